"""The vocabulary every room shares: the named errors and their HTTP mapping, redaction of secrets,
the settings read from the environment, process identity, the ticker, the Prometheus metrics.

May import: nothing else of backend (the standard library and small well-kept packages only).
"""
