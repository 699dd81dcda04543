"""Driving the real dagshub client's ``Datasource.add_annotation_model`` without the DagsHub service."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace


def add_annotation_model(monkeypatch, host: str, port: int, model: str, **kwargs) -> None:
    """Run the client's own code; only ``dagshub.auth.get_token`` (which checks the token online) is replaced."""
    import dagshub.auth
    from dagshub.data_engine.model.datasource import Datasource

    monkeypatch.setattr(dagshub.auth, "get_token", lambda *args, **kw: "dagshub-token")
    datasource = SimpleNamespace(
        source=SimpleNamespace(repoApi=SimpleNamespace(host=host, owner="alice"), repo="alice/data", name="images"),
        ngrok_listener=None,
    )
    asyncio.run(Datasource.add_annotation_model(datasource, "alice/models", model, port=port, **kwargs))
