"""Antenna's wire schemas as pydantic models, and a client that registers and runs a service the way
Antenna's platform code does (``ami/ml/models/processing_service.py`` and ``pipeline.py`` at
``731cc2a2``; ``../shared/ANTENNA.md`` has every field and rule used here).

The response models follow the processing services' own copies (pydantic v2, the stricter side),
with ``extra="forbid"`` so that a misspelt field fails, and are validated in strict JSON mode: a
number where Antenna wants a string fails too.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from urllib.parse import urljoin

import requests
from pydantic import BaseModel, ConfigDict, Field
from requests.adapters import HTTPAdapter
from urllib3.util import Retry

DETECTION_TYPES = {"detection", "localization", "segmentation"}
CLASSIFICATION_TYPES = {"classification", "tagging"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class BoundingBox(_Strict):
    x1: float
    y1: float
    x2: float
    y2: float


class AlgorithmReference(_Strict):
    name: str
    key: str


class AlgorithmCategoryMapResponse(_Strict):
    data: list[dict[str, Any]] = Field(default_factory=list)
    labels: list[str] = []
    version: str | None = None
    description: str | None = None
    uri: str | None = None


class AlgorithmConfigResponse(_Strict):
    name: str
    key: str
    description: str | None = None
    task_type: str | None = None
    version: int = 1
    version_name: str | None = None
    uri: str | None = None
    category_map: AlgorithmCategoryMapResponse | None = None


class PipelineStageParam(_Strict):
    name: str
    key: str
    category: str = "default"


class PipelineStage(_Strict):
    key: str
    name: str
    params: list[PipelineStageParam] = []
    description: str | None = None


class PipelineConfigResponse(_Strict):
    name: str
    slug: str
    version: int
    description: str | None = None
    algorithms: list[AlgorithmConfigResponse] = []
    stages: list[PipelineStage] = []


class ProcessingServiceInfoResponse(_Strict):
    name: str
    description: str | None = None
    pipelines: list[PipelineConfigResponse] = Field(default_factory=list)


class SourceImageResponse(_Strict):
    id: str
    url: str


class ClassificationResponse(_Strict):
    classification: str
    labels: list[str] | None = None
    scores: list[float] = Field(default_factory=list)
    logits: list[float] = Field(default_factory=list)
    inference_time: float | None = None
    algorithm: AlgorithmReference
    terminal: bool = True
    timestamp: datetime


class DetectionResponse(_Strict):
    source_image_id: str
    bbox: BoundingBox
    inference_time: float | None = None
    algorithm: AlgorithmReference
    timestamp: datetime
    crop_image_url: str | None = None
    classifications: list[ClassificationResponse] = []


class PipelineResultsResponse(_Strict):
    pipeline: str
    total_time: float
    algorithms: dict[str, AlgorithmConfigResponse] = {}
    source_images: list[SourceImageResponse]
    detections: list[DetectionResponse]
    errors: list[Any] | str | None = None


def processing_request(slug: str, images: list[tuple[str, str]], detections: list[dict] | None = None,
                       config: dict | None = None) -> dict[str, Any]:
    """A ``PipelineRequest`` as the platform's ``.dict()`` writes it: ``detections`` [] and ``config`` {} by default."""
    return {
        "pipeline": slug,
        "source_images": [{"id": image_id, "url": url} for image_id, url in images],
        "detections": detections or [],
        "config": config or {},
    }


class AntennaPlatform:
    """Registers a processing service and runs jobs on it as the platform does, checking what it saves."""

    def __init__(self, endpoint_url: str) -> None:
        self.endpoint_url = endpoint_url
        self.algorithms: dict[str, AlgorithmConfigResponse] = {}  # key -> algorithm, global as in Antenna's DB
        self.pipelines: dict[str, PipelineConfigResponse] = {}
        self.failures: list[str] = []  # "Failed to process ..." log lines

    def get_status(self) -> list[str]:
        """``ProcessingService.get_status``: /readyz joined relatively, retried on 5xx, a list of slugs."""
        session = requests.Session()
        retry = Retry(total=3, read=3, connect=3, backoff_factor=0.1, status_forcelist=(500, 502, 503, 504))
        session.mount("http://", HTTPAdapter(max_retries=retry))
        response = session.get(urljoin(self.endpoint_url, "readyz"), timeout=90)
        response.raise_for_status()
        online = response.json().get("status", [])
        assert isinstance(online, list) and all(isinstance(s, str) for s in online), online
        return online

    def register_pipelines(self) -> ProcessingServiceInfoResponse:
        """``create_pipelines``: /info with a 6 s timeout and no retry, then the checks saving does."""
        response = requests.get(urljoin(self.endpoint_url, "info"), timeout=6)
        response.raise_for_status()
        info = ProcessingServiceInfoResponse.model_validate_json(response.text)
        for pipeline in info.pipelines:
            detectors = [a for a in pipeline.algorithms if a.task_type in DETECTION_TYPES]
            assert len(detectors) == 1, f"{pipeline.slug}: {len(detectors)} detection algorithms"
            for algorithm in pipeline.algorithms:
                if algorithm.task_type in CLASSIFICATION_TYPES:
                    assert algorithm.category_map and algorithm.category_map.data, f"{algorithm.key} has no category map"
                    assert [d["label"] for d in algorithm.category_map.data] == algorithm.category_map.labels
                    assert [d["index"] for d in algorithm.category_map.data] == list(range(len(algorithm.category_map.data)))
                known = self.algorithms.get(algorithm.key)
                assert known is None or known.name == algorithm.name, f"key {algorithm.key} reused for another algorithm"
                self.algorithms[algorithm.key] = algorithm
            self.pipelines[pipeline.slug] = pipeline
        return info

    def process(self, slug: str, images: list[tuple[str, str]], detections: list[dict] | None = None,
                config: dict | None = None) -> PipelineResultsResponse | None:
        """One ``/process`` call, joined absolutely, no timeout; None (and a logged failure) on non-2xx."""
        body = processing_request(slug, images, detections, config)
        response = requests.post(urljoin(self.endpoint_url, "/process"), json=body)
        if not response.ok:
            try:
                detail = response.json().get("detail")
            except ValueError:
                detail = response.text[:500]
            self.failures.append(f"Failed to process: HTTP {response.status_code}: {response.reason} | Detail: {detail}")
            return None
        results = PipelineResultsResponse.model_validate_json(response.text)
        self.check_saved(results, body)
        return results

    def run_job(self, slug: str, images: list[tuple[str, str]], batch_size: int = 1) -> list[PipelineResultsResponse]:
        """An ML job: readyz lists the pipeline, then the images in chunks of ``batch_size`` (1 by default), in turn."""
        assert slug in self.get_status(), f"{slug} is not online"
        answers = []
        for start in range(0, len(images), batch_size):
            answer = self.process(slug, images[start:start + batch_size])
            if answer is not None:
                answers.append(answer)
        return answers

    def check_saved(self, results: PipelineResultsResponse, request: dict[str, Any]) -> None:
        """What ``save_results`` needs to save every detection and classification, asserted."""
        assert results.pipeline == request["pipeline"]
        pipeline = self.pipelines[results.pipeline]
        registered = {a.key: a for a in pipeline.algorithms}
        sent = [(i["id"], i["url"]) for i in request["source_images"]]
        assert [(i.id, i.url) for i in results.source_images] == sent, "every input image is echoed, in order"
        image_ids = {image_id for image_id, _ in sent}
        existing = {(d["source_image"]["id"], tuple(d["bbox"].values())) for d in request.get("detections") or []}
        for detection in results.detections:
            assert detection.source_image_id in image_ids
            box = detection.bbox
            assert 0 <= box.x1 <= box.x2 and 0 <= box.y1 <= box.y2, box
            reused = (detection.source_image_id, (box.x1, box.y1, box.x2, box.y2)) in existing
            assert reused or detection.algorithm.key in registered, f"undeclared detector {detection.algorithm.key}"
            for found in detection.classifications:
                algorithm = registered.get(found.algorithm.key)
                assert algorithm is not None, f"undeclared classifier {found.algorithm.key}"
                assert algorithm.task_type in CLASSIFICATION_TYPES
                data = algorithm.category_map.data
                assert found.scores and len(found.scores) == len(data), "scores span the category map"
                top = found.scores.index(max(found.scores))
                assert data[top]["label"] == found.classification, "the top score is the classification's label"
                assert found.labels in (None, [d["label"] for d in data])
