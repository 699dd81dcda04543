"""Ready-made hooks: result builders, adapters for common model outputs, pre hooks, and a checker.

A post hook in one line::

    from hooks import ultralytics_post
    post_hook = ultralytics_post(threshold=0.3)

Everything here pickles *by value* (this package registers itself with
``cloudpickle.register_pickle_by_value``), so a hook built from it runs in a backend that does not
have this package, or has another version of it. Do the same for your own modules::

    import cloudpickle, my_hooks
    cloudpickle.register_pickle_by_value(my_hooks)
"""

from __future__ import annotations

import sys

import cloudpickle

from .adapters import (
    easyocr_post,
    image_size,
    sklearn_post,
    torchvision_detection_post,
    transformers_post,
    ultralytics_post,
)
from .labelconfig import Control, HookConfigError, find_control
from .outline import mask_outline
from .pre import (
    image_features_frame,
    images_to_numpy,
    images_to_tensors,
    letterbox,
    letterbox_geometry,
    open_images,
    read_texts,
    texts_frame,
)
from .prompts import Point, PromptBox, context_boxes, context_label, context_points, sam_post
from .results import brush, certainty, choices, keypoint, number, polygon, prediction, rating, rectangle, span, textarea
from .targets import Box, Polygon, Span, boxes, choice_labels, multi_choice_labels, polygons, spans

cloudpickle.register_pickle_by_value(sys.modules[__name__])

__all__ = [
    "Box",
    "Control",
    "HookConfigError",
    "Point",
    "Polygon",
    "PromptBox",
    "Span",
    "boxes",
    "brush",
    "certainty",
    "choice_labels",
    "choices",
    "context_boxes",
    "context_label",
    "context_points",
    "easyocr_post",
    "find_control",
    "image_features_frame",
    "image_size",
    "images_to_numpy",
    "images_to_tensors",
    "keypoint",
    "letterbox",
    "letterbox_geometry",
    "mask_outline",
    "multi_choice_labels",
    "number",
    "open_images",
    "polygon",
    "polygons",
    "prediction",
    "rating",
    "read_texts",
    "rectangle",
    "sam_post",
    "sklearn_post",
    "span",
    "spans",
    "textarea",
    "texts_frame",
    "torchvision_detection_post",
    "transformers_post",
    "ultralytics_post",
]
