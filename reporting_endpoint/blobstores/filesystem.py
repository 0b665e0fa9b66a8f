"""Blobs as files under ``<data dir>/blobs/ab/<sha256>``: temp file, fsync, rename.

The default store, and the behaviour of the original ``blobs.py``: files 0600 in folders 0700,
every folder that gains or loses an entry fsynced, and content that is stored already is not
written, fsynced and renamed again (issue 14 measured 20 identical attachments re-fsynced on
every upload).
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import BinaryIO

from reporting_endpoint.blobstores._local import fsync_dir, make_private_dirs, sweep_temp
from reporting_endpoint.blobstores.base import (
    BlobInfo,
    BlobLocks,
    BlobNotFound,
    BlobWriter,
    SpoolBudget,
    StoredBlob,
    key_for,
    validate_key,
)
from reporting_endpoint.blobstores.locks import ShardLocks

CHUNK = 256 * 1024
# Digests this process knows to be durable (it fsynced them); bounded, oldest forgotten first.
# Forgetting one costs a fsync of a clean file and folder the next time, nothing else.
KNOWN_DURABLE = 65536
# Upload parts held in memory until their commit (see SpoolBudget), per process and per part.
SPOOL_TOTAL = 64 * 1024 * 1024
SPOOL_PART = 2 * 1024 * 1024


class FilesystemBlobStore:
    """Content-addressed files under ``root/blobs``; temp files in ``root/tmp``."""

    def __init__(self, root: Path, locks: BlobLocks | None = None) -> None:
        self.root = root
        self.blobs = root / "blobs"
        self.tmp = root / "tmp"
        self.locks: BlobLocks = locks or ShardLocks(root / "locks")
        # Folders known to be on disk with their entries. Only added to after their fsync
        # returned, so a concurrent upload never skips a sync another is still doing, and empty
        # at start: a process that died between mkdir and fsync left them unknown.
        self._synced: set[Path] = set()
        self._durable: OrderedDict[str, None] = OrderedDict()
        self._durable_lock = threading.Lock()  # commits and deletions run in worker threads
        self._ensured = False
        self._spool = SpoolBudget(SPOOL_TOTAL, SPOOL_PART)

    # --- lifecycle ----------------------------------------------------------------------

    def ensure(self) -> None:
        make_private_dirs(self.root, self.blobs, self.tmp)
        self._ensured = True

    async def start(self) -> None:
        await asyncio.to_thread(self.ensure)
        await self.sweep()

    async def close(self) -> None:
        return None

    async def sweep(self, older_than_seconds: float = 3600) -> int:
        return await asyncio.to_thread(sweep_temp, self.tmp, older_than_seconds)

    # --- writing ------------------------------------------------------------------------

    def writer(self) -> BlobWriter:
        # Once: three mkdir calls for every file part were 2 % of a 20-attachment upload.
        if not self._ensured:
            self.ensure()
        return BlobWriter(self.tmp, self._spool)

    async def commit(self, writer: BlobWriter) -> StoredBlob:
        return await asyncio.to_thread(self.commit_blocking, writer)

    async def commit_all(self, writers: Sequence[BlobWriter]) -> list[StoredBlob]:
        known = self._commit_known(writers)
        if known is not None:
            return known
        # One thread hop for the whole upload; the fsyncs queue on one disk anyway.
        return await asyncio.to_thread(lambda: [self.commit_blocking(w) for w in writers])

    def _commit_known(self, writers: Sequence[BlobWriter]) -> list[StoredBlob] | None:
        """On the event loop, without a thread hop, when every part is content this process
        has made durable already and holds in memory: one ``utime`` each (see ``_reuse``),
        nothing written. None otherwise (or when a file went meanwhile): the full commit."""
        digests = [w.sha256 for w in writers]
        with self._durable_lock:
            if not all(w.in_memory for w in writers) or not all(
                d in self._durable for d in digests
            ):
                return None
        stored = []
        for writer, digest in zip(writers, digests, strict=True):
            key = key_for(digest)
            try:
                os.utime(self.root / key)
            except FileNotFoundError:
                return None
            stored.append(StoredBlob(digest, writer.size, key))
        for writer in writers:
            writer.discard()
        return stored

    def commit_blocking(self, writer: BlobWriter) -> StoredBlob:
        """Make the file durable at its content address (blocking).

        A file survives a power loss only once every folder on its path that gained an entry
        is synced too: the file, its ``blobs/ab`` folder, ``tmp/`` (the temp name left it) and,
        until this process has synced them once, ``blobs/`` and the folders up to the one that
        holds the data folder. The caller commits the row only after.
        """
        try:
            digest = writer.sha256
            key = key_for(digest)
            final = self.root / key
            if final.exists():
                try:
                    self._reuse(final, digest)
                except FileNotFoundError:
                    pass  # a deletion took it meanwhile: write it as a new file below
                else:
                    writer.discard()  # a leftover temp name is swept: no fsync of tmp/ for it
                    return StoredBlob(digest, writer.size, key)
            writer.file.flush()  # a part held in memory reaches its temp file here
            # Stamp the commit time, not the last write's: a deletion running meanwhile skips
            # files newer than its start, and a slow upload's last write can be older than
            # that while its row is still on the way.
            os.utime(writer.file.fileno())
            os.fsync(writer.file.fileno())
            writer.file.close()
            final.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.replace(writer.path, final)
            fsync_dir(final.parent)
            fsync_dir(self.tmp)
            self._sync_parents(final.parent)
            self._remember(digest)
            return StoredBlob(digest, writer.size, key)
        except BaseException:
            writer.discard()
            raise

    def _reuse(self, final: Path, digest: str) -> None:
        """Take an existing file for this upload without writing it again.

        Its mtime moves to now, so a deletion that started before this commit leaves it alone
        (the same reason ``commit`` stamps new files). Unless this process made it durable
        itself, the file and its folder are fsynced once: another process may have renamed it
        a moment ago and not yet synced, and fsyncing clean data costs next to nothing.
        """
        os.utime(final)
        with self._durable_lock:
            if digest in self._durable:
                self._durable.move_to_end(digest)
                return
        descriptor = os.open(final, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        fsync_dir(final.parent)
        self._sync_parents(final.parent)
        self._remember(digest)

    def _sync_parents(self, folder: Path) -> None:
        # blobs/ holds the entry of ab/, the data folder those of blobs/ and tmp/, and so on up.
        for parent, entry in (
            (self.blobs, folder),
            (self.root, self.blobs),
            (self.root.parent, self.root),
        ):
            if entry not in self._synced:
                fsync_dir(parent)
                self._synced.add(entry)

    def _remember(self, digest: str) -> None:
        with self._durable_lock:
            self._durable[digest] = None
            self._durable.move_to_end(digest)
            while len(self._durable) > KNOWN_DURABLE:
                self._durable.popitem(last=False)

    # --- keeping deletions off blobs whose rows are on their way (locks.py) ------------

    def uploading(self, keys: Sequence[str]) -> AbstractAsyncContextManager[None]:
        return self.locks.uploading(keys)

    def removing(self, keys: Sequence[str]) -> AbstractAsyncContextManager[bool]:
        return self.locks.removing(keys)

    # --- reading ------------------------------------------------------------------------

    def path(self, key: str) -> Path:
        """The file of ``key`` (validated: never a path outside ``blobs/``)."""
        return self.root / validate_key(key)

    async def open(self, key: str) -> _FileStream:
        path = self.path(key)

        def opened() -> tuple[BinaryIO, int]:
            try:
                file = path.open("rb")
            except FileNotFoundError:
                raise BlobNotFound(key) from None
            return file, os.fstat(file.fileno()).st_size

        file, size = await asyncio.to_thread(opened)
        return _FileStream(file, size)

    @asynccontextmanager
    async def local_file(self, key: str) -> AsyncIterator[Path]:
        path = self.path(key)
        if not await asyncio.to_thread(path.is_file):
            raise BlobNotFound(key)
        yield path

    async def exists(self, key: str) -> bool:
        return await asyncio.to_thread(self.path(key).is_file)

    # --- deleting -----------------------------------------------------------------------

    async def delete(self, key: str, *, unless_committed_after_ns: int | None = None) -> bool:
        return bool(
            await self.delete_many([key], unless_committed_after_ns=unless_committed_after_ns)
        )

    async def delete_many(
        self, keys: Sequence[str], *, unless_committed_after_ns: int | None = None
    ) -> int:
        paths = [self.path(key) for key in keys]
        return await asyncio.to_thread(self._delete_blocking, paths, unless_committed_after_ns)

    def _delete_blocking(self, paths: Sequence[Path], after_ns: int | None) -> int:
        folders: set[Path] = set()
        removed = 0
        for path in paths:
            try:
                if after_ns is not None and path.stat().st_mtime_ns > after_ns:
                    continue
                path.unlink()
            except FileNotFoundError:
                continue
            removed += 1
            folders.add(path.parent)
            with self._durable_lock:
                self._durable.pop(path.name, None)
        # Each folder that lost an entry once, so the removals survive a power loss too.
        for folder in folders:
            fsync_dir(folder)
        return removed

    async def list_blobs(self) -> AsyncIterator[BlobInfo]:
        # One ``ab`` folder per thread hop: at most 256 hops, each a bounded listing.
        folders = await asyncio.to_thread(_subfolders, self.blobs)
        for folder in folders:
            for info in await asyncio.to_thread(_list_folder, folder):
                yield info


class _FileStream:
    """An open blob file read in chunks off the event loop."""

    def __init__(self, file: BinaryIO, size: int) -> None:
        self.file = file
        self.size = size

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            while chunk := await asyncio.to_thread(self.file.read, CHUNK):
                yield chunk
        finally:
            self.file.close()

    async def aclose(self) -> None:
        self.file.close()


def _subfolders(blobs: Path) -> list[Path]:
    if not blobs.is_dir():
        return []
    return sorted(p for p in blobs.iterdir() if p.is_dir() and len(p.name) == 2)


def _list_folder(folder: Path) -> list[BlobInfo]:
    found: list[BlobInfo] = []
    with os.scandir(folder) as entries:
        for entry in entries:
            key = f"blobs/{folder.name}/{entry.name}"
            try:
                validate_key(key)
                stat = entry.stat()
            except (ValueError, FileNotFoundError):
                continue  # not a blob of ours, or deleted while listing
            found.append(BlobInfo(key, stat.st_size, stat.st_mtime_ns))
    return found
