"""Issue counters and triage state in PostgreSQL, kept in the transaction that writes the events.

The same tally as the SQLite backend (``storage/sqlite/issue_counts.py``: the same breakdown
values, titles, release order and triage), so both engines answer the same issues. Events are
summed per fingerprint in Python, then each table gets one statement for the whole group:

1. ``issues``: one ``INSERT ... ON CONFLICT (fingerprint) DO UPDATE`` over the group's
   fingerprints in sorted order, adding the counts and answering each issue's id and triage
   state. The upsert takes the row locks (an insert, or the update of an existing row) one
   fingerprint at a time in that order, so two writers sharing issues wait for each other
   instead of deadlocking, and no one can change an issue between this read of its state and
   the write of the next state below. It changes only counts, seen times and the title, so
   the state it answers is the state before these events (the count less the group's).
2. ``issues.triage.after_events`` in Python; the few issues whose status or release range
   moves get one more ``UPDATE``, and a history row per status change (actor ``system``).
3. ``issue_hourly`` and ``issue_breakdown``: sorted upserts of the group's deltas. An issue's
   row (locked in step 1) guards its hourly and breakdown rows: whoever holds it is their
   only writer until COMMIT.

Every transaction takes the tables in one order: ``reports``, the roll-ups
(``rollups.LOCK_ORDER``), ``crashes``, then ``ISSUE_LOCK_ORDER``. Deletions tally the rows they
delete with the same functions and subtract (``forget_*``), then ``settle`` the issues
touched. The caller owns the transaction.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from reporting_endpoint.issues.fingerprint import path_shape
from reporting_endpoint.issues.triage import (
    SYSTEM_ACTOR,
    IssueState,
    after_events,
)
from reporting_endpoint.records import REPORT_BASE_WIDTH, IssueKey
from reporting_endpoint.storage.alert_store import NEW_ISSUE, REGRESSED
from reporting_endpoint.storage.filters import HOUR_MS
from reporting_endpoint.storage.issue_rows import (
    MAX_VALUE,
    bounded,
    crash_body_dims,
    crash_dims,
    has_body_dims,
    newest,
    oldest,
    status_of,
)
from reporting_endpoint.storage.postgres import alerts
from reporting_endpoint.storage.postgres.values import clean_text

# The issue tables in the order every transaction takes them (after reports, the roll-ups
# and crashes).
ISSUE_LOCK_ORDER = ("issues", "issue_hourly", "issue_breakdown", "issue_history")

# Positions in a NewReport.row() tuple.
_FINGERPRINT, _TITLE, _RELEASE = REPORT_BASE_WIDTH, REPORT_BASE_WIDTH + 1, REPORT_BASE_WIDTH + 2


@dataclass(slots=True)
class Tally:
    """What a set of events adds to (or takes from) one issue."""

    key: IssueKey | None
    count: int = 0
    first: int = 0
    last: int = 0
    releases: set[str] = field(default_factory=set)
    hours: dict[int, int] = field(default_factory=dict)
    dims: dict[tuple[str, str], int] = field(default_factory=dict)

    def add(
        self,
        first: int,
        release: str | None,
        dims: Iterable[tuple[str, str]],
        count: int = 1,
        last: int | None = None,
    ) -> None:
        """``count`` events received from ``first`` to ``last`` (the same hour)."""
        last = first if last is None else last
        if self.count == 0 or first < self.first:
            self.first = first
        if self.count == 0 or last > self.last:
            self.last = last
        self.count += count
        hour = first // HOUR_MS
        self.hours[hour] = self.hours.get(hour, 0) + count
        if release is not None:
            self.releases.add(release)
        for dim in dims:
            self.dims[dim] = self.dims.get(dim, 0) + count


@functools.lru_cache(maxsize=16384)
def _path(url: str) -> str:
    # Cached: under load many reports come from the same pages.
    return path_shape(url)[:MAX_VALUE]


def report_dims(
    kind: object, url: object, browser: object, major: object, os: object, raw: object,
    release: object,
) -> list[tuple[str, str]]:  # fmt: skip
    """The breakdown values of one report (values it lacks are left out)."""
    path = _path(url) if isinstance(url, str) and url else None
    return _dims(kind, path, browser, major, os, raw, release)


def _dims(
    kind: object, path: str | None, browser: object, major: object, os: object, raw: object,
    release: object,
) -> list[tuple[str, str]]:  # fmt: skip
    dims = [
        (name, value)
        for name, value in (
            ("browser", bounded(browser)),
            ("browser_major", bounded(major)),
            ("os", bounded(os)),
            ("release", bounded(release)),
            ("path", path),
        )
        if value is not None
    ]
    if kind == "crash" and isinstance(raw, str):
        dims.extend(crash_body_dims(raw))
    return dims


def tally_reports(rows: Sequence[Sequence[object]]) -> dict[str, Tally]:
    """Cleaned ``NewReport.row()`` tuples per fingerprint (rows without one belong to no
    issue); a new issue takes the kind, title and site of the group's first row.

    The hot path of ingest: rows are first counted per (fingerprint, hour, breakdown values)
    with one tuple and one dict lookup each, and the breakdown is worked out once per distinct
    key (a group of a thousand reports shares a few dozen), not once per row.
    """
    keys: dict[str, IssueKey] = {}
    counts: dict[tuple[Any, ...], list[int]] = {}
    for row in rows:
        fingerprint = row[_FINGERPRINT]
        if not fingerprint:
            continue
        if fingerprint not in keys:
            keys[fingerprint] = IssueKey(  # type: ignore[index]
                str(fingerprint), str(row[3]), str(row[_TITLE] or row[3]),
                row[6] if isinstance(row[6], str) else None,
            )  # fmt: skip
        received: int = row[0]  # type: ignore[assignment]
        kind, url, raw = row[3], row[4], row[12]
        body = raw if kind == "crash" and isinstance(raw, str) and has_body_dims(raw) else None
        path = _path(url) if isinstance(url, str) and url else None
        key = (fingerprint, received // HOUR_MS, kind, path, row[8], row[9], row[10],
               row[_RELEASE], body)  # fmt: skip
        seen = counts.get(key)
        if seen is None:
            counts[key] = [1, received, received]
        else:
            seen[0] += 1
            if received < seen[1]:
                seen[1] = received
            if received > seen[2]:
                seen[2] = received
    tallies = {fingerprint: Tally(key) for fingerprint, key in keys.items()}
    for (fingerprint, _hour, kind, path, browser, major, os, release, body), (
        count, first, last,
    ) in counts.items():  # fmt: skip
        tallies[fingerprint].add(
            first,
            release if isinstance(release, str) else None,
            _dims(kind, path, browser, major, os, body, release),
            count,
            last,
        )
    return tallies


def arrays(rows: Iterable[Sequence[object]], width: int) -> list[list[object]]:
    """Rows as one list per column, for ``unnest($1::type[], ...)``."""
    columns: list[list[object]] = [[] for _ in range(width)]
    for row in rows:
        for i, value in enumerate(row):
            columns[i].append(value)
    return columns


# --- adding events -------------------------------------------------------------------------

# Rows go in the order of the arrays (sorted fingerprints): the lock order. ``xmax = 0`` holds
# only for a row this statement inserted (an updated row carries this transaction's id), so
# ``created`` tells new issues, whose state needs no triage, from existing ones.
_UPSERT_ISSUES = """
INSERT INTO issues AS i (id, fingerprint, kind, title, site, event_count, first_seen, last_seen,
                         first_release, last_release, created_at)
SELECT id, f, k, t, s, n, fs, ls, fr, lr, $11
FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bigint[],
            $7::bigint[], $8::bigint[], $9::text[], $10::text[])
     AS u(id, f, k, t, s, n, fs, ls, fr, lr)
ON CONFLICT (fingerprint) DO UPDATE SET
    event_count = i.event_count + excluded.event_count,
    first_seen = least(i.first_seen, excluded.first_seen),
    last_seen = greatest(i.last_seen, excluded.last_seen),
    title = CASE WHEN $12 THEN excluded.title ELSE i.title END
RETURNING id, fingerprint, status, resolved_in_release, ignore_until_ms, ignore_until_count,
          event_count, first_release, last_release, xmax = 0 AS created
"""

# Ids for new issues, taken from the identity's own sequence, so later defaults never collide.
_NEW_IDS = (
    "SELECT nextval(pg_get_serial_sequence('issues', 'id')) AS id"
    " FROM generate_series(1, $1) ORDER BY id"
)

_UPDATE_ISSUES = """
UPDATE issues AS i SET status = u.status, resolved_in_release = u.rel,
    ignore_until_ms = u.until_ms, ignore_until_count = u.until_count,
    first_release = u.fr, last_release = u.lr,
    status_changed_at = CASE WHEN u.changed THEN $9 ELSE i.status_changed_at END
FROM unnest($1::bigint[], $2::text[], $3::text[], $4::bigint[], $5::bigint[], $6::text[],
            $7::text[], $8::boolean[]) AS u(id, status, rel, until_ms, until_count, fr, lr, changed)
WHERE i.id = u.id
"""

INSERT_HISTORY = (
    "INSERT INTO issue_history (issue_id, at, actor, from_status, to_status, reason,"
    " resolved_in_release) SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::text[],"
    " $4::text[], $5::text[], $6::text[], $7::text[])"
)

# Both counters in one statement (one round trip): the hourly upsert as a data-modifying CTE.
_BUMP_COUNTERS = (
    "WITH h AS (INSERT INTO issue_hourly AS h (issue_id, hour, count)"
    " SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::bigint[])"
    " ON CONFLICT (issue_id, hour) DO UPDATE SET count = h.count + excluded.count)"
    " INSERT INTO issue_breakdown AS b (issue_id, dimension, value, count)"
    " SELECT * FROM unnest($4::bigint[], $5::text[], $6::text[], $7::bigint[])"
    " ON CONFLICT (issue_id, dimension, value) DO UPDATE SET count = b.count + excluded.count"
)


async def add(
    connection: asyncpg.Connection,
    tallies: dict[str, Tally],
    now_ms: int,
    *,
    triage: bool = True,
) -> dict[str, int]:
    """Count ``tallies`` (per fingerprint) into their issues, creating the missing ones, and
    answer each fingerprint's issue id. With ``triage`` the events move the status on (a
    change goes to the history, actor ``system``); without it (an import of old events, a
    regroup) they only count. A tally without a key only counts (its issue must exist)."""
    if not tallies:
        return {}
    ids = await _ids(connection, tallies)
    order = sorted(tallies)
    rows = []
    for fingerprint in order:
        tally = tallies[fingerprint]
        key = tally.key or IssueKey(fingerprint, "", "", None)
        rows.append(
            (ids[fingerprint], fingerprint, key.kind, key.title, key.site, tally.count,
             tally.first, tally.last, oldest(tally.releases), newest(tally.releases))
        )  # fmt: skip
    has_titles = all(tallies[f].key is not None for f in order)
    answered = await connection.fetch(_UPSERT_ISSUES, *arrays(rows, 10), now_ms, has_titles)
    updates: list[tuple[object, ...]] = []
    history: list[tuple[object, ...]] = []
    # What alerts are about (README "Alerts"), recorded in this transaction: rare, so a group
    # without a new issue or a regression writes nothing more.
    events: list[tuple[int, str]] = []
    for record in answered:
        fingerprint = str(record["fingerprint"])
        issue_id = int(record["id"])
        ids[fingerprint] = issue_id
        if record["created"]:
            if triage:
                events.append((issue_id, NEW_ISSUE))
            continue
        tally = tallies[fingerprint]
        before = IssueState(
            status_of(record["status"]),
            record["resolved_in_release"],
            record["ignore_until_ms"],
            record["ignore_until_count"],
            int(record["event_count"]) - tally.count,
        )
        state, reason = before, None
        if triage:
            state, reason = after_events(before, tally.count, sorted(tally.releases), now_ms)
        stored = (record["first_release"], record["last_release"])
        releases = (oldest([stored[0], *tally.releases]), newest([stored[1], *tally.releases]))
        moved = _triage_fields(state) != _triage_fields(before)
        if moved or reason is not None or releases != stored:
            updates.append(
                (issue_id, state.status, state.resolved_in_release, state.ignore_until_ms,
                 state.ignore_until_count, releases[0], releases[1], reason is not None)
            )  # fmt: skip
        if state.status == "regressed" and before.status != "regressed":
            events.append((issue_id, REGRESSED))
        if reason is not None:
            history.append(
                (issue_id, now_ms, SYSTEM_ACTOR, record["status"], state.status, reason,
                 state.resolved_in_release)
            )  # fmt: skip
    if updates:
        await connection.execute(_UPDATE_ISSUES, *arrays(updates, 8), now_ms)
    await bump_counters(connection, [(ids[f], tallies[f]) for f in order], 1)
    if history:
        await connection.execute(INSERT_HISTORY, *arrays(history, 7))
    await alerts.record_events(connection, events, now_ms)
    return ids


async def _ids(connection: asyncpg.Connection, tallies: dict[str, Tally]) -> dict[str, int]:
    """The id of each fingerprint's issue: the stored one, or a new one for a fingerprint
    not stored yet, handed out in the tallies' order (the order the events came in).

    New ids are taken here rather than by the upsert's default: a default is drawn for every
    row of an ``INSERT ... ON CONFLICT``, existing ones included, which would leave a gap per
    existing issue per group; and SQLite numbers new issues in arrival order, so the same
    events get the same ids on both engines. The read takes no lock (the upsert does, in
    fingerprint order); a fingerprint another writer creates in between makes the upsert
    update that issue instead, and the id drawn for it is left unused.
    """
    stored = {
        str(fingerprint): int(issue_id)
        for issue_id, fingerprint in await connection.fetch(
            "SELECT id, fingerprint FROM issues WHERE fingerprint = ANY($1::text[])",
            list(tallies),
        )
    }
    new = [fingerprint for fingerprint in tallies if fingerprint not in stored]
    if new:
        drawn = await connection.fetch(_NEW_IDS, len(new))
        stored.update(zip(new, (int(r[0]) for r in drawn), strict=True))
    return stored


def _triage_fields(state: IssueState) -> tuple[object, ...]:
    return (
        state.status,
        state.resolved_in_release,
        state.ignore_until_ms,
        state.ignore_until_count,
    )


async def bump_counters(
    connection: asyncpg.Connection, tallies: Sequence[tuple[int, Tally]], sign: int
) -> None:
    """Add (``sign`` 1) or take away (-1) the hourly and breakdown counts of ``tallies``, in
    key order; rows that reach zero are deleted, so a breakdown never lists a value with no
    event."""
    hourly = sorted(
        (issue_id, hour, sign * count)
        for issue_id, tally in tallies
        for hour, count in tally.hours.items()
    )
    breakdown = sorted(
        (issue_id, dimension, value, sign * count)
        for issue_id, tally in tallies
        for (dimension, value), count in tally.dims.items()
    )
    if hourly or breakdown:
        await connection.execute(_BUMP_COUNTERS, *arrays(hourly, 3), *arrays(breakdown, 4))
    if sign < 0:
        ids = sorted({issue_id for issue_id, _ in tallies})
        await connection.execute(
            "DELETE FROM issue_hourly WHERE issue_id = ANY($1::bigint[]) AND count <= 0", ids
        )
        await connection.execute(
            "DELETE FROM issue_breakdown WHERE issue_id = ANY($1::bigint[]) AND count <= 0", ids
        )


# --- taking events away --------------------------------------------------------------------


async def subtract(connection: asyncpg.Connection, tallies: dict[int, Tally]) -> None:
    """Take deleted events (tallied per issue id) out of their issues' counters, in id
    order; ``settle`` them afterwards."""
    if not tallies:
        return
    order = sorted(tallies)
    await connection.execute(
        "UPDATE issues AS i SET event_count = i.event_count - u.n"
        " FROM unnest($1::bigint[], $2::bigint[]) AS u(id, n) WHERE i.id = u.id",
        order,
        [tallies[issue_id].count for issue_id in order],
    )
    await bump_counters(connection, [(issue_id, tallies[issue_id]) for issue_id in order], -1)


async def settle(connection: asyncpg.Connection, issue_ids: Iterable[int], table: str) -> None:
    """After events of these issues were deleted from ``table`` (``reports`` or
    ``crashes``): delete the issues left empty, and take the others' first/last seen again
    (one index range each) and first/last release (from the release breakdown)."""
    if table not in ("reports", "crashes"):
        raise ValueError(f"no such table: {table!r}")
    ids = sorted(set(issue_ids))
    if not ids:
        return
    rows = await connection.fetch(
        "SELECT u.id, e.first, e.last, e.n FROM unnest($1::bigint[]) AS u(id),"
        f" LATERAL (SELECT min(received_at) AS first, max(received_at) AS last, count(*) AS n"
        f" FROM {table} WHERE issue_id = u.id) AS e ORDER BY u.id",
        ids,
    )
    empty = [int(row[0]) for row in rows if not row[3]]
    kept = [row for row in rows if row[3]]
    releases: dict[int, list[str]] = {int(row[0]): [] for row in kept}
    if kept:
        for issue_id, value in await connection.fetch(
            "SELECT issue_id, value FROM issue_breakdown WHERE issue_id = ANY($1::bigint[])"
            " AND dimension = 'release'",
            list(releases),
        ):
            releases[int(issue_id)].append(str(value))
        await connection.execute(
            "UPDATE issues AS i SET first_seen = u.first, last_seen = u.last,"
            " event_count = u.n, first_release = u.fr, last_release = u.lr"
            " FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[], $5::text[],"
            " $6::text[]) AS u(id, first, last, n, fr, lr) WHERE i.id = u.id",
            *arrays(
                (
                    (row[0], row[1], row[2], row[3], oldest(releases[int(row[0])]),
                     newest(releases[int(row[0])]))
                    for row in kept
                ),
                6,
            ),
        )  # fmt: skip
    await delete_issues(connection, empty)


async def delete_issues(connection: asyncpg.Connection, issue_ids: Sequence[int]) -> None:
    """Delete issues with their counters and history."""
    if not issue_ids:
        return
    ids = sorted(issue_ids)
    await connection.execute("DELETE FROM issues WHERE id = ANY($1::bigint[])", ids)
    for table in ("issue_hourly", "issue_breakdown", "issue_history"):
        await connection.execute(f"DELETE FROM {table} WHERE issue_id = ANY($1::bigint[])", ids)


# The columns a stored report's tally reads, aggregated server-side: rows of one issue, hour
# and key values collapse into one, and the raw JSON travels only for the crash reports that
# may carry body breakdown values (the same substring test as ``has_body_dims``).
_REPORT_TALLY = (
    "SELECT issue_id, received_at / 3600000, min(received_at), max(received_at), type, url,"
    " browser, browser_major, os, release, body, count(*) FROM ("
    " SELECT issue_id, received_at, type, url, browser, browser_major, os, release,"
    "  CASE WHEN type = 'crash' AND (strpos(raw, '\"visibility_state\"') > 0"
    "   OR strpos(raw, '\"is_top_level\"') > 0) THEN raw END AS body"
    "  FROM reports WHERE issue_id IS NOT NULL AND ({where})) AS r"
    " GROUP BY 1, 2, 5, 6, 7, 8, 9, 10, 11"
)


async def tally_stored_reports(
    connection: asyncpg.Connection, where: str, *args: object
) -> dict[int, Tally]:
    """The stored reports matching ``where`` (SQL over ``reports``, ``$n`` for ``args``),
    tallied per issue id: what deleting them takes away. Read through a cursor (the caller's
    transaction), so memory holds the tallies, not the rows."""
    tallies: dict[int, Tally] = {}
    async for record in connection.cursor(_REPORT_TALLY.format(where=where), *args):
        (issue_id, _hour, first, last, kind, url, browser, major, os, release, body,
         count) = record  # fmt: skip
        tally = tallies.get(issue_id)
        if tally is None:
            tally = tallies[issue_id] = Tally(None)
        tally.add(
            int(first),
            release,
            report_dims(kind, url, browser, major, os, body, release),
            int(count),
            int(last),
        )
    return tallies


def tally_crash_rows(rows: Iterable[Sequence[Any]]) -> dict[int, Tally]:
    """Crash rows of (issue_id, received_at, os, release) per issue id (rows without an
    issue left out)."""
    tallies: dict[int, Tally] = {}
    for issue_id, received_at, os, release in rows:
        if issue_id is None:
            continue
        tally = tallies.get(issue_id)
        if tally is None:
            tally = tallies[issue_id] = Tally(None)
        tally.add(int(received_at), release, crash_dims(os, release))
    return tallies


async def forget(connection: asyncpg.Connection, tallies: dict[int, Tally], table: str) -> None:
    """Subtract the tallies of events just deleted from ``table``, then settle their issues."""
    await subtract(connection, tallies)
    await settle(connection, tallies, table)


def key_text(key: IssueKey) -> IssueKey:
    """An issue key as PostgreSQL can store it (see ``values.clean_text``)."""
    return IssueKey(
        clean_text(key.fingerprint),
        clean_text(key.kind),
        clean_text(key.title),
        None if key.site is None else clean_text(key.site),
    )
