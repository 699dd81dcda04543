"""The image users run, built for real where no image can be pulled: a Debian 12 base made with
``debootstrap`` from the package mirror apt already uses, imported into podman once (kept by the
engine, skipped when it exists), then this checkout's Dockerfile built on it with ``podman build``.

pip inside the build reaches the host's package index through the host network, its certificates
(mounted for the build) and its pip.conf (the Dockerfile's ``pipconf`` build secret): nothing of the
host is baked into the image.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

from harness.servers import ROOT
from tests.support.podman import EngineUnavailable, podman_command

BASE_IMAGE = "localhost/lsbackend-base:bookworm"
IMAGE = "localhost/lsbackend:latest"
DEBIAN_PACKAGES = "python3,python3-venv,ca-certificates"
DEFAULT_MIRROR = "http://deb.debian.org/debian"


def debian_mirror() -> str:
    """The Debian mirror apt uses here (deb822 sources first, then sources.list)."""
    for path in (Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list")):
        if path.exists():
            text = path.read_text()
            found = re.search(r"^URIs:\s*(\S+)", text, re.MULTILINE) or re.search(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)", text, re.MULTILINE)
            if found:
                return found.group(1)
    return DEFAULT_MIRROR


class Engine:
    """The podman command line as the docker driver's tests set it up (rootful, runc, cgroupfs, no
    default ulimits), and what each build step cost."""

    def __init__(self, folder: Path) -> None:
        self.command, self.env = podman_command(folder)
        self.costs: dict[str, float] = {}
        self.outputs: dict[str, str] = {}

    def run(self, *args: str, timeout: float = 600, check: bool = True, data: bytes | None = None) -> subprocess.CompletedProcess:
        done = subprocess.run([*self.command, *args], input=data, env=self.env, capture_output=True, timeout=timeout,
                              check=False)
        if check and done.returncode != 0:
            raise EngineUnavailable(f"podman {args[0]} failed: {done.stderr.decode(errors='replace')[-2000:]}")
        return done

    def text(self, *args: str) -> str:
        return self.run(*args).stdout.decode()

    def exists(self, image: str) -> bool:
        return self.run("image", "exists", image, check=False).returncode == 0

    def base_image(self) -> str:
        """The Debian base, made once per engine: debootstrap (minbase and python3), then podman import."""
        if self.exists(BASE_IMAGE):
            self.costs["base (cached)"] = 0.0
            return BASE_IMAGE
        debootstrap = shutil.which("debootstrap")
        if debootstrap is None:
            raise EngineUnavailable("debootstrap is not installed (.ci/run installs it: apt-get install debootstrap)")
        began = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="lsbackend-base-") as root:
            made = subprocess.run([debootstrap, "--variant=minbase", f"--include={DEBIAN_PACKAGES}", "bookworm", root,
                                   debian_mirror()], capture_output=True, timeout=900, check=False)
            if made.returncode != 0:
                raise EngineUnavailable(f"debootstrap failed: {made.stderr.decode(errors='replace')[-2000:]}")
            self.costs["debootstrap"] = time.monotonic() - began
            tar = subprocess.run(["tar", "-C", root, "-c", "."], capture_output=True, check=True, timeout=300)
            self.run("import", "-", BASE_IMAGE, data=tar.stdout)
        self.costs["base"] = time.monotonic() - began
        return BASE_IMAGE

    def build(self, tag: str = IMAGE, step: str = "build", context: Path = ROOT) -> str:
        """The Dockerfile of ``context`` (this checkout's, or one under deploy/) on the local base, in the docker
        format (podman drops HEALTHCHECK in its own); its cost as ``step``, its output as ``self.outputs[step]``."""
        base = self.base_image()
        # The host's certificates for pip (its index may sit behind a proxy with its own CA), and its pip.conf
        # as the Dockerfile's build secret: for this build only, in no layer.
        extra = ["-v=/etc/ssl/certs:/etc/ssl/certs:ro"] if os.path.isdir("/etc/ssl/certs") else []
        if os.path.exists("/etc/pip.conf"):
            extra.append("--secret=id=pipconf,src=/etc/pip.conf")
        began = time.monotonic()
        done = self.run("build", "--format", "docker", "--network", "host", *extra,
                        "--build-arg", f"BASE_IMAGE={base}", "-t", tag, str(context), timeout=1200)
        self.costs[step] = time.monotonic() - began
        self.outputs[step] = done.stdout.decode(errors="replace")
        return tag


def layers_holding(engine: Engine, image: str, needles: list[bytes], folder: Path) -> dict[str, list[str]]:
    """Each needle found in a file of any of ``image``'s layers, with the files that hold it: ``podman save``,
    then every regular file of every layer read through (what ``podman history`` cannot show)."""
    archive = folder / "saved.tar"
    engine.run("save", "--format", "docker-archive", "-o", str(archive), image)
    found: dict[str, list[str]] = {}
    with tarfile.open(archive) as saved:
        for member in saved:
            if not member.isfile() or not member.name.endswith((".tar", "layer.tar")):
                continue
            with tarfile.open(fileobj=saved.extractfile(member)) as layer:
                for entry in layer:
                    if not entry.isfile():
                        continue
                    content = layer.extractfile(entry).read()  # type: ignore[union-attr]
                    for needle in needles:
                        if needle in content:
                            found.setdefault(needle.decode(errors="replace"), []).append(entry.name)
    archive.unlink()
    return found
