"""Retention: the running service deletes reports and crashes older than ``retention_days``,
hourly, and then the dump and attachment files no remaining crash references."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from reporting_endpoint import deletion as deleting
from reporting_endpoint.params import now_ms
from reporting_endpoint.storage.base import Deletion, Storage, StorageError

log = logging.getLogger("reporting_endpoint.retention")

DAY_MS = 86_400_000
INTERVAL_SECONDS = 3600.0


async def prune_deletion(storage: Storage, days: int, data_dir: Path | None = None) -> Deletion:
    """Delete what is past retention now (through the storage), files after the rows.

    Without ``data_dir`` (where the blob files live) crashes are kept: deleting their rows
    without their files would leave dumps on disk that nothing can find any more.
    """
    cutoff = now_ms() - days * DAY_MS
    if data_dir is None:
        deletion = await storage.prune(cutoff, crashes=False)
    else:
        # The sweep takes files an earlier run could not remove (killed between its commit
        # and its unlinks).
        deletion = await deleting.prune(storage, cutoff, data_dir, sweep=True)
    if deletion.reports or deletion.crashes:
        log.info(
            "retention: deleted %d report(s), %d crash(es) and %d file(s) older than %d day(s)",
            deletion.reports,
            deletion.crashes,
            deletion.files_removed,
            days,
        )
    return deletion


async def prune_once(storage: Storage, days: int, data_dir: Path | None = None) -> int:
    """``prune_deletion``, answering how many rows (reports and crashes) went."""
    deletion = await prune_deletion(storage, days, data_dir)
    return deletion.reports + deletion.crashes


async def retention_loop(
    storage: Storage,
    days: int,
    interval: float = INTERVAL_SECONDS,
    data_dir: Path | None = None,
) -> None:
    """Prune at start, then every ``interval`` seconds, until cancelled."""
    while True:
        try:
            await prune_deletion(storage, days, data_dir)
        except StorageError:
            log.exception("retention: prune failed; will try again")
        await asyncio.sleep(interval)
