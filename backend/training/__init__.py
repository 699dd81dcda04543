"""Training on Label Studio's annotations, through MLflow: a new registered version, gated, promoted by alias.

- ``policy``: when a training is due (``START_TRAINING``, or enough new annotations, quietly enough);
- ``records``: what every worker of the backend sees of trainings, on disk under MODEL_DIR/training;
- ``trainer``: the worker's side: records events, starts one training at a time, watches and reports it;
- ``job``: the training itself, in a process of its own (``python -m backend.training.job``);
- ``export``: Label Studio's annotated tasks and each one's latest annotation;
- ``promotion``: log and register the trained model, gate it, move the alias.
"""
