"""SQL for crash rows: insert after the upload, record the parsed facts later."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Any

import orjson


@dataclass(frozen=True, slots=True)
class NewCrash:
    """A stored upload, ready to be committed; the dump file already exists."""

    id: str
    received_at: int
    product: str | None
    version: str | None
    guid: str | None
    platform: str | None
    process_type: str | None
    electron_version: str | None
    annotations: dict[str, str]
    query: dict[str, str]
    dump_sha256: str
    dump_size: int
    dump_path: str
    attachments: tuple[dict[str, Any], ...]
    upload_bytes: int


def insert_crash(connection: sqlite3.Connection, crash: NewCrash) -> None:
    connection.execute(
        "INSERT INTO crashes (id, received_at, product, version, guid, platform, process_type,"
        " electron_version, annotations, query, dump_sha256, dump_size, dump_path, attachments,"
        " upload_bytes) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
        (
            crash.id, crash.received_at, crash.product, crash.version, crash.guid,
            crash.platform, crash.process_type, crash.electron_version,
            orjson.dumps(crash.annotations).decode(), orjson.dumps(crash.query).decode(),
            crash.dump_sha256, crash.dump_size, crash.dump_path,
            orjson.dumps(list(crash.attachments)).decode(), crash.upload_bytes,
        ),
    )  # fmt: skip


FACT_COLUMNS = (
    "os", "os_version", "cpu", "exception_code", "exception_name", "crash_address",
    "crashing_thread", "main_module", "main_module_version", "crash_module", "crash_offset",
    "signature",
)  # fmt: skip


def record_facts(connection: sqlite3.Connection, crash_id: str, facts: dict[str, Any]) -> None:
    assignments = ", ".join(f"{name} = ?" for name in FACT_COLUMNS)
    connection.execute(
        f"UPDATE crashes SET parse_status = 'parsed', parse_error = NULL, {assignments}"
        " WHERE id = ?",
        (*(facts.get(name) for name in FACT_COLUMNS), crash_id),
    )


def record_failure(connection: sqlite3.Connection, crash_id: str, error: str) -> None:
    connection.execute(
        "UPDATE crashes SET parse_status = 'failed', parse_error = ?, signature = ? WHERE id = ?",
        (error[:500], "unparseable dump", crash_id),
    )


# SQLite integers are signed 64-bit; addresses are unsigned 64-bit (kernel and vsyscall
# addresses sit at or above 2**63), so they are stored in two's complement and read back.
_U64 = 1 << 64


def u64_to_db(value: int | None) -> int | None:
    """An unsigned 64-bit value as the signed integer SQLite can hold (None stays None)."""
    if value is None:
        return None
    value &= _U64 - 1
    return value - _U64 if value >= 1 << 63 else value


def u64_from_db(value: int | None) -> int | None:
    """The unsigned value ``u64_to_db`` stored."""
    if value is None:
        return None
    return value + _U64 if value < 0 else value
