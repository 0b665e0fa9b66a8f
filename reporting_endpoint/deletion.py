"""Deleting rows through the storage, then the blobs nothing references any more.

Two steps, in this order, so a crash between them leaves an orphan blob, never a row without
its blob: the storage deletes the rows in one transaction and answers the blobs no remaining
crash references; only after that commit are the blobs removed here, through the blob store
(a folder or a bucket). ``sweep_orphans`` is the safety net for blobs whose removal never ran
(a kill, a shutdown, a failed step).

Blobs are shared by content, so an upload of the same content may be on its way while a
deletion frees it: its blob committed (or reused), its row not yet. Each removal therefore
runs under the store's ``removing`` lock, which uploads hold shared from their blob commit
until their row has committed (``blobstores/locks.py``), and asks the storage again, inside the
lock, which blobs are still unreferenced: an upload's row is then either visible to that
question, or its blob commit comes after the removal and writes the blob again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Sequence
from dataclasses import replace

from reporting_endpoint.blobstores import BlobStore, BlobStoreError
from reporting_endpoint.blobstores.base import validate_key
from reporting_endpoint.storage.base import Blob, Deletion, Storage, StorageError

log = logging.getLogger("reporting_endpoint.deletion")

# A blob with no row for this long was left by an interrupted deletion (or upload) and will
# never get one. Uploads hold the lock above, so this only keeps the sweep off blobs of
# processes the lock does not cover (several hosts on one bucket) and off clock skew.
ORPHAN_GRACE_NS = 3600 * 1_000_000_000
# Blobs re-checked and removed under one lock: bounds how long uploads of those shards wait.
REMOVAL_BATCH = 256


def _keys(blobs: Sequence[Blob]) -> dict[str, Blob]:
    """key -> blob for the blobs whose row path is a content address (nothing else is ever
    removed, whatever a row holds: a restored or hand-edited database is data)."""
    keyed: dict[str, Blob] = {}
    for blob in blobs:
        try:
            keyed[validate_key(blob.path)] = blob
        except ValueError:
            continue
    return keyed


async def remove_unreferenced(
    storage: Storage, store: BlobStore, blobs: Sequence[Blob], committed_before_ns: int
) -> int:
    """Remove those of ``blobs`` that no crash row references, checked under the store's
    removal lock; a blob committed after ``committed_before_ns`` is kept. Returns how many
    went (0 when uploads kept the lock busy: the orphan sweep takes them later)."""
    keyed = _keys(blobs)
    removed = 0
    keys = sorted(keyed)
    for start in range(0, len(keys), REMOVAL_BATCH):
        batch = keys[start : start + REMOVAL_BATCH]
        async with store.removing(batch) as held:
            if not held:
                log.warning("blob removal skipped: uploads held the lock; the sweep retries")
                continue
            free = await storage.unreferenced_blobs([keyed[key] for key in batch])
            removed += await store.delete_many(
                [blob.path for blob in free], unless_committed_after_ns=committed_before_ns
            )
    return removed


async def delete_with_files(
    storage: Storage, deleting: Awaitable[Deletion], store: BlobStore, started_ns: int | None = None
) -> Deletion:
    """Await the storage's deletion (``storage.delete_crash(...)``, ``storage.prune(...)``),
    then remove the blobs it left unreferenced (``remove_unreferenced``).

    The rows are gone once the first step returns; a failure of the second only leaves unused
    blobs behind (logged, and collected by a later sweep), so it does not turn a done
    deletion into an error. ``started_ns`` must be taken before ``deleting`` was created.
    """
    started = time.time_ns() if started_ns is None else started_ns
    deletion = await deleting
    if not deletion.blobs:
        return deletion
    try:
        removed = await remove_unreferenced(storage, store, deletion.blobs, started)
    except (StorageError, BlobStoreError, OSError):
        log.exception("deleted rows left %d unused blob(s) behind", len(deletion.blobs))
        return deletion
    return replace(deletion, files_removed=removed)


async def delete_crash(storage: Storage, crash_id: str, store: BlobStore) -> Deletion:
    """One crash row, then its blobs when no other crash uses them."""
    started = time.time_ns()
    return await delete_with_files(storage, storage.delete_crash(crash_id), store, started)


async def prune(
    storage: Storage, older_than_ms: int, store: BlobStore, sweep: bool = True
) -> Deletion:
    """Reports and crashes received before ``older_than_ms``, then their blobs, then (with
    ``sweep``) the orphans earlier runs left."""
    started = time.time_ns()
    deletion = await delete_with_files(storage, storage.prune(older_than_ms), store, started)
    if sweep:
        try:
            orphans = await sweep_orphans(storage, store)
        except (StorageError, BlobStoreError, OSError):
            # The rows are gone and their blobs handled: a failed safety net is retried by
            # the next run, not turned into a failed deletion.
            log.exception("orphan sweep failed; the next prune tries again")
            return deletion
        deletion = replace(deletion, files_removed=deletion.files_removed + orphans)
    return deletion


async def sweep_orphans(storage: Storage, store: BlobStore) -> int:
    """Remove blobs no crash references that were last committed ``ORPHAN_GRACE_NS`` ago."""
    cutoff = time.time_ns() - ORPHAN_GRACE_NS
    referenced = await storage.referenced_blobs()
    candidates: list[Blob] = []
    async for info in store.list_blobs():
        sha256 = info.key.rsplit("/", 1)[1]
        if sha256 not in referenced and info.modified_ns < cutoff:
            candidates.append(Blob(sha256, info.key))
    if not candidates:
        return 0
    # Asked again under the lock: a row may have taken one since the listing.
    return await remove_unreferenced(storage, store, candidates, cutoff)
