"""Hooks the tests send to backends, written the way users write them (self-contained functions)."""

from __future__ import annotations

import base64

import cloudpickle

IMAGE_CONFIG = (
    '<View><Image name="image" value="$image"/>'
    '<Choices name="brightness" toName="image"><Choice value="dark"/><Choice value="light"/></Choices></View>'
)
TEXT_CONFIG = (
    '<View><Text name="text" value="$text"/>'
    '<Choices name="sentiment" toName="text"><Choice value="positive"/><Choice value="negative"/></Choices></View>'
)


def encode(fn) -> str:
    """What the dagshub client does to a hook."""
    return base64.b64encode(cloudpickle.dumps(fn)).decode()


def brightness_pre(paths):
    import numpy as np
    from PIL import Image

    return np.array([[np.asarray(Image.open(p).convert("L"), dtype=float).mean() / 255.0] for p in paths])


def torch_brightness_pre(paths):
    import numpy as np
    import torch
    from PIL import Image

    values = [[np.asarray(Image.open(p).convert("L"), dtype=float).mean() / 255.0] for p in paths]
    return torch.tensor(values, dtype=torch.float32)


def choices_post(labels):
    return [
        {"result": [{"from_name": "brightness", "to_name": "image", "type": "choices", "value": {"choices": [str(label)]}}]}
        for label in labels
    ]


def torch_choices_post(logits):
    names = ["dark", "light"]
    probs = logits.softmax(dim=1)
    return [
        {
            "result": [{"from_name": "brightness", "to_name": "image", "type": "choices", "value": {"choices": [names[int(p.argmax())]]}}],
            "score": float(p.max()),
        }
        for p in probs
    ]


def sentiment_post(labels):
    return [
        {"result": [{"from_name": "sentiment", "to_name": "text", "type": "choices", "value": {"choices": [str(label)]}}]}
        for label in labels
    ]


def wrong_label_post(labels):
    """Results that do not fit IMAGE_CONFIG: a label the config does not have."""
    return [
        {"result": [{"from_name": "brightness", "to_name": "image", "type": "choices", "value": {"choices": ["purple"]}}]}
        for _ in labels
    ]


def short_post(labels):
    """One prediction too few."""
    return choices_post(labels)[:-1]


def raising_pre(paths):
    raise ValueError("this pre hook always fails")


def slow_post(labels):
    import time

    time.sleep(1.5)
    return choices_post(labels)
