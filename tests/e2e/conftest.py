"""Real Label Studio for the end-to-end tests, in its default token mode, the orchestrator set up for it
as the quickstart says, and the browser an annotator uses; one of each per test module."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

from tests.e2e.projects import start_label_studio_or_skip, start_orchestrator, under_ci
from tests.support.browser import Annotator, BrowserUnavailable

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("LSBACKEND_ARTIFACTS") or ROOT / "artifacts") / "browser"


@pytest.fixture(scope="module")
def label_studio(tmp_path_factory):
    """Label Studio in its default token mode, and the Personal Access Token a user would make."""
    server = start_label_studio_or_skip(tmp_path_factory.mktemp("label-studio"))
    server.default_token_mode()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def orchestrator(tmp_path_factory, registry, label_studio):
    """Set up as the quickstart says for a default Label Studio: its address and a PAT, nothing else."""
    server = start_orchestrator(tmp_path_factory.mktemp("orchestrator"), registry,
                                LABEL_STUDIO_URL=label_studio.url, LABEL_STUDIO_API_KEY=label_studio.pat)
    yield server
    server.remove_all()
    server.stop()


@pytest.fixture(scope="module")
def annotator(label_studio):
    try:
        browser = Annotator(label_studio, ARTIFACTS)
    except BrowserUnavailable as exc:
        if under_ci():
            pytest.fail(f"a browser is required under CI and is unavailable: {exc}")
        pytest.skip(str(exc))
    yield browser
    browser.close()
    assert not browser.console_errors, browser.console_errors  # the labeling UI threw nothing



@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """A trap photo for the critter detector: a red moth in cell (1, 0), a blue beetle in cell (2, 2) of a 4x4 grid."""
    path = tmp_path_factory.mktemp("scene") / "trap.png"
    picture = Image.new("RGB", (320, 240), (10, 10, 10))
    picture.paste((230, 20, 20), (80, 0, 160, 60))
    picture.paste((20, 20, 230), (160, 120, 240, 180))
    picture.save(path)
    return path
