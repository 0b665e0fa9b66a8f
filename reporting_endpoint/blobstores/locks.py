"""Shard locks that keep a blob deletion from racing an upload of the same content.

Blobs are shared by content, so deleting a crash may free a blob that an upload in flight has
just committed (or reused) and whose row is not committed yet. The deletion decides "no row
references it" from the database and then removes the blob: two steps, and an upload's row can
commit between them. Without a lock the upload answers 200 and its row points at nothing.

The fix is mutual exclusion per content shard (the first two hex digits of the sha256, 256
locks): an upload holds its shards *shared* from its blob commit until its row has
committed; a deletion holds them *exclusive* from its reference check until its blobs are
removed. So either the upload's row committed before the check (the deletion sees it and
keeps the blob), or the removal finished before the upload's blob commit (which then finds no
blob and writes it again). Uploads never wait for each other.

``flock`` locks belong to the open file, so they also exclude tasks of one process, and the
kernel drops them when a process dies: a killed upload or deletion never leaves a lock held.
They are taken without blocking and polled from the event loop, so no worker thread ever
sleeps in a lock wait (the storage writer needs those threads to commit the very row a
deletion may be waiting for). The locks are empty folders, ``locks/ab/`` in the local data
folder (a listing of it shows no file that is not a blob), so they cover every process of one
host, or hosts sharing the folder over NFS. Several hosts on one bucket need locks all of
them see, from the storage they share (``base.SharesBlobLocks``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path

from reporting_endpoint.blobstores._local import make_private_dirs
from reporting_endpoint.blobstores.base import BlobStoreBusy, validate_key

# First poll after 1 ms, then doubling up to 20 ms: a deletion holds a shard for one query and
# a few unlinks, an upload for one group commit.
FIRST_POLL = 0.001
MAX_POLL = 0.02
# An upload waits this long for a deletion to let go before it answers 503 (a deletion stuck
# on a storage lock can hold its shards up to the storage's own timeout).
UPLOAD_WAIT = 60.0
# A deletion gives up after this and leaves its blobs to the orphan sweep (the safe side).
REMOVAL_WAIT = 30.0


class ShardLocks:
    """``<folder>/<ab>/`` folders locked with flock; ``uploading`` shares them, ``removing``
    excludes."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        # Shard folders made already: a 20-attachment upload spent more time in mkdir than
        # in hashing (the issue-14 profile). Lock folders are never removed while running.
        self._made: set[Path] = set()

    def _shards(self, keys: Iterable[str]) -> list[Path]:
        # Sorted, so two holders of several shards always take them in the same order and
        # cannot wait on each other in a cycle.
        names = sorted({validate_key(key)[6:8] for key in keys})  # blobs/<ab>/...
        return [self.folder / name for name in names]

    @asynccontextmanager
    async def uploading(
        self, keys: Iterable[str], wait: float = UPLOAD_WAIT
    ) -> AsyncIterator[None]:
        """Hold the shards of ``keys`` shared; BlobStoreBusy after ``wait`` seconds."""
        descriptors = await self._take(self._shards(keys), fcntl.LOCK_SH, wait)
        if descriptors is None:
            raise BlobStoreBusy("a deletion held the blob lock for too long")
        try:
            yield
        finally:
            _release(descriptors)

    @asynccontextmanager
    async def removing(
        self, keys: Iterable[str], wait: float = REMOVAL_WAIT
    ) -> AsyncIterator[bool]:
        """Hold the shards of ``keys`` exclusively; yields False (holding nothing) when
        uploads kept them busy for ``wait`` seconds: the caller then removes nothing."""
        descriptors = await self._take(self._shards(keys), fcntl.LOCK_EX, wait)
        try:
            yield descriptors is not None
        finally:
            if descriptors is not None:
                _release(descriptors)

    async def _take(self, paths: list[Path], mode: int, wait: float) -> list[int] | None:
        missing = [path for path in paths if path not in self._made]
        if missing:
            make_private_dirs(self.folder, *missing)
            self._made.update(missing)
        deadline = time.monotonic() + wait
        taken: list[int] = []
        try:
            for path in paths:
                descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                taken.append(descriptor)
                poll = FIRST_POLL
                while not _try_lock(descriptor, mode):
                    if time.monotonic() >= deadline:
                        _release(taken)
                        return None
                    await asyncio.sleep(poll)
                    poll = min(poll * 2, MAX_POLL)
        except BaseException:
            _release(taken)
            raise
        return taken


def _try_lock(descriptor: int, mode: int) -> bool:
    try:
        fcntl.flock(descriptor, mode | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return False
        raise
    return True


def _release(descriptors: list[int]) -> None:
    # Closing the descriptor drops its lock.
    for descriptor in descriptors:
        with contextlib.suppress(OSError):
            os.close(descriptor)
    descriptors.clear()
