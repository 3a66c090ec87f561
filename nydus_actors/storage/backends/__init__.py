"""Storage backends: one module per kind, behind `BlobBackend` (base.py)."""

from nydus_actors.storage.backends.base import BackendError, BackendMetrics, BlobBackend

__all__ = ["BackendError", "BackendMetrics", "BlobBackend"]
