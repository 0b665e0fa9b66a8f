"""A crashed writer task fails its waiters at once, refuses new work with 503, and comes back.

The writer is made to crash for real: a method its loop calls raises once (or always).
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
import uvicorn

from reporting_endpoint.app import create_app
from reporting_endpoint.settings import Settings
from reporting_endpoint.storage import SQLiteStorage
from reporting_endpoint.storage.base import WriterDown
from reporting_endpoint.storage.sqlite import MAX_WRITER_RESTARTS
from tests.conftest import crash_report
from tests.servers import free_port
from tests.test_storage import report


def crash_take_group(storage: SQLiteStorage, monkeypatch: pytest.MonkeyPatch, times: int) -> None:
    """The writer's next ``times`` groups crash the writer task itself (not one write)."""
    original = storage._take_group
    left = [times]

    def take_group() -> object:
        if left[0] > 0:
            left[0] -= 1
            raise RuntimeError("a bug in the writer loop")
        return original()

    monkeypatch.setattr(storage, "_take_group", take_group)


def test_waiting_submits_fail_fast_and_the_writer_restarts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "r.sqlite3"

    async def scenario() -> None:
        storage = SQLiteStorage(db)
        storage.restart_backoff = (0.5, 0.5)
        await storage.start()
        crash_take_group(storage, monkeypatch, times=1)
        waiting = [asyncio.create_task(storage.submit_reports([report(n)])) for n in range(5)]
        results = await asyncio.wait_for(
            asyncio.gather(*waiting, return_exceptions=True), timeout=2
        )
        assert all(isinstance(result, WriterDown) for result in results), results
        # Down: refused at once, and said so.
        assert not storage.health().alive
        with pytest.raises(WriterDown):
            await asyncio.wait_for(storage.submit_reports([report(10)]), timeout=1)
        with pytest.raises(WriterDown):
            await asyncio.wait_for(storage.run_job(lambda c: None), timeout=1)
        for _ in range(50):  # bounded: 5 s
            if storage.health().alive:
                break
            await asyncio.sleep(0.1)
        assert storage.health().alive
        await asyncio.wait_for(storage.submit_reports([report(20)]), timeout=5)
        await storage.stop()

    asyncio.run(scenario())
    urls = [url for (url,) in sqlite3.connect(db).execute("SELECT url FROM reports")]
    assert urls == ["https://a.example/20"]


def test_a_writer_that_keeps_crashing_stays_down_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario() -> None:
        storage = SQLiteStorage(tmp_path / "r.sqlite3")
        storage.restart_backoff = (0.01, 0.01)
        await storage.start()
        crash_take_group(storage, monkeypatch, times=1000)
        for _ in range(MAX_WRITER_RESTARTS + 1):
            with pytest.raises(WriterDown):
                await asyncio.wait_for(storage.submit_reports([report()]), timeout=2)
            for _ in range(100):  # bounded: 1 s for the restart (or the final give-up)
                if storage.health().alive or (storage._writer and storage._writer.done()):
                    break
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        assert not storage.health().alive
        with pytest.raises(WriterDown):
            await asyncio.wait_for(storage.submit_reports([report()]), timeout=1)
        await asyncio.wait_for(storage.stop(), timeout=5)

    asyncio.run(scenario())


@contextmanager
def serving(settings: Settings) -> Iterator[tuple[str, SQLiteStorage]]:
    """The app under a real uvicorn on 127.0.0.1, in this process so the test can reach in."""
    app = create_app(settings)
    storage = app.state.storage
    assert isinstance(storage, SQLiteStorage)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical", lifespan="on")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline and thread.is_alive():
        time.sleep(0.02)
    assert server.started, "the server did not start"
    try:
        yield f"http://127.0.0.1:{port}", storage
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def test_the_server_answers_503_while_the_writer_is_down_then_recovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = json.dumps([crash_report()])
    headers = {"content-type": "application/reports+json"}
    with (
        serving(Settings(db=tmp_path / "reports.sqlite3")) as (url, storage),
        httpx2.Client(base_url=url, timeout=3) as client,
    ):
        storage.restart_backoff = (2.0, 2.0)
        crash_take_group(storage, monkeypatch, times=1)
        started = time.monotonic()
        crashed = client.post("/reports", content=body, headers=headers)
        refused = client.post("/reports", content=body, headers=headers)
        health_down = client.get("/healthz")
        # Fast, and all inside the 2 s before the restart.
        assert time.monotonic() - started < 1.5
        for _ in range(50):  # bounded: 5 s
            health_up = client.get("/healthz")
            if health_up.status_code == 200:
                break
            time.sleep(0.1)
        accepted = client.post("/reports", content=body, headers=headers)
    for answer in (crashed, refused):
        assert answer.status_code == 503
        assert answer.headers["retry-after"]
        assert answer.json()["error"]["code"] == "writer_down"
    assert health_down.status_code == 503
    assert health_down.json()["writer_alive"] is False
    assert health_up.status_code == 200
    assert accepted.status_code == 200
    assert accepted.json()["accepted"] == 1
