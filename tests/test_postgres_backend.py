"""The PostgreSQL backend against a real server: durability, outages, many processes.

Black-box where it matters: ``reporting-endpoint serve --database postgresql://...``
processes under load, killed with SIGKILL, or left running while PostgreSQL itself is killed
(``pg_ctl stop -m immediate``) and started again; then ``export`` says what was committed.
The rest drives the backend in-process (text PostgreSQL refuses, partitions dropped by
another process, two writers on the same groups, databases that are not ours). The parity
suite (tests/test_storage_parity.py) covers the protocol's behaviour on both engines.
"""

from __future__ import annotations

import asyncio
import io
import json
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import httpx2
import pytest

from reporting_endpoint.cli import main
from reporting_endpoint.settings import Settings, SettingsError
from reporting_endpoint.storage import (
    NotOurDatabase,
    StorageError,
    check_database,
    open_storage,
)
from reporting_endpoint.storage.filters import Filters
from reporting_endpoint.storage.postgres import PostgresStorage
from tests.conftest import crash_report
from tests.postgres import PostgresServer
from tests.servers import RunningServer, start_service, stop
from tests.test_storage_parity import BASE, HOUR, report

T = TypeVar("T")
SENDERS = 6
MAX_SECONDS = 15.0
# No request may take longer than this, database down or not ("never a hang").
REQUEST_TIMEOUT = 20.0


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run where the data folder of a server database may be made: with a PostgreSQL URL
    it is ``reporting-endpoint.data`` in the working directory (settings.SERVER_DATA_DIR),
    which must not land in the source tree."""
    monkeypatch.chdir(tmp_path)


def export(url: str) -> list[dict[str, Any]]:
    """Every stored report, through the CLI as an operator would run it."""
    out = subprocess.run(
        [sys.executable, "-m", "reporting_endpoint", "export", "--database", url],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    return [json.loads(line) for line in out.splitlines()]


def serve(tmp_path: Path, url: str, name: str) -> RunningServer:
    return start_service(tmp_path / f"{name}.sqlite3", args=["--database", url])


@dataclass
class Load:
    """Senders posting two-report batches with unique URLs to some servers, recording what
    got a 2xx and every other answer."""

    servers: list[RunningServer]
    deadline: float
    acknowledged: list[str] = field(default_factory=list)
    statuses: list[tuple[int, str | None]] = field(default_factory=list)
    slowest: float = 0.0
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def send(self, sender: int) -> None:
        server = self.servers[sender % len(self.servers)]
        with httpx2.Client(timeout=REQUEST_TIMEOUT) as client:
            n = 0
            while not self.stop.is_set() and time.monotonic() < self.deadline:
                n += 1
                marker = f"https://durable.example/{server.port}/{sender}/{n}"
                batch = [crash_report(url=marker), crash_report(url=marker + "/b")]
                started = time.monotonic()
                try:
                    answer = client.post(
                        server.url + "/reports",
                        content=json.dumps(batch),
                        headers={"content-type": "application/reports+json"},
                    )
                except httpx2.TimeoutException:
                    with self.lock:
                        self.statuses.append((0, "timeout"))
                    return
                except httpx2.HTTPError:
                    return  # the server is gone (killed on purpose)
                with self.lock:
                    self.slowest = max(self.slowest, time.monotonic() - started)
                    self.statuses.append((answer.status_code, answer.headers.get("retry-after")))
                    if answer.status_code == 200:
                        self.acknowledged.extend([marker, marker + "/b"])
                if answer.status_code != 200:
                    time.sleep(0.05)

    def start(self, senders: int = SENDERS) -> list[threading.Thread]:
        threads = [threading.Thread(target=self.send, args=(i,)) for i in range(senders)]
        for thread in threads:
            thread.start()
        return threads

    def count(self, status: int) -> int:
        with self.lock:
            return sum(1 for code, _ in self.statuses if code == status)


def _missing(acknowledged: list[str], url: str) -> list[str]:
    stored = {str(row["url"]) for row in export(url)}
    return [marker for marker in acknowledged if marker not in stored]


def test_two_servers_on_one_database_keep_every_acknowledged_report_after_sigkill(
    tmp_path: Path, postgres_url: str
) -> None:
    servers = [serve(tmp_path, postgres_url, "a"), serve(tmp_path, postgres_url, "b")]
    load = Load(servers, time.monotonic() + MAX_SECONDS)
    threads = load.start()
    try:
        time.sleep(random.uniform(1.0, 2.5))
        for server in servers:
            server.process.send_signal(signal.SIGKILL)
        for server in servers:
            server.process.wait(timeout=10)
    finally:
        load.stop.set()
        for thread in threads:
            thread.join(timeout=MAX_SECONDS + 10)
        for server in servers:
            if server.process.poll() is None:
                server.process.kill()
    assert all(server.process.returncode == -signal.SIGKILL for server in servers)
    per_server = {s.port: sum(f"/{s.port}/" in m for m in load.acknowledged) for s in servers}
    assert all(count > 20 for count in per_server.values()), f"load never got going: {per_server}"
    missing = _missing(load.acknowledged, postgres_url)
    assert not missing, f"{len(missing)} acknowledged reports lost, e.g. {missing[:3]}"


def test_killing_postgresql_under_load_answers_503_then_recovers_by_itself(
    tmp_path: Path, postgres: PostgresServer, postgres_url: str
) -> None:
    if not postgres.local:
        pytest.skip("needs a cluster of the test's own to kill (REPORTING_ENDPOINT_TEST_POSTGRES)")
    cluster: Any = postgres
    server = serve(tmp_path, postgres_url, "a")
    load = Load([server], time.monotonic() + 120)
    threads = load.start()
    try:
        _wait_for(lambda: load.count(200) > 50, 20, "no load before the kill")
        cluster.stop("immediate")
        before = load.count(503)
        _wait_for(lambda: load.count(503) > before + 10, 20, "no 503 while PostgreSQL was down")
        time.sleep(1.0)  # a while of reconnect attempts
        health = httpx2.get(server.url + "/healthz", timeout=REQUEST_TIMEOUT)
        assert health.status_code == 503
        cluster.start()
        recovered = load.count(200)
        _wait_for(lambda: load.count(200) > recovered + 50, 30, "ingest did not recover")
        assert httpx2.get(server.url + "/healthz", timeout=REQUEST_TIMEOUT).status_code == 200
    finally:
        load.stop.set()
        for thread in threads:
            thread.join(timeout=REQUEST_TIMEOUT + 10)
        postgres.ensure_running()
        assert stop(server) == 0
    refused = [(code, retry) for code, retry in load.statuses if code != 200]
    assert refused, "nothing was refused while PostgreSQL was down"
    assert {code for code, _ in refused} == {503}, f"unexpected answers: {set(refused)}"
    assert all(retry for _, retry in refused), "a 503 without Retry-After"
    assert load.slowest < REQUEST_TIMEOUT
    missing = _missing(load.acknowledged, postgres_url)
    assert not missing, f"{len(missing)} acknowledged reports lost, e.g. {missing[:3]}"


def _wait_for(condition: Callable[[], bool], seconds: float, message: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(message)
        time.sleep(0.05)


def test_servers_starting_together_migrate_once(tmp_path: Path, postgres_url: str) -> None:
    started: list[RunningServer] = []
    errors: list[BaseException] = []

    def start(name: str) -> None:
        try:
            started.append(serve(tmp_path, postgres_url, name))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(name,)) for name in "abc"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    try:
        assert not errors, errors
        for server in started:
            answer = httpx2.post(
                server.url + "/reports",
                content=json.dumps([crash_report()]),
                headers={"content-type": "application/reports+json"},
                timeout=REQUEST_TIMEOUT,
            )
            assert answer.status_code == 200
    finally:
        for server in started:
            stop(server)

    async def applied() -> list[tuple[int, int]]:
        connection = await asyncpg.connect(postgres_url)
        try:
            rows = await connection.fetch(
                "SELECT version, count(*) FROM schema_migrations GROUP BY version ORDER BY 1"
            )
        finally:
            await connection.close()
        return [(int(r[0]), int(r[1])) for r in rows]

    versions = asyncio.run(applied())
    assert versions and all(count == 1 for _, count in versions)
    assert [v for v, _ in versions] == list(range(1, len(versions) + 1))
    assert len(export(postgres_url)) == 3


# --- in-process ---------------------------------------------------------------------------


def run(url: str, scenario: Callable[[PostgresStorage], Awaitable[T]]) -> T:
    async def main_() -> T:
        storage = open_storage(url, Settings())
        assert isinstance(storage, PostgresStorage)
        await storage.start()
        try:
            return await scenario(storage)
        finally:
            await storage.stop()

    return asyncio.run(main_())


def test_text_postgresql_refuses_is_cleaned_not_lost(postgres_url: str) -> None:
    async def scenario(storage: PostgresStorage) -> None:
        odd = report(BASE, site="nul\x00.example", user_agent="UA\ud800/1")
        await storage.submit_reports([odd, report(BASE + 1)])
        rows = [r async for r in storage.iter_reports()]
        assert [r["site"] for r in rows] == ["nul\ufffd.example", "a.example"]
        assert rows[0]["user_agent"] == "UA\\ud800/1"
        found = await storage.groups("reports", ("site",), Filters(), 10)
        assert sorted(g["site"] for g in found.groups) == ["a.example", "nul\ufffd.example"]

    run(postgres_url, scenario)


def test_a_partition_dropped_by_another_process_is_made_again(postgres_url: str) -> None:
    async def scenario(storage: PostgresStorage) -> None:
        await storage.submit_reports([report(BASE)])
        other = open_storage(postgres_url, Settings())
        await other.start()
        try:
            gone = await other.prune(BASE + 2 * 24 * HOUR, crashes=False)
        finally:
            await other.stop()
        assert gone.reports == 1
        # This writer still believes the day has its partition: the insert fails with
        # SQLSTATE 23514, the partition is made again and the insert retried.
        await storage.submit_reports([report(BASE + 1)])
        assert [r["id"] for r in (await storage.reports_page(Filters(), 10)).items]
        found = await storage.groups("reports", ("type",), Filters(), 10)
        assert [g["count"] for g in found.groups] == [1]

    run(postgres_url, scenario)


def test_two_writers_on_the_same_groups_neither_deadlock_nor_lose_counts(
    postgres_url: str,
) -> None:
    sites = [f"s{n}.example" for n in range(20)]

    async def scenario(storage: PostgresStorage) -> None:
        other = open_storage(postgres_url, Settings())
        await other.start()
        try:
            # The same groups in opposite orders, many small groups at once from both.
            forward = [report(BASE + n, site=site) for n, site in enumerate(sites)]
            backward = list(reversed(forward))
            await asyncio.gather(
                *(storage.submit_reports(forward) for _ in range(20)),
                *(other.submit_reports(backward) for _ in range(20)),
            )
        finally:
            await other.stop()
        found = await storage.groups("reports", ("site",), Filters(), 100)
        assert sorted((g["site"], g["count"]) for g in found.groups) == [
            (site, 40) for site in sorted(sites)
        ]

    run(postgres_url, scenario)


def test_a_database_that_is_not_ours_is_refused_without_writing(postgres_url: str) -> None:
    async def tables() -> list[str]:
        connection = await asyncpg.connect(postgres_url)
        try:
            rows = await connection.fetch(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
            )
        finally:
            await connection.close()
        return [str(r[0]) for r in rows]

    for flags in ({"read_only": True}, {"must_exist": True}):
        storage = open_storage(postgres_url, Settings(), **flags)
        with pytest.raises(NotOurDatabase, match="not a reporting-endpoint database"):
            asyncio.run(storage.start())
    assert asyncio.run(tables()) == []
    out = io.StringIO()
    assert main(["export", "--database", postgres_url], out=out) == 2


def test_an_unreachable_server_is_named_before_serve_and_refused_at_once(
    tmp_path: Path,
) -> None:
    url = f"postgresql://nobody:secret@/db?host={tmp_path}&port=1"
    with pytest.raises(SettingsError, match="cannot connect") as caught:
        check_database(url)
    assert "secret" not in str(caught.value)
    storage = open_storage(url, Settings())
    started = time.monotonic()
    with pytest.raises(Exception, match="db") as failed:
        asyncio.run(storage.start())
    assert not isinstance(failed.value, AssertionError)
    assert time.monotonic() - started < 15
    assert main(["serve", "--database", url]) == 2


def test_a_write_while_postgresql_is_down_fails_fast_then_works_again(
    postgres: PostgresServer, postgres_url: str
) -> None:
    if not postgres.local:
        pytest.skip("needs a cluster of the test's own to kill")
    cluster: Any = postgres

    async def scenario(storage: PostgresStorage) -> None:
        await storage.submit_reports([report(BASE)])
        await asyncio.to_thread(cluster.stop, "immediate")
        try:
            for _ in range(3):
                started = time.monotonic()
                with pytest.raises(StorageError) as refused:
                    await storage.submit_reports([report(BASE + 1)])
                assert refused.value.code in {"database_unavailable", "writer_down"}
                assert time.monotonic() - started < 5
            assert not storage.health().alive
            with pytest.raises(StorageError):
                await storage.reports_page(Filters(), 10)
        finally:
            await asyncio.to_thread(cluster.start)
        deadline = time.monotonic() + 20
        while True:
            try:
                await storage.submit_reports([report(BASE + 2)])
                break
            except StorageError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
        assert storage.health().alive
        ids = [r["received_at"] async for r in storage.iter_reports()]
        assert len(ids) == 2

    run(postgres_url, scenario)


def test_a_poison_report_fails_only_its_own_submission(postgres_url: str) -> None:
    async def scenario(storage: PostgresStorage) -> None:
        poison = report(2**70)  # past bigint: neither its partition nor its row can exist
        results = await asyncio.gather(
            *(storage.submit_reports([report(BASE + n)]) for n in range(5)),
            storage.submit_reports([poison]),
            *(storage.submit_reports([report(BASE + 10 + n)]) for n in range(5)),
            return_exceptions=True,
        )
        assert [isinstance(r, StorageError) for r in results] == [False] * 5 + [True] + [False] * 5
        assert len([r async for r in storage.iter_reports()]) == 10
        assert storage.health().alive

    run(postgres_url, scenario)


def test_facts_of_the_wrong_type_are_stored_as_their_columns_hold_them(
    postgres_url: str,
) -> None:
    from tests.test_storage_parity import crash

    async def scenario(storage: PostgresStorage) -> None:
        await storage.insert_crash(crash(1, annotations={"k": "nul\x00"}))
        facts = {
            "signature": "sig\x00nature",
            "os": 7,  # a number where text belongs
            "crashing_thread": 2**70,  # past bigint
            "crash_offset": 12.0,
            "exception_code": 2**64 - 1,
            "cpu": ["not", "a", "value"],
        }
        await storage.record_crash_facts(f"{1:032x}", facts)
        stored = await storage.get_crash(f"{1:032x}")
        assert stored is not None
        assert stored["parse_status"] == "parsed"
        assert stored["signature"] == "sig\ufffdnature" and stored["os"] == "7"
        assert stored["crashing_thread"] is None and stored["cpu"] is None
        assert stored["crash_offset"] == 12
        assert stored["exception_code_hex"] == "0xffffffffffffffff"
        assert stored["annotations"] == {"k": "nul\x00"}  # JSON escapes it: kept exactly

    run(postgres_url, scenario)


def test_a_url_with_several_hosts_uses_the_first_that_answers(
    tmp_path: Path, postgres_url: str
) -> None:
    from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

    parts = urlsplit(postgres_url)
    query = parse_qs(parts.query)
    if "host" not in query:
        pytest.skip("the server is not reached through a socket directory")
    # libpq's form: hosts (and ports) as comma-separated lists, tried in order.
    query["host"] = [f"{tmp_path}/nothing-here,{query['host'][0]}"]
    query["port"] = [f"{query.get('port', ['5432'])[0]},{query.get('port', ['5432'])[0]}"]
    url = urlunsplit(parts._replace(query=urlencode(query, doseq=True, safe="/,")))

    async def scenario(storage: PostgresStorage) -> None:
        await storage.submit_reports([report(BASE)])
        assert len((await storage.reports_page(Filters(), 10)).items) == 1

    check_database(url)
    run(url, scenario)


def test_an_idle_writer_takes_the_next_group_after_a_server_restart(
    postgres: PostgresServer, postgres_url: str
) -> None:
    if not postgres.local:
        pytest.skip("needs a cluster of the test's own to restart")
    cluster: Any = postgres

    async def scenario(storage: PostgresStorage) -> None:
        await storage.submit_reports([report(BASE)])
        await asyncio.to_thread(cluster.restart, "fast")
        # The server closed the idle write connection; the writer opens it again at once
        # rather than refusing this group.
        await storage.submit_reports([report(BASE + 1)])
        assert len([r async for r in storage.iter_reports()]) == 2

    run(postgres_url, scenario)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://u:pw@db1:5432,db2:5432/r", "postgresql://u:***@db1:5432,db2:5432/r"),
        ("postgres://u:p@ss@h/db", "postgres://u:***@h/db"),
        (
            "postgresql://u@/r?host=/s&password=pw&port=1",
            "postgresql://u@/r?host=/s&password=***&port=1",
        ),
        ("postgresql://u@h:5432/db", "postgresql://u@h:5432/db"),
        ("postgresql://u:pw@[bad/r", "postgresql://u:***@[bad/r"),
    ],
)
def test_messages_never_show_a_password(url: str, shown: str) -> None:
    from reporting_endpoint.storage.postgres import display_url

    assert display_url(url) == shown


def test_a_lock_held_elsewhere_gets_503_storage_busy_not_a_hang(postgres_url: str) -> None:
    async def scenario() -> None:
        storage = open_storage(postgres_url, Settings(write_lock_timeout=0.5))
        await storage.start()
        other = await asyncpg.connect(postgres_url)
        try:
            await storage.submit_reports([report(BASE)])
            async with other.transaction():
                await other.execute("LOCK TABLE report_groups IN EXCLUSIVE MODE")
                started = time.monotonic()
                with pytest.raises(StorageError) as refused:
                    await storage.submit_reports([report(BASE + 1)])
                assert refused.value.code == "storage_busy"
                assert time.monotonic() - started < 5
            await storage.submit_reports([report(BASE + 2)])
            assert len([r async for r in storage.iter_reports()]) == 2
        finally:
            await other.close()
            await storage.stop()

    asyncio.run(scenario())


def test_a_server_that_stops_answering_costs_a_bounded_wait(
    postgres: PostgresServer, postgres_url: str
) -> None:
    import os

    from reporting_endpoint.storage.postgres import WriterLimits

    if not postgres.local:
        pytest.skip("needs a server of the test's own to pause")

    async def scenario() -> None:
        storage = PostgresStorage(postgres_url, limits=WriterLimits(transaction_timeout=1.0))
        await storage.start()
        try:
            await storage.submit_reports([report(BASE)])
            assert storage._conn is not None
            backend = storage._conn.get_server_pid()
            # The writer's server process freezes: the socket stays open, nothing answers.
            os.kill(backend, signal.SIGSTOP)
            try:
                started = time.monotonic()
                with pytest.raises(StorageError) as refused:
                    await storage.submit_reports([report(BASE + 1)])
                assert refused.value.code == "database_unavailable"
                assert time.monotonic() - started < 5
            finally:
                os.kill(backend, signal.SIGCONT)
            deadline = time.monotonic() + 20
            while True:
                try:
                    await storage.submit_reports([report(BASE + 2)])
                    break
                except StorageError:
                    assert time.monotonic() < deadline, "the writer did not come back"
                    await asyncio.sleep(0.1)
            assert len([r async for r in storage.iter_reports()]) == 2
        finally:
            await storage.stop()

    asyncio.run(scenario())


def test_the_service_and_the_commands_use_a_postgresql_url(
    tmp_path: Path, postgres_url: str
) -> None:
    from starlette.testclient import TestClient

    from reporting_endpoint.app import create_app
    from tests.conftest import post_reports

    settings = Settings(db=tmp_path / "unused.sqlite3", database=postgres_url)
    with TestClient(create_app(settings)) as client:
        assert post_reports(client, [crash_report()] * 2).status_code == 200
        assert client.get("/healthz").status_code == 200
    assert not (tmp_path / "unused.sqlite3").exists()

    def cli(*args: str) -> tuple[int, str]:
        out = io.StringIO()
        return main(list(args), out=out), out.getvalue()

    code, text = cli("stats", "--database", postgres_url, "--json")
    assert code == 0 and json.loads(text)["groups"][0]["count"] == 2
    code, text = cli("export", "--database", postgres_url)
    assert code == 0 and len(text.splitlines()) == 2
    first = json.loads(text.splitlines()[0])["id"]
    code, text = cli("prune", "--database", postgres_url, "--older-than", "1d")
    assert (code, text.split(";")[0]) == (
        0,
        "deleted 0 report(s) and 0 crash(es) received before 1d",
    )
    assert cli("delete", "--database", postgres_url, "--report", str(first))[0] == 0
    code, text = cli("stats", "--database", postgres_url, "--json")
    assert json.loads(text)["groups"][0]["count"] == 1


def test_retention_drops_whole_days_and_deletes_rows_only_in_the_day_of_the_cut(
    postgres_url: str,
) -> None:
    day = 24 * HOUR

    async def partitions() -> list[tuple[int, int]]:
        connection = await asyncpg.connect(postgres_url)
        try:
            rows = await connection.fetch("SELECT from_ms, to_ms FROM report_partitions()")
        finally:
            await connection.close()
        return [(int(r[0]), int(r[1])) for r in rows]

    async def scenario(storage: PostgresStorage) -> None:
        times = [BASE - 3 * day, BASE - 2 * day, BASE - day + HOUR, BASE - day + 5 * HOUR, BASE]
        await storage.submit_reports([report(t) for t in times])
        cut = BASE - day + 2 * HOUR
        gone = await storage.prune(cut, crashes=False)
        assert gone.reports == 3
        left = await partitions()
        assert left and all(to_ms > cut for _, to_ms in left), left
        assert [r["received_at"] async for r in storage.iter_reports()] == [
            "2023-11-14T03:00:00.000Z",
            "2023-11-14T22:00:00.000Z",
        ]
        found = await storage.groups("reports", ("type",), Filters(), 10)
        assert [(g["count"], g["first_seen"]) for g in found.groups] == [
            (2, "2023-11-14T03:00:00.000Z")
        ]
        assert (await storage.prune(cut, crashes=False)).reports == 0

    run(postgres_url, scenario)
