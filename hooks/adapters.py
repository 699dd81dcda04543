"""Ready post hooks for common model outputs, by duck typing (no heavy library is imported).

Each factory takes options (score threshold, label map, control names) and returns a post hook
``post(output, label_config=..., inputs=...)`` that gives one prediction per task. The backend passes
the project's labeling config (names and labels come from it) and the pre hook's inputs (the image
files, whose real size sets the percentages).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from . import results as r
from .labelconfig import Control, find_control, has_control

PostHook = Callable[..., list[dict[str, Any]]]


def _array(value: Any) -> Any:
    """A numpy array from numpy, torch (any device) or nested lists."""
    import numpy as np

    for step in ("detach", "cpu", "numpy"):
        if hasattr(value, step) and not isinstance(value, np.ndarray):
            value = getattr(value, step)()
    return np.asarray(value)


def image_size(path: Any) -> tuple[int, int]:
    """(width, height) of an image file, reading only its header."""
    from PIL import Image

    with Image.open(path) as image:
        return image.size


def _control(label_config: str | None, tags: str | Sequence[str], options: Mapping[str, Any]) -> Control:
    from_name, to_name = options.get("from_name"), options.get("to_name")
    if label_config:
        return find_control(
            label_config, tags, from_name, to_name, options.get("label_map"), options.get("on_unknown", "skip")
        )
    if not from_name or not to_name:
        raise ValueError("without the labeling config, pass from_name= and to_name= to the hook factory")
    first = tags if isinstance(tags, str) else tags[0]
    return Control(
        from_name, to_name, first, (), dict(options.get("label_map") or {}), options.get("on_unknown", "skip")
    )


def _prediction(found: list[dict[str, Any]], model_version: str | None, score: str, probabilities: Any) -> dict[str, Any]:
    """A task's prediction, scored by ``score`` from the class probabilities where the model gave them
    (a classifier), by its regions' mean score where it did not (a detector)."""
    if probabilities is None:
        return r.prediction(found, model_version=model_version)
    return r.prediction(found, model_version=model_version, score=score, probabilities=probabilities)


def _per_task(output: Any, inputs: Sequence[Any] | None) -> list[Any]:
    items = list(output) if not isinstance(output, dict) else [output]
    if inputs is not None and len(items) != len(inputs):
        raise ValueError(f"the model gave {len(items)} outputs for {len(inputs)} inputs")
    return items


def _size_of(inputs: Sequence[Any] | None, index: int, fallback: tuple[int, int] | None = None) -> tuple[int, int]:
    if fallback is not None:
        return fallback
    if inputs is None:
        raise ValueError("this hook needs the image files for their size: the backend passes them as inputs=")
    return image_size(inputs[index])


def _undo_letterbox(points: Any, size: tuple[int, int], letterbox: int | None) -> Any:
    """Model coordinates in a ``letterbox`` x ``letterbox`` square back to the original image's pixels."""
    if not letterbox:
        return points
    from .pre import letterbox_geometry

    scale, pad_x, pad_y = letterbox_geometry(size, letterbox)
    out = _array(points).astype(float).copy()
    out[..., 0::2] = (out[..., 0::2] - pad_x) / scale
    out[..., 1::2] = (out[..., 1::2] - pad_y) / scale
    return out


# --- detection and segmentation ------------------------------------------------------------------


def ultralytics_post(
    threshold: float = 0.25,
    label_map: Mapping[Any, str | None] | None = None,
    on_unknown: str = "skip",
    model_version: str | None = None,
    score: str = "max",
    **names: str,
) -> PostHook:
    """Ultralytics-style results (``boxes``, ``masks``, ``keypoints``, ``probs``, ``names``, ``orig_shape``).

    Boxes become RectangleLabels; masks become PolygonLabels (or BrushLabels if that is what the
    config has); keypoints become KeyPointLabels; classification ``probs`` become Choices, scored by
    ``score`` (``"max"``, ``"margin"`` or ``"entropy"`` of the probabilities: ``results.certainty``).
    """
    options = {"label_map": label_map, "on_unknown": on_unknown, **names}

    def post(output: Any, label_config: str | None = None, inputs: Sequence[Any] | None = None) -> list[dict[str, Any]]:
        predictions = []
        for item in _per_task(output, inputs):
            height, width = (int(v) for v in item.orig_shape[:2])  # orig_shape is (height, width)
            class_names = getattr(item, "names", None)
            found: list[dict[str, Any]] = []
            probs = None
            if getattr(item, "probs", None) is not None:
                control = _control(label_config, "Choices", options)
                probs = _array(getattr(item.probs, "data", item.probs)).reshape(-1)
                top = int(probs.argmax())
                label = control.label(top, class_names)
                if label is not None:
                    found.append(
                        r.choices(label, from_name=control.from_name, to_name=control.to_name, score=float(probs[top]))
                    )
            boxes = getattr(item, "boxes", None)
            masks = getattr(item, "masks", None)
            keypoints = getattr(item, "keypoints", None)
            if boxes is not None and len(boxes):
                classes, scores = _array(boxes.cls).astype(int), _array(boxes.conf).astype(float)
                keep = [i for i in range(len(scores)) if scores[i] >= threshold]
                if (
                    masks is not None
                    and label_config
                    and (has_control(label_config, "PolygonLabels") or has_control(label_config, "BrushLabels"))
                ):
                    found += _masks(masks, keep, classes, scores, class_names, width, height, label_config, options)
                elif keypoints is not None and label_config and has_control(label_config, "KeyPointLabels"):
                    found += _keypoints(
                        keypoints, keep, classes, scores, class_names, width, height, label_config, options
                    )
                else:
                    control = _control(label_config, "RectangleLabels", options)
                    found += _rectangles(control, _array(boxes.xyxy), classes, scores, keep, class_names, width, height)
            predictions.append(_prediction(found, model_version, score, probs))
        return predictions

    return post


def _regions(control: Control, keep, classes, scores, class_names, build) -> list[dict[str, Any]]:
    """One result per kept detection whose class maps to a config label: ``build(i, label, names)``
    makes it (``names``: the control's from/to names and the score), or returns None to drop it."""
    found = []
    for i in keep:
        label = control.label(classes[i].item() if hasattr(classes[i], "item") else classes[i], class_names)
        if label is None:
            continue
        region = build(i, label, {"from_name": control.from_name, "to_name": control.to_name, "score": scores[i]})
        if region is not None:
            found.append(region)
    return found


def _rectangles(control, xyxy, classes, scores, keep, class_names, width, height) -> list[dict[str, Any]]:
    """Pixel xyxy boxes to RectangleLabels results."""
    build = lambda i, label, names: r.rectangle(xyxy[i], label, width=width, height=height, **names)
    return _regions(control, keep, classes, scores, class_names, build)


def _brushes(control, masks, classes, scores, keep, class_names, width, height) -> list[dict[str, Any]]:
    """Per-detection masks (any size; resized to the image) to BrushLabels results."""

    build = lambda i, label, names: r.brush(_image_mask(masks, i, width, height), label, **names)

    return _regions(control, keep, classes, scores, class_names, build)


def _outlines(control, masks, classes, scores, keep, class_names, width, height) -> list[dict[str, Any]]:
    """Per-detection masks (any size; resized to the image) to PolygonLabels results along their outlines."""
    from .outline import mask_outline

    def build(i, label, names):
        points = mask_outline(_image_mask(masks, i, width, height))
        return r.polygon(points, label, width=width, height=height, **names) if len(points) >= 3 else None

    return _regions(control, keep, classes, scores, class_names, build)


def _masks(masks, keep, classes, scores, class_names, width, height, label_config, options) -> list[dict[str, Any]]:
    if has_control(label_config, "PolygonLabels") and getattr(masks, "xy", None) is not None:
        control = _control(label_config, "PolygonLabels", options)

        def build(i, label, names):
            points = _array(masks.xy[i])
            return r.polygon(points, label, width=width, height=height, **names) if len(points) >= 3 else None

        return _regions(control, keep, classes, scores, class_names, build)
    control = _control(label_config, "BrushLabels", options)
    return _brushes(control, _array(masks.data), classes, scores, keep, class_names, width, height)


def _image_mask(masks: Any, index: int, width: int, height: int) -> Any:
    """Detection ``index``'s mask at the image's size: as it is where it already is, else ``_resize_mask``."""
    mask = masks[index].reshape(masks.shape[-2:])
    return mask if mask.shape == (height, width) else _resize_mask(mask, width, height)


def _resize_mask(mask: Any, width: int, height: int) -> Any:
    """A mask at the model's input size back to the image's: the centred letterbox padding a YOLO input
    has (none where the aspect ratios agree) cut off, then resized."""
    import numpy as np
    from PIL import Image

    rows, columns = mask.shape
    gain = min(rows / height, columns / width)
    pad_x, pad_y = (columns - width * gain) / 2, (rows - height * gain) / 2
    top, left = round(pad_y - 0.1), round(pad_x - 0.1)
    mask = mask[top : rows - round(pad_y + 0.1), left : columns - round(pad_x + 0.1)]
    return np.asarray(Image.fromarray((mask > 0.5).astype(np.uint8) * 255).resize((width, height), Image.Resampling.NEAREST)) > 0


def _keypoints(
    keypoints, keep, classes, scores, class_names, width, height, label_config, options
) -> list[dict[str, Any]]:
    control = _control(label_config, "KeyPointLabels", options)
    xy = _array(keypoints.xy)
    point_names = options.get("keypoint_names")
    found = []
    for i in keep:
        for k, (x, y) in enumerate(xy[i]):
            if x <= 0 and y <= 0:
                continue  # ultralytics marks invisible keypoints with (0, 0)
            label = control.label(
                point_names[k] if point_names else int(classes[i]), None if point_names else class_names
            )
            if label is not None:
                found.append(
                    r.keypoint(
                        float(x),
                        float(y),
                        label,
                        width=width,
                        height=height,
                        from_name=control.from_name,
                        to_name=control.to_name,
                        score=scores[i],
                    )
                )
    return found


def torchvision_detection_post(
    threshold: float = 0.5,
    label_map: Mapping[Any, str | None] | None = None,
    class_names: Sequence[str] | Mapping[int, str] | None = None,
    letterbox: int | None = None,
    on_unknown: str = "skip",
    model_version: str | None = None,
    **names: str,
) -> PostHook:
    """torchvision detection dicts (``boxes`` in pixel xyxy, ``labels``, ``scores``; ``masks`` optional) per image.

    Boxes become RectangleLabels; with ``masks`` (Mask R-CNN), PolygonLabels along each mask's outline
    or BrushLabels, whichever the config has. The image size comes from the files (``inputs``);
    ``letterbox`` undoes the pre hook's letterbox.
    """
    options = {"label_map": label_map, "on_unknown": on_unknown, **names}

    def post(output: Any, label_config: str | None = None, inputs: Sequence[Any] | None = None) -> list[dict[str, Any]]:
        predictions = []
        for index, item in enumerate(_per_task(output, inputs)):
            width, height = _size_of(inputs, index)
            boxes = _undo_letterbox(_array(item["boxes"]).reshape(-1, 4), (width, height), letterbox)
            labels, scores = _array(item["labels"]).reshape(-1), _array(item["scores"]).reshape(-1).astype(float)
            keep = [i for i in range(len(scores)) if scores[i] >= threshold]
            found = []
            if "masks" in item and label_config and has_control(label_config, "PolygonLabels"):
                control = _control(label_config, "PolygonLabels", options)
                found += _outlines(control, _array(item["masks"]), labels, scores, keep, class_names, width, height)
            elif "masks" in item and label_config and has_control(label_config, "BrushLabels"):
                control = _control(label_config, "BrushLabels", options)
                found += _brushes(control, _array(item["masks"]), labels, scores, keep, class_names, width, height)
            else:
                control = _control(label_config, "RectangleLabels", options)
                found += _rectangles(control, boxes, labels, scores, keep, class_names, width, height)
            predictions.append(r.prediction(found, model_version=model_version))
        return predictions

    return post


# --- classification ------------------------------------------------------------------------------


def sklearn_post(
    classes: Sequence[Any] | None = None,
    label_map: Mapping[Any, str | None] | None = None,
    on_unknown: str = "error",
    model_version: str | None = None,
    score: str = "max",
    **names: str,
) -> PostHook:
    """scikit-learn ``predict`` (one label per row) or ``predict_proba`` (one row of probabilities,
    with ``classes`` = the estimator's ``classes_``) to Choices; a row of probabilities scores its task
    by ``score``: ``"max"``, ``"margin"`` or ``"entropy"`` (``results.certainty``)."""
    options = {"label_map": label_map, "on_unknown": on_unknown, **names}

    def post(output: Any, label_config: str | None = None, inputs: Sequence[Any] | None = None) -> list[dict[str, Any]]:
        control = _control(label_config, "Choices", options)
        values = _array(output.values if hasattr(output, "values") and hasattr(output, "columns") else output)
        predictions = []
        for row in values if values.ndim > 1 and values.shape[-1] > 1 else values.reshape(-1):
            probabilities = row if values.ndim > 1 and values.shape[-1] > 1 else None
            if probabilities is not None:
                top = int(row.argmax())
                label = control.label(classes[top]) if classes is not None else control.label(top, list(control.labels))
                top_score: float | None = float(row[top])
            else:
                label, top_score = control.label(row.item() if hasattr(row, "item") else row), None
            found = (
                []
                if label is None
                else [r.choices(label, from_name=control.from_name, to_name=control.to_name, score=top_score)]
            )
            predictions.append(_prediction(found, model_version, score, probabilities))
        return predictions

    return post


def transformers_post(
    task: str = "auto",
    threshold: float = 0.0,
    label_map: Mapping[Any, str | None] | None = None,
    on_unknown: str = "skip",
    model_version: str | None = None,
    score: str = "max",
    **names: str,
) -> PostHook:
    """transformers pipeline outputs, one per input: text/image classification (``[{label, score}]``, best
    first, or MLflow's pyfunc DataFrame of ``label`` and ``score``) to Choices; token classification
    (``[{entity_group|entity, start, end, score}]``) to Labels spans on the input text; speech recognition
    (``{"text"}``) to a TextArea. ``task="auto"`` tells them apart. A classification scores its task by
    ``score``, ``"max"``, ``"margin"`` or ``"entropy"`` of the class scores it has (``top_k=None`` gives
    them all; with only the winner's, the rest counts as one class more: ``results.certainty``)."""
    options = {"label_map": label_map, "on_unknown": on_unknown, **names}

    def post(output: Any, label_config: str | None = None, inputs: Sequence[Any] | None = None) -> list[dict[str, Any]]:
        predictions = []
        if hasattr(output, "to_dict") and hasattr(output, "columns"):  # MLflow's pyfunc: a row of label, score per input
            output = output.to_dict("records")
        for index, item in enumerate(_per_task(output, inputs) if not isinstance(output, dict) else [output]):
            kind = task if task != "auto" else _transformers_kind(item)
            found: list[dict[str, Any]] = []
            probabilities = None
            if kind == "asr":
                control = _control(label_config, "TextArea", options)
                found.append(
                    r.textarea(str(item["text"]).strip(), from_name=control.from_name, to_name=control.to_name)
                )
            elif kind == "token-classification":
                control = _control(label_config, "Labels", options)
                text = _text_of(inputs, index)
                for entity in _spans_of(item, text):
                    if float(entity.get("score", 1.0)) < threshold:
                        continue
                    label = control.label(entity.get("entity_group") or entity.get("entity", "").split("-")[-1])
                    if label is not None:
                        found.append(
                            r.span(
                                int(entity["start"]),
                                int(entity["end"]),
                                label,
                                text=text,
                                from_name=control.from_name,
                                to_name=control.to_name,
                                score=entity.get("score"),
                            )
                        )
            else:
                control = _control(label_config, "Choices", options)
                ranked = [item] if isinstance(item, dict) else sorted(item, key=lambda e: -float(e["score"]))
                probabilities = [float(e["score"]) for e in ranked] or None
                best: dict[str, Any] | None = ranked[0] if ranked else None
                label = control.label(best["label"]) if best and float(best["score"]) >= threshold else None
                if best is not None and label is not None:
                    found.append(
                        r.choices(
                            label, from_name=control.from_name, to_name=control.to_name, score=float(best["score"])
                        )
                    )
            predictions.append(_prediction(found, model_version, score, probabilities))
        return predictions

    return post


def _spans_of(entities: Sequence[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    """Entities as spans. A pipeline run without an aggregation strategy (one loaded from MLflow keeps
    none) answers per token: consecutive tokens of one entity, only spaces between them, become one span
    (``B-`` starts a new one), scored by their mean, as aggregation_strategy="simple" would have."""
    if not entities or "entity_group" in entities[0]:
        return list(entities)
    merged: list[dict[str, Any]] = []
    scores: list[list[float]] = []
    for entity in sorted(entities, key=lambda e: int(e["start"])):
        tag = str(entity.get("entity", ""))
        label = tag.split("-", 1)[1] if tag[:2] in ("B-", "I-") else tag
        last = merged[-1] if merged else None
        if (last is not None and last["entity_group"] == label and not tag.startswith("B-")
                and not text[int(last["end"]):int(entity["start"])].strip()):
            last["end"] = int(entity["end"])
            scores[-1].append(float(entity.get("score", 1.0)))
            last["score"] = sum(scores[-1]) / len(scores[-1])
            continue
        merged.append({"entity_group": label, "start": int(entity["start"]), "end": int(entity["end"]),
                       "score": float(entity.get("score", 1.0))})
        scores.append([float(entity.get("score", 1.0))])
    return merged


def _transformers_kind(item: Any) -> str:
    if isinstance(item, dict):
        return "asr" if "text" in item and "label" not in item else "classification"
    first = item[0] if item else {}
    return (
        "token-classification" if isinstance(first, dict) and "start" in first and "end" in first else "classification"
    )


def _text_of(inputs: Sequence[Any] | None, index: int) -> str:
    if inputs is None:
        raise ValueError("span labels need the task's text: the backend passes it as inputs=")
    value = inputs[index]
    if isinstance(value, str) and len(value) < 4096 and "\n" not in value:
        from pathlib import Path

        path = Path(value)
        if path.is_file():
            return path.read_text()
    return str(value)


# --- OCR -----------------------------------------------------------------------------------------


def easyocr_post(
    threshold: float = 0.0,
    label: str | None = None,
    polygons: bool = False,
    model_version: str | None = None,
    **names: str,
) -> PostHook:
    """easyocr-style ``[(four corner points, text, confidence), ...]`` per image to regions (rectangles,
    or polygons) with a per-region TextArea holding the text, sharing the region's id."""
    options = dict(names)

    def post(output: Any, label_config: str | None = None, inputs: Sequence[Any] | None = None) -> list[dict[str, Any]]:
        predictions = []
        for index, detections in enumerate(_per_task(output, inputs)):
            width, height = _size_of(inputs, index)
            region_tag = "PolygonLabels" if polygons else "RectangleLabels"
            regions = _control(label_config, region_tag, {**options, "from_name": options.get("region_from_name")})
            text = _control(label_config, "TextArea", {**options, "from_name": options.get("text_from_name")})
            region_label = label or (regions.labels[0] if regions.labels else "Text")
            found = []
            for corners, words, confidence in detections:
                if float(confidence) < threshold:
                    continue
                points = _array(corners).reshape(-1, 2).astype(float)
                if polygons:
                    region = r.polygon(points, region_label, width=width, height=height, from_name=regions.from_name,
                                       to_name=regions.to_name, score=float(confidence))
                else:
                    box = (points[:, 0].min(), points[:, 1].min(), points[:, 0].max(), points[:, 1].max())
                    region = r.rectangle(box, region_label, width=width, height=height, from_name=regions.from_name,
                                         to_name=regions.to_name, score=float(confidence))
                found += [
                    region,
                    r.textarea(
                        str(words),
                        from_name=text.from_name,
                        to_name=text.to_name,
                        score=float(confidence),
                        region=region,
                    ),
                ]
            predictions.append(r.prediction(found, model_version=model_version))
        return predictions

    return post
