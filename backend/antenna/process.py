"""One ``POST /process``: Antenna's images through the configured hooks and model, as its results.

Images are fetched by the backend's own fetcher (concurrent, cached on disk, the same limits as Label
Studio's task data). Each image is one task for the hooks; for a pipeline that classifies whole
images, each detection Antenna sends back is one task instead, its crop cut from the image (or
fetched from its ``crop_image_url``). Tasks go through the same batcher as ``/predict``. An image that
cannot be fetched or read is named in ``errors`` and echoed with no detections; only a hook's or the
model's failure fails the whole request, as it does for Label Studio.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from backend.antenna.convert import Stamp, Unit, from_antenna, from_label_studio
from backend.antenna.wire import BoundingBox, ExistingDetection, PipelineRequest, SourceImage, now
from backend.config.antenna_pipeline import PipelineDefinition
from backend.core.redact import redact
from backend.labeling.validation import PredictionCompleter, data_objects, validate_predictions
from backend.serving.prediction import StageTimer, predict_tasks
from backend.serving.runtime import Serving
from backend.tasks.fetcher import FetchError, PendingInputs, TaskDataFetcher, TaskInput, dagshub_access
from backend.tasks.labelstudio import LabelStudioAccess


@dataclass
class ProcessContext:
    """What one /process stands on."""

    serving: Serving
    pipeline: PipelineDefinition
    fetcher: TaskDataFetcher
    label_studio: LabelStudioAccess
    deadline: float
    timer: StageTimer | None = None
    on_images: Callable[[int, int], None] | None = None  # (processed, failed), for the metrics


def image_size(path: str) -> tuple[int, int]:
    """(width, height) from the file's header; FetchError when it is not an image Pillow reads."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.size
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise FetchError(f"it is not an image Pillow can read ({type(exc).__name__})") from None


def process(request: PipelineRequest, ctx: ProcessContext) -> dict[str, Any]:
    """``PipelineResultsResponse`` for the request."""
    started = time.perf_counter()
    errors: list[str] = []
    images = _fetch_images(request.source_images, ctx, errors)
    units = _units(request, images, ctx, errors)
    detections: list[dict[str, Any]] = []
    if units:
        detections = _predict(units, request, ctx, errors)
    if ctx.on_images is not None:
        ctx.on_images(len(images), len(request.source_images) - len(images))
    return {
        "pipeline": request.pipeline,
        "total_time": time.perf_counter() - started,
        "algorithms": {},
        "source_images": [image.echo() for image in request.source_images],
        "detections": detections,
        "errors": errors or None,
    }


def _task(image: SourceImage, ctx: ProcessContext, request: PipelineRequest | None = None,
          existing: ExistingDetection | None = None) -> dict[str, Any]:
    """A Label Studio-shaped task for the hooks: the image's URL as its data, Antenna's request in its meta."""
    meta: dict[str, Any] = {"source_image": image.echo(), "pipeline": ctx.pipeline.slug}
    if request is not None:
        meta["config"] = request.config
    if existing is not None:
        meta["detection"] = {"bbox": existing.bbox.as_dict() if existing.bbox else None, "algorithm": existing.algorithm}
    return {"id": image.id, "data": {ctx.pipeline.image_key: image.url}, "meta": {"antenna": meta}}


def _fetch_images(sources: list[SourceImage], ctx: ProcessContext, errors: list[str]) -> dict[str, tuple[str, tuple[int, int]]]:
    """Each image's local path and size, by id; what fails is added to ``errors``."""
    objects = data_objects(ctx.serving.spec.label_config)
    tasks = [_task(image, ctx) for image in sources]
    pending = ctx.fetcher.start_tasks(tasks, objects, ctx.label_studio, dagshub_access(ctx.serving.spec))
    found: dict[str, tuple[str, tuple[int, int]]] = {}
    for index, image in enumerate(sources):
        task_input = pending.wait(index, ctx.deadline)
        try:
            if task_input is None:
                raise FetchError("it was not fetched before the deadline (PROCESS_TIMEOUT_S)")
            if task_input.error:
                raise FetchError(task_input.error)
            found[image.id] = (task_input.value, image_size(task_input.value))
        except FetchError as exc:
            errors.append(f"image {image.id}: {redact(str(exc))}")
    if ctx.timer is not None:
        ctx.timer("fetch", pending.fetch_seconds)
    return found


def _units(request: PipelineRequest, images: dict[str, tuple[str, tuple[int, int]]], ctx: ProcessContext,
           errors: list[str]) -> list[Unit]:
    """What the hooks are given: each image, or for a whole-image classifier the crops Antenna sent."""
    by_image: dict[str, list[ExistingDetection]] = {}
    if ctx.pipeline.whole_image:
        known = {image.id for image in request.source_images}
        for existing in request.detections:
            if existing.source_image.id not in known:
                errors.append(f"image {existing.source_image.id}: a detection names it, but it is not in source_images")
                continue
            by_image.setdefault(existing.source_image.id, []).append(existing)
    units = []
    for image in request.source_images:
        if image.id not in images:
            continue
        path, size = images[image.id]
        if image.id not in by_image:
            units.append(Unit(image, path, size))
            continue
        for existing in by_image[image.id]:
            try:
                units.append(_crop(image, path, size, existing, ctx))
            except FetchError as exc:
                errors.append(f"image {image.id}: {redact(str(exc))}")
    return units


def _crop(image: SourceImage, path: str, size: tuple[int, int], existing: ExistingDetection, ctx: ProcessContext) -> Unit:
    """The detection's crop as a file: fetched from its crop_image_url, or cut from the image and cached."""
    box = existing.bbox.clipped(*size) if existing.bbox else BoundingBox(0.0, 0.0, float(size[0]), float(size[1]))
    if existing.crop_image_url:
        try:
            crop_path = ctx.fetcher.fetch_one(existing.crop_image_url, image.id, ctx.label_studio)
            return Unit(image, crop_path, image_size(crop_path), existing, box)
        except FetchError:
            pass  # Antenna crops later when it has none stored; cut it from the image instead
    if box.empty:
        raise FetchError(f"the detection's bbox {existing.bbox.as_dict() if existing.bbox else None} "
                         f"has no area inside the {size[0]}x{size[1]} image")
    pixels = (round(box.x1), round(box.y1), round(box.x2), round(box.y2))
    key = f"{image.url}#crop={','.join(map(str, pixels))}"
    cache = ctx.fetcher.cache
    cached = cache.lookup(key, ".png")
    if cached is not None:
        crop_path = cached
    else:
        from PIL import Image

        buffer = io.BytesIO()
        try:
            with Image.open(path) as whole:
                whole.crop(pixels).convert("RGB").save(buffer, format="PNG")
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise FetchError(f"its crop could not be cut ({type(exc).__name__}: {exc})") from None
        crop_path = cache.store(key, ".png", [buffer.getvalue()], ctx.fetcher.limits.max_file_bytes, "FETCH_MAX_MB")
    return Unit(image, crop_path, (pixels[2] - pixels[0], pixels[3] - pixels[1]), existing, box)


def _predict(units: list[Unit], request: PipelineRequest, ctx: ProcessContext, errors: list[str]) -> list[dict[str, Any]]:
    serving, pipeline = ctx.serving, ctx.pipeline
    label_config = serving.spec.label_config
    tasks = [_task(unit.image, ctx, request, unit.detection) for unit in units]
    inputs = PendingInputs([TaskInput(value=unit.path) for unit in units], {}, data_objects(label_config))
    started = time.perf_counter()
    outcome = predict_tasks(serving, tasks, inputs, label_config=label_config, deadline=ctx.deadline, timer=ctx.timer,
                            raw=True, deadline_setting="PROCESS_TIMEOUT_S")
    stamp = Stamp(now(), round((time.perf_counter() - started) / len(units), 6))
    for index, message in sorted(outcome.errors.items()):
        errors.append(f"image {units[index].image.id}: {redact(message)}")
    complete = PredictionCompleter(serving.model_version)
    converted: list[tuple[int, Any]] = []  # (unit index, Antenna-shaped dict or a completed Label Studio prediction)
    for index, output in enumerate(outcome.items):
        if index in outcome.errors:
            continue
        if isinstance(output, dict) and "detections" in output and "result" not in output:
            converted.append((index, output))
        else:
            converted.append((index, complete(output, tasks[index], index)))
    studio = [(i, p) for i, p in converted if "result" in p]
    validate_predictions([p for _, p in studio], [tasks[i] for i, _ in studio], label_config)
    detections: list[dict[str, Any]] = []
    for index, output in converted:
        unit = units[index]
        made = from_label_studio(output, unit, pipeline, stamp) if "result" in output else from_antenna(output, unit, pipeline, stamp)
        detections.extend(made)
    return detections

