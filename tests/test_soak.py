"""The soak with faults (bench/soak.py), short: Label Studio-shaped rounds against the orchestrator while
every kind of process it runs is killed in turn, the orchestrator is restarted and the registry's
``mlflow server`` goes away for a while. What must hold whatever was killed: every task predicted
exactly once, with the right label, and every project finished. Its figures (PSS, processes, /health
latency) are printed; their measure is ``python -m bench soak``'s ten minutes, not this."""

from __future__ import annotations

import json

from bench.soak import KILLABLE, soak


def test_a_short_soak_with_faults_loses_and_repeats_nothing(tmp_path):
    figures = soak(tmp_path, seconds=32, clients=4)  # the kills come every 2-4 s: each part is killed in ~25 s
    print(json.dumps(figures, indent=1))
    assert figures["tasks"] > 0 and figures["projects"] > 0
    assert figures["predicted_twice"] == 0 and figures["wrong"] == 0, figures
    assert figures["tasks_unfinished"] == 0 and figures["clients_unfinished"] == 0, figures
    killed = set(figures["kills"])
    assert set(KILLABLE) - {"model process"} <= killed, killed  # a model process may be between lives
    assert "mlflow server (stopped a while)" in killed
    assert figures["rounds"]["complete"] >= figures["projects"]
