"""The HTTP face of a backend: Label Studio's routes and the operator's (/configure, /train, /metrics),
authentication, bounded JSON bodies, and the gunicorn worker class and configuration it runs under.

May import: core, state, quality, labeling, config, tasks, model, isolation, serving, training.
"""
