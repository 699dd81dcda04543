"""One model and its hooks: loading an MLflow model by URI and flavor (on a GPU where there is one),
decoding cloudpickled hooks safely, and pre_hook -> predict -> post_hook as one call.

May import: core, config.
"""
