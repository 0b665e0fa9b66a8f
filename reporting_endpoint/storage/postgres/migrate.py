"""Numbered SQL migrations for PostgreSQL, applied exactly once however many processes start.

``migrations/NNNN_name.sql`` are applied in order, each in a transaction of its own together
with its row in ``schema_migrations`` (number, name, checksum), so a migration is either fully
applied and recorded or not at all. Several ingest processes (or hosts) starting at once
serialise on a transaction-scoped advisory lock: each migration transaction takes the lock,
reads the table again, and applies the migration only if no one has yet. A transaction lock,
not a session lock, because it is released by COMMIT or ROLLBACK whatever happens to the
caller, and it also works behind a pooler in transaction mode.

A start with nothing to do takes no lock: it reads the table and returns. A recorded migration
whose file changed since is an error (the schema may not be what the code expects); numbers
above the newest file (a newer release migrated this database) are accepted, so hosts can be
upgraded one at a time. A migration runs as one simple-query script: it cannot hold
statements that refuse a transaction block (CREATE INDEX CONCURRENTLY).
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from importlib import resources

import asyncpg

log = logging.getLogger("reporting_endpoint.storage.postgres")

_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")

# Keyed by a hash of a fixed name rather than a bare number, so another application sharing
# the database cannot collide with it by accident; visible in pg_locks as an advisory lock.
_LOCK = "SELECT pg_advisory_xact_lock(hashtextextended('reporting_endpoint.migrations', 0))"

_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer     PRIMARY KEY,
    name       text        NOT NULL,
    checksum   text        NOT NULL,  -- sha256 of the file as applied
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


class MigrationError(RuntimeError):
    """The database's recorded migrations do not fit the migration files."""


@dataclass(frozen=True, slots=True)
class Migration:
    number: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode("utf-8")).hexdigest()


def migrations() -> list[Migration]:
    """Every migration file of this backend, in order; numbered 1..n without gaps."""
    folder = resources.files("reporting_endpoint.storage.postgres") / "migrations"
    found = []
    for entry in folder.iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append(
                Migration(int(match.group(1)), match.group(2), entry.read_text(encoding="utf-8"))
            )
    found.sort(key=lambda m: m.number)
    numbers = [m.number for m in found]
    if numbers != list(range(1, len(numbers) + 1)):
        raise MigrationError(f"migrations must be numbered 1..n without gaps, found {numbers}")
    return found


async def _applied(connection: asyncpg.Connection) -> dict[int, str]:
    """version -> checksum of what is recorded; empty before the first migration."""
    exists = await connection.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    if not exists:
        return {}
    rows = await connection.fetch("SELECT version, checksum FROM schema_migrations")
    return {int(row["version"]): str(row["checksum"]) for row in rows}


def _check(migration: Migration, applied: dict[int, str]) -> bool:
    """Whether ``migration`` is applied; raises when it was, from a different file."""
    recorded = applied.get(migration.number)
    if recorded is None:
        return False
    if recorded != migration.checksum:
        raise MigrationError(
            f"migration {migration.number:04d}_{migration.name} was applied from a different"
            " file: migrations must not change once released; add a new one instead"
        )
    return True


async def apply_migrations(connection: asyncpg.Connection, lock_timeout: float = 60.0) -> int:
    """Bring the schema up to date; returns the newest applied version.

    ``lock_timeout`` bounds each wait for another process's migration transaction (a
    ``TimeoutError`` then; nothing is half applied). ``connection`` must not be in a
    transaction.
    """
    pending = migrations()
    applied = await _applied(connection)
    if all(_check(m, applied) for m in pending):
        return max(applied, default=0)
    async with connection.transaction():
        await connection.execute(_LOCK, timeout=lock_timeout)
        await connection.execute(_CREATE_TABLE)
    for migration in pending:
        async with connection.transaction():
            await connection.execute(_LOCK, timeout=lock_timeout)
            # Read again under the lock: another process may have applied it meanwhile. In
            # READ COMMITTED this statement sees everything committed before the lock came.
            if _check(migration, await _applied(connection)):
                continue
            await connection.execute(migration.sql)
            await connection.execute(
                "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                migration.number,
                migration.name,
                migration.checksum,
            )
        log.info("applied migration %04d_%s", migration.number, migration.name)
    applied = await _applied(connection)
    newest = max(applied, default=0)
    if newest > len(pending):
        log.info("database is at migration %d, newer than this release's %d", newest, len(pending))
    return newest


async def migrate(url: str, connect_timeout: float = 30.0, lock_timeout: float = 60.0) -> int:
    """Connect to ``url`` (a libpq URL), apply the migrations, disconnect."""
    connection = await asyncpg.connect(url, timeout=connect_timeout)
    try:
        return await apply_migrations(connection, lock_timeout=lock_timeout)
    finally:
        await connection.close()
