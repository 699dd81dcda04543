"""``python -m hooks check --draw DIR``: each image task's prediction drawn onto its image with Pillow,
roughly as Label Studio's labeling UI will show it (boxes, polygons, brush masks, keypoints, their
labels and scores, per-region text, the chosen choices), so a user sees the geometry before
connecting anything. Coordinates are read the way Label Studio reads them: percent of the image.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

SHAPES = ("rectanglelabels", "rectangle", "polygonlabels", "polygon", "brushlabels", "brush", "keypointlabels",
          "keypoint")


def _colour(label: str) -> tuple[int, int, int]:
    """A stable, saturated colour per label."""
    digest = hashlib.blake2b(label.encode(), digest_size=3).digest()
    return tuple(64 + value * 191 // 255 for value in digest)  # type: ignore[return-value]


def _label_of(region: dict[str, Any]) -> str:
    value = region.get("value") or {}
    for key, found in value.items():
        if key.endswith("labels") and isinstance(found, list) and found:
            return ", ".join(str(label) for label in found)
    return ""


def _caption(region: dict[str, Any]) -> str:
    label = _label_of(region)
    score = region.get("score")
    return f"{label} {score:.2f}" if isinstance(score, (int, float)) and label else label


def _mask(value: dict[str, Any], region: dict[str, Any], size: tuple[int, int]) -> Any:
    """A brush's RLE as an alpha mask at the image's size."""
    import numpy as np
    from label_studio_sdk.converter.brush import decode_rle
    from PIL import Image

    width, height = int(region.get("original_width") or size[0]), int(region.get("original_height") or size[1])
    pixels = np.asarray(decode_rle(value["rle"]), dtype=np.uint8).reshape(height, width, 4)[:, :, 3]
    return Image.fromarray(pixels).resize(size)


def draw_prediction(image_path: str | Path, prediction: dict[str, Any], out_path: Path) -> Path:
    """Draw one prediction's regions on its image; returns the file written (PNG)."""
    from PIL import Image, ImageDraw

    image = Image.open(image_path).convert("RGBA")
    width, height = image.size
    overlay = Image.new("RGBA", image.size, (0, 0, 0, 0))
    pen = ImageDraw.Draw(overlay)
    line = max(1, round(min(width, height) / 200))
    notes: list[str] = []
    for region in prediction.get("result") or []:
        if not isinstance(region, dict):
            continue
        kind, value = region.get("type"), region.get("value") or {}
        colour = _colour(_label_of(region) or str(kind))
        anchor: tuple[float, float] | None = None
        if kind in ("rectanglelabels", "rectangle"):
            x, y = value["x"] * width / 100, value["y"] * height / 100
            box = (x, y, x + value["width"] * width / 100, y + value["height"] * height / 100)
            pen.rectangle(box, outline=(*colour, 255), fill=(*colour, 48), width=line)
            anchor = (box[0], box[1])
        elif kind in ("polygonlabels", "polygon"):
            points = [(px * width / 100, py * height / 100) for px, py in value["points"]]
            pen.polygon(points, outline=(*colour, 255), fill=(*colour, 48), width=line)
            anchor = min(points, key=lambda p: (p[1], p[0]))
        elif kind in ("brushlabels", "brush"):
            mask = _mask(value, region, image.size)
            overlay.paste(Image.new("RGBA", image.size, (*colour, 120)), (0, 0), mask)
            box = mask.getbbox()
            anchor = (box[0], box[1]) if box else None
        elif kind in ("keypointlabels", "keypoint"):
            x, y = value["x"] * width / 100, value["y"] * height / 100
            radius = max(2.0, float(value.get("width") or 0.5) * width / 100)
            pen.ellipse((x - radius, y - radius, x + radius, y + radius), fill=(*colour, 255))
            anchor = (x + radius, y - radius)
        elif kind == "textarea":
            text = " / ".join(str(t) for t in value.get("text") or [])
            if "x" in value:
                pen.text((value["x"] * width / 100 + line, (value["y"] + value.get("height", 0)) * height / 100),
                         text, fill=(*colour, 255))
            else:
                notes.append(text)
        elif kind == "choices":
            notes.append(f"{region.get('from_name', 'choices')}: {', '.join(map(str, value.get('choices') or []))}")
        else:
            notes.append(f"{kind}: {value}")
        if anchor is not None and _caption(region):
            pen.text((anchor[0] + line, max(0.0, anchor[1] - 12)), _caption(region), fill=(*colour, 255))
    for row, note in enumerate(notes):
        pen.text((4, 4 + 12 * row), note, fill=(255, 255, 255, 255), stroke_width=1, stroke_fill=(0, 0, 0, 255))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    Image.alpha_composite(image, overlay).convert("RGB").save(out_path)
    return out_path
