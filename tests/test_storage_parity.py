"""The storage protocol's behaviour, the same on every backend.

Everything here goes through ``open_storage`` and the ``Storage`` methods only (no SQL, no
driver), so a backend joins by adding itself to ``STORAGE_BACKENDS`` in conftest.py.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from reporting_endpoint.records import NewCrash, NewReport, RejectedReport
from reporting_endpoint.settings import Settings
from reporting_endpoint.storage import Storage, open_storage
from reporting_endpoint.storage.base import Blob
from reporting_endpoint.storage.filters import Filters, Position

T = TypeVar("T")
HOUR = 3_600_000
BASE = 1_700_000_000_000 // HOUR * HOUR  # on the hour
_ids = itertools.count()


def report(
    received_at: int = BASE, *, kind: str = "crash", site: str = "a.example", **extra: Any
) -> NewReport:
    values: dict[str, Any] = {
        "received_at": received_at,
        "generated_at": received_at - 5,
        "age": 5,
        "type": kind,
        "url": f"https://{site}/page",
        "origin": f"https://{site}",
        "site": site,
        "user_agent": "UA/1.0",
        "browser": "Chrome",
        "browser_major": "140",
        "os": "Linux",
        "reason": "oom" if kind == "crash" else None,
        "raw": f'{{"type": "{kind}", "body": {{"n": {next(_ids)}}}}}',
    }
    values.update(extra)
    return NewReport(**values)


def rejected(received_at: int = BASE, code: str = "invalid_value") -> RejectedReport:
    return RejectedReport(received_at, code, "body.reason", "bad", "crash", '{"x": 1}', False)


def crash(n: int, received_at: int = BASE, sha: str | None = None, **extra: Any) -> NewCrash:
    digest = sha or f"{n:064x}"
    values: dict[str, Any] = {
        "id": f"{n:032x}",
        "received_at": received_at,
        "product": "App",
        "version": "1.0",
        "guid": None,
        "platform": "linux",
        "process_type": "browser",
        "electron_version": None,
        "annotations": {"k": "v"},
        "query": {},
        "dump_sha256": digest,
        "dump_size": 10,
        "dump_path": f"blobs/{digest[:2]}/{digest}",
        "attachments": (),
        "upload_bytes": 20,
    }
    values.update(extra)
    return NewCrash(**values)


def run(database_url: str, scenario: Callable[[Storage], Awaitable[T]]) -> T:
    async def main() -> T:
        storage = open_storage(database_url, Settings())
        await storage.start()
        try:
            return await scenario(storage)
        finally:
            await storage.stop()

    return asyncio.run(main())


async def collect(items: AsyncIterator[dict[str, Any]]) -> list[dict[str, Any]]:
    return [item async for item in items]


def test_reports_are_stored_and_read_back(database_url: str) -> None:
    async def scenario(storage: Storage) -> None:
        assert storage.health().alive
        await storage.submit_reports([report(BASE + 1), report(BASE + 2, kind="deprecation")])
        page = await storage.reports_page(Filters(), 10)
        assert [r["type"] for r in page.items] == ["deprecation", "crash"]
        assert page.next is None
        first = page.items[1]
        assert first["received_at"] == "2023-11-14T22:00:00.001Z"
        assert first["site"] == "a.example" and first["reason"] == "oom"
        assert "raw" not in first
        one = await storage.get_report(first["id"])
        assert one is not None and one["raw"]["type"] == "crash"
        assert await storage.get_report(10**9) is None

    run(database_url, scenario)


def test_groups_count_and_say_when_there_are_more(database_url: str) -> None:
    async def scenario(storage: Storage) -> None:
        await storage.submit_reports(
            [report(BASE + n, site="a.example") for n in range(3)]
            + [report(BASE + n, site="b.example") for n in range(2)]
            + [report(BASE + HOUR, site="c.example", kind="deprecation")]
        )
        found = await storage.groups("reports", ("site",), Filters(), 2)
        assert [(g["site"], g["count"]) for g in found.groups] == [
            ("a.example", 3),
            ("b.example", 2),
        ]
        assert found.more
        assert found.groups[0]["first_seen"] == "2023-11-14T22:00:00.000Z"
        assert found.groups[0]["last_seen"] == "2023-11-14T22:00:00.002Z"
        crashes_only = await storage.groups(
            "reports", ("type", "reason"), Filters((("type", "crash"),)), 10
        )
        assert [(g["type"], g["reason"], g["count"]) for g in crashes_only.groups] == [
            ("crash", "oom", 5)
        ]
        assert not crashes_only.more
        window = Filters(since=BASE + HOUR, until=BASE + 2 * HOUR)
        later = await storage.groups("reports", ("site",), window, 10)
        assert [(g["site"], g["count"]) for g in later.groups] == [("c.example", 1)]

    run(database_url, scenario)


def test_time_series_counts_per_bucket(database_url: str) -> None:
    async def scenario(storage: Storage) -> None:
        await storage.submit_reports(
            [report(BASE), report(BASE + 1), report(BASE + HOUR, kind="deprecation")]
        )
        hourly = await storage.timeseries("reports", "hour", ("type",), Filters())
        base_hour = BASE // HOUR
        assert [(c.bucket, c.key, c.count) for c in hourly] == [
            (base_hour, ("crash",), 2),
            (base_hour + 1, ("deprecation",), 1),
        ]
        daily = await storage.timeseries("reports", "day", (), Filters())
        assert [(c.bucket, c.key, c.count) for c in daily] == [(base_hour // 24 * 24, (), 3)]
        await storage.insert_crash(crash(1, BASE + 5))
        crashes = await storage.timeseries("crashes", "hour", ("product",), Filters())
        assert [(c.bucket, c.key, c.count) for c in crashes] == [(base_hour, ("App",), 1)]

    run(database_url, scenario)


def test_pages_have_no_gaps_or_repeats_under_concurrent_inserts(database_url: str) -> None:
    async def scenario(storage: Storage) -> None:
        await storage.submit_reports([report(BASE + n // 2) for n in range(9)])
        seen: list[int] = []
        after: Position | None = None
        newer = BASE + 1000
        while True:
            page = await storage.reports_page(Filters(), 2, after)
            seen.extend(r["id"] for r in page.items)
            # Reports arriving meanwhile are newer than any cursor already given out.
            await storage.submit_reports([report(newer)])
            newer += 1
            if page.next is None:
                break
            after = page.next
        first_nine = [r["id"] async for r in storage.iter_reports(page_size=4)][:9]
        assert sorted(seen) == sorted(first_nine)
        assert len(set(seen)) == 9

    run(database_url, scenario)


def test_filters_and_export_in_keyset_pages(database_url: str) -> None:
    async def scenario(storage: Storage) -> None:
        await storage.submit_reports(
            [report(BASE + n, site="a.example" if n % 2 else "b.example") for n in range(7)]
        )
        only_a = await collect(storage.iter_reports(Filters((("site", "a.example"),)), page_size=2))
        assert [r["received_at"][-5:] for r in only_a] == [".001Z", ".003Z", ".005Z"]
        window = Filters(since=BASE + 2, until=BASE + 4)
        assert len(await collect(storage.iter_reports(window))) == 2

    run(database_url, scenario)


def test_quarantine_is_committed_with_the_reports(database_url: str) -> None:
    async def scenario(storage: Storage) -> None:
        await storage.submit_reports([report()], [rejected(BASE + 1), rejected(BASE + 2)])
        await storage.submit_reports([], [rejected(BASE + 3, "too_deep")])
        assert await storage.quarantine_counts() == (("invalid_value", 2), ("too_deep", 1))
        page = await storage.quarantine_page(Filters(), 2)
        assert [q["code"] for q in page.items] == ["too_deep", "invalid_value"]
        assert page.next is not None
        rest = await storage.quarantine_page(Filters(), 2, page.next)
        assert len(rest.items) == 1 and rest.next is None
        one = await storage.get_quarantined(page.items[0]["id"])
        assert one == page.items[0]
        assert await storage.get_quarantined(10**9) is None
        assert len((await storage.reports_page(Filters(), 10)).items) == 1

    run(database_url, scenario)


def test_crashes_are_stored_parsed_and_paged(database_url: str) -> None:
    async def scenario(storage: Storage) -> None:
        for n in range(3):
            await storage.insert_crash(crash(n, BASE + n))
        pending = await storage.pending_crashes(10)
        assert [p.id for p in pending] == [f"{n:032x}" for n in range(3)]
        facts = {"os": "Linux", "signature": "boom", "crash_address": 2**64 - 1}
        await storage.record_crash_facts(f"{0:032x}", facts)
        await storage.record_crash_failure(f"{1:032x}", "not a dump")
        assert [p.id for p in await storage.pending_crashes(10)] == [f"{2:032x}"]
        parsed = await storage.get_crash(f"{0:032x}")
        assert parsed is not None
        assert parsed["parse_status"] == "parsed" and parsed["signature"] == "boom"
        assert parsed["crash_address_hex"] == "0xffffffffffffffff"
        assert "dump_path" not in parsed
        failed = await storage.get_crash(f"{1:032x}")
        assert failed is not None and failed["parse_status"] == "failed"
        assert failed["signature"] == "unparseable dump"
        assert await storage.crash_dump_path(f"{2:032x}") == f"blobs/00/{2:064x}"
        assert await storage.get_crash("f" * 32) is None
        page = await storage.crash_page(Filters(), 2)
        assert [c["id"] for c in page.items] == [f"{2:032x}", f"{1:032x}"]
        rest = await storage.crash_page(Filters(), 2, page.next)
        assert [c["id"] for c in rest.items] == [f"{0:032x}"] and rest.next is None
        groups = await storage.groups("crashes", ("product", "parse_status"), Filters(), 10)
        assert sorted((g["parse_status"], g["count"]) for g in groups.groups) == [
            ("failed", 1),
            ("parsed", 1),
            ("pending", 1),
        ]
        exported = await collect(storage.iter_crashes(page_size=2))
        assert [c["id"] for c in exported] == [f"{n:032x}" for n in range(3)]

    run(database_url, scenario)


def test_deleting_a_crash_frees_only_blobs_nothing_else_uses(database_url: str) -> None:
    shared = "ab" * 32

    async def scenario(storage: Storage) -> None:
        log = {"name": "log", "filename": "a.log", "sha256": "cd" * 32, "size": 1,
               "path": f"blobs/cd/{'cd' * 32}"}  # fmt: skip
        await storage.insert_crash(crash(1, sha=shared, attachments=(log,)))
        await storage.insert_crash(crash(2, sha=shared))
        assert await storage.referenced_blobs() == frozenset({shared, "cd" * 32})
        first = await storage.delete_crash(f"{1:032x}")
        assert first.crashes == 1
        # The dump is still used by crash 2; the attachment is free.
        assert first.blobs == (Blob("cd" * 32, f"blobs/cd/{'cd' * 32}"),)
        second = await storage.delete_crash(f"{2:032x}")
        assert second.blobs == (Blob(shared, f"blobs/ab/{shared}"),)
        assert (await storage.delete_crash(f"{2:032x}")).crashes == 0
        # A new upload of the same content takes the blob again.
        await storage.insert_crash(crash(3, sha=shared))
        assert await storage.unreferenced_blobs(second.blobs) == ()
        assert await storage.referenced_blobs() == frozenset({shared})

    run(database_url, scenario)


def test_deleting_a_report_keeps_the_counters_exact(database_url: str) -> None:
    async def scenario(storage: Storage) -> None:
        await storage.submit_reports([report(BASE + n) for n in range(3)])
        page = await storage.reports_page(Filters(), 10)
        newest = page.items[0]["id"]
        assert await storage.delete_report(newest)
        assert not await storage.delete_report(newest)
        found = await storage.groups("reports", ("site",), Filters(), 10)
        assert [(g["count"], g["last_seen"]) for g in found.groups] == [
            (2, "2023-11-14T22:00:00.001Z")
        ]
        series = await storage.timeseries("reports", "hour", (), Filters())
        assert [c.count for c in series] == [2]

    run(database_url, scenario)


def test_prune_keeps_counters_exact_and_answers_free_blobs(database_url: str) -> None:
    async def scenario(storage: Storage) -> None:
        await storage.submit_reports(
            [report(BASE - 2 * HOUR), report(BASE - 1), report(BASE + 1), report(BASE + 2)]
        )
        await storage.insert_crash(crash(1, BASE - 1))
        await storage.insert_crash(crash(2, BASE + 1))
        reports_only = await storage.prune(BASE - HOUR, crashes=False)
        assert (reports_only.reports, reports_only.crashes) == (1, 0)
        gone = await storage.prune(BASE)
        assert (gone.reports, gone.crashes) == (1, 1)
        assert gone.blobs == (Blob(f"{1:064x}", f"blobs/00/{1:064x}"),)
        found = await storage.groups("reports", ("type",), Filters(), 10)
        assert [(g["count"], g["first_seen"]) for g in found.groups] == [
            (2, "2023-11-14T22:00:00.001Z")
        ]
        window = await storage.groups("reports", ("type",), Filters(since=BASE - HOUR), 10)
        assert [g["count"] for g in window.groups] == [2]
        assert [c["id"] for c in (await storage.crash_page(Filters(), 10)).items] == [f"{2:032x}"]

    run(database_url, scenario)


def test_a_concurrent_burst_is_committed_in_full(database_url: str) -> None:
    async def scenario(storage: Storage) -> None:
        await asyncio.gather(*(storage.submit_reports([report(BASE + n)]) for n in range(200)))
        assert len(await collect(storage.iter_reports())) == 200
        found = await storage.groups("reports", ("type",), Filters(), 10)
        assert found.groups[0]["count"] == 200

    run(database_url, scenario)


def test_read_only_sqlite_storage_refuses_what_is_not_ours(tmp_path: Path) -> None:
    """SQLite only (a server database has no path to get wrong): nothing is created."""
    other = tmp_path / "notes.txt"
    other.write_text("not a database\n" * 50)
    storage = open_storage(str(other), Settings(), read_only=True)
    with pytest.raises(ValueError, match="is not a reporting-endpoint database"):
        asyncio.run(storage.start())
    with pytest.raises(FileNotFoundError):
        asyncio.run(open_storage(str(tmp_path / "none"), Settings(), read_only=True).start())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
