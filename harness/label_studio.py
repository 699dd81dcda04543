"""Real Label Studio on loopback for the end-to-end tests and the benchmarks, installed and migrated once per machine.

The ``label-studio`` package lives in its own virtual environment (it pins its own Django stack)
under ``~/.cache/lsbackend-e2e`` (``LSBACKEND_E2E_CACHE``), and a migrated data folder is kept there
as a template: each run copies it, which cuts Label Studio's start from ~30 s to a few seconds.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path
from typing import Any

import requests

from harness.environments import CACHE, cached_environment
from harness.servers import Process, free_port, wait_until

VERSION = "1.23.2"
TOKEN = "0123456789abcdef0123456789abcdef01234567"
USER, PASSWORD = "admin@example.com", "adminpass123"


class LabelStudioUnavailable(Exception):
    """Label Studio could not be installed or started here; the message says why."""


def ensure_installed() -> Path:
    """The ``label-studio`` executable of the cached virtual environment, installing it the first time."""
    try:
        return cached_environment(f"ls-{VERSION}", [f"label-studio=={VERSION}"], CACHE, 900) / "bin" / "label-studio"
    except RuntimeError as exc:
        raise LabelStudioUnavailable(f"installing label-studio failed: {exc}") from exc


def _environment(data_dir: Path, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO", "PYTHONPATH", "MLFLOW_", "DJANGO"))}
    env.update(
        LABEL_STUDIO_BASE_DATA_DIR=str(data_dir),
        LABEL_STUDIO_HOST=f"http://127.0.0.1:{port}",
        # Only so that the fixed token below can set things up; default_token_mode() turns legacy tokens off.
        LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN="true",
        ML_BLOCK_LOCAL_IP="false",  # a 127.0.0.1 backend is refused otherwise
        SSRF_PROTECTION_ENABLED="false",  # its webhook to 127.0.0.1 is refused otherwise
        LATEST_VERSION_CHECK="false",
        COLLECT_ANALYTICS="false",
        SENTRY_DSN="",
        FRONTEND_SENTRY_DSN="",
        PYTHONUNBUFFERED="1",
    )
    return env


class LabelStudioApi:
    """Label Studio's REST API as a user's script calls it: a legacy ``token``, or a Personal Access Token
    (a JWT refresh token, which label-studio-sdk exchanges for access tokens and refreshes)."""

    def __init__(self, url: str, token: str = "", pat: str = "") -> None:
        self.url = url
        self.session = requests.Session()
        if token:
            self.session.headers["Authorization"] = f"Token {token}"
        self.pat = ""
        self._sdk: Any = None
        if pat:
            self.pat = pat
            self._use_pat(fresh=True)

    @classmethod
    def signed_in(cls, url: str, email: str, password: str) -> LabelStudioApi:
        """Signed in on the login page, a Personal Access Token made as *Account & Settings* makes one (Label
        Studio in its default mode: no legacy token), then used from there on."""
        browser = requests.Session()
        browser.get(f"{url}/user/login/", timeout=60)
        csrf = {"X-CSRFToken": browser.cookies.get("csrftoken", ""), "Referer": f"{url}/user/login/"}
        signed = browser.post(f"{url}/user/login/", timeout=60, headers=csrf, allow_redirects=False,
                              data={"email": email, "password": password, "csrfmiddlewaretoken": csrf["X-CSRFToken"]})
        assert signed.status_code == 302, f"signing in as {email}: {signed.status_code} {signed.text[:500]}"
        csrf = {"X-CSRFToken": browser.cookies.get("csrftoken", ""), "Referer": f"{url}/user/account"}
        made = browser.post(f"{url}/api/token/", timeout=60, headers=csrf)
        assert made.status_code in (200, 201), f"POST /api/token/: {made.status_code} {made.text[:500]}"
        return cls(url, pat=made.json()["token"])

    def _use_pat(self, fresh: bool = False) -> None:
        from label_studio_sdk.client import LabelStudio as SDK

        if fresh or self._sdk is None:
            self._sdk = SDK(base_url=self.url + "/", api_key=self.pat)
        self.session.headers["Authorization"] = self._sdk._client_wrapper.get_headers()["Authorization"]

    def api(self, method: str, path: str, expect: int | tuple[int, ...] = (200, 201), **kwargs: Any) -> Any:
        if self.pat:
            self._use_pat()  # the SDK refreshes the access token when it expires
        kwargs.setdefault("timeout", 180)
        response = self.session.request(method, self.url + path, **kwargs)
        expected = (expect,) if isinstance(expect, int) else expect
        assert response.status_code in expected, f"{method} {path}: {response.status_code} {response.text[:2000]}"
        return response.json() if response.content else None


class LabelStudio(Process, LabelStudioApi):
    """``label-studio start`` on a free loopback port, on a copy of the migrated data template."""

    def __init__(self, folder: Path, executable: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.data_dir = folder / "data"
        args = [
            str(executable),
            "start",
            "--port",
            str(self.port),
            "--internal-host",
            "127.0.0.1",
            "--no-browser",
            "--username",
            USER,
            "--password",
            PASSWORD,
            "--user-token",
            TOKEN,
        ]
        Process.__init__(self, args, _environment(self.data_dir, self.port), folder / "label-studio.log", cwd=folder)
        LabelStudioApi.__init__(self, f"http://127.0.0.1:{self.port}", token=TOKEN)

    def start(self, timeout: float = 180) -> LabelStudio:
        super().start()
        try:
            # It moves to another port when its own is taken: only an answer on ours counts.
            wait_until(lambda: requests.get(self.url + "/health", timeout=2).ok, timeout, "label studio", self.proc)
        except (RuntimeError, TimeoutError) as exc:
            raise LabelStudioUnavailable(f"label-studio did not start: {exc}\n{self.output()[-3000:]}") from exc
        return self

    def default_token_mode(self) -> str:
        """Label Studio as it is installed: legacy tokens refused. Returns a Personal Access Token (a JWT
        refresh token, made as a user makes one), which this client uses from now on, exchanged for
        access tokens as Label Studio requires."""
        pat = self.api("POST", "/api/token/")["token"]
        self.api("POST", "/api/jwt/settings", json={"api_tokens_enabled": True, "legacy_api_tokens_enabled": False})
        legacy = requests.get(self.url + "/api/projects", headers={"Authorization": f"Token {TOKEN}"}, timeout=30)
        assert legacy.status_code == 401, "legacy tokens should be refused now"
        self.pat = pat
        self._use_pat(fresh=True)
        return pat

    def uploaded_file(self, project: int, name: str) -> Path:
        """Where Label Studio keeps an uploaded file (its name gets a prefix)."""
        [path] = list((self.data_dir / "media" / "upload" / str(project)).glob(f"*{name}"))
        return path


def start_label_studio(folder: Path) -> LabelStudio:
    """A running Label Studio with a fresh copy of the cached, migrated data folder."""
    executable = ensure_installed()
    template = CACHE / f"data-template-{VERSION}"
    folder.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".data-template.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # test processes side by side: one of them migrates, once
        if not (template / ".ready").exists():
            first = LabelStudio(folder / "first-start", executable).start(timeout=300)  # runs the migrations
            first.stop()
            shutil.rmtree(template, ignore_errors=True)
            shutil.copytree(first.data_dir, template)
            (template / ".ready").touch()
    server = LabelStudio(folder, executable)
    shutil.copytree(template, server.data_dir)
    return server.start()
