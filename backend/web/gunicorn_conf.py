"""gunicorn settings for the backend, from ServerSettings (the same environment variables the app reads):
``gunicorn -c python:backend.web.gunicorn_conf wsgi:app``, which ``ls-mlflow serve`` and the orchestrator run.

One worker with threads by default: a model is loaded once per process. The worker class
(backend/web/worker.py) reads each request whole before it takes a thread, and gives Label Studio's
/health, /setup and /webhook threads of their own, so they answer while predictions run or clients stall.
"""

from backend.core.settings import ServerSettings

_server = ServerSettings.from_env()

bind = f"{_server.host}:{_server.port}"
workers = _server.workers
threads = _server.threads
worker_class = "backend.web.worker.GuardedThreadWorker"
timeout = _server.timeout_s
# gthread in gunicorn 26 can wait the whole grace period on an idle client connection at shutdown.
graceful_timeout = _server.graceful_timeout_s
keepalive = 5
accesslog = "-" if _server.access_log else None
loglevel = _server.log_level.lower()
# Never preload: CUDA does not survive fork, and each worker loads its own model.
preload_app = False
# gunicorn 26 shares one control socket under $HOME between instances; backends run side by side.
control_socket_disable = True
