"""Retention: the running service deletes reports and crashes older than ``retention_days``,
hourly, and then the dump and attachment blobs no remaining crash references."""

from __future__ import annotations

import asyncio
import logging

from reporting_endpoint import deletion as deleting
from reporting_endpoint.blobstores import BlobStore
from reporting_endpoint.params import now_ms
from reporting_endpoint.storage.base import Deletion, Storage, StorageError

log = logging.getLogger("reporting_endpoint.retention")

DAY_MS = 86_400_000
INTERVAL_SECONDS = 3600.0


async def prune_deletion(storage: Storage, days: int, blobs: BlobStore | None = None) -> Deletion:
    """Delete what is past retention now (through the storage), blobs after the rows.

    Without ``blobs`` (the store the dumps live in) crashes are kept: deleting their rows
    without their blobs would leave dumps stored that nothing can find any more.
    """
    cutoff = now_ms() - days * DAY_MS
    if blobs is None:
        deletion = await storage.prune(cutoff, crashes=False)
    else:
        # The sweep takes blobs an earlier run could not remove (killed between its commit
        # and its removals).
        deletion = await deleting.prune(storage, cutoff, blobs, sweep=True)
    if deletion.reports or deletion.crashes:
        log.info(
            "retention: deleted %d report(s), %d crash(es) and %d file(s) older than %d day(s)",
            deletion.reports,
            deletion.crashes,
            deletion.files_removed,
            days,
        )
    return deletion


async def prune_once(storage: Storage, days: int, blobs: BlobStore | None = None) -> int:
    """``prune_deletion``, answering how many rows (reports and crashes) went."""
    deletion = await prune_deletion(storage, days, blobs)
    return deletion.reports + deletion.crashes


async def retention_loop(
    storage: Storage,
    days: int,
    interval: float = INTERVAL_SECONDS,
    blobs: BlobStore | None = None,
) -> None:
    """Prune at start, then every ``interval`` seconds, until cancelled."""
    while True:
        try:
            await prune_deletion(storage, days, blobs)
        except StorageError:
            log.exception("retention: prune failed; will try again")
        await asyncio.sleep(interval)
