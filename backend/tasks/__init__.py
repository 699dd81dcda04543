"""A task's data, fetched: from Label Studio (with its token), from URLs (SSRF-guarded outbound HTTP),
from DagsHub datapoints or allowed local roots, into a bounded disk cache; the Label Studio API client.

May import: core, labeling, config.
"""
