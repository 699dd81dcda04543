"""Connect a Label Studio project to a served model through label-studio-sdk, as a person would in
Settings > Model: add (or update) the project's ML backend with the model's URL, optionally make it
interactive, and run "retrieve predictions" on the project's tasks.

``api_key`` is a Personal Access Token (Label Studio's default) or a legacy token; the SDK exchanges
a PAT for short-lived access tokens itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from .errors import LabelStudioError, Unreachable


@dataclass(frozen=True)
class Connection:
    """A project's ML backend, as Label Studio recorded it."""

    project: int
    ml_backend_id: int
    url: str
    created: bool  # False: an ML backend with this URL was there and was updated
    interactive: bool
    predictions: int | None  # the project's stored predictions of the model's version, after retrieving


HINTS = {
    401: "Check the API key: a Personal Access Token from Account & Settings (or a legacy token where those are on).",
    403: "The key's user may not do this in that project.",
    404: "Check the project id: it is the number in the project's URL.",
}
UNREACHABLE_BACKEND = (
    "Label Studio checks the URL itself (GET /health, POST /setup): it must be reachable from Label Studio's "
    "machine. In compose, use the service name, not 127.0.0.1; pass --backend-url where it differs from yours."
)


def _reason(body: Any) -> str:
    """Label Studio's error body, as a line: its detail and its validation errors."""
    if not isinstance(body, dict):
        return str(body)[:500]
    parts = [str(body.get("detail") or "")]
    for field, problems in (body.get("validation_errors") or {}).items():
        parts.append(f"{field}: {' '.join(map(str, problems)) if isinstance(problems, list) else problems}")
    return "; ".join(p for p in parts if p)[:1000] or str(body)[:500]


@contextmanager
def _label_studio_errors(label_studio_url: str, what: str, hints: dict[int, str] | None = None) -> Iterator[None]:
    import httpx
    from label_studio_sdk.core.api_error import ApiError

    try:
        yield
    except ApiError as exc:
        hint = {**HINTS, **(hints or {})}.get(exc.status_code or 0, "Label Studio's log says more.")
        raise LabelStudioError(f"Label Studio refused {what}: {exc.status_code} {_reason(exc.body)}", hint) from exc
    except httpx.HTTPError as exc:
        raise Unreachable(f"Label Studio does not answer at {label_studio_url}: {exc}",
                          "Check LABEL_STUDIO_URL (the address this machine reaches it at).") from exc


def connect_project(
    project: int,
    backend_url: str,
    *,
    label_studio_url: str,
    api_key: str,
    title: str = "MLflow",
    interactive: bool = False,
    retrieve: bool = True,
    model_version: str = "",
    basic_auth: tuple[str, str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> Connection:
    """Point ``project``'s ML backend at ``backend_url`` and, with ``retrieve``, have Label Studio ask it
    for predictions of every task (Label Studio waits for the answer; a big project is finished over
    further rounds, see docs/big-projects.md). Raises LabelStudioError with Label Studio's own reason, e.g.
    when it cannot reach ``backend_url`` (it must be an address Label Studio's machine can reach)."""
    from label_studio_sdk.client import LabelStudio

    say = progress or (lambda _message: None)
    sdk = LabelStudio(base_url=label_studio_url.rstrip("/") + "/", api_key=api_key, timeout=180)
    url = backend_url.rstrip("/") + "/"
    auth: dict[str, Any] = {}
    if basic_auth:
        auth = {"auth_method": "BASIC_AUTH", "basic_auth_user": basic_auth[0], "basic_auth_pass": basic_auth[1]}
    with _label_studio_errors(label_studio_url, f"reading project {project}"):
        sdk.projects.get(id=project)
        existing = [b for b in sdk.ml.list(project=project) if (b.url or "").rstrip("/") + "/" == url]
    say(f"{'updating' if existing else 'adding'} the ML backend {url} of project {project}")
    with _label_studio_errors(label_studio_url, f"connecting project {project} to {url}", {400: UNREACHABLE_BACKEND}):
        if existing:
            # With its project: Label Studio (1.23) checks the URL with /setup on update, and needs the project for that.
            ml = sdk.ml.update(existing[0].id, url=url, project=project, title=title, is_interactive=interactive, **auth)
        else:
            ml = sdk.ml.create(url=url, project=project, title=title, is_interactive=interactive, **auth)
    state = str(getattr(ml.state, "value", ml.state) or "")
    if state not in ("CO", "PR", "TR"):  # connected, predicting, training
        raise LabelStudioError(
            f"Label Studio could not connect project {project} to {url} (state {state or 'unknown'}): {ml.error_message or ''}",
            UNREACHABLE_BACKEND,
        )
    count = None
    if retrieve:
        say(f"retrieving predictions for project {project} (Label Studio waits for the backend's answer)")
        with _label_studio_errors(label_studio_url, f"retrieving predictions for project {project}"):
            sdk.actions.create(id="retrieve_tasks_predictions", project=project,
                               selected_items={"all": True, "excluded": []})
            stored = sdk.predictions.list(project=project)
        count = sum(1 for p in stored if not model_version or p.model_version == model_version)
        if model_version and count:  # whose scores order the Data Manager and uncertainty sampling (Settings > Predictions)
            with _label_studio_errors(label_studio_url, f"setting project {project}'s model version"):
                sdk.projects.update(id=project, model_version=model_version)
        say(f"project {project} has {count} prediction(s){f' of {model_version}' if model_version else ''}")
    return Connection(project, int(ml.id or 0), url, not existing, interactive, count)
