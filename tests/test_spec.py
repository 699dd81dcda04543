"""Both configure forms parse into one ModelSpec; malformed ones are refused with the reason."""

from __future__ import annotations

import json

import pytest

from backend.config.spec import ModelSpec, decode_configure_body, parse_model_spec
from backend.core.errors import BadRequest
from orchestrator.registry import BackendRecord

DAGSHUB = {
    "host": "https://dagshub.com",
    "username": "alice",
    "repo": "alice/models",
    "model": "detector",
    "version": "3",
    "authtoken": "secret-token",
    "datasource_repo": "alice/data",
    "datasource_name": "images",
    "pre_hook": "",
    "post_hook": "",
}


def test_dagshub_double_encoded_body():
    body = json.dumps(json.dumps(DAGSHUB)).encode()  # requests(json=json.dumps(...)) puts a JSON string on the wire
    spec = parse_model_spec(decode_configure_body(body))
    assert spec.model_uri == "models:/detector/3"
    assert spec.tracking_uri == "https://dagshub.com/alice/models.mlflow"
    assert spec.tracking_username == spec.tracking_password == "secret-token"
    assert spec.loader == "native"
    assert spec.dagshub.datasource_name == "images"


def test_dagshub_latest_by_default():
    data = {k: v for k, v in DAGSHUB.items() if k != "version"}
    assert parse_model_spec(data).model_uri == "models:/detector/latest"


def test_plain_form():
    spec = parse_model_spec({"model_uri": "models:/m@prod", "tracking_uri": "http://x/", "batch_size": 4, "loader": "native"})
    assert (spec.model_uri, spec.tracking_uri, spec.batch_size, spec.loader) == ("models:/m@prod", "http://x", 4, "native")
    assert (spec.idle_stop_s, spec.always_on) == (None, False)  # the orchestrator's IDLE_STOP_S applies


def test_both_forms_say_how_the_orchestrator_treats_the_model_when_idle():
    plain = parse_model_spec({"model_uri": "m", "idle_stop_s": 600, "always_on": False})
    dagshub = parse_model_spec({**DAGSHUB, "idle_stop_s": 0, "always_on": True})
    assert (plain.idle_stop_s, plain.always_on, dagshub.idle_stop_s, dagshub.always_on) == (600.0, False, 0.0, True)
    assert plain.model_key == parse_model_spec({"model_uri": "m"}).model_key  # the same model, the same backend


@pytest.mark.parametrize(
    "body, message",
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'"[1]"', "must be a JSON object"),
        (b"{}", "configure needs a model"),
        (b'{"model_uri": "m", "pre-hook": "x"}', "unknown configure field"),
        (b'{"model_uri": ""}', "is empty"),
        (b'{"model_uri": "m", "loader": "onnx"}', "unknown loader"),
        (b'{"model_uri": "m", "batch_size": 0}', "positive integer"),
        (b'{"model_uri": "m", "batch_size": true}', "positive integer"),
        (b'{"model_uri": "m", "gpus": -1}', "'gpus' must be a whole number of GPUs"),
        (b'{"model_uri": "m", "gpus": "1"}', "'gpus' must be a whole number of GPUs"),
        (b'{"model_uri": 5}', "must be a string"),
        (b'{"model_uri": "m", "idle_stop_s": -1}', "'idle_stop_s' must be a number of seconds"),
        (b'{"model_uri": "m", "idle_stop_s": "soon"}', "'idle_stop_s' must be a number of seconds"),
        (b'{"model_uri": "m", "always_on": "yes"}', "'always_on' must be true or false"),
    ],
)
def test_malformed_configure(body, message):
    with pytest.raises(BadRequest, match=message):
        parse_model_spec(decode_configure_body(body))


def test_public_view_hides_secrets_and_pickles():
    spec = parse_model_spec({**DAGSHUB, "pre_hook": "QUJD" * 100})
    public = spec.public()
    assert "secret-token" not in json.dumps(public)
    assert public["pre_hook"].startswith("pickle:")
    assert public["post_hook"] == "identity"


def test_public_view_strips_the_userinfo_of_every_uri():
    spec = parse_model_spec({"model_uri": "models:/m/1", "tracking_uri": "https://alice:pa55word@mlflow.example.com",
                             "registry_uri": "https://tok3n-abcdef@registry.example.com/x"})
    shown = json.dumps(spec.public())
    assert "https://***@mlflow.example.com" in shown and "https://***@registry.example.com/x" in shown
    assert "alice" not in shown and "pa55word" not in shown and "tok3n" not in shown
    assert {"pa55word", "tok3n-abcdef"} <= set(spec.secrets())  # masked in logs and errors too
    assert spec.to_dict()["tracking_uri"] == "https://alice:pa55word@mlflow.example.com"  # what is stored is whole
    record = BackendRecord("b1", {"tracking_uri": "http://u:p4ss@h:5000"}, "process", 1, "/tmp/x")
    assert record.public()["model"]["tracking_uri"] == "http://***@h:5000"  # rows written before this version


def test_round_trip_through_store_format():
    spec = parse_model_spec(DAGSHUB)
    assert ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_digest_changes_with_hooks_but_model_key_does_not():
    a = parse_model_spec({"model_uri": "models:/m/1", "post_hook": "x.y:z"})
    b = parse_model_spec({"model_uri": "models:/m/1", "post_hook": "x.y:w"})
    assert a.model_key == b.model_key
    assert a.digest != b.digest


def test_registry_errors_are_named_by_what_happened_not_by_digits_in_the_address():
    """A tracking server on port 34031 that does not answer is unreachable, not one that refused a 403."""
    from backend.model.loading import translate_mlflow_error

    spec = ModelSpec(model_uri="models:/m/1", tracking_uri="http://127.0.0.1:34031")
    refused = ConnectionError("HTTPConnectionPool(host='127.0.0.1', port=34031): Max retries exceeded with url: "
                              "/api/2.0/mlflow/registered-models/get (Caused by NewConnectionError: Connection refused)")
    assert "is unreachable" in translate_mlflow_error(refused, spec).error
    for said in ("API request to endpoint /api/2.0/mlflow/model-versions/get failed with error code 401 != 200",
                 "403 Client Error: Forbidden for url: http://127.0.0.1:40129/api/2.0/mlflow/model-versions/get"):
        assert "refused the credentials" in translate_mlflow_error(Exception(said), spec).error, said
