"""State backends: where task records live (SQLite embedded, Kubernetes in a cluster)."""

from .base import JobNotFound, Record, StateStore, WatchEvent

__all__ = ["JobNotFound", "Record", "StateStore", "WatchEvent"]
