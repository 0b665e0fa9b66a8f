"""The daily roll-up task: the running service rolls completed UTC days of the issue counters
into the daily ones, at start and then every few minutes, off the ingest path."""

from __future__ import annotations

import asyncio
import logging

from reporting_endpoint.params import now_ms
from reporting_endpoint.storage.base import Storage, StorageError

log = logging.getLogger("reporting_endpoint.daily")

# A day completes once a day; checking often only bounds how long after midnight (plus the
# grace) long windows still read that day hourly. A check with nothing to do is one small job.
INTERVAL_SECONDS = 600.0
# Steps in a row at most (a week each: decades of data), before the next interval.
MAX_STEPS = 2000


async def roll_up_loop(storage: Storage, interval: float = INTERVAL_SECONDS) -> None:
    """Roll up at start, then every ``interval`` seconds, until cancelled."""
    while True:
        try:
            # A step moves the marks a week at most (the first roll-up of a large store is
            # many short writer jobs): again at once until caught up, bounded.
            for _ in range(MAX_STEPS):
                if not await storage.roll_up_days(now_ms()):
                    break
        except StorageError:
            log.exception("daily roll-up failed; will try again")
        await asyncio.sleep(interval)
