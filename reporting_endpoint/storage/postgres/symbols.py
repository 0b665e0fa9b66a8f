"""SQL for symbol files and the modules crashes miss symbols for, in PostgreSQL (issue 15).

Writes are jobs on the writer's connection (the caller owns the transaction); reads use the
read pool. Keys travel as two text arrays (``unnest``), so hundreds of them are one statement.
Key columns are ``COLLATE "C"`` (migration 0009): orders and ties are byte order, as in SQLite.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeAlias

import asyncpg

from reporting_endpoint.native.records import MissingSymbols, SymbolFile
from reporting_endpoint.storage.native_rows import (
    RECENT_UPLOADS_MS,
    SYMBOL_COLUMNS,
    Key,
    MissingRow,
    clean_key,
    missing_from_row,
    requested,
    symbol_from_row,
    symbol_values,
)

PgPool: TypeAlias = "asyncpg.Pool[asyncpg.Record]"

_COLUMNS = ", ".join(SYMBOL_COLUMNS)
_SYMBOLS = ", ".join(f"s.{name}" for name in SYMBOL_COLUMNS)
_UPSERT = (
    f"INSERT INTO symbol_files ({_COLUMNS})"
    f" VALUES ({', '.join(f'${n}' for n in range(1, len(SYMBOL_COLUMNS) + 1))})"
    " ON CONFLICT (debug_file, debug_id) DO UPDATE SET "
    + ", ".join(f"{name} = excluded.{name}" for name in SYMBOL_COLUMNS[2:])
)
_NOW = "(extract(epoch FROM clock_timestamp()) * 1000)::bigint"
_NOW_MS = f"SELECT {_NOW}"
# The keys of the arrays bound as $1 (debug files) and $2 (debug ids).
_KEYS = "unnest($1::text[], $2::text[]) AS k(debug_file, debug_id)"


def _arrays(keys: Sequence[Key]) -> tuple[list[str], list[str]]:
    return [key[0] for key in keys], [key[1] for key in keys]


# --- writes ---------------------------------------------------------------------------------


async def put_files(connection: asyncpg.Connection, files: Sequence[SymbolFile]) -> int:
    """As the SQLite backend's ``put_files``.

    Crash rows another transaction holds (a processor recording its result) are skipped, not
    waited for: waiting could deadlock with a writer transaction recording several results,
    and such a crash is sent back by ``replace_missing`` when its result sees this upload, or
    by the processors' ``requeue_late`` within a minute when neither saw the other. The
    upserts go in key order between two uploads."""
    rows = {clean_key((f.debug_file, f.debug_id)): symbol_values(f) for f in files}
    if not rows:
        return 0
    # Stamped with the server's clock (the late check looks at recent uploads by it).
    now_ms = await connection.fetchval(_NOW_MS)
    await connection.executemany(_UPSERT, [(*rows[key][:-1], int(now_ms)) for key in sorted(rows)])
    files_, ids = _arrays(sorted(rows))
    crashes = [
        str(record[0])
        for record in await connection.fetch(
            "SELECT id FROM crashes WHERE id IN (SELECT m.crash_id FROM crash_modules AS m"
            f" JOIN {_KEYS} ON m.debug_file = k.debug_file AND m.debug_id = k.debug_id)"
            ' ORDER BY id COLLATE "C" FOR UPDATE SKIP LOCKED',
            files_,
            ids,
        )
    ]
    if not crashes:
        return 0
    await connection.execute(
        "UPDATE crashes SET parse_status = 'pending', attempts = 0, claimed_by = NULL,"
        " lease_until = NULL WHERE id = ANY($1::text[])",
        crashes,
    )
    await connection.execute(
        "DELETE FROM crash_modules AS m USING unnest($2::text[], $3::text[])"
        " AS k(debug_file, debug_id) WHERE m.crash_id = ANY($1::text[])"
        " AND m.debug_file = k.debug_file AND m.debug_id = k.debug_id",
        crashes,
        files_,
        ids,
    )
    return len(crashes)


async def replace_missing(
    connection: asyncpg.Connection, crash_id: str, missing: Sequence[MissingRow]
) -> None:
    """As the SQLite backend's ``replace_missing``. An upload committing in the same instant
    as this transaction is not seen here, nor this row by it: ``requeue_late``, run by the
    processors every minute, catches that crossing."""
    await connection.execute("DELETE FROM crash_modules WHERE crash_id = $1", crash_id)
    if not missing:
        return
    await connection.execute(
        "INSERT INTO crash_modules (crash_id, debug_file, debug_id, code_file, seen_sha256)"
        " SELECT $1, * FROM unnest($2::text[], $3::text[], $4::text[], $5::text[])",
        crash_id,
        [row[0] for row in missing],
        [row[1] for row in missing],
        [row[2] for row in missing],
        [row[3] for row in missing],
    )
    await requeue_late(connection, crash_id)


async def requeue_late(connection: asyncpg.Connection, crash_id: str | None = None) -> int:
    """As the SQLite backend's ``requeue_late``; without ``crash_id`` only symbol files stored
    in the last hour are looked at (through their index, not every missing row). Crash rows
    are locked in id order, skipping those another transaction holds (the next round, or
    their own result, sends them back)."""
    if crash_id is None:
        candidates = (
            "SELECT m.crash_id FROM symbol_files AS s JOIN crash_modules AS m"
            " ON m.debug_file = s.debug_file AND m.debug_id = s.debug_id"
            " AND s.sym_sha256 IS DISTINCT FROM m.seen_sha256"
            f" WHERE s.uploaded_at >= {_NOW} - $1 LIMIT 1000"
        )
        argument: object = RECENT_UPLOADS_MS
    else:
        candidates = (
            "SELECT m.crash_id FROM crash_modules AS m JOIN symbol_files AS s"
            " ON m.debug_file = s.debug_file AND m.debug_id = s.debug_id"
            " AND s.sym_sha256 IS DISTINCT FROM m.seen_sha256 WHERE m.crash_id = $1"
        )
        argument = crash_id
    crashes = [
        str(record[0])
        for record in await connection.fetch(
            f"SELECT id FROM crashes WHERE id IN ({candidates})"
            ' ORDER BY id COLLATE "C" FOR UPDATE SKIP LOCKED',
            argument,
        )
    ]
    if not crashes:
        return 0
    await connection.execute(
        "UPDATE crashes SET parse_status = 'pending', attempts = 0, claimed_by = NULL,"
        " lease_until = NULL WHERE id = ANY($1::text[])",
        crashes,
    )
    await connection.execute(
        "DELETE FROM crash_modules AS m USING symbol_files AS s"
        " WHERE m.crash_id = ANY($1::text[]) AND s.debug_file = m.debug_file"
        " AND s.debug_id = m.debug_id AND s.sym_sha256 IS DISTINCT FROM m.seen_sha256",
        crashes,
    )
    return len(crashes)


# --- reads ----------------------------------------------------------------------------------


async def present(pool: PgPool, keys: Sequence[Key]) -> set[Key]:
    """Those of ``keys`` (stored, cleaned keys) that have a symbol file."""
    if not keys:
        return set()
    rows = await pool.fetch(
        f"SELECT s.debug_file, s.debug_id FROM {_KEYS} JOIN symbol_files AS s"
        " ON s.debug_file = k.debug_file AND s.debug_id = k.debug_id",
        *_arrays(keys),
    )
    return {(str(row[0]), str(row[1])) for row in rows}


async def get_files(
    pool: PgPool, keys: Sequence[tuple[str, str]]
) -> dict[tuple[str, str], SymbolFile]:
    asked = requested(keys)
    if not asked:
        return {}
    rows = await pool.fetch(
        f"SELECT {_SYMBOLS} FROM {_KEYS} JOIN symbol_files AS s"
        " ON s.debug_file = k.debug_file AND s.debug_id = k.debug_id",
        *_arrays(list(asked)),
    )
    found = {}
    for row in rows:
        symbol = symbol_from_row(tuple(row))
        found[asked[(symbol.debug_file, symbol.debug_id)]] = symbol
    return found


async def get_file(pool: PgPool, debug_file: str, debug_id: str) -> SymbolFile | None:
    return (await get_files(pool, [(debug_file, debug_id)])).get((debug_file, debug_id))


async def list_files(pool: PgPool, limit: int, after: tuple[str, str] | None) -> list[SymbolFile]:
    """Symbol files in (debug_file, debug_id) byte order, those after ``after``."""
    if after is None:
        rows = await pool.fetch(
            f"SELECT {_COLUMNS} FROM symbol_files ORDER BY debug_file, debug_id LIMIT $1",
            max(0, limit),
        )
    else:
        rows = await pool.fetch(
            f"SELECT {_COLUMNS} FROM symbol_files WHERE (debug_file, debug_id) > ($1, $2)"
            " ORDER BY debug_file, debug_id LIMIT $3",
            *clean_key(after),
            max(0, limit),
        )
    return [symbol_from_row(tuple(row)) for row in rows]


async def missing(pool: PgPool, limit: int) -> list[MissingSymbols]:
    """As the SQLite backend's ``missing``."""
    rows = await pool.fetch(
        "SELECT m.debug_file, m.debug_id, max(m.code_file), count(*) AS n, max(c.received_at)"
        " FROM crash_modules AS m JOIN crashes AS c ON c.id = m.crash_id"
        " WHERE NOT EXISTS (SELECT FROM symbol_files AS s"
        " WHERE s.debug_file = m.debug_file AND s.debug_id = m.debug_id"
        " AND s.sym_sha256 IS DISTINCT FROM m.seen_sha256)"
        " GROUP BY m.debug_file, m.debug_id ORDER BY n DESC, m.debug_file, m.debug_id LIMIT $1",
        max(0, limit),
    )
    return [missing_from_row(tuple(row)) for row in rows]
