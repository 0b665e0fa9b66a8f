"""The blob store protocol: where minidumps and attachments live, in the service's own terms.

An upload streams into a local temp file (``BlobWriter``) that hashes and counts as it goes;
``commit`` makes it durable at its content address and returns what the row records. Rows hold
the key (``blobs/ab/<sha256>``), never a path or URL, so the same rows work on every store and
a key from a row is checked before it touches a folder or a bucket.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
import threading
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol, runtime_checkable

# The only keys a store hands out or accepts: whatever a row holds, no other name reaches a
# folder or a bucket (rows are written by us, but a restored or hand-edited database is data).
_KEY = re.compile(r"blobs/([0-9a-f]{2})/\1[0-9a-f]{62}")
TEMP_PREFIX = "upload-"
TEMP_SUFFIX = ".part"


class BlobNotFound(LookupError):
    """No blob under that key (deleted, swept, or never stored)."""


class BlobStoreError(Exception):
    """The store could not take a blob now (the bucket unreachable, the disk full); ``code``
    is the reason an upload is answered with (503: try again later)."""

    code = "blob_store_error"


class BlobStoreBusy(BlobStoreError):
    """A deletion held the lock of the upload's content for longer than an upload waits."""

    code = "blob_store_busy"


@dataclass(frozen=True, slots=True)
class StoredBlob:
    """What a crash row records about one committed file."""

    sha256: str
    size: int
    key: str  # ``blobs/ab/<sha256>``; the same on every store


@dataclass(frozen=True, slots=True)
class BlobInfo:
    """One stored blob as a sweep sees it."""

    key: str
    size: int
    modified_ns: int  # when it was last committed (a deletion skips blobs newer than its start)


def key_for(sha256: str) -> str:
    return validate_key(f"blobs/{sha256[:2]}/{sha256}")


def validate_key(key: str) -> str:
    """``key`` itself when it is a content address; ValueError otherwise."""
    if not _KEY.fullmatch(key):
        raise ValueError("not a blob key")
    return key


class SpoolBudget:
    """Bytes of upload parts a process may hold in memory at once, shared by its writers.

    A part that fits stays in memory until its commit: content stored already (the usual case
    for attachments, and for a dump uploaded twice) then costs no temp file at all, and a new
    blob is written to its temp file on the commit's thread, not on the event loop.
    """

    def __init__(self, total: int, per_part: int) -> None:
        self.available = total
        self.per_part = per_part
        self._lock = threading.Lock()  # commits give back from worker threads

    def take(self, held: int, more: int) -> bool:
        if held + more > self.per_part:
            return False
        with self._lock:
            if more > self.available:
                return False
            self.available -= more
            return True

    def give_back(self, amount: int) -> None:
        with self._lock:
            self.available += amount


class BlobWriter:
    """One upload part being received: hashes and counts as it goes; ``head`` keeps the first
    bytes (the caller checks the ``MDMP`` magic before committing).

    The bytes go to a local temp file (``path``, ``file``), or, with a ``SpoolBudget``, stay in
    memory while the budget allows and reach a temp file only when ``path`` or ``file`` is
    first asked for. Both stores take uploads this way: the body arrives at the client's pace,
    and S3 gets one PUT of a finished file instead of a multipart upload held open by a slow
    client.
    """

    def __init__(self, folder: Path, spool: SpoolBudget | None = None) -> None:
        self.folder = folder
        self.hash = hashlib.sha256()
        self.size = 0
        self.head = b""
        self._spool = spool
        self._memory: bytearray | None = bytearray() if spool is not None else None
        self._path: Path | None = None
        self._file: BinaryIO | None = None
        if self._memory is None:
            self._open()

    def _open(self) -> None:
        # mkstemp creates the file 0600: dumps hold process memory.
        descriptor, name = tempfile.mkstemp(dir=self.folder, prefix=TEMP_PREFIX, suffix=TEMP_SUFFIX)
        self._path = Path(name)
        self._file = os.fdopen(descriptor, "wb")
        if self._memory is not None:
            self._file.write(self._memory)
            self._release_memory()

    def _release_memory(self) -> None:
        if self._memory is not None and self._spool is not None:
            self._spool.give_back(len(self._memory))
        self._memory = None

    @property
    def path(self) -> Path:
        if self._path is None:
            self._open()
        assert self._path is not None
        return self._path

    @property
    def file(self) -> BinaryIO:
        if self._file is None:
            self._open()
        assert self._file is not None
        return self._file

    @property
    def in_memory(self) -> bool:
        return self._memory is not None

    def write(self, data: bytes) -> None:
        if len(self.head) < 8:
            self.head += data[: 8 - len(self.head)]
        self.hash.update(data)
        self.size += len(data)
        if self._memory is not None:
            assert self._spool is not None
            if self._spool.take(len(self._memory), len(data)):
                self._memory += data
                return
            self._open()
        self.file.write(data)

    @property
    def sha256(self) -> str:
        return self.hash.hexdigest()

    def discard(self) -> None:
        """Drop the part (a rejected upload, or one whose content is stored already)."""
        self._release_memory()
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
        if self._path is not None:
            with contextlib.suppress(OSError):
                self._path.unlink()


class BlobLocks(Protocol):
    """Per-content exclusion between uploads (shared) and blob removals (exclusive), for
    every process that writes to one store: see ``locks.py`` for why and for the local
    implementation. A store shared by several hosts needs one all of them see."""

    def uploading(self, keys: Iterable[str]) -> AbstractAsyncContextManager[None]: ...

    def removing(self, keys: Iterable[str]) -> AbstractAsyncContextManager[bool]: ...


@runtime_checkable
class SharesBlobLocks(Protocol):
    """A storage every host of a deployment shares (a database server) may hand out
    ``BlobLocks`` that all of them see (e.g. PostgreSQL advisory locks); the composition
    (app.py, the commands) then gives them to the blob store instead of the local ones."""

    def blob_locks(self) -> BlobLocks: ...


class BlobStream(Protocol):
    """An opened blob: its size first (for Content-Length), then its bytes in chunks."""

    size: int

    def __aiter__(self) -> AsyncIterator[bytes]: ...

    async def aclose(self) -> None: ...


@runtime_checkable
class BlobStore(Protocol):
    """Content-addressed storage for minidumps and attachments.

    ``commit`` returns only once the blob is durable, so the caller may commit the row after
    it; the same content is stored once. Every method that blocks runs off the event loop.
    """

    async def start(self) -> None:
        """Create what the store needs locally and sweep temp files a killed process left."""

    async def close(self) -> None: ...

    def writer(self) -> BlobWriter:
        """A new temp file for one upload's part."""
        ...

    async def commit(self, writer: BlobWriter) -> StoredBlob:
        """Make the writer's file durable at its content address; the temp file is gone after.

        When the blob exists already it is not written again, only marked as committed now.
        """
        ...

    async def commit_all(self, writers: Sequence[BlobWriter]) -> list[StoredBlob]:
        """``commit`` for every part of one upload, in order; on failure none is left to the
        caller (the written ones become orphans for the sweep, never rows)."""
        ...

    async def open(self, key: str) -> BlobStream:
        """The blob's size and bytes, for a download; BlobNotFound when it is gone."""
        ...

    def local_file(self, key: str) -> AbstractAsyncContextManager[Path]:
        """A local file with the blob's bytes for as long as the context lasts (parsers want a
        path); on S3 a temp download removed on exit. BlobNotFound when it is gone."""
        ...

    async def exists(self, key: str) -> bool: ...

    async def delete(self, key: str, *, unless_committed_after_ns: int | None = None) -> bool:
        """Remove one blob durably; False when it was absent or committed after the given time
        (an upload of the same content, whose row is on its way, reused it)."""
        ...

    async def delete_many(
        self, keys: Sequence[str], *, unless_committed_after_ns: int | None = None
    ) -> int:
        """``delete`` for several keys; returns how many went."""
        ...

    def list_blobs(self) -> AsyncIterator[BlobInfo]:
        """Every stored blob, for orphan sweeps (the caller compares with the rows)."""
        ...

    async def sweep(self, older_than_seconds: float = 3600) -> int:
        """Remove temp files older than that (left by a killed process; never answered)."""
        ...

    def uploading(self, keys: Sequence[str]) -> AbstractAsyncContextManager[None]:
        """Held by an upload from its blob commit until its row has committed: no deletion
        removes these blobs meanwhile (``locks.py``). BlobStoreBusy when a deletion holds
        them too long."""
        ...

    def removing(self, keys: Sequence[str]) -> AbstractAsyncContextManager[bool]:
        """Held by a deletion from its "is it still referenced?" check until the blobs are
        gone; yields False when uploads kept them busy (then remove nothing: the orphan sweep
        takes them later)."""
        ...
