"""SQL for symbol files and the modules crashes miss symbols for, in SQLite (issue 15).

Writes are writer jobs on the plain sqlite3 connection (the caller owns the transaction);
reads run on the read-only aiosqlite connection. Keys travel as one JSON list bound once
(``json_each``), so hundreds of them cost one statement and no variable limit.
"""

from __future__ import annotations

import sqlite3
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
    rows = {clean_key((f.debug_file, f.debug_id)): symbol_values(f) for f in files}
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
    """The crash's ``crash_modules`` rows become ``missing`` (no duplicate keys).

    Symbols for one of them stored while the crash was being processed (after its processor
    looked, before this commit) found no row to re-queue: the crash goes back now instead.
    """
    connection.execute("DELETE FROM crash_modules WHERE crash_id = ?", (crash_id,))
    if not missing:
        return
    connection.executemany(
        "INSERT INTO crash_modules (crash_id, debug_file, debug_id, code_file) VALUES (?,?,?,?)",
        [(crash_id, *row) for row in missing],
    )
    keys = _key_list([(row[0], row[1]) for row in missing])
    arrived = connection.execute(
        f"SELECT 1 FROM symbol_files WHERE (debug_file, debug_id) IN ({_KEYS}) LIMIT 1", (keys,)
    ).fetchone()
    if arrived is not None:
        connection.execute(
            "UPDATE crashes SET parse_status = 'pending', claimed_by = NULL, lease_until = NULL"
            " WHERE id = ?",
            (crash_id,),
        )
        connection.execute(
            "DELETE FROM crash_modules WHERE crash_id = ?2"
            f" AND (debug_file, debug_id) IN ({_KEYS})",
            (keys, crash_id),
        )


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
    """Modules crashes missed symbols for and that still have none, most crashes first."""
    rows = await connection.execute_fetchall(
        "SELECT m.debug_file, m.debug_id, max(m.code_file), count(*) AS n, max(c.received_at)"
        " FROM crash_modules AS m JOIN crashes AS c ON c.id = m.crash_id"
        " WHERE NOT EXISTS (SELECT 1 FROM symbol_files AS s"
        " WHERE s.debug_file = m.debug_file AND s.debug_id = m.debug_id)"
        " GROUP BY m.debug_file, m.debug_id ORDER BY n DESC, m.debug_file, m.debug_id LIMIT ?",
        (max(0, limit),),
    )
    return [missing_from_row(tuple(row)) for row in rows]
