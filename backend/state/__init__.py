"""The files a backend keeps under MODEL_DIR: atomic JSON files (the stored configuration), SQLite in
WAL mode shared by a backend's workers, and the trainings' records every worker reads.

May import: core.
"""
