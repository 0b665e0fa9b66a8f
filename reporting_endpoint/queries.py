"""Read-side queries shared by the JSON API and the CLI: parameterised SQL, keyset pages."""

from __future__ import annotations

import base64
import math
import re
import sqlite3
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from reporting_endpoint.storage.crashes import u64_from_db
from reporting_endpoint.storage.rollups import HOUR_MS, KEYS, hourly_table_for, table_for

DIMENSIONS = KEYS  # what groups can be keyed by and filtered on
MAX_LIMIT = 1000
DEFAULT_LIMIT = 100

EXPORT_COLUMNS = (
    "id, received_at, generated_at, age, type, url, origin, site, user_agent,"
    " browser, browser_major, os, reason, raw"
)

_RELATIVE = re.compile(r"^([0-9]{1,6})([smhdw])$")
# Whole numbers as this service writes them: ASCII digits only (str.isdigit() also takes "²",
# which int() refuses), short enough to fit SQLite's signed 64-bit integer.
_INTEGER = re.compile(r"-?[0-9]{1,19}", re.ASCII)
_CRASH_ID = re.compile(r"[0-9a-f]{32}", re.ASCII)
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
# The span datetime can show (years 1 to 9999), in ms since the epoch.
MIN_TIME_MS = int(datetime(1, 1, 1, tzinfo=UTC).timestamp() * 1000)
MAX_TIME_MS = int(datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=UTC).timestamp() * 1000)
# A time series answers every bucket of its window (zeros included), so the window is bounded.
MAX_BUCKETS = 10_000
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
    """Milliseconds since the epoch as an ISO 8601 UTC timestamp.

    Never raises: a stored value past what datetime can show (a report claiming an age of
    2**53 ms) is clamped to year 1 or 9999, so one odd row cannot fail a whole page.
    """
    clamped = min(max(int(ms), MIN_TIME_MS), MAX_TIME_MS)
    seconds, millis = divmod(clamped, 1000)
    moment = datetime.fromtimestamp(seconds, UTC).replace(microsecond=millis * 1000)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def stored_time(value: object) -> str | None:
    """``iso_time`` of a value read back from the database, whatever its SQLite type."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return iso_time(int(value))


def parse_int(value: str, minimum: int = INT64_MIN, maximum: int = INT64_MAX) -> int | None:
    """A whole number in ASCII digits within [minimum, maximum], or None."""
    if not _INTEGER.fullmatch(value):
        return None
    number = int(value)
    return number if minimum <= number <= maximum else None


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
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return int(moment.timestamp() * 1000)
    except (ValueError, OverflowError):
        raise QueryError(
            "invalid_time", f"{name} must be like 7d, 24h, 30m or an ISO 8601 time, not {value!r}"
        ) from None


def parse_limit(value: str | None, default: int = DEFAULT_LIMIT, maximum: int = MAX_LIMIT) -> int:
    if value is None or value == "":
        return default
    if parse_int(value, 1, maximum) is None:
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
        group.update(count=count, first_seen=stored_time(first), last_seen=stored_time(last))
        groups.append(group)
    return groups


def bucket_hours(bucket: str) -> int:
    if bucket not in {"hour", "day"}:
        raise QueryError("invalid_bucket", "bucket is hour or day")
    return 1 if bucket == "hour" else 24


def timeseries_query(bucket: str, by: Sequence[str], filters: Filters) -> Query:
    hours = bucket_hours(bucket)
    where, parameters = _group_where(filters, hourly=True)
    key = f"hour / {hours} * {hours}"
    columns = "".join(f", {name}" for name in by)
    table = hourly_table_for(set(by) | {name for name, _ in filters.equal})
    sql = (
        f"SELECT {key} AS b{columns}, sum(count) FROM {table}{where}"
        f" GROUP BY b{columns} ORDER BY b{columns}"
    )
    return Query(sql, tuple(parameters))


_TOO_WIDE = "a time series holds at most {} buckets: narrow since/until or use bucket=day"
MAX_POINTS = 100_000


@dataclass(frozen=True, slots=True)
class Window:
    """The buckets a time series answers, in hours since the epoch: first to last by step."""

    first: int | None  # None: from the oldest bucket holding data
    last: int
    step: int

    @classmethod
    def of(cls, bucket: str, filters: Filters, now: int | None = None) -> Window:
        """The window the filters ask for (an open end is now), refused up front when it would
        hold too many buckets."""
        step = bucket_hours(bucket)
        end = filters.until - 1 if filters.until is not None else now_ms() if now is None else now
        first = None if filters.since is None else _floor(filters.since // HOUR_MS, step)
        window = cls(first, _floor(end // HOUR_MS, step), step)
        window.check()
        return window

    def check(self) -> None:
        if self.first is not None and (self.last - self.first) // self.step + 1 > MAX_BUCKETS:
            raise QueryError("window_too_large", _TOO_WIDE.format(MAX_BUCKETS))

    def widen(self, rows: Sequence[Sequence[Any]]) -> Window:
        """Stretched to the data: an open start begins at the oldest bucket, and a clock that
        went back does not hide rows stamped after now."""
        if not rows:
            return self
        hours = [int(row[0]) for row in rows]
        first = min(hours) if self.first is None else self.first
        window = Window(first, max(self.last, *hours), self.step)
        window.check()
        return window


def _floor(hour: int, step: int) -> int:
    return hour // step * step


def series_rows(
    by: Sequence[str], rows: Sequence[Sequence[Any]], window: Window | None = None
) -> list[dict[str, Any]]:
    """Points in time order; with a window, every bucket of it for every key seen (zeros
    included), so a chart needs no gap filling and a quiet hour is visibly quiet."""

    def key_of(row: Sequence[Any]) -> tuple[Any, ...]:
        return tuple(value if value != "" else None for value in row[1 : 1 + len(by)])

    counts = {(int(row[0]), key_of(row)): row[-1] for row in rows}
    if window is None or window.first is None:
        points = sorted(counts.items(), key=lambda item: item[0][0])
    else:
        keys = sorted({key for _, key in counts}, key=lambda k: tuple(str(v or "") for v in k))
        if not by:
            keys = [()]
        buckets = range(window.first, window.last + 1, window.step)
        if len(buckets) * max(len(keys), 1) > MAX_POINTS:
            raise QueryError(
                "window_too_large", f"more than {MAX_POINTS} points: narrow the window or by"
            )
        points = [((b, key), counts.get((b, key), 0)) for b in buckets for key in keys]
    series = []
    for (hour, key), count in points:
        point: dict[str, Any] = {"time": iso_time(hour * HOUR_MS)}
        point.update(zip(by, key, strict=True))
        point["count"] = count
        series.append(point)
    return series


def encode_cursor(received_at: int, row_id: int | str) -> str:
    """An opaque keyset position: the last row's received time and id."""
    return base64.urlsafe_b64encode(f"{received_at}.{row_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[int, str]:
    """The position ``encode_cursor`` made. The time must fit SQLite's integer (a bigger one
    raised OverflowError in the driver: a 500); the id is checked by the caller."""
    bad = QueryError("invalid_cursor", "cursor is not one this service gave out")
    if len(cursor) > 200:
        raise bad
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        received_at, row_id = base64.urlsafe_b64decode(padded).decode("ascii").split(".")
    except (ValueError, UnicodeDecodeError):
        raise bad from None
    moment = parse_int(received_at)
    if moment is None:
        raise bad
    return moment, row_id


def decode_row_cursor(cursor: str) -> tuple[int, int]:
    """A cursor over a table with integer ids (reports, quarantine)."""
    received_at, raw_id = decode_cursor(cursor)
    row_id = parse_int(raw_id, 0)
    if row_id is None:
        raise QueryError("invalid_cursor", "cursor is not one this service gave out")
    return received_at, row_id


def reports_query(filters: Filters, limit: int, cursor: str | None = None) -> Query:
    """Newest first; keyset-paginated on (received_at, id), so concurrent inserts (always newer
    than a cursor already given out) never shift a page: no gaps, no repeats. Fetches one extra
    row to tell whether there is a next page."""
    clauses, parameters = filters.row_clauses()
    if cursor:
        received_at, row_id = decode_row_cursor(cursor)
        clauses.append("(received_at < ? OR (received_at = ? AND id < ?))")
        parameters.extend([received_at, received_at, row_id])
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
     browser, browser_major, os, reason, raw) = _texts(row)  # fmt: skip
    stored = _stored_json(raw)
    body = stored.get("body", {}) if isinstance(stored, dict) else {}
    report = {
        "id": rid,
        "received_at": stored_time(received_at),
        "generated_at": stored_time(generated_at),
        "type": kind,
        "url": url,
        "user_agent": user_agent,
        "age": age,
        "body": body,
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


def _stored_json(text: object) -> Any:
    """JSON this service stored, parsed; text that does not parse (written by something else)
    is answered as it is rather than failing the page it sits on."""
    if not isinstance(text, str | bytes):
        return text
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return text if isinstance(text, str) else text.decode("utf-8", "replace")


def open_readonly(path: Path) -> sqlite3.Connection:
    """A connection that cannot write, for the CLI; fails clearly when the file is missing."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no database at {path}")
    connection = sqlite3.connect(f"file:{Path(path).resolve()}?mode=ro", uri=True)
    # Text that is not UTF-8 (written by another tool) is shown with U+FFFD; the default
    # raises, and one such row would stop an export.
    connection.text_factory = _lenient_text
    return connection


def _lenient_text(data: bytes) -> str:
    return data.decode("utf-8", "replace")


def _texts(row: Sequence[Any]) -> tuple[Any, ...]:
    """Blobs where text belongs (written by another tool) as text: JSON cannot hold bytes."""
    return tuple(_lenient_text(v) if isinstance(v, bytes) else v for v in row)


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


def crash_timeseries_query(bucket: str, by: Sequence[str], filters: Filters) -> Query:
    """Crash counts per hour or day, straight from the crashes table (indexed on time)."""
    hours = bucket_hours(bucket)
    clauses, parameters = filters.row_clauses()
    where = " WHERE " + " AND ".join(clauses) if clauses else ""
    columns = "".join(f", {name}" for name in by)
    sql = (
        f"SELECT received_at / {HOUR_MS} / {hours} * {hours} AS b{columns}, count(*)"
        f" FROM crashes{where} GROUP BY b{columns} ORDER BY b{columns}"
    )
    return Query(sql, tuple(parameters))


def crashes_query(filters: Filters, limit: int, cursor: str | None = None) -> Query:
    clauses, parameters = filters.row_clauses()
    if cursor:
        received_at, crash_id = decode_cursor(cursor)
        if not _CRASH_ID.fullmatch(crash_id):
            raise QueryError("invalid_cursor", "cursor is not one this service gave out")
        clauses.append("(received_at < ? OR (received_at = ? AND id < ?))")
        parameters.extend([received_at, received_at, crash_id])
    where = " WHERE " + " AND ".join(clauses) if clauses else ""
    sql = f"SELECT {CRASH_COLUMNS} FROM crashes{where} ORDER BY received_at DESC, id DESC LIMIT ?"
    return Query(sql, (*parameters, limit + 1))


def crash_query(crash_id: str) -> Query:
    return Query(f"SELECT {CRASH_COLUMNS} FROM crashes WHERE id = ?", (crash_id,))


def crash_row_to_dict(row: Sequence[Any]) -> dict[str, Any]:
    crash = dict(zip(_CRASH_NAMES, _texts(row), strict=True))
    crash["received_at"] = stored_time(crash["received_at"])
    for name in ("annotations", "query", "attachments"):
        crash[name] = _stored_json(crash[name])
    for name in ("crash_address", "crash_offset", "exception_code"):
        # Stored in two's complement (SQLite integers are signed): addresses at or above 2**63
        # come back negative and are unsigned again here.
        if isinstance(crash[name], int):
            crash[name] = u64_from_db(crash[name])
            crash[name + "_hex"] = f"0x{crash[name]:x}"
    if not isinstance(crash["attachments"], list):
        crash["attachments"] = []
    for attachment in crash["attachments"]:
        if isinstance(attachment, dict):
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


# Reports refused at ingest, kept in the bounded quarantine table.
def quarantine_counts(connection: sqlite3.Connection) -> list[tuple[str, int]]:
    """How many quarantined reports per rejection code, largest first (for ``stats``)."""
    rows = connection.execute(
        "SELECT code, count(*) AS n FROM quarantine GROUP BY code ORDER BY n DESC, code"
    ).fetchall()
    return [(str(code), int(n)) for code, n in rows]


QUARANTINE_COLUMNS = "id, received_at, code, field, message, type, raw, truncated"
QUARANTINE_FILTERS = ("code", "type")


def quarantine_query(filters: Filters, limit: int, cursor: str | None = None) -> Query:
    """Newest first, keyset pages on (received_at, id) like the reports."""
    clauses, parameters = filters.row_clauses()
    if cursor:
        received_at, row_id = decode_row_cursor(cursor)
        clauses.append("(received_at < ? OR (received_at = ? AND id < ?))")
        parameters.extend([received_at, received_at, row_id])
    where = " WHERE " + " AND ".join(clauses) if clauses else ""
    sql = (
        f"SELECT {QUARANTINE_COLUMNS} FROM quarantine{where}"
        " ORDER BY received_at DESC, id DESC LIMIT ?"
    )
    return Query(sql, (*parameters, limit + 1))


def quarantined_query(row_id: int) -> Query:
    return Query(f"SELECT {QUARANTINE_COLUMNS} FROM quarantine WHERE id = ?", (row_id,))


def quarantine_row_to_dict(row: Sequence[Any]) -> dict[str, Any]:
    rid, received_at, code, field_name, message, kind, raw, truncated = row
    return {
        "id": rid,
        "received_at": stored_time(received_at),
        "code": code,
        "field": field_name,
        "message": message,
        "type": kind,
        # A report cut short is no longer JSON: it is shown as the text that was kept.
        "raw": raw if truncated else _stored_json(raw),
        "truncated": bool(truncated),
    }


def quarantine_page(rows: Sequence[Sequence[Any]], limit: int) -> dict[str, Any]:
    page = [quarantine_row_to_dict(row) for row in rows[:limit]]
    next_cursor = None
    if len(rows) > limit:
        last = rows[limit - 1]
        next_cursor = encode_cursor(last[1], last[0])
    return {"quarantine": page, "next_cursor": next_cursor}
