"""Names and labels from the project's labeling config, so a post hook never hard-codes them.

``Control`` is one control tag (``RectangleLabels name="box" toName="image"``): its ``from_name``,
``to_name``, result ``type`` and labels, and how model class names or indices map onto those labels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


class HookConfigError(ValueError):
    """The labeling config does not have what the hook needs, or a label does not map onto it."""


def _interface(config: str) -> Any:
    """The parsed config: the backend's cached parse where there is one, else parsed here.

    No cache of its own: this module pickles by value, and a cache (or an lru_cache wrapper, which
    pickles by reference) would travel with every hook.
    """
    try:
        from backend.labeling.validation import parse_label_config
    except ImportError:
        from label_studio_sdk.label_interface import LabelInterface

        return LabelInterface(config)
    return parse_label_config(config)


@dataclass
class Control:
    """One control of the config, and the mapping from the model's classes to its labels.

    ``label_map`` maps a model class (name or index) to a config label, or to None to drop it;
    unmapped classes are matched to a label of the same name (case-insensitive). ``on_unknown``
    is "skip" (drop the region, counted in ``skipped``) or "error".
    """

    from_name: str
    to_name: str
    tag: str
    labels: tuple[str, ...] = ()
    label_map: Mapping[Any, str | None] = field(default_factory=dict)
    on_unknown: str = "skip"
    skipped: int = 0

    @property
    def type(self) -> str:
        return self.tag.lower()

    def label(self, model_class: Any, names: Mapping[int, str] | Sequence[str] | None = None) -> str | None:
        """The config label for a model class (an index is first turned into a name with ``names``)."""
        if model_class in self.label_map:
            return self.label_map[model_class]
        name = model_class
        if names is not None and not isinstance(model_class, str):
            try:
                name = names[int(model_class)]
            except (IndexError, KeyError, ValueError, TypeError):
                name = model_class
        if name in self.label_map:
            return self.label_map[name]
        if not self.labels:
            return str(name)
        by_lower = {label.lower(): label for label in self.labels}
        found = by_lower.get(str(name).lower())
        if found is None:
            if self.on_unknown == "error":
                raise HookConfigError(
                    f"class {name!r} is not a label of {self.tag} {self.from_name!r} (labels: {', '.join(self.labels)})",
                )
            self.skipped += 1
        return found


def find_control(
    config: str,
    tags: str | Sequence[str],
    from_name: str | None = None,
    to_name: str | None = None,
    label_map: Mapping[Any, str | None] | None = None,
    on_unknown: str = "skip",
) -> Control:
    """The one control of the given tag(s); ``from_name`` picks among several."""
    wanted = (tags,) if isinstance(tags, str) else tuple(tags)
    interface = _interface(config)
    candidates = [c for c in interface.controls if c.tag.lower() in {t.lower() for t in wanted}]
    if from_name is not None:
        candidates = [c for c in candidates if c.name == from_name]
    if not candidates:
        have = ", ".join(f"{c.tag} {c.name!r}" for c in interface.controls) or "none"
        raise HookConfigError(f"the labeling config has no {' or '.join(wanted)} control (it has: {have})")
    if len(candidates) > 1:
        names = ", ".join(repr(c.name) for c in candidates)
        raise HookConfigError(
            f"the labeling config has several {' or '.join(wanted)} controls ({names}); pass from_name="
        )
    control = candidates[0]
    targets = list(control.to_name or [])
    return Control(
        from_name=control.name,
        to_name=to_name or (targets[0] if targets else ""),
        tag=control.tag,
        labels=tuple(getattr(control, "labels", None) or ()),
        label_map=dict(label_map or {}),
        on_unknown=on_unknown,
    )


def has_control(config: str, tag: str) -> bool:
    return any(c.tag.lower() == tag.lower() for c in _interface(config).controls)
