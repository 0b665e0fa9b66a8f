"""Another process holding the database's write lock delays commits; it never stops serving.

The lock is held from this test process (a separate process from the server, like `prune` run
beside a running service) on the real file of a real `reporting-endpoint serve`.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx2
import pytest

from reporting_endpoint.storage import SQLiteStorage
from reporting_endpoint.storage.base import StorageBusy
from tests.conftest import crash_report
from tests.crashpad_client import MINIDUMPS, content_type, dump_upload
from tests.servers import RunningServer, running_service
from tests.test_storage import report

# A health check slower than this means something blocked the event loop.
PROMPT = 0.5
DUMP = (MINIDUMPS / "linux-x64_breakpad_linux_null_dereference.dmp").read_bytes()


@contextmanager
def write_lock(db: Path) -> Iterator[None]:
    """Hold the write lock of ``db`` (an open write transaction) until the block ends."""
    connection = sqlite3.connect(db, isolation_level=None)
    try:
        connection.execute("BEGIN IMMEDIATE")
        yield
        connection.execute("COMMIT")
    finally:
        connection.close()


def post_report(server: RunningServer, marker: str) -> httpx2.Response:
    with httpx2.Client(timeout=60) as client:
        return client.post(
            server.url + "/reports",
            content=json.dumps([crash_report(url=marker)]),
            headers={"content-type": "application/reports+json"},
        )


def post_dump(server: RunningServer) -> httpx2.Response:
    with httpx2.Client(timeout=60) as client:
        return client.post(
            server.url + "/crashpad",
            content=dump_upload(DUMP, {"prod": "LockTest", "ver": "1.0"}),
            headers={"content-type": content_type()},
        )


def health_latencies(server: RunningServer, count: int) -> list[tuple[int, float]]:
    """(status, seconds) of ``count`` health checks, 0.1 s apart."""
    results = []
    with httpx2.Client(timeout=30) as client:
        for _ in range(count):
            started = time.monotonic()
            answer = client.get(server.url + "/healthz")
            results.append((answer.status_code, time.monotonic() - started))
            time.sleep(0.1)
    return results


def stored(db: Path, sql: str) -> list[tuple[object, ...]]:
    connection = sqlite3.connect(db)
    try:
        return connection.execute(sql).fetchall()
    finally:
        connection.close()


def test_a_held_write_lock_delays_commits_but_the_server_keeps_answering(
    tmp_path: Path,
) -> None:
    db = tmp_path / "reports.sqlite3"
    answers: dict[str, httpx2.Response] = {}

    def send(name: str, post: object) -> None:
        answers[name] = post()  # type: ignore[operator]

    with running_service(db) as server:
        with write_lock(db):
            senders = [
                threading.Thread(
                    target=send,
                    args=(f"r{n}", lambda n=n: post_report(server, f"https://lock.example/{n}")),
                )
                for n in range(3)
            ]
            senders.append(threading.Thread(target=send, args=("dump", lambda: post_dump(server))))
            for sender in senders:
                sender.start()
            time.sleep(0.3)  # every upload is waiting for the lock by now
            health = health_latencies(server, 10)
            # Still waiting: the lock really held them back (no answer before a commit).
            assert all(sender.is_alive() for sender in senders), answers
        for sender in senders:
            sender.join(timeout=30)
    assert all(status == 200 for status, _ in health), health
    assert max(seconds for _, seconds in health) < PROMPT, health
    assert {name: answer.status_code for name, answer in answers.items()} == {
        "r0": 200, "r1": 200, "r2": 200, "dump": 200,
    }  # fmt: skip
    urls = {str(url) for (url,) in stored(db, "SELECT url FROM reports")}
    assert urls == {f"https://lock.example/{n}" for n in range(3)}
    assert stored(db, "SELECT id FROM crashes") == [(answers["dump"].text,)]


def test_a_lock_held_past_the_timeout_answers_503_with_retry_after(tmp_path: Path) -> None:
    db = tmp_path / "reports.sqlite3"
    env = {"REPORTING_ENDPOINT_WRITE_LOCK_TIMEOUT": "0.5"}
    with running_service(db, env=env) as server:
        with write_lock(db):
            started = time.monotonic()
            report = post_report(server, "https://lock.example/late")
            dump = post_dump(server)
            waited = time.monotonic() - started
            health = health_latencies(server, 3)
        after = post_report(server, "https://lock.example/after")
    assert report.status_code == 503
    assert report.headers["retry-after"]
    assert report.json()["error"]["code"] == "storage_busy"
    assert dump.status_code == 503
    assert dump.headers["retry-after"]
    assert dump.text == "Discarded=storage_busy"
    # Each waited for its own timeout once: no retry one submission at a time.
    assert waited < 2 * 0.5 + 1.5, waited
    assert all(status == 200 and seconds < PROMPT for status, seconds in health), health
    assert after.status_code == 200
    urls = [str(url) for (url,) in stored(db, "SELECT url FROM reports")]
    assert urls == ["https://lock.example/after"]


def test_a_group_that_times_out_fails_once_and_the_loop_never_stalls(tmp_path: Path) -> None:
    db = tmp_path / "r.sqlite3"
    timeout = 0.3

    async def scenario() -> tuple[list[BaseException | None], float, float]:
        storage = SQLiteStorage(db, write_lock_timeout=timeout)
        await storage.start()
        gaps: list[float] = []

        async def ticker() -> None:
            last = time.monotonic()
            for _ in range(1000):  # bounded; cancelled long before
                await asyncio.sleep(0.01)
                now = time.monotonic()
                gaps.append(now - last)
                last = now

        ticking = asyncio.create_task(ticker())
        with write_lock(db):
            started = time.monotonic()
            results = await asyncio.gather(
                *(storage.submit_reports([report(n)]) for n in range(5)), return_exceptions=True
            )
            waited = time.monotonic() - started
            # The job path (crash rows, pruning) gives up the same way.
            with pytest.raises(StorageBusy):
                await storage.run_job(lambda connection: None)
        ticking.cancel()
        await storage.submit_reports([report(99)])  # the lock is gone: writes go through again
        await storage.stop()
        return list(results), waited, max(gaps)

    results, waited, longest_gap = asyncio.run(scenario())
    assert all(isinstance(result, StorageBusy) for result in results), results
    assert all(result.code == "storage_busy" for result in results if result)  # type: ignore[attr-defined]
    # One wait for the whole group, not one more per submission (5 x 0.3 s).
    assert waited < 2 * timeout + 0.5, waited
    # A lock wait on the loop would stall it for the whole wait; a busy shared machine, briefly.
    assert longest_gap < 0.25, longest_gap
    assert stored(db, "SELECT url FROM reports") == [("https://a.example/99",)]
