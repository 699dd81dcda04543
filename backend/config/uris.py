"""The model URIs a configure names, as patterns both the spec and the Antenna pipeline read."""

from __future__ import annotations

import re

MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>[^/]+)|@(?P<alias>[^/]+))/?$")  # models:/name/version or models:/name@alias
