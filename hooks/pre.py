"""Ready pre hooks: images opened with Pillow, resized or letterboxed (the geometry recomputable by the
post hook from the original size), as numpy batches or a pandas DataFrame, and text files read."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

PreHook = Callable[[Sequence[Any]], Any]


def open_images(paths: Sequence[Any], mode: str = "RGB") -> list[Any]:
    """Pillow images, converted to ``mode``; EXIF rotation applied, as Label Studio shows them."""
    from PIL import Image, ImageOps

    images = []
    for path in paths:
        with Image.open(path) as image:
            images.append(ImageOps.exif_transpose(image).convert(mode))
    return images


def letterbox_geometry(size: tuple[int, int], target: int) -> tuple[float, float, float]:
    """(scale, pad_x, pad_y) that fit an image of ``size`` (width, height) into a ``target`` square, centred."""
    width, height = size
    scale = min(target / width, target / height)
    return scale, (target - round(width * scale)) / 2, (target - round(height * scale)) / 2


def letterbox(image: Any, target: int, fill: int = 114) -> Any:
    """The image scaled to fit a ``target`` square without distortion, padded with ``fill``."""
    from PIL import Image

    scale, pad_x, pad_y = letterbox_geometry(image.size, target)
    resized = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BILINEAR)
    canvas = Image.new(image.mode, (target, target), (fill,) * len(image.getbands()))
    canvas.paste(resized, (int(pad_x), int(pad_y)))
    return canvas


def images_to_numpy(
    size: int | tuple[int, int] | None = None,
    letterboxed: bool = False,
    scale: float = 1 / 255,
    channels_first: bool = False,
    dtype: str = "float32",
) -> PreHook:
    """A pre hook: image files to one (N, H, W, C) array (or N, C, H, W), resized or letterboxed to ``size``.

    Without ``size`` every image must already have the same size.
    """

    def pre(paths: Sequence[Any]) -> Any:
        import numpy as np

        images = open_images(paths)
        if size is not None:
            if letterboxed:
                square = size if isinstance(size, int) else size[0]
                images = [letterbox(image, square) for image in images]
            else:
                wh = (size, size) if isinstance(size, int) else size
                images = [image.resize(wh) for image in images]
        batch = np.stack([np.asarray(image) for image in images]).astype(dtype) * scale
        return batch.transpose(0, 3, 1, 2) if channels_first else batch

    return pre


def images_to_tensors(scale: float = 1 / 255) -> PreHook:
    """A pre hook for torchvision detection models: one (3, H, W) float tensor per image, each at its own
    size (the model resizes and batches them itself), scaled to 0..1."""

    def pre(paths: Sequence[Any]) -> list[Any]:
        import numpy as np
        import torch

        return [torch.from_numpy(np.asarray(image, dtype=np.float32) * scale).permute(2, 0, 1).contiguous()
                for image in open_images(paths)]

    return pre


def image_features_frame(columns: Sequence[str] = ("brightness",)) -> PreHook:
    """A pre hook for pyfunc models with a tabular signature: simple per-image features as a DataFrame.

    Known columns: ``brightness`` (mean grey level, 0..1), ``width``, ``height``, ``aspect``.
    """

    def pre(paths: Sequence[Any]) -> Any:
        import numpy as np
        import pandas as pd

        rows = []
        for image in open_images(paths, mode="L"):
            features = {
                "brightness": float(np.asarray(image, dtype=float).mean() / 255.0),
                "width": image.width,
                "height": image.height,
                "aspect": image.width / image.height,
            }
            rows.append({column: features[column] for column in columns})
        return pd.DataFrame(rows, columns=list(columns))

    return pre


def read_texts(values: Sequence[Any]) -> list[str]:
    """Texts: inline text as is (Label Studio's Text tags), text files read."""
    from pathlib import Path

    texts = []
    for value in values:
        path = Path(str(value)) if isinstance(value, str) and len(value) < 4096 and "\n" not in value else None
        texts.append(path.read_text() if path is not None and path.is_file() else str(value))
    return texts


def texts_frame(column: str = "text") -> PreHook:
    """A pre hook for pyfunc text models with a signature: the texts as a one-column DataFrame."""

    def pre(values: Sequence[Any]) -> Any:
        import pandas as pd

        return pd.DataFrame({column: read_texts(values)})

    return pre
