"""SQL for symbol files and the modules crashes miss symbols for, in SQLite (issue 15).

Writes are writer jobs on the plain sqlite3 connection (the caller owns the transaction);
reads run on the read-only aiosqlite connection. Keys travel as one JSON list bound once
(``json_each``), so hundreds of them cost one statement and no variable limit.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence

import aiosqlite
import orjson

from reporting_endpoint.native.records import MissingSymbols, SymbolFile
from reporting_endpoint.storage.native_rows import (
    SYMBOL_COLUMNS,
    Key,
    MissingRow,
    clean_key,
    missing_from_row,
    requested,
    symbol_from_row,
    symbol_values,
)

_COLUMNS = ", ".join(SYMBOL_COLUMNS)
_SYMBOLS = ", ".join(f"s.{name}" for name in SYMBOL_COLUMNS)
_UPSERT = (
    f"INSERT INTO symbol_files ({_COLUMNS}) VALUES ({', '.join('?' * len(SYMBOL_COLUMNS))})"
    " ON CONFLICT (debug_file, debug_id) DO UPDATE SET "
    + ", ".join(f"{name} = excluded.{name}" for name in SYMBOL_COLUMNS[2:])
)
# Joins a crash_modules row (m) to a stored symbol file for its module that its processor did
# not see (stored since it looked).
_NEWER = (
    "JOIN symbol_files AS s ON s.debug_file = m.debug_file AND s.debug_id = m.debug_id"
    " AND s.sym_sha256 IS NOT m.seen_sha256"
)
# The keys of a JSON list of [debug_file, debug_id] pairs bound as ?1.
_KEYS = (
    "SELECT json_extract(value, '$[0]') AS debug_file, json_extract(value, '$[1]') AS debug_id"
    " FROM json_each(?1)"
)


def _key_list(keys: Sequence[Key]) -> str:
    return orjson.dumps([list(key) for key in keys]).decode()


# --- writes ---------------------------------------------------------------------------------


def put_files(connection: sqlite3.Connection, files: Sequence[SymbolFile]) -> int:
    """Store ``files`` (a key stored already is replaced; of one key twice, the last wins) and
    send every crash that missed one of their keys back to processing, with those rows of
    ``crash_modules`` gone; answers how many crashes went back.

    A crash leased to a processor goes back too: its lease is cleared, so that processor's
    result (made without these symbols) is refused by the owner check of ``record_facts``."""
    # Stamped here, in the writer, just before the commit (not when the upload began): crashes
    # compare it with when their processor looked for symbols (``replace_missing``).
    now_ms = int(time.time() * 1000)
    rows = {clean_key((f.debug_file, f.debug_id)): (*symbol_values(f)[:-1], now_ms) for f in files}
    if not rows:
        return 0
    connection.executemany(_UPSERT, list(rows.values()))
    keys = _key_list(list(rows))
    requeued = connection.execute(
        "UPDATE crashes SET parse_status = 'pending', attempts = 0, claimed_by = NULL,"
        " lease_until = NULL WHERE id IN (SELECT m.crash_id FROM crash_modules AS m"
        f" JOIN ({_KEYS}) AS k ON m.debug_file = k.debug_file AND m.debug_id = k.debug_id)",
        (keys,),
    ).rowcount
    connection.execute(
        f"DELETE FROM crash_modules WHERE (debug_file, debug_id) IN ({_KEYS})", (keys,)
    )
    return int(requeued)


def replace_missing(
    connection: sqlite3.Connection, crash_id: str, missing: Sequence[MissingRow]
) -> None:
    """The crash's ``crash_modules`` rows become ``missing`` (no duplicate keys), each with
    the symbol file the store had when the processor looked (``seen_sha256``).

    A symbol file other than the one it saw (stored after the look: no row was there to
    re-queue) sends the crash back now. The one it saw is not a reason: the processor had it
    and could not use it (a blob gone, a file its loader refused); re-queueing would go round
    for ever, and the module stays on the missing list until it is uploaded again.
    """
    connection.execute("DELETE FROM crash_modules WHERE crash_id = ?", (crash_id,))
    if not missing:
        return
    connection.executemany(
        "INSERT INTO crash_modules (crash_id, debug_file, debug_id, code_file, seen_sha256)"
        " VALUES (?,?,?,?,?)",
        [(crash_id, *row) for row in missing],
    )
    requeue_late(connection, crash_id)


def requeue_late(connection: sqlite3.Connection, crash_id: str | None = None) -> int:
    """Crashes (one, or at most 1,000 when ``crash_id`` is None) that miss a module whose
    stored symbol file is not the one their processor saw: back to processing with fresh
    attempts, those rows gone."""
    found = connection.execute(
        f"SELECT DISTINCT m.crash_id FROM crash_modules AS m {_NEWER}"
        " WHERE (?1 IS NULL OR m.crash_id = ?1) LIMIT 1000",
        (crash_id,),
    ).fetchall()
    if not found:
        return 0
    ids = orjson.dumps([row[0] for row in found]).decode()
    connection.execute(
        "UPDATE crashes SET parse_status = 'pending', attempts = 0, claimed_by = NULL,"
        " lease_until = NULL WHERE id IN (SELECT value FROM json_each(?))",
        (ids,),
    )
    connection.execute(
        "DELETE FROM crash_modules AS m WHERE m.crash_id IN (SELECT value FROM json_each(?))"
        " AND EXISTS (SELECT 1 FROM symbol_files AS s WHERE s.debug_file = m.debug_file"
        " AND s.debug_id = m.debug_id AND s.sym_sha256 IS NOT m.seen_sha256)",
        (ids,),
    )
    return len(found)


# --- reads ----------------------------------------------------------------------------------


async def present(connection: aiosqlite.Connection, keys: Sequence[Key]) -> set[Key]:
    """Those of ``keys`` (stored, cleaned keys) that have a symbol file."""
    if not keys:
        return set()
    rows = await connection.execute_fetchall(
        f"SELECT s.debug_file, s.debug_id FROM ({_KEYS}) AS k JOIN symbol_files AS s"
        " ON s.debug_file = k.debug_file AND s.debug_id = k.debug_id",
        (_key_list(keys),),
    )
    return {(str(row[0]), str(row[1])) for row in rows}


async def get_files(
    connection: aiosqlite.Connection, keys: Sequence[tuple[str, str]]
) -> dict[tuple[str, str], SymbolFile]:
    asked = requested(keys)
    if not asked:
        return {}
    rows = await connection.execute_fetchall(
        f"SELECT {_SYMBOLS} FROM ({_KEYS}) AS k JOIN symbol_files AS s"
        " ON s.debug_file = k.debug_file AND s.debug_id = k.debug_id",
        (_key_list(list(asked)),),
    )
    found = {}
    for row in rows:
        symbol = symbol_from_row(tuple(row))
        found[asked[(symbol.debug_file, symbol.debug_id)]] = symbol
    return found


async def get_file(
    connection: aiosqlite.Connection, debug_file: str, debug_id: str
) -> SymbolFile | None:
    return (await get_files(connection, [(debug_file, debug_id)])).get((debug_file, debug_id))


async def list_files(
    connection: aiosqlite.Connection, limit: int, after: tuple[str, str] | None
) -> list[SymbolFile]:
    """Symbol files in (debug_file, debug_id) byte order, those after ``after``."""
    where, parameters = "", tuple[str, ...]()
    if after is not None:
        where, parameters = " WHERE (debug_file, debug_id) > (?, ?)", clean_key(after)
    rows = await connection.execute_fetchall(
        f"SELECT {_COLUMNS} FROM symbol_files{where} ORDER BY debug_file, debug_id LIMIT ?",
        (*parameters, max(0, limit)),
    )
    return [symbol_from_row(tuple(row)) for row in rows]


async def missing(connection: aiosqlite.Connection, limit: int) -> list[MissingSymbols]:
    """Modules crashes missed symbols for and that have none stored but the one their
    processor saw, most crashes first: a module whose stored symbols could not be used (a file
    the loader refused, a blob gone) stays listed, since uploading it again is what helps."""
    rows = await connection.execute_fetchall(
        "SELECT m.debug_file, m.debug_id, max(m.code_file), count(*) AS n, max(c.received_at)"
        " FROM crash_modules AS m JOIN crashes AS c ON c.id = m.crash_id"
        " WHERE NOT EXISTS (SELECT 1 FROM symbol_files AS s"
        " WHERE s.debug_file = m.debug_file AND s.debug_id = m.debug_id"
        " AND s.sym_sha256 IS NOT m.seen_sha256)"
        " GROUP BY m.debug_file, m.debug_id ORDER BY n DESC, m.debug_file, m.debug_id LIMIT ?",
        (max(0, limit),),
    )
    return [missing_from_row(tuple(row)) for row in rows]
