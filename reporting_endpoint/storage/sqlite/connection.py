"""Opening the SQLite file: private file mode, the pragmas every writer uses, migrations."""

from __future__ import annotations

import contextlib
import os
import sqlite3
from pathlib import Path

from reporting_endpoint.storage.sqlite.schema import apply_migrations


def open_connection(path: Path, synchronous: str = "FULL") -> sqlite3.Connection:
    """A plain write connection with the pragmas every writer of this database uses."""
    path.parent.mkdir(parents=True, exist_ok=True)
    create_private(path)
    # Used by the writer task on the loop and by the writer thread for COMMIT, never both at once.
    connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    configure(connection, synchronous)
    return connection


def create_private(path: Path) -> None:
    """Create the database file 0600 when it is missing.

    It holds URLs, user agents, GUIDs and annotations; SQLite would create it 0644, and gives
    the -wal and -shm files the mode of the main file, so creating this one first covers all three.
    """
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def configure(connection: sqlite3.Connection, synchronous: str = "FULL") -> None:
    # The busy timeout first: switching a new file to WAL takes a lock that processes starting
    # together contend for.
    connection.execute("PRAGMA busy_timeout=5000")
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute(f"PRAGMA synchronous={synchronous.upper()}")


def migrate(path: Path) -> int:
    """Create the database when missing and apply every migration."""
    connection = open_connection(path)
    try:
        return apply_migrations(connection)
    finally:
        connection.close()


def is_busy(exc: sqlite3.Error) -> bool:
    # Extended codes (SQLITE_BUSY_RECOVERY, ...) carry the primary code in their low byte.
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
