"""Retention: the running service deletes reports and crashes older than ``retention_days``,
hourly, and then the dump and attachment files no remaining crash references."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

from reporting_endpoint.queries import now_ms
from reporting_endpoint.storage.base import Storage, StorageError
from reporting_endpoint.storage.deletion import (
    ORPHAN_GRACE_NS,
    Deletion,
    delete_through,
    prune_everything,
    sweep_orphans,
)
from reporting_endpoint.storage.rollups import prune

log = logging.getLogger("reporting_endpoint.retention")

DAY_MS = 86_400_000
INTERVAL_SECONDS = 3600.0


async def prune_deletion(storage: Storage, days: int, data_dir: Path | None = None) -> Deletion:
    """Delete what is past retention now (through the writer), files after the rows.

    Without ``data_dir`` (where the blob files live) crashes are kept: deleting their rows
    without their files would leave dumps on disk that nothing can find any more.
    """
    cutoff = now_ms() - days * DAY_MS
    if data_dir is None:
        deletion = Deletion(reports=await storage.run_job(partial(prune, older_than_ms=cutoff)))
    else:
        job = partial(prune_everything, older_than_ms=cutoff)
        deletion = await delete_through(storage, job, data_dir)
        # Files an earlier run could not remove (killed between its commit and its unlinks).
        sweep = partial(
            sweep_orphans, root=data_dir, written_before_ns=time.time_ns() - ORPHAN_GRACE_NS
        )
        orphans = await storage.run_job(sweep)
        deletion = replace(deletion, files_removed=deletion.files_removed + orphans)
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
