"""Read-side queries shared by the JSON API and the CLI: parameterised SQL, keyset pages."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

EXPORT_COLUMNS = (
    "id, received_at, generated_at, age, type, url, origin, site, user_agent,"
    " browser, browser_major, os, reason, raw"
)


def iso_time(ms: int) -> str:
    """Milliseconds since the epoch as an ISO 8601 UTC timestamp."""
    return (
        datetime.fromtimestamp(ms / 1000, UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


def open_readonly(path: Path) -> sqlite3.Connection:
    """A connection that cannot write, for the CLI; fails clearly when the file is missing."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no database at {path}")
    return sqlite3.connect(f"file:{Path(path).resolve()}?mode=ro", uri=True)


def report_row_to_dict(row: tuple[Any, ...]) -> dict[str, Any]:
    (rid, received_at, generated_at, age, kind, url, origin, site, user_agent,
     browser, browser_major, os, reason, raw) = row  # fmt: skip
    stored = orjson.loads(raw)
    return {
        "id": rid,
        "received_at": iso_time(received_at),
        "generated_at": iso_time(generated_at),
        "type": kind,
        "url": url,
        "user_agent": user_agent,
        "age": age,
        "body": stored.get("body", {}),
        "origin": origin,
        "site": site,
        "browser": browser,
        "browser_major": browser_major,
        "os": os,
        "reason": reason,
    }


def iter_reports(connection: sqlite3.Connection, page_size: int = 1000) -> Iterator[dict[str, Any]]:
    """Every stored report, oldest first, in keyset pages so memory stays flat."""
    last_id = 0
    while True:
        rows = connection.execute(
            f"SELECT {EXPORT_COLUMNS} FROM reports WHERE id > ? ORDER BY id LIMIT ?",
            (last_id, page_size),
        ).fetchall()
        if not rows:
            return
        for row in rows:
            yield report_row_to_dict(row)
        last_id = rows[-1][0]
