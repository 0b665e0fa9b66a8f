"""``reporting-endpoint copy`` between real databases: SQLite into PostgreSQL and back.

A source is filled through the storage protocol (reports over several days, some sharing a
millisecond; crashes with dumps and attachments in a real blob store, some parsed; quarantined
reports), copied, and then read back through the protocol on both sides: pages, groups, time
series, single rows with their raw JSON, crash JSON, quarantine, and every blob by its sha256
must be identical. A copy SIGKILLed between batches (and between a batch's blobs and its rows)
finishes on a rerun with nothing doubled and exact counters.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from reporting_endpoint.blobstores import BlobStore, open_blob_store
from reporting_endpoint.cli import main
from reporting_endpoint.records import NewCrash, NewReport, RejectedReport
from reporting_endpoint.settings import Settings
from reporting_endpoint.storage import Storage, open_storage
from reporting_endpoint.storage.filters import Filters, Position

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent
DAY = 86_400_000
HOUR = 3_600_000
BASE = 1_700_000_000_000 // DAY * DAY  # a UTC midnight, years before any test runs
SITES = ("a.example", "b.example", "c.example")
REPORTS = 90
CRASHES = 23
QUARANTINED = 11


# --- a source worth copying ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Side:
    """One database and its blob store, as the command names them."""

    database: str
    blobs: str  # a folder for --from-blob-store / --to-blob-store ("" = the default)
    data_dir: Path

    def store(self) -> BlobStore:
        return open_blob_store(self.blobs, self.data_dir)


def sqlite_side(path: Path) -> Side:
    # The default blob store: the data folder beside the file, as serve uses it.
    database = f"sqlite://{path}"
    return Side(database, "", Settings(database=database).data_dir)


def postgres_side(url: str, folder: Path) -> Side:
    # A server names no folder: the store is named explicitly (the default would be a folder
    # in the working directory).
    return Side(url, str(folder), folder)


def run(coroutine: Awaitable[T]) -> T:
    async def main() -> T:
        return await coroutine

    return asyncio.run(main())


@asynccontextmanager
async def opened(database: str, *, read_only: bool = False) -> AsyncIterator[Storage]:
    storage = open_storage(database, Settings(), read_only=read_only)
    await storage.start()
    try:
        yield storage
    finally:
        await storage.stop()


def report(n: int) -> NewReport:
    # Spread over four days and several hours; every fifth shares the millisecond of the one
    # before it, so keyset paging and resuming meet equal received times.
    received = BASE + (n // 25) * DAY + (n % 7) * HOUR + (n - n % 5) * 1000
    site = SITES[n % 3]
    kind = "crash" if n % 4 else "deprecation"
    return NewReport(
        received_at=received,
        generated_at=received - n,
        age=n,
        type=kind,
        url=f"https://{site}/page/{n}",
        origin=f"https://{site}",
        site=site,
        user_agent=f"UA/{n % 2}",
        browser="Chrome" if n % 2 else "Firefox",
        browser_major=str(100 + n % 3),
        os="Linux" if n % 3 else None,
        reason="oom" if kind == "crash" and n % 3 else None,
        raw=f'{{"type": "{kind}", "body": {{"n": {n}, "text": "caf\\u00e9 \\u2603"}}}}',
    )


def rejected(n: int) -> RejectedReport:
    return RejectedReport(
        BASE + n * 7 * HOUR, f"code_{n % 3}", "body.reason", f"bad {n}", "crash", '{"x": 1}', n == 3
    )


async def store_blob(store: BlobStore, content: bytes) -> str:
    writer = store.writer()
    writer.write(content)
    return (await store.commit(writer)).sha256


async def fill(side: Side) -> None:
    """Reports, quarantined reports and crashes (with dumps and attachments, several sharing
    one blob) through the protocol, as the service writes them."""
    store = side.store()
    await store.start()
    try:
        async with opened(side.database) as storage:
            for start in range(0, REPORTS, 30):
                batch = range(start, min(start + 30, REPORTS))
                quarantined = [rejected(n) for n in batch if n < QUARANTINED]
                await storage.submit_reports([report(n) for n in batch], quarantined)
            for n in range(CRASHES):
                # Crashes 0 and 1 share their dump: one blob, two rows.
                dump = await store_blob(store, b"MDMP" + bytes([n // 2 if n < 2 else n]) * 2000)
                note = await store_blob(store, f"log of crash {n}\n".encode() * 50)
                await storage.insert_crash(
                    NewCrash(
                        id=f"{n * 7919:032x}",
                        # Pairs share a millisecond (ids out of order with time for some).
                        received_at=BASE + (n // 2) * 5 * HOUR,
                        product="App",
                        version=f"1.{n % 3}",
                        guid=None,
                        platform="linux",
                        process_type="browser" if n % 2 else "renderer",
                        electron_version="30.0.0",
                        annotations={"prod": "App", "n": str(n)},
                        query={"q": "1"},
                        dump_sha256=dump,
                        dump_size=2004,
                        dump_path=f"blobs/{dump[:2]}/{dump}",
                        attachments=(
                            {
                                "name": "log",
                                "filename": "log.txt",
                                "sha256": note,
                                "size": 100,
                                "path": f"blobs/{note[:2]}/{note}",
                            },
                        ),
                        upload_bytes=3000,
                    )
                )
                if n % 3 == 0:
                    await storage.record_crash_facts(
                        f"{n * 7919:032x}",
                        {
                            "os": "Linux",
                            "cpu": "amd64",
                            "signature": f"crash_{n % 2}",
                            # Past 2**63: stored in two's complement, read back unsigned.
                            "crash_address": 0xFFFF_FFFF_FF60_0000 + n,
                            "exception_code": 0xC000_0005,
                        },
                    )
                elif n % 3 == 1:
                    await storage.record_crash_failure(f"{n * 7919:032x}", "not a minidump")
    finally:
        await store.close()


# --- what a reader of each side sees --------------------------------------------------------


async def pages(read: Callable[[Position | None], Awaitable[Any]]) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    after: Position | None = None
    while True:
        page = await read(after)
        items.extend(page.items)
        if page.next is None:
            return items
        after = page.next


async def view(side: Side) -> dict[str, Any]:
    """Everything the read API and the export show of one side, and its blobs by sha256."""
    seen: dict[str, Any] = {}
    store = side.store()
    async with opened(side.database, read_only=True) as storage:
        reports = await pages(lambda after: storage.reports_page(Filters(), 13, after))
        seen["reports"] = reports
        seen["raw"] = [await storage.get_report(r["id"]) for r in reports]
        # Sorted: the engines export in different orders (SQLite by id, PostgreSQL by time).
        exported = [r async for r in storage.iter_reports(page_size=17)]
        seen["export"] = sorted(exported, key=lambda r: int(r["id"]))
        window = Filters(since=BASE + DAY + 3 * HOUR, until=BASE + 3 * DAY)
        site = Filters(equal=(("site", "b.example"),))
        for by in (("type",), ("site", "browser"), ("type", "reason", "user_agent", "os")):
            for name, filters in (("all", Filters()), ("window", window), ("site", site)):
                found = await storage.groups("reports", by, filters, 100)
                seen[f"groups {','.join(by)} {name}"] = found.groups
        for bucket in ("hour", "day"):
            series = await storage.timeseries("reports", bucket, ("type",), Filters())
            seen[f"series {bucket}"] = series
        crashes = await pages(lambda after: storage.crash_page(Filters(), 5, after))
        seen["crashes"] = crashes
        # Issues are numbered afresh at the target (copy regroups there): compared by the
        # issue pages, not by number.
        seen["crash"] = [
            {k: v for k, v in (await storage.get_crash(c["id"]) or {}).items() if k != "issue_id"}
            for c in crashes
        ]
        seen["crash export"] = [c async for c in storage.iter_crashes(page_size=4)]
        found = await storage.groups(
            "crashes", ("product", "version", "signature", "parse_status"), Filters(), 100
        )
        seen["crash groups"] = found.groups
        seen["pending"] = await storage.pending_crashes(100)
        seen["quarantine"] = await pages(lambda after: storage.quarantine_page(Filters(), 4, after))
        seen["quarantine counts"] = await storage.quarantine_counts()
        blobs: dict[str, str] = {}
        for crash in seen["crash"]:
            shas = [crash["dump_sha256"], *(a["sha256"] for a in crash["attachments"])]
            for sha in shas:
                stream = await store.open(f"blobs/{sha[:2]}/{sha}")
                digest = hashlib.sha256()
                async for chunk in stream:
                    digest.update(chunk)
                blobs[sha] = digest.hexdigest()
        seen["blobs"] = blobs
        seen["counts"] = await storage.counts()
    await store.close()
    return seen


def assert_same(source: Side, target: Side) -> dict[str, Any]:
    expected, got = run(view(source)), run(view(target))
    assert len(expected["reports"]) == REPORTS
    assert len(expected["crashes"]) == CRASHES
    assert len(expected["quarantine"]) == QUARANTINED
    assert all(sha == digest for sha, digest in got["blobs"].items())
    assert len(got["blobs"]) == CRASHES * 2 - 1  # two crashes share one dump
    for name in expected:
        assert got[name] == expected[name], name
    counts = got["counts"]
    assert all(total == REPORTS for total in counts.rollup_totals)
    # The target's counters equal a recount of its rows, not only the source's counters.
    recount: dict[tuple[str, str | None], int] = {}
    for row in got["export"]:
        key = (row["type"], row["reason"])
        recount[key] = recount.get(key, 0) + 1
    groups = got["groups type,reason,user_agent,os all"]
    summed: dict[tuple[str, str | None], int] = {}
    for group in groups:
        key = (group["type"], group["reason"])
        summed[key] = summed.get(key, 0) + group["count"]
    assert summed == recount
    return got


def copy(source: Side, target: Side, *extra: str) -> tuple[int, str]:
    out = io.StringIO()
    argv = ["copy", "--from", source.database, "--to", target.database, "--quiet", *extra]
    if source.blobs:
        argv += ["--from-blob-store", source.blobs]
    if target.blobs:
        argv += ["--to-blob-store", target.blobs]
    code = main(argv, out)
    return code, out.getvalue()


# --- the tests ------------------------------------------------------------------------------


@pytest.fixture
def sqlite_to_postgres(tmp_path: Path, postgres_url: str) -> tuple[Side, Side]:
    return sqlite_side(tmp_path / "source.sqlite3"), postgres_side(postgres_url, tmp_path / "pg")


@pytest.fixture
def postgres_to_sqlite(tmp_path: Path, postgres_url: str) -> tuple[Side, Side]:
    return postgres_side(postgres_url, tmp_path / "pg"), sqlite_side(tmp_path / "target.sqlite3")


@pytest.fixture(params=["sqlite-to-postgresql", "postgresql-to-sqlite"])
def sides(request: pytest.FixtureRequest) -> tuple[Side, Side]:
    name = "sqlite_to_postgres" if request.param.startswith("sqlite") else "postgres_to_sqlite"
    pair: tuple[Side, Side] = request.getfixturevalue(name)
    return pair


def test_copy_brings_everything_across_identical(
    sides: tuple[Side, Side], capsys: pytest.CaptureFixture[str]
) -> None:
    source, target = sides
    run(fill(source))
    code, text = copy(source, target)
    assert code == 0, capsys.readouterr().err
    assert f"copied {REPORTS} report(s), {CRASHES} crash(es), {QUARANTINED} quarantined" in text
    assert f"and {CRASHES * 2 - 1} blob(s)" in text
    assert "differs" not in text
    assert_same(source, target)
    # A second run finds everything there: nothing is added, and it still verifies.
    code, text = copy(source, target)
    assert code == 0
    assert "copied 0 report(s), 0 crash(es), 0 quarantined report(s) and 0 blob(s)" in text
    assert_same(source, target)


def test_the_target_takes_new_reports_after_a_copy(sides: tuple[Side, Side]) -> None:
    """After rows came in with explicit ids, the target's own inserts get fresh ones (on
    PostgreSQL the id sequences were moved past the copied ids)."""
    source, target = sides
    run(fill(source))
    assert copy(source, target)[0] == 0

    async def insert_more() -> tuple[list[int], list[int], int]:
        async with opened(target.database) as storage:
            copied = [r["id"] async for r in storage.iter_reports()]
            quarantined = await pages(lambda a: storage.quarantine_page(Filters(), 100, a))
            await storage.submit_reports(
                [report(n) for n in range(1000, 1005)], [rejected(50), rejected(51)]
            )
            page = await storage.reports_page(Filters(), REPORTS + 10)
            again = await pages(lambda a: storage.quarantine_page(Filters(), 100, a))
            new_ids = sorted(set(r["id"] for r in page.items) - set(copied))
            new_quarantine = sorted({q["id"] for q in again} - {q["id"] for q in quarantined})
            counts = await storage.counts()
            assert all(total == REPORTS + 5 for total in counts.rollup_totals)
            return copied, new_ids + new_quarantine, max(q["id"] for q in quarantined)

    copied, new_ids, last_quarantined = run(insert_more())
    assert len(new_ids) == 7
    assert min(new_ids[:5]) > max(copied)
    assert min(new_ids[5:]) > last_quarantined


KILLER = textwrap.dedent(
    """
    import asyncio, os, signal, sys
    from reporting_endpoint.copying import CopyPlan, copy_store

    source, target, source_blobs, target_blobs, stage, at = sys.argv[1:7]

    def checkpoint(what, batch):
        # SIGKILL: no cleanup, no rollback, no finally: as a power cut or the OOM killer.
        if what == stage and batch == int(at):
            os.kill(os.getpid(), signal.SIGKILL)

    plan = CopyPlan.between(
        source, target, source_blobs=source_blobs, target_blobs=target_blobs, batch_size=7
    )
    asyncio.run(copy_store(plan, checkpoint=checkpoint))
    """
)


def killed_copy(source: Side, target: Side, stage: str, at: int) -> None:
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    arguments = [source.database, target.database, source.blobs, target.blobs, stage, str(at)]
    done = subprocess.run(
        [sys.executable, "-c", KILLER, *arguments],
        env=environment,
        capture_output=True,
        timeout=120,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()


def test_a_killed_copy_finishes_on_a_rerun_without_duplicates(sides: tuple[Side, Side]) -> None:
    source, target = sides
    run(fill(source))
    # Killed in the middle of the reports (two batches of seven committed)...
    killed_copy(source, target, "reports", 2)
    partial = run(view(target))["counts"]
    assert partial.reports.rows == 14 and partial.crashes.rows == 0
    # ...then, resumed, in the crashes: after a batch's blobs were stored, before its rows...
    killed_copy(source, target, "blobs", 2)
    partial = run(view(target))["counts"]
    assert partial.reports.rows == REPORTS and partial.crashes.rows == 7
    # ...then after the second crash batch of the next run committed. That run started at
    # the millisecond of the 7th crash, which it shares with the 8th: its first batch re-read
    # the 7th (present, skipped) and took six new rows, its second seven more.
    killed_copy(source, target, "crashes", 2)
    partial = run(view(target))["counts"]
    assert partial.crashes.rows == 7 + 6 + 7 and partial.quarantine.rows == 0
    assert all(total == REPORTS for total in partial.rollup_totals)
    # A rerun of the command completes it: every row once, counters exact, blobs all there.
    code, text = copy(source, target)
    assert code == 0
    assert f"copied 0 report(s), {CRASHES - 20} crash(es), 11 quarantined report(s)" in text
    assert_same(source, target)


def test_a_difference_fails_the_verification(
    sqlite_to_postgres: tuple[Side, Side], capsys: pytest.CaptureFixture[str]
) -> None:
    source, target = sqlite_to_postgres
    run(fill(source))
    assert copy(source, target)[0] == 0
    capsys.readouterr()

    async def one_more_at_the_target() -> None:
        async with opened(target.database) as storage:
            await storage.submit_reports([report(5000)])

    run(one_more_at_the_target())
    code, text = copy(source, target)
    assert code == 1
    error = capsys.readouterr().err
    assert "verification failed" in error
    assert f"reports: {REPORTS} in the source, {REPORTS + 1} in the target" in error
    assert "reports" in text and "<- differs" in text


def test_a_blob_lost_at_the_target_fails_until_a_rescan_copies_it(
    postgres_to_sqlite: tuple[Side, Side], capsys: pytest.CaptureFixture[str]
) -> None:
    source, target = postgres_to_sqlite
    run(fill(source))
    assert copy(source, target)[0] == 0
    first = run(view(source))["crash"][-1]  # the oldest crash: not re-read by a resume
    lost = target.data_dir / "blobs" / first["dump_sha256"][:2] / first["dump_sha256"]
    lost.unlink()
    capsys.readouterr()
    assert copy(source, target)[0] == 1
    assert "blobs: 1 of the source's are not in the target store" in capsys.readouterr().err
    code, text = copy(source, target, "--rescan")
    assert code == 0
    assert "0 crash(es), 0 quarantined report(s) and 1 blob(s)" in text
    assert lost.is_file()


def test_copy_refuses_what_it_cannot_do(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    file = tmp_path / "a.sqlite3"
    code = main(["copy", "--from", str(file), "--to", f"sqlite://{file}", "--quiet"])
    assert code == 2
    assert "the same database" in capsys.readouterr().err
    missing = tmp_path / "missing.sqlite3"
    code = main(["copy", "--from", str(missing), "--to", str(tmp_path / "b.sqlite3"), "--quiet"])
    assert code == 2
    assert "cannot open the source database" in capsys.readouterr().err
    # Refused before the target was opened: nothing was created there.
    assert not (tmp_path / "b.sqlite3").exists()


def test_progress_is_shown_on_stderr(tmp_path: Path) -> None:
    source = sqlite_side(tmp_path / "source.sqlite3")
    run(fill(source))
    target = str(tmp_path / "target.sqlite3")
    command = ["copy", "--from", source.database, "--to", target, "--batch-size", "10"]
    done = subprocess.run(
        [sys.executable, "-m", "reporting_endpoint", *command],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    for name in ("reports", "crashes", "quarantine"):
        assert name in done.stderr
    assert "100%" in done.stderr and "verifying" in done.stderr
    assert "copied 90 report(s)" in done.stdout


def test_postgresql_to_postgresql_on_one_blob_store(
    tmp_path: Path, postgres: Any, postgres_url: str
) -> None:
    """The same engine on both sides; one blob store for both: the rows move, no blob does,
    and the check still finds every blob."""
    source = postgres_side(postgres_url, tmp_path / "blobs")
    other = postgres.create_database()
    try:
        target = postgres_side(other, tmp_path / "blobs")
        run(fill(source))
        code, text = copy(source, target)
        assert code == 0
        assert "quarantined report(s) and 0 blob(s)" in text
        assert "blobs                 45          45" in text
        assert_same(source, target)
    finally:
        postgres.drop_database(other)


def test_the_protocol_moves_whole_rows(database_url: str) -> None:
    """``export_batch``, ``import_batch`` and ``counts`` on each backend: whole rows in
    (received_at, id) order, resumable from a position or a time, imported once only."""

    async def scenario() -> None:
        async with opened(database_url) as storage:
            await storage.submit_reports([report(n) for n in range(12)], [rejected(1)])
            every = await storage.export_batch("reports", 100)
            assert len(every) == 12 and len(every[0]) == 15
            keys = [(row[1], row[0]) for row in every]
            assert keys == sorted(keys)
            first = await storage.export_batch("reports", 5)
            rest = await storage.export_batch("reports", 100, Position(first[-1][1], first[-1][0]))
            assert first + rest == every
            since = await storage.export_batch("reports", 100, since=every[6][1])
            assert since == tuple(row for row in every if row[1] >= every[6][1])
            counts = await storage.counts()
            assert counts.reports.rows == 12 and counts.quarantine.rows == 1
            assert counts.reports.last_received_at == every[-1][1]
            assert counts.rollup_totals == (12, 12, 12, 12)
            # Importing rows that are there already adds nothing and keeps the counters.
            assert await storage.import_batch("reports", every) == 0
            quarantined = await storage.export_batch("quarantine", 10)
            assert await storage.import_batch("quarantine", quarantined) == 0
            assert await storage.counts() == counts
            # Rows of the wrong shape are refused before anything is written.
            with pytest.raises(ValueError):
                await storage.import_batch("reports", [every[0][:5]])
            with pytest.raises(ValueError):
                await storage.import_batch("nothing", every)  # type: ignore[arg-type]

            # Rows that went missing come back with their ids, counted once each.
            for row in every[2:5]:
                assert await storage.delete_report(int(row[0]))
            assert await storage.import_batch("reports", every) == 3
            assert await storage.counts() == counts
            assert await storage.export_batch("reports", 100) == every

    run(scenario())


@pytest.fixture(params=["sqlite-to-sqlite", "sqlite-to-postgresql", "postgresql-to-sqlite"])
def issue_sides(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Side, Side]:
    if request.param == "sqlite-to-sqlite":
        return sqlite_side(tmp_path / "s.sqlite3"), sqlite_side(tmp_path / "t.sqlite3")
    name = "sqlite_to_postgres" if request.param.startswith("sqlite") else "postgres_to_sqlite"
    pair: tuple[Side, Side] = request.getfixturevalue(name)
    return pair


def test_copied_events_belong_to_issues_at_the_target(issue_sides: tuple[Side, Side]) -> None:
    """Rows travel without issue columns but with each event's release; the target groups
    them like the source did: the same issues, counts, first and last release and release
    breakdown, for reports (release from the page URL) and a native crash (``_version``)."""
    from starlette.testclient import TestClient

    from reporting_endpoint.app import create_app
    from tests.conftest import captured_reports, crash_report
    from tests.crashpad_client import MINIDUMPS, content_type, dump_upload

    source, target = issue_sides

    def service(side: Side) -> TestClient:
        settings = Settings(
            database=side.database, read_token="r", release_source="query:v",
            **({"blob_store": side.blobs} if side.blobs else {}),
        )  # fmt: skip
        return TestClient(create_app(settings))

    auth = {"authorization": "Bearer r"}
    page = "https://shop.example.com/app/checkout"
    batch = captured_reports("crash-pagecrash") + captured_reports("deprecation")
    # Distinct ages: events generated apart, not retries of each other.
    batch += [crash_report(url=f"{page}?v=1.1", age=13 + 2000 * n) for n in range(2)]
    batch += [crash_report(url=f"{page}?v=1.3", age=10_013 + 2000 * n) for n in range(3)]
    fields = {"prod": "Electron", "ver": "33.2.1", "_productName": "ExampleApp",
              "_version": "1.2.3", "platform": "win32", "process_type": "browser"}  # fmt: skip
    dump = dump_upload(
        (MINIDUMPS / "win-x64_electron_node-minidump_windows.dmp").read_bytes(), fields
    )

    def snapshot(client: TestClient) -> dict[str, Any]:
        listed = client.get("/api/issues", headers=auth, params={"since": "7d"}).json()
        issues = {}
        for item in listed["issues"]:
            detail = client.get(f"/api/issues/{item['id']}", headers=auth).json()
            releases = sorted(
                (entry["value"], entry["count"])
                for entry in (detail.get("breakdowns") or {}).get("release", [])
            )
            issues[item["fingerprint"]] = (
                item["title"], item["count"], item["first_release"], item["last_release"],
                detail["first_release"], detail["last_release"], releases,
            )  # fmt: skip
        return issues

    with service(source) as client:
        posted = client.post(
            "/reports", content=json.dumps(batch),
            headers={"content-type": "application/reports+json"},
        )  # fmt: skip
        assert posted.json()["accepted"] == len(batch)
        uploaded = client.post("/crashpad", content=dump, headers={"content-type": content_type()})
        assert uploaded.status_code == 200
        client.portal.call(client.app.state.analyzer.idle)  # type: ignore[attr-defined,union-attr]
        expected = snapshot(client)
    code, output = copy(source, target)
    assert code == 0, output
    with service(target) as client:
        got = snapshot(client)

    summary = list(expected.values())
    assert summary, "the source has issues to compare"
    released = {(s[2], s[3], tuple(s[6])) for s in summary if s[6]}
    # Reports with releases 1.1 and 1.3 in one issue; the native crash in release 1.2.3.
    assert ("1.1", "1.3", (("1.1", 2), ("1.3", 3))) in released, summary
    assert ("1.2.3", "1.2.3", (("1.2.3", 1),)) in released, summary
    assert got == expected
