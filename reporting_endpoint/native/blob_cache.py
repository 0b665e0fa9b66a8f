"""Symbol blobs kept on local disk when the blob store is a bucket: one download per file.

Symbol blobs are content addressed and never change, so a local copy named by its sha256 is
valid for ever and may be shared by every process on the host. Without it each crash would
download every symbol file of its modules (hundreds of MB for an Electron app) from S3.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING

from reporting_endpoint.blobstores import BlobStore
from reporting_endpoint.blobstores.base import key_for

if TYPE_CHECKING:
    from reporting_endpoint.settings import Settings

_SHA256 = re.compile(r"[0-9a-f]{64}")
# A copy used within this many seconds is kept even past the budget (a walk may hold it).
IN_USE = 600.0
# A temp download older than this was left by a killed process.
STALE_PART = 3600.0


class SymbolBlobCache:
    """``path(sha256)``: a local copy of a symbol blob; least recently used copies go first
    once the folder holds more than ``max_bytes``. A copy is written to a temp name, checked
    against its hash, synced and renamed, so a reader never sees half a file."""

    def __init__(self, blobs: BlobStore, folder: Path, max_bytes: int) -> None:
        self.blobs = blobs
        self.folder = folder
        self.max_bytes = max_bytes
        self._downloads: dict[str, asyncio.Task[Path]] = {}

    async def path(self, sha256: str) -> Path:
        if not _SHA256.fullmatch(sha256):
            raise ValueError(f"not a sha256: {sha256[:80]!r}")
        target = self.folder / sha256
        try:
            await asyncio.to_thread(os.utime, target)  # its use, for the eviction order
            return target
        except FileNotFoundError:
            pass
        task = self._downloads.get(sha256)
        if task is None:
            task = asyncio.create_task(self._download(sha256, target))
            self._downloads[sha256] = task
            task.add_done_callback(lambda _: self._downloads.pop(sha256, None))
        # Shielded: a caller that gives up does not cancel the download others wait for.
        return await asyncio.shield(task)

    async def _download(self, sha256: str, target: Path) -> Path:
        await asyncio.to_thread(self.folder.mkdir, mode=0o700, parents=True, exist_ok=True)
        temp = self.folder / f".{sha256}.{os.getpid()}.{time.monotonic_ns()}.part"
        digest = hashlib.sha256()
        stream = await self.blobs.open(key_for(sha256))
        try:
            handle = await asyncio.to_thread(temp.open, "wb")
            try:
                async for chunk in stream:
                    digest.update(chunk)
                    await asyncio.to_thread(handle.write, chunk)
                await asyncio.to_thread(handle.flush)
                await asyncio.to_thread(os.fsync, handle.fileno())
            finally:
                await asyncio.to_thread(handle.close)
                await stream.aclose()
            if digest.hexdigest() != sha256:
                raise OSError(f"symbol blob {sha256} does not match its hash")
            await asyncio.to_thread(os.replace, temp, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                await asyncio.to_thread(temp.unlink)
        await asyncio.to_thread(self._evict, target)
        return target

    def _evict(self, keep: Path) -> None:
        entries: list[tuple[float, int, Path]] = []
        now = time.time()
        for path in self.folder.iterdir():
            with contextlib.suppress(FileNotFoundError):
                status = path.stat()
                if not _SHA256.fullmatch(path.name):
                    # A download a killed process left: counted until it is stale, then gone.
                    if path.name.endswith(".part") and now - status.st_mtime > STALE_PART:
                        path.unlink()
                    elif path.name.endswith(".part"):
                        entries.append((now, status.st_size, path))
                    continue
                entries.append((status.st_mtime, status.st_size, path))
        total = sum(size for _, size, _ in entries)
        for used, size, path in sorted(entries):
            if total <= self.max_bytes:
                break
            # Files used lately may be about to be opened by a walk that was handed them: the
            # folder may exceed its budget for that long rather than pull them away.
            if path == keep or now - used < IN_USE or path.name.endswith(".part"):
                continue
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            total -= size


CACHE_FOLDER = "symbol-blobs"


def symbol_cache_from(settings: Settings, blobs: BlobStore) -> SymbolBlobCache | None:
    """The cache a processor uses with this blob store: none for a local folder (its files
    are read in place), ``<data folder>/symbol-blobs`` of ``symbol_cache_bytes`` otherwise."""
    from reporting_endpoint.blobstores.filesystem import FilesystemBlobStore

    if isinstance(blobs, FilesystemBlobStore):
        return None
    return SymbolBlobCache(blobs, settings.data_dir / CACHE_FOLDER, settings.symbol_cache_bytes)
