"""Label Studio's annotated tasks, and the one annotation of each that a training learns from.

``GET /api/projects/{id}/export?exportType=JSON`` returns every task with at least one annotation in
one answer (no paging; ~4 s for 2,000 tasks). It needs a token with the right to change the project:
a Personal Access Token (exchanged through label-studio-sdk, as for task files) or a legacy token.
"""

from __future__ import annotations

from typing import Any

import requests

from backend.tasks.labelstudio import LabelStudioAccess, LabelStudioAuth, LabelStudioRefused

EXPORT_TIMEOUT_S = 600.0


class ExportFailed(Exception):
    """Label Studio could not be asked, or said no; the message says which setting to fix."""


def export_url(access: LabelStudioAccess, project_id: Any) -> str:
    return f"{access.url.rstrip('/')}/api/projects/{project_id}/export?exportType=JSON"


def export_annotated_tasks(access: LabelStudioAccess, project_id: Any, auth: LabelStudioAuth | None = None) -> list[dict[str, Any]]:
    """Every annotated task of the project, with its annotations."""
    if not access.url:
        raise ExportFailed(
            "the backend does not know where Label Studio is: set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY "
            "(a Personal Access Token), or connect the backend to the project so Label Studio calls /setup"
        )
    auth = auth or LabelStudioAuth()
    url = export_url(access, project_id)
    try:
        response = requests.get(url, headers=auth.headers(access), timeout=EXPORT_TIMEOUT_S)
        if response.status_code == 401:
            response = requests.get(url, headers=auth.headers(access, fresh=True), timeout=EXPORT_TIMEOUT_S)
    except LabelStudioRefused as exc:
        raise ExportFailed(str(exc)) from None
    except requests.RequestException as exc:
        raise ExportFailed(f"could not reach Label Studio at {access.url} ({type(exc).__name__}): check LABEL_STUDIO_URL") from None
    if response.status_code in (401, 403):
        raise ExportFailed(f"exporting project {project_id}: {access.refused(response.status_code, response.text)}")
    if response.status_code == 404:
        raise ExportFailed(f"Label Studio has no project {project_id} at {access.url} (or its token may not see it)")
    if not response.ok:
        raise ExportFailed(f"Label Studio answered {response.status_code} to the export of project {project_id}: {response.text[:300]}")
    try:
        tasks = response.json()
    except ValueError:
        raise ExportFailed(f"Label Studio's export of project {project_id} is not JSON") from None
    if not isinstance(tasks, list):
        raise ExportFailed(f"Label Studio's export of project {project_id} is not a list of tasks")
    return [t for t in tasks if isinstance(t, dict)]


def latest_annotation(task: dict[str, Any]) -> dict[str, Any] | None:
    """The task's most recently updated annotation that was not skipped and has results, or None."""
    usable = [
        a for a in task.get("annotations") or ()
        if isinstance(a, dict) and not a.get("was_cancelled") and isinstance(a.get("result"), list) and a["result"]
    ]
    if not usable:
        return None
    return max(usable, key=lambda a: (str(a.get("updated_at") or a.get("created_at") or ""), a.get("id") or 0))


def annotated_examples(tasks: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[list[dict[str, Any]]]]:
    """The tasks that have a usable annotation, and that annotation's results, in the same order."""
    kept, results = [], []
    for task in tasks:
        annotation = latest_annotation(task)
        if annotation is not None and isinstance(task.get("data"), dict):
            kept.append(task)
            results.append(annotation["result"])
    return kept, results
