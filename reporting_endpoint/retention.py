"""Retention: the running service deletes reports older than ``retention_days``, hourly."""

from __future__ import annotations

import asyncio
import logging
from functools import partial

from reporting_endpoint.queries import now_ms
from reporting_endpoint.storage.base import Storage, StorageError
from reporting_endpoint.storage.rollups import prune

log = logging.getLogger("reporting_endpoint.retention")

DAY_MS = 86_400_000
INTERVAL_SECONDS = 3600.0


async def prune_once(storage: Storage, days: int) -> int:
    """Delete what is past retention now (through the writer); returns how many went."""
    deleted = await storage.run_job(partial(prune, older_than_ms=now_ms() - days * DAY_MS))
    if deleted:
        log.info("retention: deleted %d report(s) older than %d day(s)", deleted, days)
    return deleted


async def retention_loop(storage: Storage, days: int, interval: float = INTERVAL_SECONDS) -> None:
    """Prune at start, then every ``interval`` seconds, until cancelled."""
    while True:
        try:
            await prune_once(storage, days)
        except StorageError:
            log.exception("retention: prune failed; will try again")
        await asyncio.sleep(interval)
