"""Symbol files and symbolicated crashes in storage (issue 15), the same on every backend.

Through the ``Storage`` protocol only, except the migration tests, which build a database at
the previous schema version by hand (as a database of the last release is).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import asyncpg

from reporting_endpoint import deletion as deleting
from reporting_endpoint.blobstores.filesystem import FilesystemBlobStore
from reporting_endpoint.native.records import Frame, MissingSymbols, Module, SymbolFile
from reporting_endpoint.storage import Storage
from reporting_endpoint.storage.base import Blob
from reporting_endpoint.storage.native_rows import MAX_JSON_BYTES
from reporting_endpoint.storage.postgres import PostgresStorage
from reporting_endpoint.storage.postgres.migrate import migrations as pg_migrations
from reporting_endpoint.storage.sqlite import SQLiteStorage
from reporting_endpoint.storage.sqlite.schema import migrations as sqlite_migrations
from tests.test_storage_parity import BASE, crash, run

LEASE = 60_000
APP = ("app.pdb", "AAAA1")
LIBC = ("libc.so.6", "BBBB0")
GPU = ("gpu.dll", "CCCC2")


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def symbol(key: tuple[str, str], version: str = "1", **extra: Any) -> SymbolFile:
    values: dict[str, Any] = {
        "debug_file": key[0],
        "debug_id": key[1],
        "name": key[0].removesuffix(".pdb") + ".sym",
        "code_file": key[0].replace(".pdb", ".exe"),
        "code_id": "5F00" + version,
        "os": "windows",
        "arch": "x86_64",
        "sym_sha256": sha(f"sym {key} {version}"),
        "sym_size": 1000 + len(version),
        "object_sha256": sha(f"object {key} {version}"),
        "object_size": 90_000,
        "source": "upload",
        "uploaded_at": BASE + 5,
    }
    values.update(extra)
    return SymbolFile(**values)


def module(key: tuple[str, str], base: int) -> Module:
    return Module(base, 0x1000, f"C:\\app\\{key[0]}", "5F00", key[0], key[1], "1.0.0.0")


MODULES = [
    module(APP, 0x400000),
    module(LIBC, 0x7F00_0000_0000),
    module(GPU, 0xFFFF_8000_0000_0000),
]
FRAMES = [
    Frame(0, "context", 0x401234, "app.exe", 0x1234, "main", 4, "main.cc", 12),
    Frame(1, "scan", 0x7F00_0000_0100, "libc.so.6", 0x100),
]


def facts(*missing: tuple[str, str], signature: str = "main") -> dict[str, Any]:
    """A processor's result with the modules and frames above, missing ``missing``."""
    return {
        "signature": signature,
        "crash_module": "app.exe",
        "modules": [m.as_dict() for m in MODULES],
        "frames": [f.as_dict() for f in FRAMES],
        "missing_symbols": [[f, i, f"C:\\app\\{f}"] for f, i in missing],
    }


def cid(n: int) -> str:
    return f"{n:032x}"


async def parsed_with(storage: Storage, n: int, *missing: tuple[str, str], at: int = 0) -> str:
    """Crash ``n`` stored and processed, missing ``missing``."""
    await storage.insert_crash(crash(n, BASE + at))
    await storage.record_crash_facts(cid(n), facts(*missing))
    return cid(n)


async def status(storage: Storage, crash_id: str) -> str:
    found = await storage.get_crash(crash_id)
    assert found is not None
    return str(found["parse_status"])


# --- symbol files ----------------------------------------------------------------------------


def unstamped(found: Any) -> Any:
    """Symbol files as stored, without the time the storage stamped them with."""
    if isinstance(found, SymbolFile):
        return dataclasses.replace(found, uploaded_at=0)
    if isinstance(found, dict):
        return {key: unstamped(value) for key, value in found.items()}
    if isinstance(found, list):
        return [unstamped(value) for value in found]
    return found


def test_symbol_files_are_stored_read_listed_and_replaced(database_url: str) -> None:
    async def scenario(storage: Storage) -> None:
        assert await storage.list_symbol_files() == []
        assert await storage.get_symbol_file(*APP) is None
        files = [symbol(GPU), symbol(APP, object_sha256=None, object_size=None), symbol(LIBC)]
        before = int(time.time() * 1000)
        assert await storage.put_symbol_files(files) == 0  # no crash was waiting for them
        after = int(time.time() * 1000)
        stored = await storage.get_symbol_file(*APP)
        # Stamped by the storage when it stored them (the time crashes compare with).
        assert stored is not None and before - 1000 <= stored.uploaded_at <= after + 1000
        files = unstamped(files)
        assert unstamped(stored) == files[1]
        assert await storage.get_symbol_file("app.pdb", "AAAA2") is None

        # In key order (byte order: upper case before lower), one page after the other.
        every = await storage.list_symbol_files(limit=10)
        assert [(s.debug_file, s.debug_id) for s in every] == [APP, GPU, LIBC]
        first = await storage.list_symbol_files(limit=2)
        assert first == every[:2]
        last = (first[-1].debug_file, first[-1].debug_id)
        assert await storage.list_symbol_files(limit=2, after=last) == every[2:]
        assert await storage.list_symbol_files(limit=2, after=LIBC) == []

        # Hundreds of keys in one lookup, the absent ones left out.
        keys = [APP, LIBC, *((f"m{n}.so", "0" * 33) for n in range(500))]
        found = unstamped(await storage.get_symbol_files(keys))
        assert found == {APP: files[1], LIBC: files[2]}
        assert await storage.get_symbol_files([]) == {}

        # A new upload of a key replaces the row.
        newer = symbol(APP, "2", source="upstream", uploaded_at=0)
        await storage.put_symbol_files([newer])
        assert unstamped(await storage.get_symbol_file(*APP)) == newer
        assert len(await storage.list_symbol_files()) == 3

    run(database_url, scenario)


# --- processed crashes ------------------------------------------------------------------------


def test_a_processed_crash_shows_its_modules_with_symbols_and_its_frames(
    database_url: str,
) -> None:
    async def scenario(storage: Storage) -> None:
        await storage.insert_crash(crash(1))
        unprocessed = await storage.get_crash(cid(1))
        assert unprocessed is not None
        assert (unprocessed["modules"], unprocessed["frames"]) == ([], [])

        await storage.put_symbol_files([symbol(APP)])
        await storage.record_crash_facts(cid(1), facts(LIBC, GPU))
        shown = await storage.get_crash(cid(1))
        assert shown is not None and shown["parse_status"] == "parsed"
        assert shown["signature"] == "main"
        assert shown["modules"] == [
            {**m.as_dict(), "has_symbols": m.symbol_key == APP} for m in MODULES
        ]
        # Addresses at and above 2**63 come back as they went in.
        assert shown["modules"][2]["base"] == 0xFFFF_8000_0000_0000
        assert shown["frames"] == [{**f.as_dict(), "inlined": list(f.inlined)} for f in FRAMES]
        # Symbols stored later show at once.
        await storage.put_symbol_files([symbol(GPU)])
        again = await storage.get_crash(cid(1))
        assert again is not None
        assert [m["has_symbols"] for m in again["modules"]] == [True, False, True]

        # A result without them leaves none (not the earlier ones).
        await storage.record_crash_facts(cid(1), {"signature": "plain"})
        plain = await storage.get_crash(cid(1))
        assert plain is not None and (plain["modules"], plain["frames"]) == ([], [])
        assert await storage.missing_symbols() == []

    run(database_url, scenario)


def test_a_result_that_cannot_be_stored_marks_the_crash_failed_with_the_reason(
    database_url: str,
) -> None:
    async def scenario(storage: Storage) -> None:
        await parsed_with(storage, 1, LIBC)
        huge = facts(GPU) | {"frames": [{"function": "f" * 1000}] * (MAX_JSON_BYTES // 1000)}
        await storage.record_crash_facts(cid(1), huge)
        failed = await storage.get_crash(cid(1))
        assert failed is not None and failed["parse_status"] == "failed"
        assert failed["parse_error"].startswith("facts not stored: ValueError: frames is")
        assert (failed["modules"], failed["frames"]) == ([], [])
        # Neither the old nor the refused missing modules are left behind.
        assert await storage.missing_symbols() == []

        await storage.insert_crash(crash(2))
        await storage.record_crash_facts(cid(2), facts() | {"missing_symbols": [["a", 1, None]]})
        bad = await storage.get_crash(cid(2))
        assert bad is not None and bad["parse_status"] == "failed"
        assert "missing_symbols entry" in bad["parse_error"]
        assert bad["signature"] == "main"

    run(database_url, scenario)


def test_missing_symbols_count_crashes_per_module_most_first(database_url: str) -> None:
    async def scenario(storage: Storage) -> None:
        assert await storage.missing_symbols() == []
        await parsed_with(storage, 1, LIBC, GPU, at=1)
        await parsed_with(storage, 2, GPU, at=5)
        await parsed_with(storage, 3, APP, GPU, at=3)
        await parsed_with(storage, 4, LIBC, at=2)
        await storage.insert_crash(crash(5, BASE + 9))  # not processed: needs nothing yet
        # One module listed twice by a dump counts once.
        await storage.insert_crash(crash(6, BASE + 4))
        twice = [[*APP, "C:\\app\\app.pdb"], [*APP, "Z:\\app.pdb"]]
        doubled = facts(APP) | {"missing_symbols": twice}
        await storage.record_crash_facts(cid(6), doubled)

        missing = await storage.missing_symbols()
        assert missing == [
            MissingSymbols(*GPU, "C:\\app\\gpu.dll", 3, BASE + 5),
            MissingSymbols(*APP, "C:\\app\\app.pdb", 2, BASE + 4),
            MissingSymbols(*LIBC, "C:\\app\\libc.so.6", 2, BASE + 2),
        ]
        assert await storage.missing_symbols(limit=1) == missing[:1]
        # A key the store has now is not missing any more.
        await storage.put_symbol_files([symbol(GPU)])
        assert await storage.missing_symbols() == missing[1:]
        # Not even for a crash processed without it since (its symbols would not load).
        await parsed_with(storage, 7, GPU, at=8)
        assert await storage.missing_symbols() == missing[1:]

    run(database_url, scenario)


# --- late symbols send crashes back to processing ------------------------------------------


def test_late_symbols_requeue_exactly_the_crashes_that_needed_them(database_url: str) -> None:
    async def scenario(storage: Storage) -> None:
        # Each crash was tried once before its result (one attempt counted at the claim).
        for n in (1, 2, 3, 4):
            await storage.insert_crash(crash(n, BASE + n))
        claim = await storage.claim_crashes("p", 10, lease_ms=LEASE, max_attempts=1)
        assert len(claim.crashes) == 4
        await storage.record_crash_facts(cid(1), facts(LIBC, GPU), owner="p")
        await storage.record_crash_facts(cid(2), facts(GPU), owner="p")
        await storage.record_crash_facts(cid(3), facts(APP), owner="p")
        await storage.record_crash_facts(cid(4), facts(), owner="p")
        assert (await storage.processing_backlog()).pending == 0

        # One upload of two files: the crashes missing either go back, once each.
        requeued = await storage.put_symbol_files([symbol(GPU), symbol(LIBC)])
        assert requeued == 2
        assert [await status(storage, cid(n)) for n in (1, 2, 3, 4)] == [
            "pending", "pending", "parsed", "parsed",
        ]  # fmt: skip
        backlog = await storage.processing_backlog()
        assert (backlog.pending, backlog.oldest_received_at) == (2, BASE + 1)
        # Their attempts start again: with one attempt allowed, the claim takes them rather
        # than giving up on them as already tried.
        again = await storage.claim_crashes("q", 10, lease_ms=LEASE, max_attempts=1)
        assert ([c.id for c in again.crashes], again.failed) == ([cid(1), cid(2)], 0)
        # Those keys are off their missing lists: uploading them again re-queues nothing.
        assert await storage.put_symbol_files([symbol(GPU, "2"), symbol(LIBC, "2")]) == 0
        # The rest of crash 3's list is as it was.
        assert await storage.missing_symbols() == [
            MissingSymbols(*APP, "C:\\app\\app.pdb", 1, BASE + 3)
        ]

    run(database_url, scenario)


def test_a_result_made_before_the_symbols_came_is_refused(database_url: str) -> None:
    """A processor holds a crash when symbols it misses arrive: its lease is cleared, its
    result (made without them) is not recorded, and the next claim processes the crash."""

    async def scenario(storage: Storage) -> None:
        await parsed_with(storage, 1, LIBC, GPU)
        assert await storage.put_symbol_files([symbol(LIBC)]) == 1
        held = await storage.claim_crashes("a", 5, lease_ms=LEASE, max_attempts=3)
        assert [c.id for c in held.crashes] == [cid(1)]
        # GPU symbols come while "a" works on it (without them).
        assert await storage.put_symbol_files([symbol(GPU)]) == 1
        await storage.record_crash_facts(cid(1), facts(GPU, signature="stale"), owner="a")
        await storage.record_crash_failure(cid(1), "late failure", owner="a")
        stale = await storage.get_crash(cid(1))
        assert stale is not None and stale["parse_status"] == "pending"
        assert stale["signature"] == "main"
        # Another processor takes it at once (no lease to wait out) and records it.
        taken = await storage.claim_crashes("b", 5, lease_ms=LEASE, max_attempts=3)
        assert [c.id for c in taken.crashes] == [cid(1)]
        await storage.record_crash_facts(cid(1), facts(signature="fresh"), owner="b")
        fresh = await storage.get_crash(cid(1))
        assert fresh is not None and (fresh["parse_status"], fresh["signature"]) == (
            "parsed",
            "fresh",
        )
        assert all(m["has_symbols"] for m in fresh["modules"][1:])

    run(database_url, scenario)


def test_symbols_stored_during_the_first_processing_send_the_crash_back(
    database_url: str,
) -> None:
    """The crash had no missing-module rows yet when its symbols came (its processor had
    looked already): recording the result finds them and sends the crash round again."""

    async def scenario(storage: Storage) -> None:
        await storage.insert_crash(crash(1, BASE + 1))
        held = await storage.claim_crashes("a", 5, lease_ms=LEASE, max_attempts=3)
        assert [c.id for c in held.crashes] == [cid(1)]
        assert await storage.put_symbol_files([symbol(GPU)]) == 0  # nothing to re-queue yet
        await storage.record_crash_facts(cid(1), facts(GPU, LIBC), owner="a")
        assert await status(storage, cid(1)) == "pending"
        again = await storage.claim_crashes("b", 5, lease_ms=LEASE, max_attempts=3)
        assert [c.id for c in again.crashes] == [cid(1)]
        await storage.record_crash_facts(cid(1), facts(LIBC), owner="b")
        assert await status(storage, cid(1)) == "parsed"
        assert [(m.debug_file, m.debug_id) for m in await storage.missing_symbols()] == [LIBC]

    run(database_url, scenario)


def saw(*missing: tuple[str, str, str | None]) -> dict[str, Any]:
    """A result missing modules whose stored .sym its processor saw (sha256, None: none)."""
    return {
        **facts(),
        "missing_symbols": [[f, i, f"C:\\app\\{f}", seen] for f, i, seen in missing],
    }


async def attempts(database_url: str, crash_id: str) -> int:
    query = "SELECT attempts FROM crashes WHERE id = "
    if database_url.startswith("sqlite://"):
        with sqlite3.connect(database_url.removeprefix("sqlite://")) as connection:
            return int(connection.execute(query + "?", (crash_id,)).fetchone()[0])
    connection = await asyncpg.connect(database_url)
    try:
        return int(await connection.fetchval(query + "$1", crash_id))
    finally:
        await connection.close()


async def raw(database_url: str, *statements: str) -> None:
    if database_url.startswith("sqlite://"):
        with sqlite3.connect(database_url.removeprefix("sqlite://")) as connection:
            for statement in statements:
                connection.execute(statement)
        return
    connection = await asyncpg.connect(database_url)
    try:
        for statement in statements:
            await connection.execute(statement)
    finally:
        await connection.close()


def test_symbols_stored_while_a_crash_was_processed_send_it_back_with_fresh_attempts(
    database_url: str,
) -> None:
    """The processor saw no symbols for GPU; they were stored before its result: back to
    processing at once, attempts from zero (uploads never use up a crash's attempts)."""

    async def scenario(storage: Storage) -> None:
        await storage.insert_crash(crash(1, BASE + 1))
        held = await storage.claim_crashes("a", 5, lease_ms=LEASE, max_attempts=3)
        assert [c.id for c in held.crashes] == [cid(1)]
        assert await storage.put_symbol_files([symbol(GPU)]) == 0  # nothing waiting yet
        await storage.record_crash_facts(cid(1), saw((*GPU, None), (*LIBC, None)), owner="a")
        assert await status(storage, cid(1)) == "pending"
        assert await attempts(database_url, cid(1)) == 0
        again = await storage.claim_crashes("b", 5, lease_ms=LEASE, max_attempts=1)
        assert [c.id for c in again.crashes] == [cid(1)]
        gpu = symbol(GPU).sym_sha256
        await storage.record_crash_facts(cid(1), saw((*GPU, gpu), (*LIBC, None)), owner="b")
        assert await status(storage, cid(1)) == "parsed"

    run(database_url, scenario)


def test_symbols_the_processor_had_and_could_not_use_stay_missing_without_a_loop(
    database_url: str,
) -> None:
    """The processor saw GPU's stored symbols and could not use them (a blob gone, a file its
    loader refused): the crash is not sent round (it would go round for ever), the module
    stays on the missing list, and uploading another file for it sends the crash back."""

    async def scenario(storage: Storage) -> None:
        await storage.put_symbol_files([symbol(GPU)])
        await storage.insert_crash(crash(1, BASE + 1))
        await storage.claim_crashes("a", 5, lease_ms=LEASE, max_attempts=3)
        gpu = symbol(GPU).sym_sha256
        await storage.record_crash_facts(cid(1), saw((*GPU, gpu)), owner="a")
        assert await status(storage, cid(1)) == "parsed"
        assert await storage.requeue_late_symbols() == 0
        assert await status(storage, cid(1)) == "parsed"
        assert [(m.debug_file, m.debug_id) for m in await storage.missing_symbols()] == [GPU]
        assert await storage.put_symbol_files([symbol(GPU, "2")]) == 1
        assert await status(storage, cid(1)) == "pending"
        assert await storage.missing_symbols() == []

    run(database_url, scenario)


def test_an_upload_and_a_result_that_crossed_are_caught_by_the_late_check(
    database_url: str,
) -> None:
    """Each committed without seeing the other (possible on PostgreSQL, where the upload skips
    crash rows a result holds): the crash kept its missing row for symbols that now exist. The
    processors' periodic check sends it back; on SQLite, one writer orders them, and the check
    has nothing to do."""

    async def scenario(storage: Storage) -> None:
        await storage.insert_crash(crash(1, BASE + 1))
        await storage.insert_crash(crash(2, BASE + 2))
        await storage.record_crash_facts(cid(2), saw((*LIBC, None)))
        await storage.put_symbol_files([symbol(GPU)])
        await storage.record_crash_facts(cid(1), facts())
        # The crossing, as the database would hold it: crash 1 parsed, still missing GPU, its
        # processor having seen none.
        await raw(
            database_url,
            "INSERT INTO crash_modules (crash_id, debug_file, debug_id, code_file, seen_sha256)"
            f" VALUES ('{cid(1)}', '{GPU[0]}', '{GPU[1]}', NULL, NULL)",
        )
        assert await status(storage, cid(1)) == "parsed"
        expected = 0 if database_url.startswith("sqlite://") else 1
        assert await storage.requeue_late_symbols() == expected
        if expected:
            assert [await status(storage, cid(n)) for n in (1, 2)] == ["pending", "parsed"]
            assert await storage.requeue_late_symbols() == 0

    run(database_url, scenario)


# --- deletion and blobs ----------------------------------------------------------------------


def test_deleting_crashes_takes_their_missing_modules(database_url: str) -> None:
    async def scenario(storage: Storage) -> None:
        await parsed_with(storage, 1, LIBC, at=-10)
        await parsed_with(storage, 2, LIBC, APP, at=1)
        await parsed_with(storage, 3, APP, at=2)
        assert (await storage.delete_crash(cid(3))).crashes == 1
        assert await storage.missing_symbols() == [
            MissingSymbols(*LIBC, "C:\\app\\libc.so.6", 2, BASE + 1),
            MissingSymbols(*APP, "C:\\app\\app.pdb", 1, BASE + 1),
        ]
        assert (await storage.prune(BASE)).crashes == 1
        assert [m.crashes for m in await storage.missing_symbols()] == [1, 1]
        await storage.delete_crash(cid(2))
        assert await storage.missing_symbols() == []
        # A crash stored again under a deleted one's id (a restore) needs nothing yet.
        for n, at in ((1, -10), (2, 1), (3, 2)):
            await storage.insert_crash(crash(n, BASE + at))
        assert await storage.missing_symbols() == []
        # Nothing left that a symbol upload could send back.
        assert await storage.put_symbol_files([symbol(LIBC), symbol(APP)]) == 0

    run(database_url, scenario)


def test_symbol_blobs_are_referenced(database_url: str) -> None:
    async def scenario(storage: Storage) -> None:
        app = symbol(APP)
        libc = symbol(LIBC, object_sha256=None, object_size=None)
        await storage.put_symbol_files([app, libc])
        referenced = await storage.referenced_blobs()
        assert {app.sym_sha256, app.object_sha256, libc.sym_sha256} <= referenced
        assert app.object_sha256 is not None
        blobs = [Blob(s, f"blobs/{s[:2]}/{s}") for s in (app.sym_sha256, app.object_sha256)]
        other = Blob("e" * 64, f"blobs/ee/{'e' * 64}")
        assert await storage.unreferenced_blobs([*blobs, other]) == (other,)

        # A crash whose dump has the same content as a symbol file: deleting the crash does
        # not free that blob.
        await storage.insert_crash(crash(1, sha=app.sym_sha256))
        deletion = await storage.delete_crash(cid(1))
        assert (deletion.crashes, deletion.blobs) == (1, ())

    run(database_url, scenario)


def test_the_orphan_sweep_keeps_symbol_blobs(database_url: str, tmp_path: Path) -> None:
    store = FilesystemBlobStore(tmp_path / "data")

    def blob(content: bytes) -> str:
        digest = hashlib.sha256(content).hexdigest()
        path = tmp_path / "data" / "blobs" / digest[:2] / digest
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        old = time.time_ns() - deleting.ORPHAN_GRACE_NS - 60 * 1_000_000_000
        os.utime(path, ns=(old, old))
        return digest

    async def scenario(storage: Storage) -> None:
        await store.start()
        sym, obj, orphan = blob(b"MODULE windows x86_64"), blob(b"MZ..."), blob(b"orphan")
        await storage.put_symbol_files([symbol(APP, sym_sha256=sym, object_sha256=obj)])
        assert await deleting.sweep_orphans(storage, store) == 1
        assert await store.exists(f"blobs/{sym[:2]}/{sym}")
        assert await store.exists(f"blobs/{obj[:2]}/{obj}")
        assert not await store.exists(f"blobs/{orphan[:2]}/{orphan}")

    run(database_url, scenario)


# --- migrations ------------------------------------------------------------------------------

# A crash row as the previous schema version holds it (no modules, no frames).
_OLD_CRASH = (
    "INSERT INTO crashes (id, received_at, product, annotations, query, dump_sha256, dump_size,"
    " dump_path, attachments, upload_bytes, parse_status, signature)"
)


async def _after_migration(storage: Storage) -> None:
    """An old database's crashes read as unprocessed-for-symbols, and take new results."""
    await storage.start()
    try:
        old = await storage.get_crash(cid(7))
        assert old is not None and (old["signature"], old["modules"], old["frames"]) == (
            "old",
            [],
            [],
        )
        await storage.record_crash_facts(cid(7), facts(APP))
        assert [m.debug_file for m in await storage.missing_symbols()] == ["app.pdb"]
        assert await storage.put_symbol_files([symbol(APP)]) == 1
    finally:
        await storage.stop()


def test_the_sqlite_migration_keeps_the_data_of_the_previous_version(tmp_path: Path) -> None:
    db = tmp_path / "old.sqlite3"
    connection = sqlite3.connect(db, isolation_level=None)
    for number, sql in sqlite_migrations():
        if number < 10:
            connection.executescript(sql)
            connection.execute(f"PRAGMA user_version = {number}")
    connection.execute(
        f"{_OLD_CRASH} VALUES (?, ?, 'App', '{{}}', '{{}}', ?, 1, 'blobs/x', '[]', 1,"
        " 'parsed', 'old')",
        (cid(7), BASE, "7" * 64),
    )
    connection.close()
    asyncio.run(_after_migration(SQLiteStorage(db)))
    connection = sqlite3.connect(db)
    assert connection.execute("PRAGMA user_version").fetchone()[0] == len(sqlite_migrations())
    connection.close()


def test_the_postgres_migration_keeps_the_data_of_the_previous_version(
    postgres_url: str,
) -> None:
    async def main() -> None:
        connection = await asyncpg.connect(postgres_url)
        try:
            await connection.execute(
                "CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text NOT NULL,"
                " checksum text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            for migration in pg_migrations():
                if migration.number < 9:
                    await connection.execute(migration.sql)
                    await connection.execute(
                        "INSERT INTO schema_migrations (version, name, checksum)"
                        " VALUES ($1, $2, $3)",
                        migration.number,
                        migration.name,
                        migration.checksum,
                    )
            await connection.execute(
                f"{_OLD_CRASH} VALUES ($1, $2, 'App', '{{}}', '{{}}', $3, 1, 'blobs/x', '[]',"
                " 1, 'parsed', 'old')",
                cid(7),
                BASE,
                "7" * 64,
            )
        finally:
            await connection.close()
        await _after_migration(PostgresStorage(postgres_url))

    asyncio.run(main())
