"""The daily issue counters in PostgreSQL: the roll-up of completed days (a writer job, off the
ingest path, which rolls up the coarse report counters too) and the triggers that keep a
rolled-up day equal to its hours afterwards."""

from __future__ import annotations

import asyncpg

from reporting_endpoint.storage.postgres import group_days
from reporting_endpoint.storage.postgres.reads import PgPool
from reporting_endpoint.storage.spans import DAY_HOURS, MOST_DAYS, completed_hour, next_mark

# How long the roll-up job waits for a lock on an hourly table before it backs off.
LOCK_TIMEOUT_MS = 1000
_MARK = "SELECT day FROM daily_mark WHERE name = 'issue'"
_OPERATIONS = {"insert": "INSERT", "update": "UPDATE", "delete": "DELETE"}


async def _make_triggers(connection: asyncpg.Connection, mark_day: int) -> None:
    """(Re)make the triggers with the mark as a literal in their WHEN: an event of a day not
    rolled up yet (every event of today) costs one comparison in the executor, no call."""
    mark = int(mark_day) * DAY_HOURS  # an int: it becomes part of the statement
    old = f"(OLD.hour >= 0 AND OLD.hour < {mark})"
    new = f"(NEW.hour >= 0 AND NEW.hour < {mark})"
    when = {"insert": new, "update": f"{old} OR {new}", "delete": old}
    # Replaced in place (PostgreSQL 14+): SHARE ROW EXCLUSIVE, as the job holds already; a
    # DROP TRIGGER would take ACCESS EXCLUSIVE, waiting for every reader with ingest behind it.
    for name, operation in _OPERATIONS.items():
        await connection.execute(
            f"CREATE OR REPLACE TRIGGER issue_daily_{name} AFTER {operation} ON issue_hourly"
            f" FOR EACH ROW WHEN ({when[name]}) EXECUTE FUNCTION issue_daily_follow('{mark}')"
        )


async def roll_up(connection: asyncpg.Connection, now_ms: int) -> int:
    """One step of the roll-up: the report counters' completed hours and days, then the
    issue counters' completed days, each mark moved at most a day; how far the marks moved
    (0: caught up). A writer job in a transaction of its own: the rows, the marks and the
    triggers change together; run again once caught up (by any worker), nothing."""
    # The job's locks stop the ingest's writes to the hourly tables: it waits for them a
    # moment at most, then gives up (StorageBusy, rolled back) and runs again later, so a
    # long transaction elsewhere never stalls the ingest queued behind the job.
    await connection.execute(f"SET LOCAL lock_timeout = '{int(LOCK_TIMEOUT_MS)}ms'")
    # The report roll-ups first: the hourly report table comes before the issue tables in
    # every writer's lock order.
    moved = await group_days.roll_up(connection, completed_hour(now_ms))
    target = completed_hour(now_ms) // DAY_HOURS
    if target <= int(await connection.fetchval(_MARK)):
        return moved
    # Writers in flight finish their hourly upserts first; the next ones wait for this commit
    # and then meet the new triggers, so no event falls between the sums and the triggers.
    await connection.execute("LOCK TABLE issue_hourly IN SHARE ROW EXCLUSIVE MODE")
    mark = int(await connection.fetchval(_MARK))
    first = await connection.fetchval(
        "SELECT min(hour) FROM issue_hourly WHERE hour >= $1", mark * DAY_HOURS
    )
    target = next_mark(mark, target, None if first is None else first // DAY_HOURS, MOST_DAYS)
    if target <= mark:
        return moved
    # A day before the mark is never written here, so these days have no rows yet; cleared
    # anyway, so a mark set back by hand rolls up again to the same rows.
    await connection.execute("DELETE FROM issue_daily WHERE day >= $1 AND day < $2", mark, target)
    await connection.execute(
        f"INSERT INTO issue_daily (issue_id, day, count) SELECT issue_id, hour / {DAY_HOURS},"
        " sum(count)::bigint FROM issue_hourly WHERE hour >= $1 AND hour < $2"
        " GROUP BY 1, 2 HAVING sum(count) <> 0",
        max(mark, 0) * DAY_HOURS,
        target * DAY_HOURS,
    )
    await connection.execute("UPDATE daily_mark SET day = $1 WHERE name = 'issue'", target)
    await _make_triggers(connection, target)
    return moved + target - mark


async def mark_day(pool: PgPool) -> int:
    """The first day not rolled up (days before it are read from ``issue_daily``)."""
    value = await pool.fetchval(_MARK)
    return int(value) if value is not None else 0
