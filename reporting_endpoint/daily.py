"""The daily roll-up task: the running service rolls completed UTC days of the issue counters
into the daily ones, at start and then every few minutes, off the ingest path."""

from __future__ import annotations

import asyncio
import logging

from reporting_endpoint.params import now_ms
from reporting_endpoint.storage.base import Storage, StorageBusy, StorageError

log = logging.getLogger("reporting_endpoint.daily")

# A day completes once a day; checking often only bounds how long after midnight (plus the
# grace) long windows still read that day hourly. A check with nothing to do is one small job.
INTERVAL_SECONDS = 600.0
# Steps in a row at most (a day each: decades of data), before the next interval.
MAX_STEPS = 20_000


async def roll_up_steps(storage: Storage, steps: int = MAX_STEPS) -> int:
    """Roll-up steps until caught up (at most ``steps``); how many moved a mark. A step that
    found an hourly table locked too long (StorageBusy: it backed off, rolled back) ends the
    run, logged: the next run tries again. Other storage errors are logged the same way."""
    done = 0
    try:
        # A step moves the marks a day at most (the first roll-up of a large store is many
        # short writer jobs): again at once until caught up, bounded, yielding in between.
        for _ in range(steps):
            if not await storage.roll_up_days(now_ms()):
                break
            done += 1
            await asyncio.sleep(0)
    except StorageBusy as exc:
        log.warning("daily roll-up backed off (%s); will try again", exc)
    except StorageError:
        log.exception("daily roll-up failed; will try again")
    return done


async def roll_up_loop(storage: Storage, interval: float = INTERVAL_SECONDS) -> None:
    """Roll up at start, then every ``interval`` seconds, until cancelled."""
    while True:
        await roll_up_steps(storage)
        await asyncio.sleep(interval)
