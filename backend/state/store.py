"""The configuration persisted under MODEL_DIR, so a restarted process (or a sibling worker) serves it too."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class StoredFileBroken(Exception):
    """A stored file exists but cannot be used; says which file, why, and what to do."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path} cannot be used: {reason}")
        self.path = path
        self.reason = reason
        self.fix = (f"POST /configure again (the broken file is then kept aside as {path.name}.broken-<time>), "
                    f"or restore {path} from a backup and restart the backend.")


class JsonFile:
    """One JSON document on disk, replaced atomically and readable only by its owner (it holds tokens)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def save(self, document: dict[str, Any]) -> int:
        """Write and return the new stamp."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
        try:
            with os.fdopen(fd, "w") as handle:
                json.dump(document, handle, indent=2, sort_keys=True)
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return self.stamp() or 0

    def load(self) -> dict[str, Any] | None:
        """The document; None when there is none; StoredFileBroken when it is there and unusable."""
        try:
            with self.path.open() as handle:
                document = json.load(handle)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, RecursionError) as exc:
            raise StoredFileBroken(self.path, f"{type(exc).__name__}: {exc}") from exc
        if not isinstance(document, dict):
            raise StoredFileBroken(self.path, f"it holds a {type(document).__name__}, not a JSON object")
        return document

    def keep_aside(self) -> Path | None:
        """Move an unusable file out of the way, under a name that says so, rather than overwrite it."""
        aside = self.path.with_name(f"{self.path.name}.broken-{time.strftime('%Y%m%dT%H%M%S')}")
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return None
        log.warning("kept the unusable %s aside as %s", self.path, aside)
        return aside

    def stamp(self) -> int | None:
        """Changes whenever the file is replaced; a stat, cheap enough to poll per request."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return st.st_mtime_ns ^ st.st_ino


class ConfigurationStore:
    """MODEL_DIR/configuration.json (the model spec) and MODEL_DIR/label_studio.json (from /setup)."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir
        self.configuration = JsonFile(model_dir / "configuration.json")
        self.label_studio = JsonFile(model_dir / "label_studio.json")

    @property
    def cache_dir(self) -> Path:
        return self.model_dir / "cache"

    @property
    def artifacts_dir(self) -> Path:
        return self.model_dir / "artifacts"
