"""The client side: serve an MLflow model to Label Studio from Python or the ``ls-mlflow`` command.

    from lsmlflow import Client, connect_project

    served = Client("http://127.0.0.1:9090").configure("models:/detector@champion", post_hook=post)
    connect_project(7, served.url, label_studio_url="http://127.0.0.1:8080", api_key=PAT)

Errors are in ``lsmlflow.errors`` (a tree in its docstring); all derive from ClientError.
"""

from __future__ import annotations

from .client import Client, Served
from .errors import (
    ClientError,
    ConfigureFailed,
    HookNotPortable,
    LabelStudioError,
    ServerError,
    Unreachable,
    WaitTimeout,
)
from .labelstudio import Connection, connect_project
from .pickling import encode_hook

__all__ = [
    "Client", "ClientError", "ConfigureFailed", "Connection", "HookNotPortable", "LabelStudioError", "Served",
    "ServerError", "Unreachable", "WaitTimeout", "connect_project", "encode_hook",
]
