"""The client (``lsmlflow``) against real gunicorn backends and a real orchestrator: hooks from a module
that only the client has, the 202 path of a slow load, typed errors that carry the server's own
reason, and nothing sent that the server could not run."""

from __future__ import annotations

import threading

import pytest

from harness.calls import labels, predict_images
from harness.servers import closed_port
from lsmlflow import Client, ConfigureFailed, HookNotPortable, Unreachable
from lsmlflow.pickling import is_users_module


def test_a_backend_serves_hooks_from_a_module_only_the_client_has(start_backend, images, client_side):
    backend = start_backend(CONFIGURE_WAIT_S="0")  # every load answers 202 at once: the client follows it
    said: list[str] = []
    client = Client(backend.url)
    assert is_users_module("clientside_hooks") and is_users_module("clientside_helpers")

    served = client.configure("models:/brightness/1", pre_hook=client_side.pre, post_hook=client_side.post,
                              progress=said.append)
    assert (served.url, served.model_uri, served.model_version, served.backend_id) == (
        backend.url, "models:/brightness/1", "brightness:1", None)
    assert said[0].startswith("configuring models:/brightness/1") and said[-1].startswith("serving models:/brightness/1")
    assert labels(predict_images(served.url, images, "white", "black")) == ["dark", "light"]  # swapped by the client's code
    assert client.health()["pre_hook"].startswith("pickle:")

    # The load fails after the 202: the server's own reason, typed; what served before still serves.
    with pytest.raises(ConfigureFailed) as failed:
        client.configure("models:/no-such-model/1", pre_hook=client_side.pre, post_hook=client_side.post)
    assert "no-such-model" in failed.value.error and failed.value.detail and failed.value.status == 0
    assert failed.value.body["state"] == "failed"
    # Refused before any load: the HTTP status and the server's body.
    with pytest.raises(ConfigureFailed) as refused:
        client.configure("models:/brightness/1", post_hook=client_side.post, batch_size="many")
    assert refused.value.status == 400 and "batch_size" in refused.value.error
    # A hook that cannot be pickled is named before anything is sent.
    lock = threading.Lock()
    with pytest.raises(HookNotPortable, match="post_hook cannot be pickled"):
        client.configure("models:/brightness/2", post_hook=lambda labels: [lock for _ in labels])
    assert client.served().model_version == "brightness:1"
    assert labels(predict_images(backend.url, images, "white")) == ["dark"]

    with closed_port() as port, pytest.raises(Unreachable, match="nothing answers"):
        Client(f"http://127.0.0.1:{port}").configure("models:/brightness/1", post_hook=client_side.post)


def test_the_orchestrator_serves_hooks_from_a_module_only_the_client_has(start_orchestrator, images, client_side):
    orchestrator = start_orchestrator()
    client = Client(orchestrator.url)
    assert client.is_orchestrator()
    served = client.configure("models:/brightness@champion", pre_hook=client_side.pre, post_hook=client_side.post)
    assert served.backend_id and served.url == f"{orchestrator.url}/models/{served.backend_id}/"
    assert served.model_version == "brightness:1"  # champion is version 1
    assert labels(predict_images(served.url, images, "white", "black")) == ["dark", "light"]
    found = client.served("models:/brightness@champion")  # what `ls-mlflow connect` looks up
    assert (found.url, found.model_version, found.backend_id) == (served.url, "brightness:1", served.backend_id)

    with pytest.raises(ConfigureFailed) as failed:  # a new model that does not load: its backend is not kept
        client.configure("models:/no-such-model/1", post_hook=client_side.post)
    assert "no-such-model" in failed.value.error and failed.value.body.get("backend_kept") is False
    assert [b["id"] for b in client.backends()] == [served.backend_id]
