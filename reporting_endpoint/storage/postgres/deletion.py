"""Deleting reports and crashes in PostgreSQL, keeping every roll-up exact.

Jobs on the writer's connection; the caller owns the transaction. Retention drops whole
daily partitions before the cut (no dead rows, no vacuum) and deletes rows only in the one
partition the cut falls in; the roll-ups are then recounted exactly as the SQLite backend
does (hours before the cut go, the cut's hour is recounted from the reports left, the
all-time tables are rebuilt from the hourly one).

Other ingest processes commit roll-up upserts in parallel, and a recount must not interleave
with them: prune and delete take the roll-up tables in EXCLUSIVE mode (reads go on, writers
wait), after ``reports`` and in the writers' own table order (``rollups.LOCK_ORDER``), so no
two transactions ever wait for each other in a cycle. Lock waits are bounded by the
connection's lock_timeout.

Issues stay exact too (``issue_writes``): what the deleted rows took part in is tallied from
the rows themselves (``RETURNING`` of a row delete; a read before the partitions of whole days
are dropped, since a DROP says nothing of its rows) and subtracted, then each issue touched
takes its first/last seen and releases again, and one left without events goes. The issue
tables come after ``reports``, the roll-ups and ``crashes``, the order every writer takes.

Like the SQLite backend, deletions answer the blobs no remaining crash row references; the
caller removes those files after the commit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any

import asyncpg
import orjson

from reporting_endpoint.storage.base import Blob, Deletion
from reporting_endpoint.storage.filters import HOUR_MS
from reporting_endpoint.storage.postgres import issue_writes
from reporting_endpoint.storage.postgres.rollups import (
    HOURLY_TABLES,
    KEYS,
    LOCK_ORDER,
    TOTAL_TABLES,
)

_KEY_COLUMNS = ", ".join(KEYS)
_KEY_EXPRESSIONS = ", ".join(f"coalesce({name}, '')" for name in KEYS)
_LOCK_ROLLUPS = f"LOCK TABLE {', '.join(LOCK_ORDER)} IN EXCLUSIVE MODE"


async def _one(connection: asyncpg.Connection, sql: str, *args: object) -> asyncpg.Record:
    """The one row an aggregate query answers."""
    row = await connection.fetchrow(sql, *args)
    assert row is not None  # an aggregate without GROUP BY always answers one row
    return row


def _placeholders(start: int, count: int) -> list[str]:
    return [f"${n}" for n in range(start, start + count)]


# --- reports ------------------------------------------------------------------------------


async def delete_report(connection: asyncpg.Connection, report_id: int) -> bool:
    """Delete one report and keep every roll-up exact; False when there is no such report.

    Its row of the finest hourly table is recounted from the reports left (one hour, one
    group); the coarser rows lose one, and take their first/last seen again from that exact
    table only when the report sat at an edge.
    """
    found = await connection.fetchrow(
        f"DELETE FROM reports WHERE id = $1 RETURNING received_at, {_KEY_EXPRESSIONS},"
        f" {_REPORT_EVENT}",
        report_id,
    )
    if found is None:
        return False
    await connection.execute(_LOCK_ROLLUPS)
    received_at = int(found[0])
    key = dict(zip(KEYS, found[1 : 1 + len(KEYS)], strict=True))
    event = found[1 + len(KEYS) :]
    hour = received_at // HOUR_MS
    match = " AND ".join(
        f"coalesce({name}, '') = {p}"
        for name, p in zip(KEYS, _placeholders(3, len(KEYS)), strict=True)
    )
    count, first, last = await _one(
        connection,
        "SELECT count(*), min(received_at), max(received_at) FROM reports"
        f" WHERE received_at >= $1 AND received_at < $2 AND {match}",
        hour * HOUR_MS,
        (hour + 1) * HOUR_MS,
        *key.values(),
    )
    await _set_row(connection, "report_groups_hourly", {"hour": hour, **key}, count, first, last)
    for table, keys in HOURLY_TABLES.items():
        if table != "report_groups_hourly":
            await _take_one(connection, table, {"hour": hour} | _pick(key, keys), received_at)
    for table, keys in TOTAL_TABLES.items():
        await _take_one(connection, table, _pick(key, keys), received_at)
    await issue_writes.forget(connection, _report_tally([event]), "reports")
    return True


# What a deleted report takes from its issue (``issue_writes.report_dims``' arguments).
_REPORT_EVENT = "issue_id, received_at, type, url, browser, browser_major, os, raw, release"


def _report_tally(events: Iterable[Sequence[Any]]) -> dict[int, issue_writes.Tally]:
    """Rows of ``_REPORT_EVENT`` per issue id (rows without an issue left out)."""
    tallies: dict[int, issue_writes.Tally] = {}
    for issue_id, received_at, kind, url, browser, major, os, raw, release in events:
        if issue_id is None:
            continue
        tally = tallies.setdefault(issue_id, issue_writes.Tally(None))
        dims = issue_writes.report_dims(kind, url, browser, major, os, raw, release)
        tally.add(int(received_at), release, dims)
    return tallies


def _pick(key: dict[str, Any], names: Sequence[str]) -> dict[str, Any]:
    return {name: key[name] for name in names}


def _where(key: dict[str, Any]) -> str:
    return " AND ".join(f"{name} = ${n}" for n, name in enumerate(key, 1))


async def _set_row(
    connection: asyncpg.Connection,
    table: str,
    key: dict[str, Any],
    count: int,
    first: int | None,
    last: int | None,
) -> None:
    await connection.execute(f"DELETE FROM {table} WHERE {_where(key)}", *key.values())
    if count:
        columns = ", ".join(key)
        values = ", ".join(_placeholders(1, len(key) + 3))
        await connection.execute(
            f"INSERT INTO {table} ({columns}, count, first_seen, last_seen) VALUES ({values})",
            *key.values(),
            count,
            first,
            last,
        )


async def _take_one(
    connection: asyncpg.Connection, table: str, key: dict[str, Any], received_at: int
) -> None:
    """One report less in a coarser roll-up row (a primary-key lookup)."""
    where = _where(key)
    row = await connection.fetchrow(
        f"SELECT count, first_seen, last_seen FROM {table} WHERE {where}", *key.values()
    )
    if row is None:
        return
    count, first, last = int(row[0]) - 1, row[1], row[2]
    if count > 0 and (received_at <= first or received_at >= last):
        # The report was the group's first or last: take the edges again from the finest
        # table, exact already (rare; an operator deletes one report at a time).
        first, last = await _one(
            connection,
            f"SELECT min(first_seen), max(last_seen) FROM report_groups_hourly WHERE {where}",
            *key.values(),
        )
    await _set_row(connection, table, key, max(count, 0), first, last)


async def prune_reports(connection: asyncpg.Connection, older_than_ms: int) -> int:
    """Delete reports received before ``older_than_ms`` and keep the counters (roll-ups and
    issues) exact; returns how many went. Whole days go as partitions; the rest is one range
    delete."""
    deleted, tallies = await _prune_reports(connection, older_than_ms)
    await issue_writes.forget(connection, tallies, "reports")
    return deleted


async def _prune_reports(
    connection: asyncpg.Connection, older_than_ms: int
) -> tuple[int, dict[int, issue_writes.Tally]]:
    """``prune_reports`` up to the issues: how many reports went, and what they take from
    their issues (for the caller to subtract once every table before the issues is done)."""
    # Nothing before the cut (a young database, or a prune that just ran elsewhere), not
    # even an empty day to drop: the roll-ups are exact already, so no lock is taken and
    # ingest does not wait at all.
    if not await connection.fetchval(
        "SELECT EXISTS (SELECT FROM reports WHERE received_at < $1)"
        " OR EXISTS (SELECT FROM report_partitions() WHERE to_ms <= $1)",
        older_than_ms,
    ):
        return 0, {}
    # Writers first wait here (they take ROW EXCLUSIVE on reports before the roll-ups), then
    # the roll-ups: the writers' own order. Reads go on until a partition is dropped.
    await connection.execute("LOCK TABLE reports IN SHARE ROW EXCLUSIVE MODE")
    await connection.execute(_LOCK_ROLLUPS)
    # What every report about to go (whole partitions included: a DROP says nothing of its
    # rows) takes from its issue, tallied before they go.
    tallies = await issue_writes.tally_stored_reports(connection, "received_at < $1", older_than_ms)
    dropped = await connection.fetchval("SELECT drop_report_partitions($1)", older_than_ms)
    status = await connection.execute("DELETE FROM reports WHERE received_at < $1", older_than_ms)
    deleted = int(status.split()[-1])
    edge = older_than_ms // HOUR_MS
    await connection.execute("DELETE FROM report_groups_hourly WHERE hour <= $1", edge)
    await connection.execute(
        f"INSERT INTO report_groups_hourly (hour, {_KEY_COLUMNS}, count, first_seen, last_seen)"
        f" SELECT received_at / {HOUR_MS}, type, coalesce(site, ''), coalesce(origin, ''),"
        " coalesce(browser, ''), coalesce(browser_major, ''), coalesce(os, ''),"
        " coalesce(reason, ''), user_agent, count(*), min(received_at), max(received_at)"
        " FROM reports WHERE received_at >= $1 AND received_at < $2"
        " GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9",
        edge * HOUR_MS,
        (edge + 1) * HOUR_MS,
    )
    for table, keys in HOURLY_TABLES.items():
        if table == "report_groups_hourly":
            continue
        columns = ", ".join(keys)
        await connection.execute(f"DELETE FROM {table} WHERE hour <= $1", edge)
        await connection.execute(
            f"INSERT INTO {table} (hour, {columns}, count, first_seen, last_seen)"
            f" SELECT hour, {columns}, sum(count), min(first_seen), max(last_seen)"
            f" FROM report_groups_hourly WHERE hour = $1 GROUP BY hour, {columns}",
            edge,
        )
    for table, keys in TOTAL_TABLES.items():
        columns = ", ".join(keys)
        await connection.execute(f"DELETE FROM {table}")
        await connection.execute(
            f"INSERT INTO {table} ({columns}, count, first_seen, last_seen)"
            f" SELECT {columns}, sum(count), min(first_seen), max(last_seen)"
            f" FROM report_groups_hourly GROUP BY {columns}"
        )
    return int(dropped or 0) + deleted, tallies


# --- crashes ------------------------------------------------------------------------------


def _blobs_of(rows: Iterable[asyncpg.Record]) -> dict[str, str]:
    """sha256 -> path of every file the given (dump_sha256, dump_path, attachments) rows use."""
    files: dict[str, str] = {}
    for sha256, path, attachments in (tuple(row)[:3] for row in rows):
        files[sha256] = path
        files.update((sha, p) for sha, p in _attachment_blobs(attachments) if sha not in files)
    return files


def _attachment_blobs(attachments: object) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    with contextlib.suppress(orjson.JSONDecodeError, TypeError):
        for attachment in orjson.loads(attachments):  # type: ignore[arg-type]
            if isinstance(attachment, dict) and attachment.get("sha256"):
                found.append((str(attachment["sha256"]), str(attachment.get("path", ""))))
    return found


async def _still_used(connection: asyncpg.Connection, shas: list[str]) -> set[str]:
    """Those of ``shas`` some crash row uses (as its dump or an attachment), or some symbol
    file (as its text or its native debug file).

    Attachments are JSON text (not jsonb, see the migration), and a row copied from
    elsewhere may not even parse: the candidates are found by substring in SQL, then the
    JSON is read here.
    """
    rows = await connection.fetch(
        "SELECT dump_sha256, attachments FROM crashes WHERE dump_sha256 = ANY($1::text[])"
        " OR EXISTS (SELECT FROM unnest($1::text[]) AS s(sha)"
        " WHERE strpos(crashes.attachments, s.sha) > 0)",
        shas,
    )
    wanted = set(shas)
    used: set[str] = set()
    for row in rows:
        used.add(str(row[0]))
        used.update(sha for sha, _ in _attachment_blobs(row[1]))
    symbols = await connection.fetch(
        "SELECT sym_sha256 FROM symbol_files WHERE sym_sha256 = ANY($1::text[])"
        " UNION SELECT object_sha256 FROM symbol_files WHERE object_sha256 = ANY($1::text[])",
        shas,
    )
    used.update(str(row[0]) for row in symbols)
    return used & wanted


async def _unreferenced(connection: asyncpg.Connection, files: dict[str, str]) -> tuple[Blob, ...]:
    if not files:
        return ()
    still = await _still_used(connection, sorted(files))
    return tuple(Blob(sha, path) for sha, path in sorted(files.items()) if sha not in still)


async def unreferenced(connection: asyncpg.Connection, blobs: Sequence[Blob]) -> tuple[Blob, ...]:
    """Those of ``blobs`` that no crash row references (checked again after a deletion)."""
    return await _unreferenced(connection, {blob.sha256: blob.path for blob in blobs})


async def delete_crash(connection: asyncpg.Connection, crash_id: str) -> Deletion:
    """Delete one crash row; ``crashes`` is 0 when there was none."""
    rows = await connection.fetch(
        f"DELETE FROM crashes WHERE id = $1 RETURNING {_CRASH_DELETED}", crash_id
    )
    if not rows:
        return Deletion()
    await issue_writes.forget(connection, _crash_tally(rows), "crashes")
    return Deletion(crashes=len(rows), blobs=await _unreferenced(connection, _blobs_of(rows)))


# A deleted crash row: its files, then what it takes from its issue.
_CRASH_DELETED = "dump_sha256, dump_path, attachments, issue_id, received_at, os, release"


def _crash_tally(rows: Iterable[asyncpg.Record]) -> dict[int, issue_writes.Tally]:
    return issue_writes.tally_crash_rows(tuple(row)[3:] for row in rows)


async def prune_crashes(connection: asyncpg.Connection, older_than_ms: int) -> Deletion:
    """Delete crashes received before ``older_than_ms`` (their issues kept exact)."""
    deletion, tallies = await _prune_crashes(connection, older_than_ms)
    await issue_writes.forget(connection, tallies, "crashes")
    return deletion


async def _prune_crashes(
    connection: asyncpg.Connection, older_than_ms: int
) -> tuple[Deletion, dict[int, issue_writes.Tally]]:
    rows = await connection.fetch(
        f"DELETE FROM crashes WHERE received_at < $1 RETURNING {_CRASH_DELETED}", older_than_ms
    )
    blobs = await _unreferenced(connection, _blobs_of(rows))
    return Deletion(crashes=len(rows), blobs=blobs), _crash_tally(rows)


async def prune_everything(connection: asyncpg.Connection, older_than_ms: int) -> Deletion:
    """Reports (counters kept exact) and crashes received before ``older_than_ms``.

    The issues come last, after both tables: a parse elsewhere locks its crash row and then
    its issue, so taking an issue before a crash row here could close a cycle with it.
    """
    reports, report_tallies = await _prune_reports(connection, older_than_ms)
    deletion, crash_tallies = await _prune_crashes(connection, older_than_ms)
    await issue_writes.forget(connection, report_tallies, "reports")
    await issue_writes.forget(connection, crash_tallies, "crashes")
    return replace(deletion, reports=reports)
