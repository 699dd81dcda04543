"""An Antenna pipeline derived from a configuration: its labeling config's controls become algorithms.

Antenna wants exactly one detection-type algorithm per pipeline and a full category map for every
classifier. So a config whose controls draw regions (RectangleLabels, PolygonLabels, EllipseLabels
and their unlabelled forms) declares a ``detector``; one that only has Choices on the image declares
a ``whole-image`` detector (each image, or each crop Antenna sends, is one region). Every labelled
control becomes a classifier whose category map is its labels in config order (a Label's
``taxon_rank``, ``gbif_key`` or ``source`` attribute is carried into its entry).

Antenna keeps algorithms by ``key`` forever and never updates a category map, so a classifier's key
and name carry a digest of its labels: change the labels and Antenna registers a new algorithm
instead of scoring against the old map.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from backend.config.uris import MODELS_URI
from backend.core.errors import BadRequest
from backend.labeling.validation import data_objects, parse_label_config

if TYPE_CHECKING:
    from backend.config.spec import ModelSpec

REGION_TAGS = frozenset({"rectanglelabels", "rectangle", "polygonlabels", "polygon", "ellipselabels", "ellipse"})
LABELLED_TAGS = frozenset({"rectanglelabels", "polygonlabels", "ellipselabels", "choices"})
PIPELINE_KEYS = frozenset({"slug", "name", "description", "version"})
LABEL_EXTRAS = ("taxon_rank", "gbif_key", "source")  # a Label's attributes Antenna's category map understands
SLUG = re.compile(r"^[-a-zA-Z0-9_]{1,200}$")  # Antenna's SlugField, with room for the algorithms' suffixes


@dataclass(frozen=True)
class Algorithm:
    """One algorithm as ``/info`` declares it; ``control`` is the labeling config control it stands for."""

    key: str
    name: str
    task_type: str
    description: str
    version_name: str
    uri: str
    control: str = ""
    categories: tuple[tuple[tuple[str, Any], ...], ...] = ()  # the category map's entries, hashable

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(dict(entry)["label"] for entry in self.categories)

    @property
    def ref(self) -> dict[str, str]:
        return {"name": self.name, "key": self.key}

    def config(self) -> dict[str, Any]:
        """``AlgorithmConfigResponse``."""
        category_map = None
        if self.categories:
            category_map = {
                "data": [dict(entry) for entry in self.categories],
                "labels": list(self.labels),
                "version": self.key.rsplit("-", 1)[-1],
                "description": f"The labels of {self.control!r} in the labeling config, in its order.",
                "uri": None,
            }
        return {
            "name": self.name,
            "key": self.key,
            "description": self.description,
            "task_type": self.task_type,
            "version": 1,
            "version_name": self.version_name,
            "uri": self.uri,
            "category_map": category_map,
        }


@dataclass(frozen=True)
class PipelineDefinition:
    """What one configuration offers Antenna: a pipeline slug, its detector and its classifiers."""

    slug: str
    name: str
    description: str
    version: int
    image_key: str  # the task data key the config's Image reads ($image)
    image_name: str  # that Image's name, the results' to_name
    detector: Algorithm
    classifiers: tuple[Algorithm, ...]
    region_controls: frozenset[str]

    @property
    def whole_image(self) -> bool:
        """Only whole-image classifiers: Antenna's existing detections are classified crop by crop."""
        return not self.region_controls

    def classifier_for(self, control: str) -> Algorithm | None:
        return next((a for a in self.classifiers if a.control == control), None)

    @property
    def algorithms(self) -> tuple[Algorithm, ...]:
        return (self.detector, *self.classifiers)

    def config(self) -> dict[str, Any]:
        """``PipelineConfigResponse``."""
        return {
            "name": self.name,
            "slug": self.slug,
            "version": self.version,
            "description": self.description,
            "algorithms": [a.config() for a in self.algorithms],
            "stages": [],
        }


def define_pipeline(spec: ModelSpec) -> PipelineDefinition | None:
    """The spec's pipeline, or None for a configuration without a ``label_config`` (Label Studio only)."""
    if not spec.label_config:
        return None
    return _define(spec.label_config, json.dumps(spec.pipeline, sort_keys=True), spec.model_uri)


def check_pipeline_fields(label_config: str, pipeline: Any, model_uri: str) -> None:
    """Raise BadRequest, naming the field and the fix, when these cannot make an Antenna pipeline."""
    if not isinstance(pipeline, dict):
        raise BadRequest("'pipeline' must be a JSON object", f"got {type(pipeline).__name__}; send e.g. {{\"slug\": \"moths\"}}.")
    if pipeline and not label_config:
        raise BadRequest("'pipeline' needs a 'label_config'", "Send the labeling config whose controls the pipeline's algorithms come from.")
    if label_config:
        _define(label_config, json.dumps(pipeline, sort_keys=True), model_uri)


@functools.lru_cache(maxsize=64)
def _define(label_config: str, pipeline_json: str, model_uri: str) -> PipelineDefinition:
    fields = _pipeline_fields(json.loads(pipeline_json), model_uri)
    slug, name = fields["slug"], fields["name"]
    image = _the_image(label_config)
    controls = [c for c in parse_label_config(label_config).controls if image.name in (c.to_name or ())]
    usable = [c for c in controls if c.tag.lower() in REGION_TAGS | LABELLED_TAGS]
    if not usable:
        raise BadRequest(
            "the labeling config has no control Antenna can use",
            f"Add a RectangleLabels, PolygonLabels, EllipseLabels or Choices on the Image {image.name!r}; "
            f"it has: {', '.join(f'{c.tag} {c.name!r}' for c in controls) or 'no controls'}.",
        )
    version_name = _version_name(model_uri)
    regions = frozenset(c.name for c in usable if c.tag.lower() in REGION_TAGS)
    if regions:
        detector = Algorithm(f"{slug}-detector", f"{name}: detector", "detection",
                             f"Regions drawn by {', '.join(sorted(regions))} of the labeling config.", version_name, model_uri)
    else:
        detector = Algorithm(f"{slug}-whole-image", f"{name}: whole image", "detection",
                             "Each image, or each crop of a detection Antenna sends, as one region.", version_name, model_uri)
    classifiers = tuple(_classifier(c, slug, name, version_name, model_uri) for c in usable if c.tag.lower() in LABELLED_TAGS)
    return PipelineDefinition(slug, name, fields["description"], fields["version"], image.key, image.name,
                              detector, classifiers, regions)


def _the_image(label_config: str) -> Any:
    objects = data_objects(label_config)
    images = [o for o in objects if o.tag.lower() == "image"]
    if len(objects) != 1 or not images:
        read = ", ".join(f"{o.tag} {o.name!r}" for o in objects) or "nothing"
        raise BadRequest(
            f"an Antenna pipeline reads one image per task, and this labeling config reads {read}",
            'Send a labeling config with exactly one <Image value="$image"/> and the controls that label it.',
        )
    return images[0]


def _classifier(control: Any, slug: str, name: str, version_name: str, model_uri: str) -> Algorithm:
    entries = []
    for index, attrs in enumerate(label.attr for label in control.labels_attrs.values()):
        entry: dict[str, Any] = {"index": index, "label": str(attrs.get("value", ""))}
        entry.update({k: attrs[k] for k in LABEL_EXTRAS if attrs.get(k)})
        entries.append(entry)
    if not entries:
        raise BadRequest(
            f"the {control.tag} {control.name!r} has no labels",
            "Antenna needs every classifier's category map: give the control its <Label>/<Choice> values.",
        )
    digest = hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()[:6]
    multiple = control.tag.lower() == "choices" and control.attr.get("choice") == "multiple"
    kind = "choices" if control.tag.lower() == "choices" else "labels"
    return Algorithm(
        key=f"{slug}-{slugify(control.name)}-{digest}",
        name=f"{name}: {control.name} [{digest}]",
        task_type="tagging" if multiple else "classification",
        description=f"The {kind} of {control.tag} {control.name!r}: {', '.join(e['label'] for e in entries[:10])}"
        + (f" and {len(entries) - 10} more" if len(entries) > 10 else ""),
        version_name=version_name,
        uri=model_uri,
        control=control.name,
        categories=tuple(tuple(entry.items()) for entry in entries),
    )


def _pipeline_fields(pipeline: dict[str, Any], model_uri: str) -> dict[str, Any]:
    unknown = sorted(set(pipeline) - PIPELINE_KEYS)
    if unknown:
        raise BadRequest(f"unknown 'pipeline' field(s): {', '.join(unknown)}", f"Known: {', '.join(sorted(PIPELINE_KEYS))}.")
    for key in ("slug", "name", "description"):
        if pipeline.get(key) is not None and not isinstance(pipeline[key], str):
            raise BadRequest(f"'pipeline.{key}' must be a string", f"got {type(pipeline[key]).__name__}")
    slug = pipeline.get("slug") or default_slug(model_uri)
    if not SLUG.match(slug):
        raise BadRequest(f"'pipeline.slug' {slug!r} is not a slug",
                         "Use letters, digits, '-' and '_' only (at most 200): Antenna's pipelines are keyed by it.")
    version = pipeline.get("version", _model_version_number(model_uri))
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise BadRequest("'pipeline.version' must be a positive integer", f"got {version!r}")
    return {
        "slug": slug,
        "name": pipeline.get("name") or model_label(model_uri),
        "description": pipeline.get("description") or f"{model_uri}, served by an MLflow backend for Label Studio and Antenna.",
        "version": version,
    }


def slugify(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:100] or "model"


def model_label(model_uri: str) -> str:
    """A readable name: ``moths v3``, ``moths@champion``, ``moths (latest)``, a run's or a path's last parts."""
    match = MODELS_URI.match(model_uri)
    if match:
        if match["alias"]:
            return f"{match['name']}@{match['alias']}"
        version = match["version"] or ""
        return f"{match['name']} (latest)" if version.lower() == "latest" else f"{match['name']} v{version}"
    parts = [p for p in re.split(r"[:/]+", model_uri) if p]
    return " ".join(parts[-2:]) if model_uri.startswith("runs:") else (parts[-1] if parts else "model")


def default_slug(model_uri: str) -> str:
    """The pipeline's slug when the configure names none: from the model's name and version."""
    match = MODELS_URI.match(model_uri)
    if match and not match["alias"] and (match["version"] or "").lower() == "latest":
        return slugify(match["name"])
    return slugify(model_label(model_uri).replace("@", "-"))


def _version_name(model_uri: str) -> str:
    match = MODELS_URI.match(model_uri)
    if not match:
        return "1"
    return match["alias"] or match["version"] or "1"


def _model_version_number(model_uri: str) -> int:
    match = MODELS_URI.match(model_uri)
    version = match["version"] if match else None
    return int(version) if version and version.isdigit() and int(version) > 0 else 1
