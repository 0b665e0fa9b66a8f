"""Writes reports with their roll-up counters, and prunes both; plain sqlite3, no transactions."""

from __future__ import annotations

import operator
import sqlite3
from collections.abc import Callable, Sequence

from reporting_endpoint.storage.filters import HOUR_MS, REPORT_DIMENSIONS
from reporting_endpoint.storage.sqlite import issue_counts
from reporting_endpoint.storage.sqlite.issue_tally import Tally, tally_reports

# The first 13 values of NewReport.row(), then the fingerprint (None for ""), the release and
# the issue id the writer found for the fingerprint (the title lives on the issue).
INSERT_REPORT = (
    "INSERT INTO reports (received_at, generated_at, age, type, url, origin, site, user_agent,"
    " browser, browser_major, os, reason, raw, fingerprint, release, issue_id)"
    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
)
# Positions in a NewReport.row() tuple.
_FINGERPRINT, _RELEASE = 13, 15

# Group key columns, in this order everywhere below.
KEYS = REPORT_DIMENSIONS
# Positions of those keys in a NewReport.row() tuple.
_ROW_POSITIONS = (3, 6, 5, 8, 9, 10, 11, 7)
_RECEIVED_AT = 0
_group_key = operator.itemgetter(*_ROW_POSITIONS)

_KEY_COLUMNS = ", ".join(KEYS)
_MERGE = (
    " ON CONFLICT DO UPDATE SET count = count + excluded.count,"
    " first_seen = min(first_seen, excluded.first_seen),"
    " last_seen = max(last_seen, excluded.last_seen)"
)
UPSERT_HOURLY = (
    f"INSERT INTO report_groups_hourly (hour, {_KEY_COLUMNS}, count, first_seen, last_seen)"
    f" VALUES ({', '.join('?' * (len(KEYS) + 4))}){_MERGE}"
)
# All-time roll-ups, from the finest to the coarsest; a query reads the smallest table that has
# every column it groups or filters on.
TOTAL_TABLES: dict[str, tuple[str, ...]] = {
    "report_groups": KEYS,
    "report_groups_site": ("type", "site", "browser", "reason"),
}


def _upsert_total(table: str, keys: tuple[str, ...]) -> str:
    return (
        f"INSERT INTO {table} ({', '.join(keys)}, count, first_seen, last_seen)"
        f" VALUES ({', '.join('?' * (len(keys) + 3))}){_MERGE}"
    )


_TOTALS = [
    (_upsert_total(table, keys), tuple(KEYS.index(k) for k in keys))
    for table, keys in TOTAL_TABLES.items()
]


# Hourly roll-ups, finest first, the same way.
HOURLY_TABLES: dict[str, tuple[str, ...]] = {
    "report_groups_hourly": KEYS,
    "report_groups_hourly_kind": ("type", "reason", "browser"),
}
_HOURLY_COARSE = [
    (
        f"INSERT INTO {table} (hour, {', '.join(keys)}, count, first_seen, last_seen)"
        f" VALUES ({', '.join('?' * (len(keys) + 4))}){_MERGE}",
        tuple(KEYS.index(k) for k in keys),
    )
    for table, keys in HOURLY_TABLES.items()
    if table != "report_groups_hourly"
]


def hourly_table_for(columns: set[str]) -> str:
    """The smallest hourly roll-up holding all of ``columns``."""
    for table, keys in reversed(HOURLY_TABLES.items()):
        if columns <= set(keys):
            return table
    return "report_groups_hourly"


def _project(
    deltas: dict[tuple[object, ...], Delta], positions: tuple[int, ...], keep_hour: bool
) -> dict[tuple[object, ...], Delta]:
    """Sum (hour, *keys) deltas onto fewer keys (and the hour, when kept)."""
    out: dict[tuple[object, ...], Delta] = {}
    for key, (count, first, last) in deltas.items():
        projected = tuple(key[1 + i] for i in positions)
        if keep_hour:
            projected = (key[0], *projected)
        total = out.get(projected)
        if total is None:
            out[projected] = [count, first, last]
        else:
            total[0] += count
            total[1] = min(total[1], first)
            total[2] = max(total[2], last)
    return out


def table_for(columns: set[str]) -> str:
    """The smallest all-time roll-up holding all of ``columns``."""
    for table, keys in reversed(TOTAL_TABLES.items()):
        if columns <= set(keys):
            return table
    return "report_groups"


Delta = list[int]  # [count, first_seen, last_seen]


def rollup(rows: Sequence[tuple[object, ...]]) -> dict[tuple[object, ...], Delta]:
    """Per (hour, *keys): how many rows, first and last received time. Under load one group of
    rows shares few keys, so this turns hundreds of inserts into a handful of upserts."""
    deltas: dict[tuple[object, ...], Delta] = {}
    for row in rows:
        received: int = row[_RECEIVED_AT]  # type: ignore[assignment]
        key = (received // HOUR_MS, *_group_key(row))
        delta = deltas.get(key)
        if delta is None:
            deltas[key] = [1, received, received]
        else:
            delta[0] += 1
            if received < delta[1]:
                delta[1] = received
            if received > delta[2]:
                delta[2] = received
    # None becomes '' only now, once per key rather than once per row.
    return {tuple("" if v is None else v for v in key): delta for key, delta in deltas.items()}


def write_reports(
    connection: sqlite3.Connection, rows: Sequence[tuple[object, ...]], now_ms: int
) -> Callable[[], None]:
    """Insert the rows (``NewReport.row()`` order) and bump their counters and their issues';
    the caller owns the transaction. Answers the rest of the issue counters, to run before
    the COMMIT: one statement per table, so the writer runs it on its thread (see
    ``issue_counts.bump_counters``)."""
    deferred: list[tuple[int, Tally]] = []
    counted: list[list[tuple[object, ...]]] = []
    if not rows:
        return lambda: None
    ids = issue_counts.add(
        connection, tally_reports(rows), now_ms, deferred=deferred, deferred_counts=counted
    )
    connection.executemany(
        INSERT_REPORT,
        [
            (*row[:_FINGERPRINT], row[_FINGERPRINT] or None, row[_RELEASE],
             ids.get(row[_FINGERPRINT]))  # type: ignore[call-overload]
            for row in rows
        ],
    )  # fmt: skip
    count_reports(connection, rows)

    def finish() -> None:
        for issues in counted:
            issue_counts.count_issues(connection, issues)
        issue_counts.bump_counters(connection, deferred, 1)

    return finish


def count_reports(connection: sqlite3.Connection, rows: Sequence[tuple[object, ...]]) -> None:
    """Bump the counters of rows (``NewReport.row()`` order) inserted in this transaction:
    the one path every insert of reports takes, ingest and ``copy`` alike."""
    hourly = rollup(rows)
    connection.executemany(UPSERT_HOURLY, [(*key, *delta) for key, delta in hourly.items()])
    for upsert, positions in _HOURLY_COARSE:
        coarse = _project(hourly, positions, keep_hour=True)
        connection.executemany(upsert, [(*key, *delta) for key, delta in coarse.items()])
    for upsert, positions in _TOTALS:
        totals = _project(hourly, positions, keep_hour=False)
        connection.executemany(upsert, [(*key, *delta) for key, delta in totals.items()])


def prune(connection: sqlite3.Connection, older_than_ms: int) -> int:
    """Delete reports received before ``older_than_ms`` and keep the counters exact.

    Whole hours before the cut lose their roll-up rows; the hour the cut falls in is recounted
    from the reports left; the all-time tables are rebuilt from the hourly one. The caller owns
    the transaction. Returns how many reports were deleted.
    """
    touched = issue_counts.forget_events(connection, "reports", "received_at < ?", (older_than_ms,))
    deleted = connection.execute(
        "DELETE FROM reports WHERE received_at < ?", (older_than_ms,)
    ).rowcount
    issue_counts.settle(connection, touched, "reports")
    edge = older_than_ms // HOUR_MS
    connection.execute("DELETE FROM report_groups_hourly WHERE hour <= ?", (edge,))
    connection.execute(
        f"INSERT INTO report_groups_hourly (hour, {_KEY_COLUMNS}, count, first_seen, last_seen)"
        " SELECT received_at / 3600000, type, coalesce(site, ''), coalesce(origin, ''),"
        " coalesce(browser, ''), coalesce(browser_major, ''), coalesce(os, ''),"
        " coalesce(reason, ''), user_agent, count(*), min(received_at), max(received_at)"
        " FROM reports WHERE received_at >= ? AND received_at < ?"
        " GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9",
        (edge * HOUR_MS, (edge + 1) * HOUR_MS),
    )
    for table, keys in HOURLY_TABLES.items():
        if table == "report_groups_hourly":
            continue
        columns = ", ".join(keys)
        connection.execute(f"DELETE FROM {table} WHERE hour <= ?", (edge,))
        connection.execute(
            f"INSERT INTO {table} (hour, {columns}, count, first_seen, last_seen)"
            f" SELECT hour, {columns}, sum(count), min(first_seen), max(last_seen)"
            f" FROM report_groups_hourly WHERE hour = ? GROUP BY hour, {columns}",
            (edge,),
        )
    for table, keys in TOTAL_TABLES.items():
        columns = ", ".join(keys)
        connection.execute(f"DELETE FROM {table}")
        connection.execute(
            f"INSERT INTO {table} ({columns}, count, first_seen, last_seen)"
            f" SELECT {columns}, sum(count), min(first_seen), max(last_seen)"
            f" FROM report_groups_hourly GROUP BY {columns}"
        )
    return int(deleted)
