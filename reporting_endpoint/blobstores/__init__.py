"""Where minidumps and attachments live: a folder (default) or S3-compatible storage.

``open_blob_store`` is the only place that chooses; everything else uses ``base.BlobStore``.
"""

from __future__ import annotations

from pathlib import Path

from reporting_endpoint.blobstores.base import (
    BlobInfo,
    BlobLocks,
    BlobNotFound,
    BlobStore,
    BlobStoreBusy,
    BlobStoreError,
    BlobStream,
    BlobWriter,
    SharesBlobLocks,
    StoredBlob,
)

__all__ = [
    "BlobInfo",
    "BlobLocks",
    "BlobNotFound",
    "BlobStore",
    "BlobStoreBusy",
    "BlobStoreError",
    "BlobStream",
    "BlobWriter",
    "SharesBlobLocks",
    "StoredBlob",
    "blob_locks_of",
    "open_blob_store",
]


def blob_locks_of(storage: object) -> BlobLocks | None:
    """The storage's own blob locks when it has some every host sees, else None (local)."""
    return storage.blob_locks() if isinstance(storage, SharesBlobLocks) else None


def open_blob_store(spec: str, data_dir: Path, locks: BlobLocks | None = None) -> BlobStore:
    """``""`` -> files under ``data_dir``; a folder path -> files there; ``s3://bucket/prefix``
    -> that bucket (with ``data_dir/tmp`` for uploads in progress).

    ``locks`` orders uploads and removals of the same content (``locks.py``); by default
    flock folders under ``data_dir/locks``, which every process of one host shares."""
    if spec.startswith("s3://"):
        # Imported here so a deployment on the default store never loads the S3 client.
        from reporting_endpoint.blobstores.s3 import S3BlobStore

        return S3BlobStore(spec, data_dir, locks)
    if "://" in spec:
        raise ValueError(f"unknown blob store {spec!r}: a folder path or s3://bucket/prefix")
    from reporting_endpoint.blobstores.filesystem import FilesystemBlobStore

    return FilesystemBlobStore(Path(spec) if spec else data_dir, locks)
