"""Configure a backend or the orchestrator from Python, and wait until the model serves.

    client = Client("http://127.0.0.1:9090")
    served = client.configure("models:/detector@champion", pre_hook=my_pre, post_hook=my_post)
    served.url          # what Label Studio connects to (for the orchestrator: the model's own URL)

Hooks are plain functions; see ``pickling`` for how they travel. The same client talks to a backend
(``gunicorn wsgi:app``) and to the orchestrator: it asks which one answers.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import requests

from .errors import ConfigureFailed, ServerError, Unreachable, WaitTimeout
from .pickling import check_portable, encode_hook

Progress = Callable[[str], None]
# How long the server may take to answer one configure call: its own wait (CONFIGURE_WAIT_S, 20 s),
# and for the orchestrator a backend's start before it.
ANSWER_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Served:
    """A model the server serves: where Label Studio connects to it, and what the server said."""

    url: str  # the backend's URL, or the orchestrator's per-model URL (…/models/<id>/)
    model_uri: str
    model_version: str
    backend_id: str | None = None  # the orchestrator's id for it
    answer: dict[str, Any] = field(default_factory=dict, repr=False)


def configure_body(model: str, *, pre_hook: Callable[..., Any] | str | None = None,
                   post_hook: Callable[..., Any] | str | None = None, label_config: str | None = None,
                   **fields: Any) -> dict[str, Any]:
    """The JSON a configure sends: hooks (``train_hook`` and ``embed_hook`` too) encoded as ``pickling`` says."""
    body: dict[str, Any] = {"model_uri": model, "pre_hook": encode_hook(pre_hook, "pre_hook"),
                            "post_hook": encode_hook(post_hook, "post_hook"), **fields}
    for role in ("train_hook", "embed_hook"):
        if role in fields:
            body[role] = encode_hook(fields[role], role)
    if label_config is not None:
        body["label_config"] = label_config
    return body


class Client:
    """One server: a backend or the orchestrator. ``token`` is its CONFIGURE_TOKEN; ``basic_auth`` its
    (user, password), when it has them."""

    def __init__(self, url: str, *, token: str | None = None, basic_auth: tuple[str, str] | None = None,
                 timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.http = requests.Session()
        self.http.headers["User-Agent"] = "ls-mlflow-client"
        if basic_auth:
            self.http.auth = basic_auth
        self._token = token

    # -- plain calls ---------------------------------------------------------------------------------

    def _call(self, method: str, path: str, what: str, *, configure_rights: bool = False,
              timeout: float | tuple[float, float] | None = None, **kwargs: Any) -> requests.Response:
        url = path if path.startswith("http") else f"{self.url}/{path.lstrip('/')}"
        headers = dict(kwargs.pop("headers", {}))
        if configure_rights and self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        try:
            return self.http.request(method, url, headers=headers, timeout=timeout or self.timeout, **kwargs)
        except requests.ConnectionError as exc:
            raise Unreachable(f"nothing answers at {self.url} ({what})",
                              "Start the server (ls-mlflow serve, or ls-mlflow orchestrator), or check the URL.") from exc
        except requests.Timeout as exc:
            raise Unreachable(f"{self.url} did not answer {what} in time", "Check the server's log.") from exc

    def _json(self, response: requests.Response, what: str, error: type[ServerError] = ServerError) -> dict[str, Any]:
        try:
            body = response.json()
        except ValueError:
            body = {"error": f"{what} answered {response.status_code} without JSON", "detail": response.text[:300]}
        if response.status_code >= 400:
            raise error.from_answer(response.status_code, body, what)
        return body if isinstance(body, dict) else {"answer": body}

    def health(self) -> dict[str, Any]:
        return self._json(self._call("GET", "/health", "GET /health"), "GET /health")

    def _runtime(self) -> dict[str, Any] | None:
        """The server's Python and cloudpickle; None where it does not say, or its /health is an error
        (the orchestrator's newest backend down): the server's own check on the hooks then decides."""
        try:
            return self.health().get("runtime")
        except ServerError:
            return None

    def is_orchestrator(self) -> bool:
        """The orchestrator lists its backends; a backend has no such route."""
        return self._call("GET", "/backends", "GET /backends").status_code == 200

    def backends(self) -> list[dict[str, Any]]:
        """The orchestrator's backends, each with its state, model, URLs and last error."""
        return self._json(self._call("GET", "/backends", "GET /backends"), "GET /backends")["backends"]

    def backend(self, backend_id: str, log_lines: int = 20) -> dict[str, Any]:
        """One of the orchestrator's backends, with its own /health and its recent log."""
        path = f"/backends/{backend_id}?log_lines={log_lines}"
        return self._json(self._call("GET", path, f"GET {path}"), f"GET {path}")

    # -- configure -----------------------------------------------------------------------------------

    def configure(
        self,
        model: str,
        *,
        post_hook: Callable[..., Any] | str | None = None,
        pre_hook: Callable[..., Any] | str | None = None,
        label_config: str | None = None,
        wait: float = 600.0,
        progress: Progress | None = None,
        **fields: Any,
    ) -> Served:
        """Serve ``model`` (``models:/name/version``, ``models:/name@alias``, ``runs:/...``, a path) with
        these hooks; returns once it serves, following the server's 202 while a big model loads.
        ``fields``: any other configure field (``batch_size``, ``loader``, ``tracking_uri``, ``pipeline``,
        ``train_hook`` and ``embed_hook`` as functions, ``training``...).
        Raises HookNotPortable before sending a hook the server could not run, ConfigureFailed with the
        server's error and fix, WaitTimeout when it still loads after ``wait`` seconds."""
        say = progress or (lambda _message: None)
        body = configure_body(model, pre_hook=pre_hook, post_hook=post_hook, label_config=label_config, **fields)
        if any(callable(hook) for hook in (pre_hook, post_hook, fields.get("train_hook"), fields.get("embed_hook"))):
            check_portable(self._runtime(), self.url)
        say(f"configuring {model} on {self.url}")
        started = time.monotonic()
        response = self._call("POST", "/configure", "POST /configure", configure_rights=True, json=body,
                              timeout=(5.0, min(wait, ANSWER_TIMEOUT_S) + 15.0))
        answer = self._json(response, "POST /configure", ConfigureFailed)
        orchestrated = "label_studio_url" in answer
        if response.status_code == 202:
            answer = self._follow(answer, model, started + wait, say)
        if orchestrated:
            backend = answer.get("backend") or {}
            served = Served(answer["label_studio_url"], model, str(backend.get("model_version") or ""), answer.get("id"), answer)
        else:
            served = Served(self.url, model, str(answer.get("model_version") or ""), None, answer)
        if not served.model_version:  # a load that ended after a 202: the version is on /health
            health = self._json(self._call("GET", served.url.rstrip("/") + "/health", "GET /health"), "GET /health")
            served = Served(served.url, model, str(health.get("model_version") or ""), served.backend_id, answer)
        say(f"serving {model} as {served.model_version} at {served.url} ({time.monotonic() - started:.1f} s)")
        return served

    def _follow(self, answer: dict[str, Any], model: str, deadline: float, say: Progress) -> dict[str, Any]:
        """Poll the load's status URL until it is ready or failed."""
        started = time.monotonic()
        loading = answer.get("backend") or answer  # the orchestrator wraps the backend's 202
        status_url = answer.get("status_url") or loading.get("status_url") or "/configure/status"
        last_said = 0.0
        while True:
            job = self._json(self._call("GET", status_url, "GET configure status"), "GET configure status")
            if loading.get("job") and job.get("job") != loading["job"]:
                raise ConfigureFailed(f"a later configure replaced {model} while it loaded",
                                      "Configure it again if it should serve; GET /health says what serves now.", 409, job)
            state = job.get("state")
            if state == "ready":
                return {**answer, "backend": {**(answer.get("backend") or {}), "status": "ready"}}
            if state == "failed":
                error = job.get("error") or {}
                raise ConfigureFailed(str(error.get("error") or f"loading {model} failed"), str(error.get("detail") or ""),
                                      0, job)  # no status of its own: the load failed after the 202
            now = time.monotonic()
            if now > deadline:
                raise WaitTimeout(f"{model} is still loading", f"It goes on on the server; follow it at {status_url}.")
            if now - last_said >= 5.0:
                say(f"still loading {model} ({now - started:.0f} s)")
                last_said = now
            time.sleep(0.5)

    def served(self, model: str | None = None) -> Served:
        """What serves ``model`` here (by URI; on a backend, or an orchestrator with one model, it may be
        left out): the URL for Label Studio without configuring anything."""
        if self.is_orchestrator():
            backends = [b for b in self.backends() if b.get("configured_at")]
            chosen = [b for b in backends if model is None or b.get("model", {}).get("model_uri") == model]
            if len(chosen) != 1:
                known = ", ".join(str(b.get("model", {}).get("model_uri")) for b in backends) or "none"
                raise ServerError(
                    f"{'no' if not chosen else 'more than one'} configured backend serves {model or 'a model'}",
                    f"Name one with --model; configured here: {known}.", 404,
                )
            record = chosen[0]
            health = (self.backend(record["id"], 0).get("health")) or {}
            return Served(record["label_studio_url"], record["model"].get("model_uri", ""),
                          str(health.get("model_version") or ""), record["id"], record)
        health = self.health()
        if not health.get("configured"):
            raise ServerError(f"{self.url} serves no model yet", "Configure it first: ls-mlflow configure.", 404, health)
        return Served(self.url, str(health.get("model_uri") or ""), str(health.get("model_version") or ""), None, health)
