"""Real Label Studio for the end-to-end tests, in its default token mode, and the orchestrator set up for
it as the README says; one of each per test module."""

from __future__ import annotations

import pytest

from tests.e2e.projects import start_label_studio_or_skip, start_orchestrator


@pytest.fixture(scope="module")
def label_studio(tmp_path_factory):
    """Label Studio in its default token mode, and the Personal Access Token a user would make."""
    server = start_label_studio_or_skip(tmp_path_factory.mktemp("label-studio"))
    server.default_token_mode()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def orchestrator(tmp_path_factory, registry, label_studio):
    """Set up as the README says for a default Label Studio: its address and a PAT, nothing else."""
    server = start_orchestrator(tmp_path_factory.mktemp("orchestrator"), registry,
                                LABEL_STUDIO_URL=label_studio.url, LABEL_STUDIO_API_KEY=label_studio.pat)
    yield server
    server.remove_all()
    server.stop()
