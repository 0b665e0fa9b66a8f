"""The coarse report roll-ups in SQLite (completed hours, then completed days, by type, site,
browser, os and reason): filled by the roll-up job, kept equal afterwards by triggers, read by
windowed group queries."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from reporting_endpoint.storage.spans import (
    DAY_HOURS,
    MOST_DAYS,
    MOST_HOURS,
    Levels,
    next_mark,
)

KEYS = ("type", "site", "browser", "os", "reason")
_KEYS = ", ".join(KEYS)


class Level:
    """One roll-up made from another: its table, its time column, where its rows come from."""

    def __init__(self, table: str, column: str, source: str, bucket: str, hours: int) -> None:
        self.table, self.column, self.source = table, column, source
        self.bucket = bucket  # the source's hour as this level's time column
        self.hours = hours  # source hours per row of this level

    def matches(self, row: str) -> str:
        """This level's row of a source row (OLD or NEW)."""
        bucket = self.bucket.replace("hour", f"{row}.hour")
        return f"{self.column} = {bucket}" + "".join(f" AND {k} = {row}.{k}" for k in KEYS)

    def sources(self, row: str) -> str:
        """The source rows of this level's row of a source row."""
        first = f"{self.bucket.replace('hour', f'{row}.hour')} * {self.hours}"
        return f"hour >= {first} AND hour < {first} + {self.hours}" + "".join(
            f" AND {k} = {row}.{k}" for k in KEYS
        )

    def fill(self, connection: sqlite3.Connection, first_hour: int, end_hour: int) -> None:
        """Rows for the source hours [first_hour, end_hour) (whole rows of this level), from
        scratch: the job's roll-up."""
        bucket_first, bucket_end = first_hour // self.hours, end_hour // self.hours
        connection.execute(
            f"DELETE FROM {self.table} WHERE {self.column} >= ? AND {self.column} < ?",
            (bucket_first, bucket_end),
        )
        connection.execute(
            f"INSERT INTO {self.table} ({self.column}, {_KEYS}, count, first_seen, last_seen)"
            f" SELECT {self.bucket}, {_KEYS}, sum(count), min(first_seen), max(last_seen)"
            f" FROM {self.source} WHERE hour >= ? AND hour < ? GROUP BY 1, {_KEYS}"
            " HAVING sum(count) != 0",
            (max(first_hour, 0), end_hour),
        )

    def make_triggers(self, connection: sqlite3.Connection, mark_hour: int) -> None:
        """Triggers on the source for its hours before ``mark_hour`` (a literal: a row of a later
        hour stops at the WHEN): counts follow at once; first and last seen are read again
        from the source only when the row that went held one of them."""
        name = f"{self.table}_follow"
        for operation in ("insert", "update", "delete"):
            connection.execute(f"DROP TRIGGER IF EXISTS {name}_{operation}")
        mark = int(mark_hour)  # an int: it becomes part of the statement
        old = f"OLD.hour >= 0 AND OLD.hour < {mark}"
        new = f"NEW.hour >= 0 AND NEW.hour < {mark}"
        new_bucket = self.bucket.replace("hour", "NEW.hour")
        add = (
            f"INSERT INTO {self.table} ({self.column}, {_KEYS}, count, first_seen, last_seen)"
            f" SELECT {new_bucket}, {', '.join(f'NEW.{k}' for k in KEYS)}, NEW.count,"
            f" NEW.first_seen, NEW.last_seen WHERE {new}"
            " ON CONFLICT DO UPDATE SET count = count + excluded.count,"
            " first_seen = min(first_seen, excluded.first_seen),"
            " last_seen = max(last_seen, excluded.last_seen);"
        )
        rows = f"FROM {self.source} WHERE {self.sources('OLD')}"
        take = (
            f"UPDATE {self.table} SET count = count - OLD.count WHERE {self.matches('OLD')}"
            f" AND {old};"
            f" DELETE FROM {self.table} WHERE {self.matches('OLD')} AND count <= 0 AND {old};"
            f" UPDATE {self.table} SET first_seen = (SELECT min(first_seen) {rows}),"
            f" last_seen = (SELECT max(last_seen) {rows}) WHERE {self.matches('OLD')} AND {old}"
            " AND (OLD.first_seen <= first_seen OR OLD.last_seen >= last_seen);"
        )
        connection.execute(
            f"CREATE TRIGGER {name}_insert AFTER INSERT ON {self.source} WHEN {new} BEGIN {add} END"
        )
        connection.execute(
            f"CREATE TRIGGER {name}_update AFTER UPDATE ON {self.source}"
            f" WHEN ({old}) OR ({new}) BEGIN {take} {add} END"
        )
        connection.execute(
            f"CREATE TRIGGER {name}_delete AFTER DELETE ON {self.source} WHEN {old}"
            f" BEGIN {take} END"
        )


COARSE = Level("report_groups_coarse", "hour", "report_groups_hourly", "hour", 1)
DAILY = Level("report_groups_daily", "day", "report_groups_coarse", f"hour / {DAY_HOURS}", 24)


def _mark(connection: sqlite3.Connection, name: str) -> int:
    return int(
        connection.execute("SELECT day FROM daily_mark WHERE name = ?", (name,)).fetchone()[0]
    )


def _first(connection: sqlite3.Connection, table: str, hour: int) -> int | None:
    """The first hour from ``hour`` on with a row in ``table`` (its key starts with hour)."""
    found = connection.execute(f"SELECT min(hour) FROM {table} WHERE hour >= ?", (hour,))
    value = found.fetchone()[0]
    return None if value is None else int(value)


def roll_up(connection: sqlite3.Connection, mark_hour: int) -> int:
    """Roll hours before ``mark_hour`` into the coarse table and whole days into the daily one
    (each mark moved at most a day), move the marks, remake the triggers; how far the marks
    moved (0: caught up). Writer job; idempotent."""
    hour = _mark(connection, "report_hour")
    end = next_mark(hour, mark_hour, _first(connection, COARSE.source, hour), MOST_HOURS)
    if end > hour:
        COARSE.fill(connection, hour, end)
        connection.execute("UPDATE daily_mark SET day = ? WHERE name = 'report_hour'", (end,))
        COARSE.make_triggers(connection, end)
    day = _mark(connection, "report_day")
    first = _first(connection, DAILY.source, day * DAY_HOURS)
    end_day = next_mark(
        day, end // DAY_HOURS, None if first is None else first // DAY_HOURS, MOST_DAYS
    )
    if end_day > day:
        DAILY.fill(connection, day * DAY_HOURS, end_day * DAY_HOURS)
        connection.execute("UPDATE daily_mark SET day = ? WHERE name = 'report_day'", (end_day,))
        DAILY.make_triggers(connection, end_day * DAY_HOURS)
    return (end - hour) + (end_day - day)


def window_source(
    read: Levels, columns: Sequence[str], where: str, parameters: Sequence[object]
) -> tuple[str, list[object]]:
    """A FROM source with ``columns``, count, first_seen and last_seen: the window's rows of
    each level, with the same equality ``where`` (``?`` parameters) on each."""
    selects: list[str] = []
    out: list[object] = []
    picked = ", ".join((*columns, "count", "first_seen", "last_seen"))
    for table, column, ranges in (
        ("report_groups_daily", "day", read.days),
        ("report_groups_coarse", "hour", read.coarse),
        ("report_groups_hourly", "hour", read.fine),
    ):
        for first, last in ranges:
            selects.append(
                f"SELECT {picked} FROM {table} WHERE {where}{column} >= ? AND {column} <= ?"
            )
            out.extend([*parameters, first, last])
    return f"({' UNION ALL '.join(selects)})", out
