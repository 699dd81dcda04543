"""When a training is due: the ``training`` block of a configure, with defaults a team can live with.

Label Studio's own "start training on annotation submission" sends ``START_TRAINING`` inside every
N-th annotator save, and a webhook that is slow slows the save, so the backend decides for itself:

- ``trigger: "manual"`` (default): only ``START_TRAINING`` (the button, or ``POST /train``) trains;
- ``trigger: "annotations"``: also after ``every`` new or changed annotations, once there are at least
  ``min_annotations``, when none arrived for ``quiet_s`` (a burst settles first), and at most once per
  ``min_interval_s``;
- after a failed training, automatic ones back off (``backoff_s``, doubling, up to an hour); an explicit
  ``START_TRAINING`` does not wait for the backoff, only for the training that runs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from backend.core.errors import BadRequest

TRIGGERS = ("manual", "annotations")
PROMOTIONS = ("auto", "manual")
MAX_BACKOFF_S = 3600.0


@dataclass(frozen=True)
class TrainingPolicy:
    """One configuration's training settings, validated."""

    alias: str = "champion"  # the alias a passing version is promoted to (the one the backend serves)
    candidate_alias: str = "candidate"  # set on every registered version, passing or not
    promote: str = "auto"
    trigger: str = "manual"
    min_annotations: int = 10
    every: int = 20
    quiet_s: float = 30.0
    min_interval_s: float = 300.0
    backoff_s: float = 60.0
    gate_tasks: int = 200  # annotated tasks the gate predicts with the new and the serving version
    max_regression: float = 0.0  # how much lower the new version's agreement may be than the serving one's
    min_agreement: float = 0.0
    flavor: str = ""  # how to log what train_hook returns; by its type when empty
    params: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, raw: dict[str, Any] | None, default_alias: str = "champion") -> TrainingPolicy:
        raw = dict(raw or {})
        unknown = sorted(set(raw) - set(cls.__dataclass_fields__))
        if unknown:
            raise BadRequest(
                f"unknown training field(s): {', '.join(unknown)}",
                f"Known fields: {', '.join(sorted(cls.__dataclass_fields__))}.",
            )
        raw.setdefault("alias", default_alias)
        defaults = cls()
        values: dict[str, Any] = {}
        for name, default in asdict(defaults).items():
            value = raw.get(name, default)
            if isinstance(default, str):
                if not isinstance(value, str):
                    raise BadRequest(f"training.{name} must be a string", f"got {value!r}")
            elif isinstance(default, (int, float)):
                if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                    raise BadRequest(f"training.{name} must be a number of at least 0", f"got {value!r}")
                value = type(default)(value)
            elif isinstance(default, dict) and not isinstance(value, dict):
                raise BadRequest(f"training.{name} must be a JSON object", f"got {value!r}")
            values[name] = value
        if values["trigger"] not in TRIGGERS:
            raise BadRequest(f"training.trigger must be one of {', '.join(TRIGGERS)}", f"got {values['trigger']!r}")
        if values["promote"] not in PROMOTIONS:
            raise BadRequest(f"training.promote must be one of {', '.join(PROMOTIONS)}", f"got {values['promote']!r}")
        if not values["alias"] or values["alias"] == values["candidate_alias"]:
            raise BadRequest("training.alias and training.candidate_alias must differ and not be empty",
                             f"got {values['alias']!r} and {values['candidate_alias']!r}")
        if values["every"] < 1:
            raise BadRequest("training.every must be at least 1", f"got {values['every']!r}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def backoff(self, failures: int) -> float:
        """Seconds automatic trainings wait after ``failures`` failed ones in a row."""
        return 0.0 if failures <= 0 else min(MAX_BACKOFF_S, self.backoff_s * 2 ** (failures - 1))

    def automatic_due(self, *, annotations: int, changed: int, last_event_at: float, last_started_at: float,
                      failures: int, last_failed_at: float, now: float) -> str | None:
        """Why an automatic training should start now, or None. ``annotations``: the project's count;
        ``changed``: new or changed annotations since the last training started."""
        if self.trigger != "annotations":
            return None
        if annotations < self.min_annotations or changed < self.every:
            return None
        if now - last_event_at < self.quiet_s or now - last_started_at < self.min_interval_s:
            return None
        if failures and now - last_failed_at < self.backoff(failures):
            return None
        return f"{changed} new annotation(s)"

    def waits_for(self, *, annotations: int, changed: int, last_event_at: float, last_started_at: float,
                  failures: int, last_failed_at: float, now: float) -> str:
        """What an automatic training waits for, for /health (empty when nothing)."""
        if self.trigger != "annotations":
            return "START_TRAINING (training.trigger is manual)"
        if annotations < self.min_annotations:
            return f"{self.min_annotations - annotations} more annotation(s) before the first training"
        if changed < self.every:
            return f"{self.every - changed} more new annotation(s)"
        if now - last_event_at < self.quiet_s:
            return f"{self.quiet_s - (now - last_event_at):.0f} s without new annotations"
        if now - last_started_at < self.min_interval_s:
            return f"{self.min_interval_s - (now - last_started_at):.0f} s of training.min_interval_s"
        if failures and now - last_failed_at < self.backoff(failures):
            return f"{self.backoff(failures) - (now - last_failed_at):.0f} s of backoff after {failures} failure(s)"
        return ""
