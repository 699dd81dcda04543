"""Hooks for the demo brightness model: what a user writes for a classification project.

``pre_hook`` turns the tasks' image files into the model's input (mean grey level, 0..1);
``post_hook`` turns the model's labels into one Label Studio prediction per task.
"""

from __future__ import annotations

import base64
import sys

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
    """What the dagshub client does to a hook, with the hook's module pickled by value.

    cloudpickle pickles functions of importable modules by reference; registering the module by
    value makes the backend independent of it, as for a function written in a notebook.
    """
    module = sys.modules.get(fn.__module__)
    if module is not None and fn.__module__ != "__main__":
        cloudpickle.register_pickle_by_value(module)
    return base64.b64encode(cloudpickle.dumps(fn)).decode()


def brightness_pre(paths):
    import numpy as np
    from PIL import Image

    return np.array([[np.asarray(Image.open(p).convert("L"), dtype=float).mean() / 255.0] for p in paths])


def choices_post(labels):
    return [
        {"result": [{"from_name": "brightness", "to_name": "image", "type": "choices", "value": {"choices": [str(label)]}}]}
        for label in labels
    ]


def sentiment_post(labels):
    return [
        {"result": [{"from_name": "sentiment", "to_name": "text", "type": "choices", "value": {"choices": [str(label)]}}]}
        for label in labels
    ]


def sentiment_train(texts, annotations, params=None):
    """A train_hook: a text classifier fitted to what annotators chose; it improves as you label."""
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    from hooks import choice_labels

    params = params or {}
    model = make_pipeline(CountVectorizer(), LogisticRegression(C=float(params.get("C", 10.0))))
    return model.fit(texts, choice_labels(annotations))
