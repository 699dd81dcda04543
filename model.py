"""The configured model's pipeline, at the top of the checkout where readers look for it: the code is
``backend/model/pipeline.py`` (``pre_hook -> model.predict -> post_hook`` on one batch)."""

from backend.model.pipeline import Pipeline, StageTimer

__all__ = ["Pipeline", "StageTimer"]
