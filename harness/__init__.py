"""Real servers for the tests and the benchmark: gunicorn backends, the orchestrator, `mlflow server`,
a Ray cluster, file servers, and the HTTP calls every test makes of them (``calls``).

Both ``tests/`` and ``bench/`` stand on this package; it stands on neither. Not shipped in the wheel.
"""
