"""Serving a configuration: the runtime that swaps it atomically, the alias follower, the predict
path (prediction, batching into the model process, continuation of rounds past Label Studio's deadline),
the prediction cache shared by workers, and the push of what the background finishes into Label Studio.

May import: core, state, quality, labeling, config, tasks, model, isolation.
"""
