"""The database holds URLs, user agents, GUIDs and annotations: it and its -wal/-shm are 0600."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

from reporting_endpoint.storage import SQLiteStorage
from tests.test_storage import report


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_database_and_its_wal_and_shm_are_created_private(tmp_path: Path) -> None:
    db = tmp_path / "data" / "reports.sqlite3"
    # A permissive umask must not matter: the files are created 0600 on purpose.
    previous = os.umask(0o002)
    try:

        async def scenario() -> dict[str, int]:
            storage = SQLiteStorage(db)
            await storage.start()
            await storage.submit_reports([report()])
            # While the service runs: the -wal and -shm files exist now.
            modes = {
                suffix: mode(db.with_name(db.name + suffix)) for suffix in ("", "-wal", "-shm")
            }
            await storage.stop()
            return modes

        modes = asyncio.run(scenario())
    finally:
        os.umask(previous)
    assert modes == {"": 0o600, "-wal": 0o600, "-shm": 0o600}


def test_an_existing_database_keeps_its_mode(tmp_path: Path) -> None:
    # An operator who chose a mode (a group that reads backups) keeps it.
    db = tmp_path / "reports.sqlite3"
    db.touch(mode=0o640)
    os.chmod(db, 0o640)

    async def scenario() -> None:
        storage = SQLiteStorage(db)
        await storage.start()
        await storage.submit_reports([report()])
        await storage.stop()

    asyncio.run(scenario())
    assert mode(db) == 0o640
