"""The coarse report roll-ups in PostgreSQL (completed hours, then completed days, by type,
site, browser, os and reason): filled by the roll-up job, kept equal afterwards by triggers,
read by windowed group queries; the same tables and rules as the SQLite backend's."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import asyncpg

from reporting_endpoint.storage.spans import (
    DAY_HOURS,
    MOST_DAYS,
    MOST_HOURS,
    Levels,
    next_mark,
)

KEYS = ("type", "site", "browser", "os", "reason")
_KEYS = ", ".join(KEYS)
_OPERATIONS = {"insert": "INSERT", "update": "UPDATE", "delete": "DELETE"}


class Level:
    """One roll-up made from another: its table, its time column, where its rows come from."""

    def __init__(self, table: str, column: str, source: str, hours: int) -> None:
        self.table, self.column, self.source = table, column, source
        self.hours = hours  # source hours per row of this level

    def _bucket(self, row: str) -> str:
        return f"{row}.hour / {self.hours}" if self.hours > 1 else f"{row}.hour"

    def _matches(self, row: str) -> str:
        keys = "".join(f" AND {k} = {row}.{k}" for k in KEYS)
        return f"{self.column} = {self._bucket(row)}{keys}"

    def function(self) -> str:
        """The trigger function: counts follow at once; first and last seen are read again
        from the source only when the row that went held one of them. TG_ARGV[0]: the mark."""
        first = f"{self._bucket('OLD')} * {self.hours}"
        sources = f"hour >= {first} AND hour < {first} + {self.hours}" + "".join(
            f" AND {k} = OLD.{k}" for k in KEYS
        )
        values = ", ".join(f"NEW.{k}" for k in KEYS)
        return f"""CREATE OR REPLACE FUNCTION {self.table}_follow() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    mark bigint := TG_ARGV[0]::bigint;
    kept {self.table}%ROWTYPE;
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') AND OLD.hour >= 0 AND OLD.hour < mark THEN
        UPDATE {self.table} SET count = count - OLD.count WHERE {self._matches("OLD")}
        RETURNING * INTO kept;
        IF FOUND AND kept.count <= 0 THEN
            DELETE FROM {self.table} WHERE {self._matches("OLD")};
        ELSIF FOUND AND (OLD.first_seen <= kept.first_seen OR OLD.last_seen >= kept.last_seen)
        THEN
            -- AFTER ROW triggers run once the statement is done: a DELETE of many rows may
            -- have taken every source row already (its other rows' calls then drop this one).
            UPDATE {self.table} SET (first_seen, last_seen) =
                (SELECT coalesce(min(first_seen), kept.first_seen),
                        coalesce(max(last_seen), kept.last_seen)
                 FROM {self.source} WHERE {sources})
            WHERE {self._matches("OLD")};
        END IF;
    END IF;
    IF TG_OP IN ('UPDATE', 'INSERT') AND NEW.hour >= 0 AND NEW.hour < mark THEN
        INSERT INTO {self.table} AS g ({self.column}, {_KEYS}, count, first_seen, last_seen)
        VALUES ({self._bucket("NEW")}, {values}, NEW.count, NEW.first_seen, NEW.last_seen)
        ON CONFLICT ({self.column}, {_KEYS}) DO UPDATE SET count = g.count + excluded.count,
            first_seen = least(g.first_seen, excluded.first_seen),
            last_seen = greatest(g.last_seen, excluded.last_seen);
    END IF;
    RETURN NULL;
END
$$"""

    async def fill(self, connection: asyncpg.Connection, first_hour: int, end_hour: int) -> None:
        """Rows for the source hours [first_hour, end_hour) (whole rows of this level), from
        scratch: the job's roll-up."""
        await connection.execute(
            f"DELETE FROM {self.table} WHERE {self.column} >= $1 AND {self.column} < $2",
            first_hour // self.hours,
            end_hour // self.hours,
        )
        bucket = f"hour / {self.hours}" if self.hours > 1 else "hour"
        await connection.execute(
            f"INSERT INTO {self.table} ({self.column}, {_KEYS}, count, first_seen, last_seen)"
            f" SELECT {bucket}, {_KEYS}, sum(count)::bigint, min(first_seen), max(last_seen)"
            f" FROM {self.source} WHERE hour >= $1 AND hour < $2 GROUP BY 1, {_KEYS}"
            " HAVING sum(count) <> 0",
            max(first_hour, 0),
            end_hour,
        )

    async def make_triggers(self, connection: asyncpg.Connection, mark_hour: int) -> None:
        """Triggers on the source for its hours before ``mark_hour``, a literal in their WHEN:
        a row of a later hour costs one comparison in the executor, no call. Replaced in
        place (PostgreSQL 14+): SHARE ROW EXCLUSIVE, as the job holds already; a DROP
        TRIGGER would take ACCESS EXCLUSIVE, waiting for every reader with ingest behind it."""
        mark = int(mark_hour)  # an int: it becomes part of the statement
        old = f"(OLD.hour >= 0 AND OLD.hour < {mark})"
        new = f"(NEW.hour >= 0 AND NEW.hour < {mark})"
        when = {"insert": new, "update": f"{old} OR {new}", "delete": old}
        await connection.execute(self.function())
        for name, operation in _OPERATIONS.items():
            trigger = f"{self.table}_{name}"
            await connection.execute(
                f"CREATE OR REPLACE TRIGGER {trigger} AFTER {operation} ON {self.source}"
                f" FOR EACH ROW WHEN ({when[name]}) EXECUTE FUNCTION {self.table}_follow('{mark}')"
            )


COARSE = Level("report_groups_coarse", "hour", "report_groups_hourly", 1)
DAILY = Level("report_groups_daily", "day", "report_groups_coarse", DAY_HOURS)


async def _mark(connection: asyncpg.Connection, name: str) -> int:
    return int(await connection.fetchval("SELECT day FROM daily_mark WHERE name = $1", name))


async def _first(connection: asyncpg.Connection, table: str, hour: int) -> int | None:
    """The first hour from ``hour`` on with a row in ``table`` (its key starts with hour)."""
    value = await connection.fetchval(f"SELECT min(hour) FROM {table} WHERE hour >= $1", hour)
    return None if value is None else int(value)


async def roll_up(connection: asyncpg.Connection, mark_hour: int) -> int:
    """Roll hours before ``mark_hour`` into the coarse table and whole days into the daily one
    (each mark moved at most a day), move the marks, remake the triggers; how far the marks
    moved (0: caught up). Writer job; idempotent."""
    if mark_hour <= await _mark(connection, "report_hour"):
        return 0
    # Writers in flight finish their upserts first; the next ones wait for this commit and
    # then meet the new triggers, so no row falls between the sums and the triggers.
    await connection.execute("LOCK TABLE report_groups_hourly IN SHARE ROW EXCLUSIVE MODE")
    hour = await _mark(connection, "report_hour")
    end = next_mark(hour, mark_hour, await _first(connection, COARSE.source, hour), MOST_HOURS)
    if end <= hour:
        return 0
    await COARSE.fill(connection, hour, end)
    await connection.execute("UPDATE daily_mark SET day = $1 WHERE name = 'report_hour'", end)
    await COARSE.make_triggers(connection, end)
    day = await _mark(connection, "report_day")
    first = await _first(connection, DAILY.source, day * DAY_HOURS)
    end_day = next_mark(
        day, end // DAY_HOURS, None if first is None else first // DAY_HOURS, MOST_DAYS
    )
    if end_day > day:
        await DAILY.fill(connection, day * DAY_HOURS, end_day * DAY_HOURS)
        await connection.execute(
            "UPDATE daily_mark SET day = $1 WHERE name = 'report_day'", end_day
        )
        await DAILY.make_triggers(connection, end_day * DAY_HOURS)
    return (end - hour) + (end_day - day)


def window_source(
    read: Levels, columns: Sequence[str], equal: str, arg: Callable[[object], str]
) -> str:
    """A FROM source with ``columns``, count, first_seen and last_seen: the window's rows of
    each level, with the same equality conditions ``equal`` (ending in AND) on each."""
    picked = ", ".join((*columns, "count", "first_seen", "last_seen"))
    selects = [
        f"SELECT {picked} FROM {table} WHERE {equal}{column} >= {arg(lo)} AND {column} <= {arg(hi)}"
        for table, column, ranges in (
            ("report_groups_daily", "day", read.days),
            ("report_groups_coarse", "hour", read.coarse),
            ("report_groups_hourly", "hour", read.fine),
        )
        for lo, hi in ranges
    ]
    return f"({' UNION ALL '.join(selects)}) AS u"
