"""Issue counters and triage state in SQLite, kept in the transaction that writes the events.

Every path that adds or removes events (ingest, a parsed crash, deletion, prune, regroup)
goes through a tally (``issue_tally``): events summed per issue in Python, then each issue
costs one read, one update and its counter upserts, never one statement per event.
Deletions tally the rows they are about to delete the same way and subtract, so the counters
stay exact. Plain sqlite3 on the writer's connection; the caller owns the transaction.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from typing import Any

import orjson

from reporting_endpoint.issues.triage import (
    SYSTEM_ACTOR,
    IssueState,
    after_events,
)
from reporting_endpoint.storage.alert_store import NEW_ISSUE, REGRESSED
from reporting_endpoint.storage.issue_rows import ISSUE_COLUMNS, newest, oldest, status_of
from reporting_endpoint.storage.sqlite import alerts
from reporting_endpoint.storage.sqlite.issue_tally import (
    CRASH_EVENT_COLUMNS,
    REPORT_EVENT_COLUMNS,
    Tally,
    tally_crash_event,
    tally_report_event,
)

# SQLite's default bound on host parameters is 32766; stay far below it.
_CHUNK = 500
_ISSUE_SELECT = ", ".join(ISSUE_COLUMNS)
# Statuses that new events never change: their issues only count.
_ONLY_COUNTED = frozenset({"unresolved", "regressed"})


def issues_by_fingerprint(
    connection: sqlite3.Connection, fingerprints: Sequence[str], columns: str = _ISSUE_SELECT
) -> dict[str, tuple[Any, ...]]:
    """The stored issues of these fingerprints, as rows of ``columns`` (the fingerprint
    second; default every ``ISSUE_COLUMNS``)."""
    found: dict[str, tuple[Any, ...]] = {}
    for start in range(0, len(fingerprints), _CHUNK):
        chunk = fingerprints[start : start + _CHUNK]
        marks = ",".join("?" * len(chunk))
        for row in connection.execute(
            f"SELECT {columns} FROM issues WHERE fingerprint IN ({marks})", chunk
        ):
            found[row[1]] = tuple(row)
    return found


def record_history(
    connection: sqlite3.Connection,
    issue_id: int,
    at: int,
    actor: str,
    before: str | None,
    after: str,
    reason: str,
    resolved_in_release: str | None,
) -> None:
    connection.execute(
        "INSERT INTO issue_history (issue_id, at, actor, from_status, to_status, reason,"
        " resolved_in_release) VALUES (?,?,?,?,?,?,?)",
        (issue_id, at, actor, before, after, reason, resolved_in_release),
    )


def add(
    connection: sqlite3.Connection,
    tallies: dict[str, Tally],
    now_ms: int,
    *,
    triage: bool = True,
    deferred: list[tuple[int, Tally]] | None = None,
    deferred_counts: list[list[tuple[object, ...]]] | None = None,
) -> dict[str, int]:
    """Count ``tallies`` (per fingerprint) into their issues, creating the missing ones, and
    answer each fingerprint's issue id. With ``triage`` the events move the status on (and a
    change is written to the history, actor ``system``); without it (an import of old events,
    a regroup) they only count. With ``deferred`` (and ``deferred_counts``) the hourly and
    breakdown counters (and the counts of issues whose status does not move) are left to the
    caller: ``bump_counters`` and ``count_issues`` in the same transaction."""
    if deferred is not None and deferred_counts is None:
        raise ValueError("deferred counters go with deferred_counts")
    if not tallies:
        return {}
    existing = issues_by_fingerprint(connection, list(tallies))
    ids: dict[str, int] = {}
    counted: list[tuple[object, ...]] = []
    triaged: list[tuple[object, ...]] = []
    created: list[tuple[object, ...]] = []
    # What alerts are about (README "Alerts"), recorded in this transaction: rare, so a group
    # without a new issue or a regression writes nothing more.
    events: list[tuple[int, str]] = []
    for fingerprint, tally in tallies.items():
        row = existing.get(fingerprint)
        if row is None:
            key = tally.key
            assert key is not None, "a new issue needs its key"
            created.append(
                (
                    fingerprint, key.kind, key.title, key.site, tally.count, tally.first,
                    tally.last, oldest(tally.releases), newest(tally.releases), now_ms,
                )
            )  # fmt: skip
            continue
        issue_id = int(row[0])
        ids[fingerprint] = issue_id
        first_release = oldest([row[12], *tally.releases]) if tally.releases else row[12]
        last_release = newest([row[13], *tally.releases]) if tally.releases else row[13]
        status = status_of(row[5])
        if not triage or status in _ONLY_COUNTED:
            # The common case under load: the events only count (no triage state to move).
            counted.append(
                (tally.count, tally.first, tally.last, first_release, last_release, issue_id)
            )
            continue
        state = IssueState(status, row[6], row[7], row[8], int(row[9]))
        state, changed = after_events(state, tally.count, sorted(tally.releases), now_ms)
        if state.status == "regressed" and status != "regressed":
            events.append((issue_id, REGRESSED))
        if changed is not None:
            record_history(
                connection, issue_id, now_ms, SYSTEM_ACTOR, row[5], state.status, changed,
                state.resolved_in_release,
            )  # fmt: skip
        triaged.append(
            (
                state.status, state.resolved_in_release, state.ignore_until_ms,
                state.ignore_until_count, state.event_count, tally.first, tally.last,
                first_release, last_release, now_ms if changed is not None else None, issue_id,
            )
        )  # fmt: skip
    if counted and deferred_counts is not None:
        # Left to the caller with the counters: one statement, off the event loop.
        deferred_counts.append(counted)
    elif counted:
        count_issues(connection, counted)
    connection.executemany(
        "UPDATE issues SET status = ?, resolved_in_release = ?, ignore_until_ms = ?,"
        " ignore_until_count = ?, event_count = ?, first_seen = min(first_seen, ?),"
        " last_seen = max(last_seen, ?), first_release = ?, last_release = ?,"
        " status_changed_at = coalesce(?, status_changed_at) WHERE id = ?",
        triaged,
    )
    if created:
        connection.executemany(
            "INSERT INTO issues (fingerprint, kind, title, site, status, event_count,"
            " first_seen, last_seen, first_release, last_release, created_at)"
            " VALUES (?,?,?,?,'unresolved',?,?,?,?,?,?)",
            created,
        )
        new = issues_by_fingerprint(connection, [str(row[0]) for row in created], "id, fingerprint")
        ids.update({str(row[1]): int(row[0]) for row in new.values()})
        if triage:
            events.extend((ids[str(row[0])], NEW_ISSUE) for row in created)
    alerts.record_events(connection, events, now_ms)
    pairs = [(ids[fp], tally) for fp, tally in tallies.items()]
    if deferred is None:
        bump_counters(connection, pairs, 1)
    else:
        deferred.extend(pairs)
    return ids


_COUNT_ISSUES = (
    "UPDATE issues SET event_count = event_count + j.n, first_seen = min(first_seen, j.first),"
    " last_seen = max(last_seen, j.last), first_release = j.first_release,"
    " last_release = j.last_release"
    " FROM (SELECT json_extract(value, '$[0]') AS n, json_extract(value, '$[1]') AS first,"
    " json_extract(value, '$[2]') AS last, json_extract(value, '$[3]') AS first_release,"
    " json_extract(value, '$[4]') AS last_release, json_extract(value, '$[5]') AS id"
    " FROM json_each(?)) AS j WHERE issues.id = j.id"
)


def count_issues(connection: sqlite3.Connection, counted: Sequence[tuple[object, ...]]) -> None:
    """Add events to issues whose status they do not move: (count, first seen, last seen,
    first release, last release, id) each, in one statement (see ``bump_counters``)."""
    if counted:
        connection.execute(_COUNT_ISSUES, (orjson.dumps(counted),))


# One statement per counter table for a whole group, the rows as one JSON array: SQLite runs
# it in a single step, so on the writer thread it holds the GIL once, not once per row, and
# the event loop keeps serving requests on another core meanwhile.
_BUMP_HOURLY = (
    "INSERT INTO issue_hourly (issue_id, hour, count)"
    " SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'),"
    " json_extract(value, '$[2]') FROM json_each(?) WHERE true"
    " ON CONFLICT DO UPDATE SET count = count + excluded.count"
)
_BUMP_BREAKDOWN = (
    "INSERT INTO issue_breakdown (issue_id, dimension, value, count)"
    " SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'),"
    " json_extract(value, '$[2]'), json_extract(value, '$[3]') FROM json_each(?) WHERE true"
    " ON CONFLICT DO UPDATE SET count = count + excluded.count"
)


def bump_counters(
    connection: sqlite3.Connection, tallies: Sequence[tuple[int, Tally]], sign: int
) -> None:
    """Add (``sign`` 1) or take away (-1) the hourly and breakdown counts of ``tallies``;
    rows that reach zero are deleted, so a breakdown never lists a value with no event."""
    hourly = [
        (issue_id, hour, sign * count)
        for issue_id, tally in tallies
        for hour, count in tally.hours.items()
    ]
    breakdown = [
        (issue_id, dimension, value, sign * count)
        for issue_id, tally in tallies
        for (dimension, value), count in tally.dims.items()
    ]
    if hourly:
        connection.execute(_BUMP_HOURLY, (orjson.dumps(hourly),))
    if breakdown:
        connection.execute(_BUMP_BREAKDOWN, (orjson.dumps(breakdown),))
    if sign < 0:
        connection.executemany(
            "DELETE FROM issue_hourly WHERE issue_id = ? AND hour = ? AND count <= 0",
            [row[:2] for row in hourly],
        )
        connection.executemany(
            "DELETE FROM issue_breakdown WHERE issue_id = ? AND dimension = ? AND value = ?"
            " AND count <= 0",
            [row[:3] for row in breakdown],
        )


def subtract(connection: sqlite3.Connection, tallies: dict[int, Tally]) -> None:
    """Take events about to be deleted (tallied per issue id) out of their issues' counters.
    Call it before the DELETE and ``settle`` after it."""
    if not tallies:
        return
    connection.executemany(
        "UPDATE issues SET event_count = event_count - ? WHERE id = ?",
        [(tally.count, issue_id) for issue_id, tally in tallies.items()],
    )
    bump_counters(connection, list(tallies.items()), -1)


def settle(connection: sqlite3.Connection, issue_ids: Iterable[int], table: str) -> None:
    """After events of these issues were deleted from ``table`` (``reports`` or ``crashes``):
    delete the issues left empty, and recompute the others' first/last seen (one index range
    each) and first/last release (from the release breakdown)."""
    for issue_id in issue_ids:
        row = connection.execute(
            f"SELECT min(received_at), max(received_at), count(*) FROM {table} WHERE issue_id = ?",
            (issue_id,),
        ).fetchone()
        if not row[2]:
            delete_issue(connection, issue_id)
            continue
        releases = [
            value
            for (value,) in connection.execute(
                "SELECT value FROM issue_breakdown WHERE issue_id = ? AND dimension = 'release'",
                (issue_id,),
            )
        ]
        connection.execute(
            "UPDATE issues SET first_seen = ?, last_seen = ?, event_count = ?,"
            " first_release = ?, last_release = ? WHERE id = ?",
            (row[0], row[1], row[2], oldest(releases), newest(releases), issue_id),
        )


def delete_issue(connection: sqlite3.Connection, issue_id: int) -> None:
    for table in ("issue_hourly", "issue_breakdown", "issue_history"):
        connection.execute(f"DELETE FROM {table} WHERE issue_id = ?", (issue_id,))
    connection.execute("DELETE FROM issues WHERE id = ?", (issue_id,))


def forget_events(
    connection: sqlite3.Connection, table: str, where: str, params: Sequence[object]
) -> set[int]:
    """Before deleting the rows of ``table`` (``reports`` or ``crashes``) matching ``where``:
    take them out of their issues' counters. Answers the issues touched, for ``settle``."""
    columns = REPORT_EVENT_COLUMNS if table == "reports" else CRASH_EVENT_COLUMNS
    tally_event = tally_report_event if table == "reports" else tally_crash_event
    tallies: dict[int, Tally] = {}
    cursor = connection.execute(
        f"SELECT issue_id, {columns} FROM {table} WHERE issue_id IS NOT NULL AND ({where})",
        params,
    )
    while batch := cursor.fetchmany(2000):
        for row in batch:
            tally = tallies.get(row[0])
            if tally is None:
                tally = tallies[row[0]] = Tally(None)
            tally_event(tally, row[1:])
    subtract(connection, tallies)
    return set(tallies)
