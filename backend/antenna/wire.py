"""Antenna's ``PipelineRequest`` read the way its platform writes it, and its answers' small parts.

Input is accepted in the platform's (pydantic v1) shapes, which are the loosest: ids may be numbers,
``config`` and ``detections`` may be missing or null, a detection's ``bbox`` may be null, unknown
fields are ignored. Output is written in the services' stricter shapes: a bbox on every detection,
``logits`` always a list, a ``timestamp`` everywhere (both sides then accept it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from backend.core.errors import Unprocessable


@dataclass(frozen=True)
class SourceImage:
    id: str
    url: str

    def echo(self) -> dict[str, str]:
        return {"id": self.id, "url": self.url}


@dataclass(frozen=True)
class BoundingBox:
    """Pixels of the source image: (x1, y1) top left, (x2, y2) bottom right."""

    x1: float
    y1: float
    x2: float
    y2: float

    def as_dict(self) -> dict[str, float]:
        return {"x1": self.x1, "y1": self.y1, "x2": self.x2, "y2": self.y2}

    def clipped(self, width: int, height: int) -> BoundingBox:
        return BoundingBox(_clip(self.x1, width), _clip(self.y1, height), _clip(self.x2, width), _clip(self.y2, height))

    @property
    def empty(self) -> bool:
        return self.x2 <= self.x1 or self.y2 <= self.y1


@dataclass(frozen=True)
class ExistingDetection:
    """A detection Antenna sends back to be classified again (``reprocess_existing_detections``)."""

    source_image: SourceImage
    bbox: BoundingBox | None
    algorithm: dict[str, str]
    crop_image_url: str | None = None


@dataclass(frozen=True)
class PipelineRequest:
    pipeline: str
    source_images: list[SourceImage]
    detections: list[ExistingDetection] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)


SERVICE_NAME = "MLflow backend for Label Studio and Antenna"


def service_info(pipelines: list[dict[str, Any]], description: str) -> dict[str, Any]:
    """``ProcessingServiceInfoResponse``."""
    return {"name": SERVICE_NAME, "description": description, "pipelines": pipelines}


def now() -> str:
    """A timestamp as Antenna stores it (ISO 8601; UTC, with its offset)."""
    return datetime.now(UTC).isoformat()


def _clip(value: float, limit: int) -> float:
    return min(float(limit), max(0.0, value))


def _fail(where: str, problem: str) -> Unprocessable:
    return Unprocessable(
        f"{where} {problem}",
        'Antenna sends {"pipeline": "<slug>", "source_images": [{"id": "1", "url": "https://..."}], '
        '"detections": [], "config": {}}.',
    )


def _text(value: Any, where: str, *, required: bool = True) -> str | None:
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise _fail(where, f"must be a string, got {type(value).__name__}" if value is not None else "is missing")
    return str(value)


def _source_image(value: Any, where: str) -> SourceImage:
    if not isinstance(value, dict):
        raise _fail(where, f"must be an object with 'id' and 'url', got {type(value).__name__}")
    url = value.get("url")
    if not isinstance(url, str) or not url:
        raise _fail(f"{where}.url", "must be the image's URL" if url is None else f"must be a non-empty string, got {url!r}")
    return SourceImage(str(_text(value.get("id"), f"{where}.id")), url)


def parse_bbox(value: Any, where: str) -> BoundingBox:
    """A ``BoundingBox`` object (a list is refused, as Antenna's schema refuses it)."""
    if not isinstance(value, dict):
        raise _fail(where, f"must be an object with x1, y1, x2, y2, got {type(value).__name__}")
    numbers = []
    for name in ("x1", "y1", "x2", "y2"):
        number = value.get(name)
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number):
            raise _fail(f"{where}.{name}", f"must be a finite number, got {number!r}")
        numbers.append(float(number))
    return BoundingBox(*numbers)


def parse_request(body: dict[str, Any]) -> PipelineRequest:
    """A ``PipelineRequest``, or an Unprocessable (422) naming the field, as FastAPI would."""
    slug = body.get("pipeline")
    if not isinstance(slug, str) or not slug:
        raise _fail("'pipeline'", "must be the slug of a pipeline this service lists at /info")
    images = body.get("source_images")
    if not isinstance(images, list):
        raise _fail("'source_images'", "must be a list of {id, url}" if images is not None else "is missing")
    sources = [_source_image(image, f"source_images[{i}]") for i, image in enumerate(images)]
    detections = []
    for i, item in enumerate(body.get("detections") or []):
        where = f"detections[{i}]"
        if not isinstance(item, dict):
            raise _fail(where, f"must be an object, got {type(item).__name__}")
        algorithm = item.get("algorithm")
        if not isinstance(algorithm, dict) or not isinstance(algorithm.get("key"), str):
            raise _fail(f"{where}.algorithm", "must be {name, key} of the algorithm that made the detection")
        crop = item.get("crop_image_url")
        detections.append(ExistingDetection(
            _source_image(item.get("source_image"), f"{where}.source_image"),
            None if item.get("bbox") is None else parse_bbox(item["bbox"], f"{where}.bbox"),
            {"name": str(algorithm.get("name") or algorithm["key"]), "key": algorithm["key"]},
            crop if isinstance(crop, str) and crop else None,
        ))
    config = body.get("config")
    if config is not None and not isinstance(config, dict):
        raise _fail("'config'", f"must be an object, got {type(config).__name__}")
    return PipelineRequest(slug, sources, detections, config or {})
