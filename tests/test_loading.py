"""Loading a model into a backend's model process: what concerns the copy of its artifacts on disk."""

from __future__ import annotations

import fcntl

import pytest
import yaml

from backend.config.spec import ModelSpec
from backend.model.loading import _safe_load_with_libyaml, artifacts_lock, load_model, read_yaml_with_libyaml

MLMODEL = """
artifact_path: model
flavors:
  python_function:
    env: {conda: conda.yaml, virtualenv: python_env.yaml}
    loader_module: mlflow.sklearn
    model_path: model.skops
    predict_fn: predict
    python_version: 3.11.7
  sklearn: {code: null, pickled_model: model.skops, serialization_format: skops, sklearn_version: 1.7.2}
mlflow_version: 3.4.0
model_size_bytes: 1841
model_uuid: 3c1f0d4e2b
utc_time_created: '2026-12-06 13:25:47.220512'
signature: {inputs: '[{"type": "double", "required": true}]', outputs: null}
metadata: {when: 2026-12-06, ratio: 0.5, exp: 1e3, octal: 0o17, flags: [yes, no, on, off, ~, null, true]}
"""


def _could_take(path, kind: int) -> bool:
    """Whether another process (another open file) could take the lock ``kind`` now, without waiting."""
    with open(path, "a") as other:
        try:
            fcntl.flock(other, kind | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True


@pytest.mark.parametrize("loads", [1, 2])
def test_a_download_waits_for_the_loads_under_way_and_loads_wait_for_it(tmp_path, loads):
    # Two configures racing each other: one model process reads the copy while the other would rewrite it.
    lock = tmp_path / ".lock"
    with artifacts_lock(tmp_path, exclusive=False):
        if loads == 2:
            with artifacts_lock(tmp_path, exclusive=False):  # loads share it
                assert not _could_take(lock, fcntl.LOCK_EX)
        assert _could_take(lock, fcntl.LOCK_SH) and not _could_take(lock, fcntl.LOCK_EX)  # a download waits
    with artifacts_lock(tmp_path, exclusive=True):
        assert not _could_take(lock, fcntl.LOCK_SH)  # a load waits for the download
    assert _could_take(lock, fcntl.LOCK_EX)  # let go once done


def test_mlmodel_files_read_with_libyaml_come_out_as_pythons_loader_reads_them(monkeypatch):
    monkeypatch.setattr(yaml, "safe_load", yaml.safe_load)  # put back after the test
    assert _safe_load_with_libyaml(MLMODEL) == yaml.load(MLMODEL, Loader=yaml.SafeLoader)
    read_yaml_with_libyaml()
    assert yaml.safe_load is _safe_load_with_libyaml  # PyYAML here is built with libyaml (the image's is too)


def test_a_restore_does_not_check_the_models_requirements_again(tmp_path, registry, monkeypatch):
    # The first load (a configure) warns of requirements the backend's packages do not meet; a restore or a wake
    # loads the copy it downloaded, and the check (every installed distribution's metadata read) is not made again.
    import mlflow.pyfunc

    checked: list[object] = []
    monkeypatch.setattr(mlflow.pyfunc, "warn_dependency_requirement_mismatches", checked.append)
    spec = ModelSpec(model_uri="models:/brightness/1", tracking_uri=registry, registry_uri=registry)
    first = load_model(spec, tmp_path)
    assert len(checked) == 1
    again = load_model(spec, tmp_path, prefer_local=True)
    assert len(checked) == 1 and again.local_path == first.local_path
    assert again.predict is not None and again.resolved == first.resolved
