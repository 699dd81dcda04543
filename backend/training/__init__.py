"""Training on Label Studio's annotations, through MLflow: a new registered version, gated, promoted by alias.

- ``trainer``: the worker's side: records events, starts one training at a time, watches and reports it;
- ``job``: the training itself, in a process of its own (``python -m backend.training.job``);
- ``export``: Label Studio's annotated tasks and each one's latest annotation;
- ``promotion``: log and register the trained model, gate it, move the alias.

When a training is due is ``config.training_policy``; what every worker sees of trainings is
``state.training_records``.

May import: core, state, quality, labeling, config, tasks, model.
"""
