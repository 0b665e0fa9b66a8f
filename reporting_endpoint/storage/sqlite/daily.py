"""The daily issue counters in SQLite: the roll-up of completed days (a writer job, off the
ingest path, which rolls up the coarse report counters too) and the triggers that keep a
rolled-up day equal to its hours afterwards."""

from __future__ import annotations

import sqlite3

import aiosqlite

from reporting_endpoint.storage.filters import HOUR_MS
from reporting_endpoint.storage.spans import DAY_HOURS, MOST_DAYS, completed_hour, next_mark
from reporting_endpoint.storage.sqlite import group_days

_MARK = "SELECT day FROM daily_mark WHERE name = 'issue'"
_TRIGGERS = ("issue_daily_insert", "issue_daily_update", "issue_daily_delete")


def _add(row: str, mark_hour: int) -> str:
    return (
        f"INSERT INTO issue_daily (issue_id, day, count) SELECT {row}.issue_id,"
        f" {row}.hour / {DAY_HOURS}, {row}.count WHERE {row}.hour >= 0 AND {row}.hour < {mark_hour}"
        " ON CONFLICT (issue_id, day) DO UPDATE SET count = count + excluded.count;"
    )


def _take(row: str, mark_hour: int) -> str:
    where = f"issue_id = {row}.issue_id AND day = {row}.hour / {DAY_HOURS}"
    guard = f"{row}.hour >= 0 AND {row}.hour < {mark_hour}"
    return (
        f"UPDATE issue_daily SET count = count - {row}.count WHERE {where} AND {guard};"
        f" DELETE FROM issue_daily WHERE {where} AND count = 0 AND {guard};"
    )


def _make_triggers(connection: sqlite3.Connection, mark_day: int) -> None:
    """(Re)make the triggers with the mark as a literal: for an event of a day not rolled up
    yet (every event of today) the trigger stops at its WHEN, but SQLite sets up the trigger's
    frame first (measured: about 12,700 instructions a report for all the triggers)."""
    for name in _TRIGGERS:
        connection.execute(f"DROP TRIGGER IF EXISTS {name}")
    mark = int(mark_day) * DAY_HOURS  # an int: it becomes part of the statement
    old = f"OLD.hour >= 0 AND OLD.hour < {mark}"
    new = f"NEW.hour >= 0 AND NEW.hour < {mark}"
    connection.execute(
        f"CREATE TRIGGER issue_daily_insert AFTER INSERT ON issue_hourly WHEN {new}"
        f" BEGIN {_add('NEW', mark)} END"
    )
    connection.execute(
        f"CREATE TRIGGER issue_daily_update AFTER UPDATE ON issue_hourly WHEN ({old}) OR ({new})"
        f" BEGIN {_take('OLD', mark)} {_add('NEW', mark)}"
        f" DELETE FROM issue_daily WHERE issue_id = NEW.issue_id AND day = NEW.hour / {DAY_HOURS}"
        " AND count = 0; END"
    )
    connection.execute(
        f"CREATE TRIGGER issue_daily_delete AFTER DELETE ON issue_hourly WHEN {old}"
        f" BEGIN {_take('OLD', mark)} END"
    )


def roll_up(connection: sqlite3.Connection, now_ms: int) -> int:
    """One step of the roll-up: the report counters' completed hours and days, then the
    issue counters' completed days, each mark moved at most a day; how far the marks moved
    (0: caught up). A writer job: the caller owns the transaction, so the rows, the marks
    and the triggers change together; run again once caught up, it changes nothing."""
    moved = group_days.roll_up(connection, completed_hour(now_ms))
    mark = int(connection.execute(_MARK).fetchone()[0])
    target = completed_hour(now_ms) // DAY_HOURS
    if target <= mark:
        return moved
    first_seen = connection.execute(
        "SELECT min(first_seen) FROM issues WHERE last_seen >= ?", (mark * DAY_HOURS * HOUR_MS,)
    ).fetchone()[0]
    first = None if first_seen is None else int(first_seen) // HOUR_MS // DAY_HOURS
    target = next_mark(mark, target, first, MOST_DAYS)
    first_hour, end_hour = mark * DAY_HOURS, target * DAY_HOURS
    # A day before the mark is never written here, so these days have no rows yet; cleared
    # anyway, so a mark set back by hand rolls up again to the same rows.
    connection.execute("DELETE FROM issue_daily WHERE day >= ? AND day < ?", (mark, target))
    # The issues seen in those days, each a primary-key range of its hours (no index by hour).
    connection.execute(
        f"INSERT INTO issue_daily (issue_id, day, count) SELECT h.issue_id, h.hour / {DAY_HOURS},"
        " sum(h.count) FROM issues i JOIN issue_hourly h ON h.issue_id = i.id"
        " AND h.hour >= ? AND h.hour < ? WHERE i.last_seen >= ? AND i.first_seen < ?"
        " GROUP BY 1, 2 HAVING sum(h.count) != 0",
        (max(first_hour, 0), end_hour, max(first_hour, 0) * HOUR_MS, end_hour * HOUR_MS),
    )
    connection.execute("UPDATE daily_mark SET day = ? WHERE name = 'issue'", (target,))
    _make_triggers(connection, target)
    return moved + target - mark


async def mark_day(connection: aiosqlite.Connection) -> int:
    """The first day not rolled up (days before it are read from ``issue_daily``)."""
    rows = list(await connection.execute_fetchall(_MARK))
    return int(rows[0][0]) if rows else 0
