"""Models with a known cost, for the benchmarks: ``fixed_ms`` per call plus ``per_item_ms`` per row.

``CostModel`` sleeps rather than computes so the cost is the same on a busy machine, and holds one
lock while it does: like a GPU, the "device" runs one call at a time (sleeps alone would run in
parallel in a threaded server, which no real accelerator does). ``BusyModel`` computes in Python
instead, holding the GIL, as a CPU model does.
"""

from __future__ import annotations

import sys
import threading
import time

import mlflow.pyfunc

TEXT_CONFIG = (
    '<View><Text name="text" value="$text"/>'
    '<Choices name="label" toName="text"><Choice value="short"/><Choice value="long"/></Choices></View>'
)
IMAGE_CONFIG = (
    '<View><Image name="image" value="$image"/>'
    '<Choices name="label" toName="image"><Choice value="short"/><Choice value="long"/></Choices></View>'
)


DEVICE = threading.Lock()


class CostModel(mlflow.pyfunc.PythonModel):
    def __init__(self, fixed_ms: float, per_item_ms: float) -> None:
        self.fixed_ms, self.per_item_ms = fixed_ms, per_item_ms

    def predict(self, context, model_input, params=None):
        with DEVICE:
            time.sleep((self.fixed_ms + self.per_item_ms * len(model_input)) / 1000.0)
        return ["long" if n > 8 else "short" for n in model_input["n"]]


class BusyModel(mlflow.pyfunc.PythonModel):
    """A CPU model that holds the GIL while it computes (pure Python, as many partly-Python models are):
    ``fixed_ms`` per call plus ``per_item_ms`` per row of busy work."""

    def __init__(self, fixed_ms: float, per_item_ms: float) -> None:
        self.fixed_ms, self.per_item_ms = fixed_ms, per_item_ms

    def predict(self, context, model_input, params=None):
        until = time.perf_counter() + (self.fixed_ms + self.per_item_ms * len(model_input)) / 1000.0
        spins = 0
        while time.perf_counter() < until:
            spins += 1
        return ["long" if n > 8 else "short" for n in model_input["n"]]


def pre_hook(items):
    import pandas as pd

    return pd.DataFrame({"n": [len(str(item)) for item in items]})


def post_hook(labels):
    return [
        {"result": [{"from_name": "label", "to_name": "text", "type": "choices", "value": {"choices": [str(label)]}}]}
        for label in labels
    ]


def numpy_post_hook(labels):
    """``post_hook`` with numpy in it, as a real model's hook has: a float32 score and 256 float32 scores per
    task, which the model process turns into plain values before they cross to the worker."""
    import numpy as np

    scores = np.linspace(0, 1, 256, dtype=np.float32)
    return [
        {"result": [{"from_name": "label", "to_name": "text", "type": "choices", "value": {"choices": [str(label)]}}],
         "score": np.float32(0.5), "meta": {"scores": scores}}
        for label in labels
    ]


def image_post_hook(labels):
    return [
        {"result": [{"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": [str(label)]}}]}
        for label in labels
    ]


def register(tracking_uri: str) -> None:
    mlflow.set_tracking_uri(tracking_uri)
    for name, kind, fixed, per_item in (
        ("per_item_1ms", CostModel, 0.0, 1.0), ("fixed_20ms", CostModel, 20.0, 1.0), ("free", CostModel, 0.0, 0.0),
        ("per_item_1_5ms", CostModel, 0.0, 1.5), ("busy_20ms", BusyModel, 20.0, 1.0), ("per_item_15ms", CostModel, 0.0, 15.0),
    ):
        with mlflow.start_run():
            mlflow.pyfunc.log_model(
                name="model", python_model=kind(fixed, per_item), registered_model_name=name, code_paths=None
            )


if __name__ == "__main__":
    from bench.models import register as register_by_reference  # CostModel by reference, not as __main__'s

    register_by_reference(sys.argv[1])
