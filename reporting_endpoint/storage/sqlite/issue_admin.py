"""Changing issues in SQLite outside ingest: a person's triage decision, and regrouping every
stored event after the fingerprint rules changed. Writer jobs: plain sqlite3 on the writer's
connection, the caller owns the transaction."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Mapping
from typing import Any

from reporting_endpoint.issues.triage import IssueState, StatusChange, change_status
from reporting_endpoint.records import IssueKey
from reporting_endpoint.storage.issue_rows import status_of
from reporting_endpoint.storage.rows import (
    CRASH_COLUMNS,
    REPORT_COLUMNS,
    crash_row_to_dict,
    report_row_to_dict,
    texts,
)
from reporting_endpoint.storage.sqlite import issue_counts
from reporting_endpoint.storage.sqlite.issue_tally import (
    Tally,
    tally_crash_event,
    tally_report_event,
)

# Rows read per step while regrouping (memory stays flat whatever the table's size).
_BATCH = 2000
_I64_MAX = (1 << 63) - 1


def set_status(
    connection: sqlite3.Connection, issue_id: int, change: StatusChange, now_ms: int
) -> bool:
    """Apply ``change`` and record it in the history; False when there is no such issue."""
    row = connection.execute(
        "SELECT status, resolved_in_release, ignore_until_ms, ignore_until_count, event_count"
        " FROM issues WHERE id = ?",
        (issue_id,),
    ).fetchone()
    if row is None:
        return False
    before = IssueState(status_of(row[0]), row[1], row[2], row[3], int(row[4]))
    after = change_status(before, change, now_ms)
    connection.execute(
        "UPDATE issues SET status = ?, resolved_in_release = ?, ignore_until_ms = ?,"
        " ignore_until_count = ?, status_changed_at = ? WHERE id = ?",
        (
            after.status, after.resolved_in_release, after.ignore_until_ms,
            after.ignore_until_count, now_ms, issue_id,
        ),
    )  # fmt: skip
    # Every decision is recorded, a repeated one too: the history says who looked, and when.
    issue_counts.record_history(
        connection, issue_id, now_ms, change.actor, before.status, after.status, change.reason,
        after.resolved_in_release,
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
        self, key: IssueKey | None, old_issue: object, row_id: object, event: tuple[Any, ...],
        tally_event: Callable[[Tally, tuple[Any, ...]], None],
    ) -> None:  # fmt: skip
        fingerprint = key.fingerprint if key is not None and key.fingerprint else None
        if fingerprint is not None:
            tally = self.tallies.get(fingerprint)
            if tally is None:
                assert key is not None
                tally = self.tallies[fingerprint] = Tally(key)
            tally_event(tally, event)
        new_issue = self.known.get(fingerprint) if fingerprint is not None else None
        if fingerprint is not None and new_issue is None:
            self.moves.append((fingerprint, None, row_id))  # a new issue: id after ``add``
            self.changed += 1
        elif new_issue != old_issue:
            self.moves.append((fingerprint, new_issue, row_id))
            self.changed += 1


def regroup(
    connection: sqlite3.Connection,
    report_key: Callable[[Mapping[str, Any]], IssueKey],
    crash_key: Callable[[Mapping[str, Any]], IssueKey | None],
    now_ms: int,
) -> int:
    """Recompute the issue of every report and parsed crash, rebuild every issue counter from
    scratch, keep the status and history of the issues whose fingerprint survives and delete
    the issues left without events. Answers how many events changed issue."""
    known = {
        str(fp): int(iid) for iid, fp in connection.execute("SELECT id, fingerprint FROM issues")
    }
    # Counters start again from zero; statuses stay (a regroup is not a new event).
    connection.execute("DELETE FROM issue_hourly")
    connection.execute("DELETE FROM issue_breakdown")
    connection.execute(
        "UPDATE issues SET event_count = 0, first_seen = ?, last_seen = ?, first_release = NULL,"
        " last_release = NULL",
        (_I64_MAX, -_I64_MAX),
    )
    moved = 0
    for table in ("reports", "crashes"):
        state = _Regroup(known)
        _scan(connection, table, state, report_key, crash_key)
        ids = issue_counts.add(connection, state.tallies, now_ms, triage=False)
        known.update(ids)
        # The rules may title an issue differently now (ingest never retitles one).
        connection.executemany(
            "UPDATE issues SET title = ? WHERE id = ?",
            [(tally.key.title, ids[fp]) for fp, tally in state.tallies.items() if tally.key],
        )
        connection.executemany(
            f"UPDATE {table} SET fingerprint = ?, issue_id = ? WHERE id = ?",
            [
                (fp, issue_id if issue_id is not None or fp is None else ids[fp], row_id)
                for fp, issue_id, row_id in state.moves
            ],
        )
        moved += state.changed
    for (issue_id,) in connection.execute("SELECT id FROM issues WHERE event_count = 0").fetchall():
        issue_counts.delete_issue(connection, int(issue_id))
    return moved


def _scan(
    connection: sqlite3.Connection,
    table: str,
    state: _Regroup,
    report_key: Callable[[Mapping[str, Any]], IssueKey],
    crash_key: Callable[[Mapping[str, Any]], IssueKey | None],
) -> None:
    if table == "reports":
        columns = ", ".join(REPORT_COLUMNS)
        sql = f"SELECT {columns}, issue_id, release FROM reports ORDER BY id"
    else:
        columns = ", ".join(CRASH_COLUMNS)
        # Only parsed crashes have a signature to group by; the others keep no issue.
        sql = f"SELECT {columns}, issue_id, release FROM crashes ORDER BY id"
    cursor = connection.execute(sql)
    width = len(REPORT_COLUMNS) if table == "reports" else len(CRASH_COLUMNS)
    while batch := cursor.fetchmany(_BATCH):
        for raw_row in batch:
            row = texts(raw_row)
            old_issue, release = row[width], row[width + 1]
            if table == "reports":
                key: IssueKey | None = report_key(report_row_to_dict(row[:width], with_raw=True))
                # received_at, type, url, browser, browser_major, os, raw, release
                event = (row[1], row[4], row[5], row[9], row[10], row[11], row[13], release)
                state.count(key, old_issue, row[0], event, tally_report_event)
            else:
                crash = crash_row_to_dict(row[:width])
                key = crash_key(crash) if crash.get("parse_status") == "parsed" else None
                state.count(key, old_issue, row[0], (row[1], crash.get("os"), release),
                            tally_crash_event)  # fmt: skip
