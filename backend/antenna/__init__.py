"""Antenna's processing-service API (``/info``, ``/readyz``, ``/livez``, ``/process``) from the same
configured model and hooks that serve Label Studio.

A configure that carries a Label Studio ``label_config`` (and optionally a ``pipeline`` name) also
defines an Antenna pipeline: its controls become a detector and classifiers with category maps
(``config.antenna_pipeline``), Antenna's requests become tasks for the same hooks (``wire``, ``process``), and the
post hook's Label Studio regions become Antenna's detections and classifications (``convert``).

May import: core, labeling, config, tasks, serving, web.
"""
