"""The SQLite schema: numbered migrations in ``migrations/``, applied in order and recorded in
``PRAGMA user_version``."""

from __future__ import annotations

import re
import sqlite3
from importlib import resources

_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


def migrations() -> list[tuple[int, str]]:
    """(number, SQL) for every file in the migrations folder, in order."""
    folder = resources.files("reporting_endpoint.storage.sqlite") / "migrations"
    found = []
    for entry in folder.iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append((int(match.group(1)), entry.read_text(encoding="utf-8")))
    found.sort()
    numbers = [number for number, _ in found]
    if numbers != list(range(1, len(numbers) + 1)):
        raise RuntimeError(f"migrations must be numbered 1..n without gaps, found {numbers}")
    return found


def _statements(script: str) -> list[str]:
    """The statements of a migration, split where SQLite itself says one is complete."""
    statements: list[str] = []
    buffer = ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            if buffer.strip():
                statements.append(buffer)
            buffer = ""
    if buffer.strip() and not buffer.strip().startswith("--"):
        statements.append(buffer)
    return statements


def apply_migrations(connection: sqlite3.Connection) -> int:
    """Bring the schema up to date in one transaction per migration; returns the version.

    Several processes may start on one new file at once (two `serve` processes, the workers of
    one): each migration takes the write lock first and reads the version again under it, so
    it runs exactly once. Not ``executescript``: it commits before it runs, which would drop
    the lock between the check and the statements. ``connection`` must be in autocommit mode.
    """
    latest = int(connection.execute("PRAGMA user_version").fetchone()[0])
    for number, sql in migrations():
        if number <= latest:
            continue
        connection.execute("BEGIN IMMEDIATE")
        try:
            current = int(connection.execute("PRAGMA user_version").fetchone()[0])
            if number > current:
                for statement in _statements(sql):
                    connection.execute(statement)
                connection.execute(f"PRAGMA user_version = {number}")
            connection.execute("COMMIT")
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        latest = max(number, current)
    return latest
