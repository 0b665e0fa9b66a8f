"""Deleting rows through the storage, then the blob files nothing references any more.

Two steps, in this order, so a crash between them leaves an orphan file, never a row without
its file: the storage deletes the rows in one transaction and answers the blobs no remaining
crash references; only after that commit are the files removed here. ``sweep_orphans`` is the
safety net for files whose removal never ran (a kill, a shutdown, a failed step).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Sequence
from dataclasses import replace
from pathlib import Path

from reporting_endpoint.storage.base import Blob, Deletion, Storage, StorageError

log = logging.getLogger("reporting_endpoint.deletion")

# An upload renames its file into blobs/ a moment before its row commits; a file with no row
# for this long was left by an interrupted deletion (or upload) and will never get one.
ORPHAN_GRACE_NS = 3600 * 1_000_000_000


def remove_blobs(root: Path, blobs: Sequence[Blob], deleted_after_ns: int) -> int:
    """Unlink the files of ``blobs`` under ``root`` (the data dir); returns how many went.

    ``blobs`` must be ones the storage found unreferenced after the deletion committed. A file
    written after ``deleted_after_ns`` is skipped (an upload of the same content replaced it
    and its row is on its way), and nothing outside ``blobs/`` is touched, whatever a row
    holds. Each folder that lost an entry is fsynced, so the removal survives a power loss too.
    """
    folders: set[Path] = set()
    removed = 0
    store = (root / "blobs").resolve()
    for blob in blobs:
        path = (root / blob.path).resolve()
        if store not in path.parents:
            continue
        try:
            if path.stat().st_mtime_ns > deleted_after_ns:
                continue
            path.unlink()
        except FileNotFoundError:
            continue
        removed += 1
        folders.add(path.parent)
    for folder in folders:
        _fsync_dir(folder)
    return removed


def remove_unreferenced(root: Path, referenced: frozenset[str], written_before_ns: int) -> int:
    """Unlink blob files whose hash is not in ``referenced``, written before
    ``written_before_ns``; returns how many went."""
    store = root / "blobs"
    if not store.is_dir():
        return 0
    folders: set[Path] = set()
    removed = 0
    for folder in store.iterdir():
        if not folder.is_dir() or folder.is_symlink():
            continue
        for entry in os.scandir(folder):
            if entry.name in referenced or not entry.is_file(follow_symlinks=False):
                continue
            with contextlib.suppress(FileNotFoundError):
                if entry.stat(follow_symlinks=False).st_mtime_ns >= written_before_ns:
                    continue
                os.unlink(entry.path)
                removed += 1
                folders.add(folder)
    for changed in folders:
        _fsync_dir(changed)
    return removed


def _fsync_dir(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


async def delete_with_files(
    storage: Storage, deleting: Awaitable[Deletion], root: Path, started_ns: int | None = None
) -> Deletion:
    """Await the storage's deletion (``storage.delete_crash(...)``, ``storage.prune(...)``),
    then remove the files it left unreferenced, once the storage confirms again that no crash
    row took them meanwhile.

    The rows are gone once the first step returns; a failure of the second only leaves unused
    files behind (logged, and collected by a later sweep), so it does not turn a done
    deletion into an error. ``started_ns`` must be taken before ``deleting`` was created.
    """
    started = time.time_ns() if started_ns is None else started_ns
    deletion = await deleting
    if not deletion.blobs:
        return deletion
    try:
        free = await storage.unreferenced_blobs(deletion.blobs)
        removed = await asyncio.to_thread(remove_blobs, root, free, started)
    except (StorageError, OSError):
        log.exception("deleted rows left %d unused file(s) behind", len(deletion.blobs))
        return deletion
    return replace(deletion, files_removed=removed)


async def delete_crash(storage: Storage, crash_id: str, root: Path) -> Deletion:
    """One crash row, then its files when no other crash uses them."""
    started = time.time_ns()
    return await delete_with_files(storage, storage.delete_crash(crash_id), root, started)


async def prune(storage: Storage, older_than_ms: int, root: Path, sweep: bool = True) -> Deletion:
    """Reports and crashes received before ``older_than_ms``, then their files, then (with
    ``sweep``) the orphans earlier runs left."""
    started = time.time_ns()
    deletion = await delete_with_files(storage, storage.prune(older_than_ms), root, started)
    if sweep:
        orphans = await sweep_orphans(storage, root)
        deletion = replace(deletion, files_removed=deletion.files_removed + orphans)
    return deletion


async def sweep_orphans(storage: Storage, root: Path) -> int:
    """Unlink blob files no crash references, older than ``ORPHAN_GRACE_NS``.

    The age keeps a file whose upload is between its rename and its commit: such a file was
    stamped a moment ago.
    """
    cutoff = time.time_ns() - ORPHAN_GRACE_NS
    referenced = await storage.referenced_blobs()
    return await asyncio.to_thread(remove_unreferenced, root, referenced, cutoff)
