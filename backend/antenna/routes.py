"""Antenna's four routes on a backend. ``/info`` answers from the configuration alone (Antenna gives it
6 s and no retry, and it must never wait for a model); ``/readyz`` lists the pipelines a loaded model
serves; ``/process`` runs one request through the serving model. All sit at the root, where Antenna
joins ``/process`` whatever path its registered address has.
"""

from __future__ import annotations

import time
from typing import Any

from flask import Blueprint, jsonify

from backend.antenna.process import ProcessContext, process
from backend.antenna.wire import parse_request, service_info
from backend.config.antenna_pipeline import PipelineDefinition, define_pipeline
from backend.config.spec import ModelSpec
from backend.core.errors import Unprocessable
from backend.serving.runtime import Serving
from backend.web.api import services
from backend.web.bodies import json_body

antenna = Blueprint("antenna", __name__)

def _configured_spec() -> ModelSpec | None:
    """The serving configuration, else the one being loaded: what /info describes."""
    runtime = services().runtime
    if runtime.active is not None:
        return runtime.active.spec
    job = runtime.job
    return job.spec if job is not None and job.error is None else None


def _pipeline_of(spec: ModelSpec | None) -> PipelineDefinition | None:
    return define_pipeline(spec) if spec is not None else None


@antenna.get("/info")
def info():
    """Antenna: this backend's pipeline (its algorithms and category maps)."""
    spec = _configured_spec()
    pipeline = _pipeline_of(spec)
    description = (
        f"Serves {spec.model_uri}." if spec is not None else "No model is configured yet: POST /configure with a label_config."
    )
    if spec is not None and pipeline is None:
        description += " Its configuration has no label_config, so it offers Antenna no pipeline."
    return jsonify(service_info([pipeline.config()] if pipeline else [], description))


@antenna.get("/livez")
def livez():
    """Antenna: the process is alive."""
    return jsonify({"status": True})


@antenna.get("/readyz")
def readyz():
    """Antenna: the pipeline slugs that can process now."""
    active = services().runtime.active
    pipeline = _pipeline_of(active.spec if active is not None else None)
    if pipeline is None:
        detail = "no model is loaded yet" if active is None else "the configuration has no label_config, so no pipeline"
        return jsonify({"status": [], "detail": detail}), 503
    return jsonify({"status": [pipeline.slug]})


@antenna.post("/process")
def process_images():
    """Antenna: detections and classifications for a batch of source images."""
    s = services()
    deadline = time.monotonic() + s.settings.process_timeout_s
    request = parse_request(json_body())

    def count(processed: int, failed: int) -> None:
        s.metrics.antenna_images.labels("processed").inc(processed)
        s.metrics.antenna_images.labels("failed").inc(failed)

    def run(serving: Serving) -> dict[str, Any]:
        pipeline = define_pipeline(serving.spec)
        if pipeline is None or request.pipeline != pipeline.slug:
            known = f"pipeline {pipeline.slug!r}" if pipeline else "no pipeline (configure it with a label_config)"
            raise Unprocessable(f"unknown pipeline {request.pipeline!r}", f"This service runs {known}; GET /info lists it.")
        ctx = ProcessContext(
            serving, pipeline, s.fetcher, s.label_studio_access(), deadline,
            timer=lambda stage, seconds: s.metrics.stage_seconds.labels(stage).observe(seconds), on_images=count,
        )
        return process(request, ctx)

    return jsonify(s.runtime.serve(min(s.settings.configure_wait_s, s.settings.process_timeout_s), run))
