"""The store: one SQLite file with every candidate, every verdict and every timing."""

from kerneltune.store.db import Store, cache_dir, default_db_path

__all__ = ["Store", "cache_dir", "default_db_path"]
