"""Stored rows to the JSON the API and the CLI send, the same for every backend.

A backend reads its rows as tuples in the column orders below and hands them to these
functions; nothing here knows a query language. Values written by something other than this
service (bad JSON, bytes where text belongs, numbers past what a date can show) are answered as
they are rather than failing the page they sit on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import orjson

REPORT_COLUMNS = (
    "id", "received_at", "generated_at", "age", "type", "url", "origin", "site", "user_agent",
    "browser", "browser_major", "os", "reason", "raw",
)  # fmt: skip
CRASH_COLUMNS = (
    "id", "received_at", "product", "version", "guid", "platform", "process_type",
    "electron_version", "annotations", "query", "dump_sha256", "dump_size", "dump_path",
    "attachments", "upload_bytes", "parse_status", "parse_error", "os", "os_version", "cpu",
    "exception_code", "exception_name", "crash_address", "crashing_thread", "main_module",
    "main_module_version", "crash_module", "crash_offset", "signature",
)  # fmt: skip
QUARANTINE_COLUMNS = ("id", "received_at", "code", "field", "message", "type", "raw", "truncated")
# Whole rows as ``export_batch`` answers them and ``import_batch`` takes them, per table: the
# same order on every backend, so rows move between engines as they are. Each event's release
# travels last (``regroup`` at the target takes it from the row); its issue columns do not
# (the target computes them with its own rules).
EXPORT_COLUMNS: dict[str, tuple[str, ...]] = {
    "reports": (*REPORT_COLUMNS, "release"),
    "crashes": (*CRASH_COLUMNS, "release"),
    "quarantine": QUARANTINE_COLUMNS,
}


def check_rows(kind: str, rows: Sequence[Sequence[object]]) -> None:
    """Refuse, before any write, rows ``import_batch`` cannot take: an unknown table, a row
    of the wrong width, or one without an id and a whole-number received time (the copy's
    keyset key)."""
    columns = EXPORT_COLUMNS.get(kind)
    if columns is None:
        raise ValueError(f"no such table: {kind!r}")
    for row in rows:
        if len(row) != len(columns):
            raise ValueError(f"a {kind} row has {len(row)} values, not {len(columns)}")
        if row[0] is None or isinstance(row[1], bool) or not isinstance(row[1], int):
            raise ValueError(f"a {kind} row without an id or a received time: {row[:2]!r}")


# Facts a parsed dump adds to its crash row.
FACT_COLUMNS = (
    "os", "os_version", "cpu", "exception_code", "exception_name", "crash_address",
    "crashing_thread", "main_module", "main_module_version", "crash_module", "crash_offset",
    "signature",
)  # fmt: skip
# Unsigned 64-bit values: addresses, offsets, and exception codes (which a dump stores as u32
# on Windows but as a u64 elsewhere).
U64_FACTS = frozenset({"exception_code", "crash_address", "crash_offset"})

# The span datetime can show (years 1 to 9999), in ms since the epoch.
MIN_TIME_MS = int(datetime(1, 1, 1, tzinfo=UTC).timestamp() * 1000)
MAX_TIME_MS = int(datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=UTC).timestamp() * 1000)

# Database integers are signed 64-bit; addresses are unsigned 64-bit (kernel and vsyscall
# addresses sit at or above 2**63), so they are stored in two's complement and read back.
_U64 = 1 << 64


def u64_to_db(value: int | None) -> int | None:
    """An unsigned 64-bit value as the signed integer a database column can hold."""
    if value is None:
        return None
    value &= _U64 - 1
    return value - _U64 if value >= 1 << 63 else value


def u64_from_db(value: int | None) -> int | None:
    """The unsigned value ``u64_to_db`` stored."""
    if value is None:
        return None
    return value + _U64 if value < 0 else value


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
    """``iso_time`` of a value read back from the database, whatever its stored type."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return iso_time(int(value))


def lenient_text(data: bytes) -> str:
    """Text that is not UTF-8 (written by another tool), shown with U+FFFD."""
    return data.decode("utf-8", "replace")


def texts(row: Sequence[Any]) -> tuple[Any, ...]:
    """Bytes where text belongs (written by another tool) as text: JSON cannot hold bytes."""
    return tuple(lenient_text(v) if isinstance(v, bytes) else v for v in row)


def stored_json(text: object) -> Any:
    """JSON this service stored, parsed; text that does not parse is answered as it is."""
    if not isinstance(text, str | bytes):
        return text
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return text if isinstance(text, str) else text.decode("utf-8", "replace")


def report_row_to_dict(row: Sequence[Any], with_raw: bool = False) -> dict[str, Any]:
    """A row in ``REPORT_COLUMNS`` order as the API shows a report."""
    (rid, received_at, generated_at, age, kind, url, origin, site, user_agent,
     browser, browser_major, os, reason, raw) = texts(row)  # fmt: skip
    stored = stored_json(raw)
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


def crash_row_to_dict(row: Sequence[Any]) -> dict[str, Any]:
    """A row in ``CRASH_COLUMNS`` order as the API shows a crash (no file paths)."""
    crash = dict(zip(CRASH_COLUMNS, texts(row), strict=True))
    crash["received_at"] = stored_time(crash["received_at"])
    for name in ("annotations", "query", "attachments"):
        crash[name] = stored_json(crash[name])
    for name in ("crash_address", "crash_offset", "exception_code"):
        # Stored in two's complement (database integers are signed): addresses at or above
        # 2**63 come back negative and are unsigned again here.
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


def quarantine_row_to_dict(row: Sequence[Any]) -> dict[str, Any]:
    """A row in ``QUARANTINE_COLUMNS`` order as the API shows a quarantined report."""
    rid, received_at, code, field_name, message, kind, raw, truncated = texts(row)
    return {
        "id": rid,
        "received_at": stored_time(received_at),
        "code": code,
        "field": field_name,
        "message": message,
        "type": kind,
        # A report cut short is no longer JSON: it is shown as the text that was kept.
        "raw": raw if truncated else stored_json(raw),
        "truncated": bool(truncated),
    }


def group_rows(by: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[dict[str, Any]]:
    """Rows of (*key, count, first seen, last seen) as the API shows groups; an empty key
    value (how the roll-ups store a missing one) is None."""
    groups = []
    for row in rows:
        group: dict[str, Any] = {
            name: (row[i] if row[i] != "" else None) for i, name in enumerate(by)
        }
        count, first, last = row[len(by) :]
        group.update(count=count, first_seen=stored_time(first), last_seen=stored_time(last))
        groups.append(group)
    return groups
