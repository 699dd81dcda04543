"""What a process that forks model processes makes once, before its forks, so that no fork makes it again.

Each woken backend's model process is a fork of the models' template. Whatever a library builds lazily, at
a model's load or its first prediction, a fork builds anew every time, on the wake's way, unless the
template built it first: then every fork finds it in the pages it shares. Each step here is best effort
(a library's internals change): without it, a fork is only slower.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

log = logging.getLogger(__name__)


def prime_model_processes() -> None:
    """All of the below, where MLflow is imported already: the backends' template, whose gunicorn masters
    and workers never load a model, does without it (about 85 MiB)."""
    if "mlflow" not in sys.modules:
        return
    prime_mlflow()
    prime_sqlite_store(os.environ.get("MLFLOW_TRACKING_URI", ""))
    prime_first_predictions()


def prime_mlflow() -> None:
    """MLflow's map of installed packages: each model load checks the model's requirements against it, and
    building it scans every installed distribution (~1 s). And MLmodel files read with libyaml."""
    try:
        from mlflow.utils.requirements_utils import _init_packages_to_modules_map

        _init_packages_to_modules_map()
    except Exception as exc:  # noqa: BLE001 - a private helper of MLflow's: without it, loads are only slower
        log.debug("could not prime MLflow's package map: %s", exc)
    from backend.model.loading import read_yaml_with_libyaml

    read_yaml_with_libyaml()


def prime_sqlite_store(uri: str) -> None:
    """Make MLflow's client for the default registry once here, where it is an SQLite file that exists: a fork
    then finds the store in MLflow's cache, its tables mapped and its queries compiled, and its first look
    at an alias (the registry follower's) costs ~25 ms of CPU instead of ~250. The connections are closed
    before any fork (a fork opens its own). Not for a database server: one that does not answer would hold
    the template's start for as long as its driver waits, and a missing file would be created here."""
    if not uri.startswith("sqlite:///") or not Path(uri.removeprefix("sqlite:///")).is_file():
        return
    try:
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        try:  # the follower's query, compiled: a name no registry holds
            client.get_model_version_by_alias("lsbackend-prime-no-such-model", "none")
        except MlflowException:
            pass
        for store in (client._tracking_client.store, client._get_registry_client().store):
            store.engine.dispose()
    except Exception as exc:  # noqa: BLE001 - MLflow's internals: without this, a fork's first lookup is slower
        log.debug("could not prime MLflow's store for %s: %s", uri, exc)


def prime_first_predictions() -> None:
    """What a model process's first prediction fills, where its library is imported here. scikit-learn's
    check of a prediction's input asks narwhals for its plugins, which reads every installed distribution's
    entry points (~10 ms; cached after); Pillow imports its common formats' plugins at the first image it
    opens (~3 ms). A small model's first prediction after a wake: 16 -> 3 ms. One prediction of a tiny
    linear model here walks scikit-learn's own path, whatever its version asks of its dependencies."""
    image = sys.modules.get("PIL.Image")
    if image is not None:
        image.preinit()
    if "sklearn" not in sys.modules:
        return
    try:
        import numpy as np
        from sklearn.linear_model import LinearRegression

        LinearRegression().fit(np.array([[0.0], [1.0]]), np.array([0.0, 1.0])).predict(np.array([[0.5]]))
    except Exception as exc:  # noqa: BLE001 - without it, each fork's first prediction fills the caches itself
        log.debug("could not prime scikit-learn's first prediction: %s", exc)
