"""Opening the SQLite file: private file mode, the pragmas every writer uses, migrations."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
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
    _switch_to_wal(connection)
    connection.execute(f"PRAGMA synchronous={synchronous.upper()}")


# Bounds the retries of the switch to WAL below (seconds).
_WAL_SWITCH_DEADLINE = 10.0


def _switch_to_wal(connection: sqlite3.Connection) -> None:
    # SQLite answers SQLITE_BUSY at once, without calling the busy handler, when this
    # connection holds a shared lock and another holds the reserved lock (a deadlock it refuses
    # to wait on): processes opening one fresh file together hit that while one of them
    # migrates. So the switch is retried here, bounded in time.
    deadline = time.monotonic() + _WAL_SWITCH_DEADLINE
    pause = 0.01
    while True:
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if not is_busy(exc) or time.monotonic() + pause > deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.2)


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
