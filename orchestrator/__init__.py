"""One supervised backend per model, behind one address for Label Studio.

``flask --app orchestrator run`` finds ``create_app`` here; gunicorn serves ``'orchestrator:create_app()'``.
"""

from .app import create_app

__all__ = ["create_app"]
