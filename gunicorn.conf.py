"""gunicorn settings for the backend, from the same environment variables the app reads.

One worker with threads by default: a model is loaded once per process. The worker class
(backend/worker.py) reads each request whole before it takes a thread, and gives Label Studio's
/health, /setup and /webhook threads of their own, so they answer while predictions run or clients stall.
"""

import os

bind = f"{os.environ.get('HOST', '127.0.0.1')}:{os.environ.get('PORT', '9090')}"
workers = int(os.environ.get("WORKERS", "1"))
threads = int(os.environ.get("THREADS", "8"))
worker_class = "backend.worker.GuardedThreadWorker"
# Longer than Label Studio's 100 s predict timeout, so the backend's own 504 answers first.
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "130"))
# gthread in gunicorn 26 can wait the whole grace period on an idle client connection at shutdown.
graceful_timeout = int(os.environ.get("GRACEFUL_TIMEOUT", "10"))
keepalive = 5
accesslog = "-" if os.environ.get("ACCESS_LOG", "") else None
# Never preload: CUDA does not survive fork, and each worker loads its own model.
preload_app = False
# gunicorn 26 shares one control socket under $HOME between instances; backends run side by side.
control_socket_disable = True
