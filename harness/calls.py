"""The calls every test makes of a backend or the orchestrator, written once: configure the demo model
with its hooks, predict images, read the labels back.

``target`` is a base URL (a backend's, the orchestrator's, or one of its per-model URLs), anything with
a ``url`` (a Backend or OrchestratorProcess), or a Flask test client.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import requests

from examples.hooks import IMAGE_CONFIG, brightness_pre, choices_post
from lsmlflow.pickling import encode_hook

DEMO_MODEL = "models:/brightness/1"


def demo_configure_body(**fields: Any) -> dict[str, Any]:
    """The brightness model with its demo hooks, pickled as a client pickles them; ``fields`` override."""
    return {"model_uri": DEMO_MODEL, "pre_hook": encode_hook(brightness_pre), "post_hook": encode_hook(choices_post), **fields}


def _post(target: Any, path: str, body: dict[str, Any], timeout: float) -> Any:
    if hasattr(target, "application"):  # a Flask test client
        return target.post(f"/{path}", json=body)
    base = target if isinstance(target, str) else target.url
    return requests.post(f"{base.rstrip('/')}/{path}", json=body, timeout=timeout)


def configure(target: Any, timeout: float = 120, **fields: Any) -> Any:
    """POST /configure with the demo model and hooks, or what ``fields`` say instead."""
    return _post(target, "configure", demo_configure_body(**fields), timeout)


def image_tasks(images: dict[str, Path], *names: str, first_id: int = 1, **task_fields: Any) -> list[dict[str, Any]]:
    """One task per named image, ids counting from ``first_id``."""
    return [{"id": first_id + i, "data": {"image": str(images[name])}, **task_fields} for i, name in enumerate(names)]


def predict(target: Any, tasks: list[dict[str, Any]], config: str = IMAGE_CONFIG, timeout: float = 60, **extra: Any) -> Any:
    """POST /predict as Label Studio sends it."""
    return _post(target, "predict", {"tasks": tasks, "label_config": config, **extra}, timeout)


def predict_images(target: Any, images: dict[str, Path], *names: str, timeout: float = 60, **extra: Any) -> Any:
    return predict(target, image_tasks(images, *names), timeout=timeout, **extra)


def body_of(response: Any) -> dict[str, Any]:
    return response.get_json() if hasattr(response, "get_json") else response.json()


def labels(response: Any) -> list[str | None]:
    """The first choice of each task's prediction; None where a task got none."""
    return [p["result"][0]["value"]["choices"][0] if p and p["result"] else None for p in body_of(response)["results"]]


def labels_and_version(response: Any) -> tuple[list[str | None], str]:
    """The labels and the answer's model_version, of an answer that must be a 200."""
    assert response.status_code == 200, getattr(response, "text", response)
    return labels(response), body_of(response)["model_version"]
