"""Antenna's routes on the orchestrator: one processing service with every backend's pipeline.

Antenna joins ``/process`` to the registered address absolutely (a path prefix is dropped), so these
live at the root and ``/process`` picks the backend by the request's pipeline slug. ``/info`` comes
from what the orchestrator recorded at configure time (it answers while backends restart, never
waiting for one); ``/readyz`` asks every backend at once, briefly.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import requests
from flask import Blueprint, Response, jsonify

from backend.antenna.wire import service_info
from backend.core.errors import Unprocessable
from backend.web.bodies import json_body

from .api import orchestrator, send
from .registry import BackendRecord

antenna = Blueprint("antenna", __name__)

READYZ_TIMEOUT_S = 2.0


def _with_pipelines() -> list[BackendRecord]:
    """Configured backends whose configuration defines an Antenna pipeline, oldest first."""
    return [r for r in orchestrator().manager.registry.backends() if r.configured_at and r.model.get("pipeline")]


@antenna.get("/info")
def info():
    """Antenna: the pipelines of every configured backend."""
    records = _with_pipelines()
    description = f"One pipeline per configured model: {len(records)} of {len(orchestrator().manager.registry.backends())} backends."
    return jsonify(service_info([r.model["pipeline"] for r in records], description))


@antenna.get("/livez")
def livez():
    """Antenna: the orchestrator is alive."""
    return jsonify({"status": True})


@antenna.get("/readyz")
def readyz():
    """Antenna: the slugs whose backends are ready."""
    records = _with_pipelines()
    http = orchestrator().manager.http

    def ready(record: BackendRecord) -> list[str]:
        try:
            response = http.get(f"{record.url}/readyz", timeout=READYZ_TIMEOUT_S)
            status = response.json().get("status") if response.status_code == 200 else []
        except (requests.RequestException, ValueError, AttributeError):
            return []
        return [s for s in status if isinstance(s, str)] if isinstance(status, list) else []

    with ThreadPoolExecutor(max_workers=min(16, len(records) or 1)) as pool:
        slugs = [slug for found in pool.map(ready, records) for slug in found]
    return jsonify({"status": slugs}), (200 if slugs else 503)


@antenna.post("/process")
def process() -> Response:
    """Antenna: /process sent to the backend whose pipeline has the request's slug."""
    slug = json_body().get("pipeline")
    records = {r.model["pipeline"]["slug"]: r for r in _with_pipelines()}
    record = records.get(slug) if isinstance(slug, str) else None
    if record is None:
        known = ", ".join(repr(s) for s in sorted(records)) or "none yet (configure a model with a label_config)"
        raise Unprocessable(f"unknown pipeline {slug!r}", f"The pipelines here are {known}; GET /info lists them.")
    return send(record, "process", timeout_s=orchestrator().settings.process_timeout_s + 15.0)
