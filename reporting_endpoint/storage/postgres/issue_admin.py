"""Changing issues in PostgreSQL outside ingest: a person's triage decision, and regrouping
every stored event after the fingerprint rules changed.

Writer jobs on the write connection; the caller owns the transaction. The same steps as
``storage/sqlite/issue_admin.py``, so both engines end with the same issues, ids aside from
ingest order. A decision locks its issue's row (``FOR UPDATE``), so it cannot interleave with
a writer moving the same issue on. A regroup rewrites every event's issue: it takes
``reports`` and ``crashes`` so that no other process inserts or parses meanwhile, then the
issue tables, in the order every transaction takes them (``issue_writes``); reads go on.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import asyncpg

from reporting_endpoint.issues.triage import IssueState, StatusChange, change_status
from reporting_endpoint.records import IssueKey
from reporting_endpoint.storage.issue_rows import crash_dims, status_of
from reporting_endpoint.storage.postgres import issue_writes
from reporting_endpoint.storage.postgres.issue_writes import (
    INSERT_HISTORY,
    ISSUE_LOCK_ORDER,
    Tally,
    arrays,
    key_text,
    report_dims,
)
from reporting_endpoint.storage.rows import (
    CRASH_COLUMNS,
    REPORT_COLUMNS,
    crash_row_to_dict,
    report_row_to_dict,
    texts,
)

# Rows read per round trip while regrouping, and ids rewritten per statement.
_BATCH = 2000
_I64_MAX = (1 << 63) - 1


async def set_status(
    connection: asyncpg.Connection, issue_id: int, change: StatusChange, now_ms: int
) -> bool:
    """Apply ``change`` and record it in the history; False when there is no such issue."""
    row = await connection.fetchrow(
        "SELECT status, resolved_in_release, ignore_until_ms, ignore_until_count, event_count"
        " FROM issues WHERE id = $1 FOR UPDATE",
        issue_id,
    )
    if row is None:
        return False
    before = IssueState(status_of(row[0]), row[1], row[2], row[3], int(row[4]))
    after = change_status(before, change, now_ms)
    await connection.execute(
        "UPDATE issues SET status = $1, resolved_in_release = $2, ignore_until_ms = $3,"
        " ignore_until_count = $4, status_changed_at = $5 WHERE id = $6",
        after.status, after.resolved_in_release, after.ignore_until_ms,
        after.ignore_until_count, now_ms, issue_id,
    )  # fmt: skip
    # Every decision is recorded, a repeated one too: the history says who looked, and when.
    await connection.execute(
        INSERT_HISTORY,
        *arrays(
            [(issue_id, now_ms, change.actor, before.status, after.status, change.reason,
              after.resolved_in_release)],
            7,
        ),
    )  # fmt: skip
    return True


class _Regroup:
    """The state of one regroup: new tallies, and the rows whose issue changes."""

    def __init__(self, known: dict[str, int]) -> None:
        self.known = known  # fingerprint -> id of the issues that exist now
        self.tallies: dict[str, Tally] = {}
        # Rows whose issue changes: to an existing issue (its id known now) or a new one.
        self.moves: list[tuple[str | None, int | None, object]] = []
        self.changed = 0

    def count(
        self,
        key: IssueKey | None,
        old_issue: object,
        row_id: object,
        received_at: int,
        release: str | None,
        dims: list[tuple[str, str]],
    ) -> None:
        fingerprint = key.fingerprint if key is not None and key.fingerprint else None
        if fingerprint is not None:
            tally = self.tallies.get(fingerprint)
            if tally is None:
                assert key is not None
                tally = self.tallies[fingerprint] = Tally(key)
            tally.add(received_at, release, dims)
        new_issue = self.known.get(fingerprint) if fingerprint is not None else None
        if fingerprint is not None and new_issue is None:
            self.moves.append((fingerprint, None, row_id))  # a new issue: id after ``add``
            self.changed += 1
        elif new_issue != old_issue:
            self.moves.append((fingerprint, new_issue, row_id))
            self.changed += 1


async def regroup(
    connection: asyncpg.Connection,
    report_key: Callable[[Mapping[str, Any]], IssueKey],
    crash_key: Callable[[Mapping[str, Any]], IssueKey | None],
    now_ms: int,
) -> int:
    """Recompute the issue of every report and parsed crash, rebuild every issue counter from
    scratch, keep the status and history of the issues whose fingerprint survives and delete
    the issues left without events. Answers how many events changed issue."""
    # Writers and parses wait (reads go on); then the issue tables, in the usual order.
    await connection.execute("LOCK TABLE reports IN SHARE ROW EXCLUSIVE MODE")
    await connection.execute("LOCK TABLE crashes IN SHARE ROW EXCLUSIVE MODE")
    await connection.execute(f"LOCK TABLE {', '.join(ISSUE_LOCK_ORDER)} IN EXCLUSIVE MODE")
    known = {
        str(fp): int(iid)
        for iid, fp in await connection.fetch("SELECT id, fingerprint FROM issues")
    }
    # Counters start again from zero; statuses stay (a regroup is not a new event).
    await connection.execute("DELETE FROM issue_hourly")
    await connection.execute("DELETE FROM issue_breakdown")
    await connection.execute(
        "UPDATE issues SET event_count = 0, first_seen = $1, last_seen = $2,"
        " first_release = NULL, last_release = NULL",
        _I64_MAX,
        -_I64_MAX,
    )
    moved = 0
    for table in ("reports", "crashes"):
        state = _Regroup(known)
        await _scan(connection, table, state, report_key, crash_key)
        ids = await issue_writes.add(connection, state.tallies, now_ms, triage=False)
        known.update(ids)
        id_type = "bigint" if table == "reports" else "text"
        moves = [
            (fp, issue_id if issue_id is not None or fp is None else ids[fp], row_id)
            for fp, issue_id, row_id in state.moves
        ]
        for start in range(0, len(moves), _BATCH):
            await connection.execute(
                f"UPDATE {table} AS t SET fingerprint = u.fp, issue_id = u.issue"
                f" FROM unnest($1::text[], $2::bigint[], $3::{id_type}[]) AS u(fp, issue, id)"
                " WHERE t.id = u.id",
                *arrays(moves[start : start + _BATCH], 3),
            )
        moved += state.changed
    empty = [
        int(r[0]) for r in await connection.fetch("SELECT id FROM issues WHERE event_count = 0")
    ]
    await issue_writes.delete_issues(connection, empty)
    return moved


async def _scan(
    connection: asyncpg.Connection,
    table: str,
    state: _Regroup,
    report_key: Callable[[Mapping[str, Any]], IssueKey],
    crash_key: Callable[[Mapping[str, Any]], IssueKey | None],
) -> None:
    """Every row of ``table`` in id order (the order SQLite walks: the first row of a new
    fingerprint names its issue), through a cursor of this transaction."""
    columns: tuple[str, ...] = REPORT_COLUMNS if table == "reports" else CRASH_COLUMNS
    order = "id" if table == "reports" else 'id COLLATE "C"'
    sql = f"SELECT {', '.join(columns)}, issue_id, release FROM {table} ORDER BY {order}"
    width = len(columns)
    key: IssueKey | None
    async for record in connection.cursor(sql, prefetch=_BATCH):
        row = texts(tuple(record))
        old_issue, release = row[width], row[width + 1]
        if table == "reports":
            key = report_key(report_row_to_dict(row[:width], with_raw=True))
            dims = report_dims(row[4], row[5], row[9], row[10], row[11], row[13], release)
        else:
            crash = crash_row_to_dict(row[:width])
            key = crash_key(crash) if crash.get("parse_status") == "parsed" else None
            dims = crash_dims(crash.get("os"), release)
        if key is not None:
            key = key_text(key)
        state.count(key, old_issue, row[0], int(row[1]), release, dims)
