"""Where user code runs, away from the HTTP worker: the model process and its host, the zygote that
forks it warm, the backends' template that forks backends and zygotes, the gunicorn master of a backend
forked from it, and the fork protocol.

May import: core, config, model.
"""
