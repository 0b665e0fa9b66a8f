"""Read-side queries shared by the JSON API and the CLI: parameterised SQL, keyset pages."""

from __future__ import annotations

import base64
import re
import sqlite3
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from reporting_endpoint.storage.rollups import HOUR_MS, KEYS, hourly_table_for, table_for

DIMENSIONS = KEYS  # what groups can be keyed by and filtered on
MAX_LIMIT = 1000
DEFAULT_LIMIT = 100

EXPORT_COLUMNS = (
    "id, received_at, generated_at, age, type, url, origin, site, user_agent,"
    " browser, browser_major, os, reason, raw"
)

_RELATIVE = re.compile(r"^(\d{1,6})([smhdw])$")
_UNIT_MS = {"s": 1000, "m": 60_000, "h": HOUR_MS, "d": 24 * HOUR_MS, "w": 7 * 24 * HOUR_MS}


class QueryError(ValueError):
    """A bad query parameter; ``code`` is the stable reason sent back."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def iso_time(ms: int) -> str:
    """Milliseconds since the epoch as an ISO 8601 UTC timestamp."""
    moment = datetime.fromtimestamp(ms / 1000, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_time(value: str, name: str, now: int | None = None) -> int:
    """``7d`` / ``24h`` / ``30m`` / ``90s`` / ``2w`` ago, or an ISO 8601 time (UTC if naive)."""
    text = value.strip()
    relative = _RELATIVE.match(text)
    if relative:
        return (now if now is not None else now_ms()) - int(relative.group(1)) * _UNIT_MS[
            relative.group(2)
        ]
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise QueryError(
            "invalid_time", f"{name} must be like 7d, 24h, 30m or an ISO 8601 time, not {value!r}"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def parse_limit(value: str | None, default: int = DEFAULT_LIMIT, maximum: int = MAX_LIMIT) -> int:
    if value is None or value == "":
        return default
    if not value.isdigit() or not 1 <= int(value) <= maximum:
        raise QueryError("invalid_limit", f"limit must be a whole number from 1 to {maximum}")
    return int(value)


def parse_by(
    value: str | None,
    default: Sequence[str] = ("type",),
    dimensions: Sequence[str] = DIMENSIONS,
) -> tuple[str, ...]:
    if value is None or not value.strip():
        return tuple(default)
    names = tuple(part.strip() for part in value.split(",") if part.strip())
    unknown = [name for name in names if name not in dimensions]
    if unknown or not names or len(set(names)) != len(names):
        raise QueryError(
            "invalid_by",
            f"by takes distinct names among {', '.join(dimensions)}; got {value!r}",
        )
    return names


@dataclass(frozen=True, slots=True)
class Filters:
    """Exact-match filters on group keys, and a received-time window [since, until)."""

    equal: tuple[tuple[str, str], ...] = ()
    since: int | None = None
    until: int | None = None

    @classmethod
    def parse(
        cls,
        params: Mapping[str, str],
        now: int | None = None,
        dimensions: Sequence[str] = DIMENSIONS,
    ) -> Filters:
        equal = tuple((name, params[name]) for name in dimensions if name in params)
        since = parse_time(params["since"], "since", now) if params.get("since") else None
        until = parse_time(params["until"], "until", now) if params.get("until") else None
        if since is not None and until is not None and since >= until:
            raise QueryError("invalid_time", "since must be before until")
        return cls(equal, since, until)

    def row_clauses(self) -> tuple[list[str], list[object]]:
        """WHERE clauses and parameters for a table of rows (exact received times)."""
        clauses = [f"{name} = ?" for name, _ in self.equal]
        parameters: list[object] = [value for _, value in self.equal]
        if self.since is not None:
            clauses.append("received_at >= ?")
            parameters.append(self.since)
        if self.until is not None:
            clauses.append("received_at < ?")
            parameters.append(self.until)
        return clauses, parameters


@dataclass(frozen=True, slots=True)
class Query:
    sql: str
    parameters: tuple[object, ...] = field(default=())


def _group_where(filters: Filters, hourly: bool) -> tuple[str, list[object]]:
    clauses: list[str] = []
    parameters: list[object] = []
    for name, value in filters.equal:
        clauses.append(f"{name} = ?")
        parameters.append(value)
    if hourly and filters.since is not None:
        clauses.append("hour >= ?")
        parameters.append(filters.since // HOUR_MS)
    if hourly and filters.until is not None:
        clauses.append("hour <= ?")
        parameters.append((filters.until - 1) // HOUR_MS)
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), parameters


def groups_query(by: Sequence[str], filters: Filters, limit: int) -> Query:
    """Counts per group, largest first, from the roll-up tables (cost: O(groups)).

    With ``since``/``until`` the hourly roll-up is used, so the window is widened to whole hours.
    """
    hourly = filters.since is not None or filters.until is not None
    columns_used = set(by) | {name for name, _ in filters.equal}
    table = hourly_table_for(columns_used) if hourly else table_for(columns_used)
    where, parameters = _group_where(filters, hourly)
    columns = ", ".join(by)
    sql = (
        f"SELECT {columns}, sum(count) AS n, min(first_seen), max(last_seen) FROM {table}{where}"
        f" GROUP BY {columns} ORDER BY n DESC, {columns} LIMIT ?"
    )
    return Query(sql, (*parameters, limit))


def group_rows(by: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[dict[str, Any]]:
    groups = []
    for row in rows:
        group: dict[str, Any] = {
            name: (row[i] if row[i] != "" else None) for i, name in enumerate(by)
        }
        count, first, last = row[len(by) :]
        group.update(count=count, first_seen=iso_time(first), last_seen=iso_time(last))
        groups.append(group)
    return groups


def timeseries_query(bucket: str, by: Sequence[str], filters: Filters) -> Query:
    if bucket not in {"hour", "day"}:
        raise QueryError("invalid_bucket", "bucket is hour or day")
    hours = 1 if bucket == "hour" else 24
    where, parameters = _group_where(filters, hourly=True)
    key = f"hour / {hours} * {hours}"
    columns = "".join(f", {name}" for name in by)
    table = hourly_table_for(set(by) | {name for name, _ in filters.equal})
    sql = (
        f"SELECT {key} AS b{columns}, sum(count) FROM {table}{where}"
        f" GROUP BY b{columns} ORDER BY b{columns}"
    )
    return Query(sql, tuple(parameters))


def series_rows(by: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[dict[str, Any]]:
    series = []
    for row in rows:
        point: dict[str, Any] = {"time": iso_time(row[0] * HOUR_MS)}
        point.update(
            {name: (row[i + 1] if row[i + 1] != "" else None) for i, name in enumerate(by)}
        )
        point["count"] = row[-1]
        series.append(point)
    return series


def encode_cursor(received_at: int, row_id: int | str) -> str:
    """An opaque keyset position: the last row's received time and id."""
    return base64.urlsafe_b64encode(f"{received_at}.{row_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[int, str]:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        received_at, row_id = base64.urlsafe_b64decode(padded).decode().split(".")
        return int(received_at), row_id
    except (ValueError, UnicodeDecodeError):
        raise QueryError("invalid_cursor", "cursor is not one this service gave out") from None


def reports_query(filters: Filters, limit: int, cursor: str | None = None) -> Query:
    """Newest first; keyset-paginated on (received_at, id), so concurrent inserts (always newer
    than a cursor already given out) never shift a page: no gaps, no repeats. Fetches one extra
    row to tell whether there is a next page."""
    clauses, parameters = filters.row_clauses()
    if cursor:
        received_at, row_id = decode_cursor(cursor)
        if not row_id.isdigit():
            raise QueryError("invalid_cursor", "cursor is not one this service gave out")
        clauses.append("(received_at < ? OR (received_at = ? AND id < ?))")
        parameters.extend([received_at, received_at, int(row_id)])
    where = " WHERE " + " AND ".join(clauses) if clauses else ""
    sql = f"SELECT {EXPORT_COLUMNS} FROM reports{where} ORDER BY received_at DESC, id DESC LIMIT ?"
    return Query(sql, (*parameters, limit + 1))


def report_page(rows: Sequence[Sequence[Any]], limit: int) -> dict[str, Any]:
    page = [report_row_to_dict(row) for row in rows[:limit]]
    next_cursor = None
    if len(rows) > limit:
        last = rows[limit - 1]
        next_cursor = encode_cursor(last[1], last[0])
    return {"reports": page, "next_cursor": next_cursor}


def report_query(report_id: int) -> Query:
    return Query(f"SELECT {EXPORT_COLUMNS} FROM reports WHERE id = ?", (report_id,))


def report_row_to_dict(row: Sequence[Any], with_raw: bool = False) -> dict[str, Any]:
    (rid, received_at, generated_at, age, kind, url, origin, site, user_agent,
     browser, browser_major, os, reason, raw) = row  # fmt: skip
    stored = orjson.loads(raw)
    report = {
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
    if with_raw:
        report["raw"] = stored
    return report


def open_readonly(path: Path) -> sqlite3.Connection:
    """A connection that cannot write, for the CLI; fails clearly when the file is missing."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no database at {path}")
    return sqlite3.connect(f"file:{Path(path).resolve()}?mode=ro", uri=True)


def run(connection: sqlite3.Connection, query: Query) -> list[tuple[Any, ...]]:
    return connection.execute(query.sql, query.parameters).fetchall()


def iter_reports(
    connection: sqlite3.Connection, filters: Filters | None = None, page_size: int = 1000
) -> Iterator[dict[str, Any]]:
    """Every matching report, oldest first, in keyset pages so memory stays flat."""
    clauses, base = (filters or Filters()).row_clauses()
    clauses.append("id > ?")
    sql = f"SELECT {EXPORT_COLUMNS} FROM reports WHERE {' AND '.join(clauses)} ORDER BY id LIMIT ?"
    last_id = 0
    while True:
        rows = connection.execute(sql, (*base, last_id, page_size)).fetchall()
        if not rows:
            return
        for row in rows:
            yield report_row_to_dict(row)
        last_id = rows[-1][0]


# Crashpad uploads: few enough to group straight from their table (indexed on the usual key).
CRASH_DIMENSIONS = (
    "product", "version", "platform", "process_type", "signature", "os", "cpu",
    "exception_name", "electron_version", "main_module", "crash_module", "parse_status",
)  # fmt: skip
CRASH_DEFAULT_BY = ("product", "version", "platform", "process_type", "signature")
CRASH_COLUMNS = (
    "id, received_at, product, version, guid, platform, process_type, electron_version,"
    " annotations, query, dump_sha256, dump_size, dump_path, attachments, upload_bytes,"
    " parse_status, parse_error, os, os_version, cpu, exception_code, exception_name,"
    " crash_address, crashing_thread, main_module, main_module_version, crash_module,"
    " crash_offset, signature"
)
_CRASH_NAMES = tuple(name.strip() for name in CRASH_COLUMNS.split(","))
CRASH_DUMP_PATH = _CRASH_NAMES.index("dump_path")  # position in a crash_query row


def crash_groups_query(by: Sequence[str], filters: Filters, limit: int) -> Query:
    clauses, parameters = filters.row_clauses()
    where = " WHERE " + " AND ".join(clauses) if clauses else ""
    columns = ", ".join(by)
    sql = (
        f"SELECT {columns}, count(*) AS n, min(received_at), max(received_at) FROM crashes{where}"
        f" GROUP BY {columns} ORDER BY n DESC, {columns} LIMIT ?"
    )
    return Query(sql, (*parameters, limit))


def crashes_query(filters: Filters, limit: int, cursor: str | None = None) -> Query:
    clauses, parameters = filters.row_clauses()
    if cursor:
        received_at, crash_id = decode_cursor(cursor)
        clauses.append("(received_at < ? OR (received_at = ? AND id < ?))")
        parameters.extend([received_at, received_at, crash_id])
    where = " WHERE " + " AND ".join(clauses) if clauses else ""
    sql = f"SELECT {CRASH_COLUMNS} FROM crashes{where} ORDER BY received_at DESC, id DESC LIMIT ?"
    return Query(sql, (*parameters, limit + 1))


def crash_query(crash_id: str) -> Query:
    return Query(f"SELECT {CRASH_COLUMNS} FROM crashes WHERE id = ?", (crash_id,))


def crash_row_to_dict(row: Sequence[Any]) -> dict[str, Any]:
    crash = dict(zip(_CRASH_NAMES, row, strict=True))
    crash["received_at"] = iso_time(crash["received_at"])
    for name in ("annotations", "query", "attachments"):
        crash[name] = orjson.loads(crash[name])
    for name in ("crash_address", "crash_offset", "exception_code"):
        if crash[name] is not None:
            crash[name + "_hex"] = f"0x{crash[name]:x}"
    for attachment in crash["attachments"]:
        attachment.pop("path", None)
    crash.pop("dump_path")
    return crash


def crash_page(rows: Sequence[Sequence[Any]], limit: int) -> dict[str, Any]:
    page = [crash_row_to_dict(row) for row in rows[:limit]]
    next_cursor = None
    if len(rows) > limit:
        last = rows[limit - 1]
        next_cursor = encode_cursor(last[1], last[0])
    return {"crashes": page, "next_cursor": next_cursor}


def iter_crashes(
    connection: sqlite3.Connection, filters: Filters | None = None
) -> Iterator[dict[str, Any]]:
    clauses, parameters = (filters or Filters()).row_clauses()
    where = " WHERE " + " AND ".join(clauses) if clauses else ""
    cursor = connection.execute(
        f"SELECT {CRASH_COLUMNS} FROM crashes{where} ORDER BY received_at, id", parameters
    )
    for row in cursor:
        yield crash_row_to_dict(row)
