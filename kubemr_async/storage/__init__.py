"""Blob backends: where inputs, runs and results live (files locally, S3 in a cluster)."""

from .base import BlobNotFound, BlobStore

__all__ = ["BlobNotFound", "BlobStore"]
