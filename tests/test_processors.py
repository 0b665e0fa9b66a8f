"""Crash processors in real processes (issue 14): a dump that kills its processor, SIGKILL of
the whole service mid-dump, `reporting-endpoint process` beside `serve --processors 0`, and a
short sustained run whose backlog drains with memory bounded.

Each test runs `serve` (and `process`) as real processes on both engines; the test hooks in
``reporting_endpoint.processing`` make a processor die on a marker in a dump, or parse slowly.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx2
import pytest

from reporting_endpoint.health import BACKLOG_TTL
from reporting_endpoint.processing import DELAY_VARIABLE, FAULT_VARIABLE, SPIN_VARIABLE
from tests.crashpad_client import MINIDUMPS, content_type, dump_upload
from tests.servers import RunningServer, start_service, stop

TOKEN = "read-secret"
AUTH = {"authorization": f"Bearer {TOKEN}"}
DUMP = (MINIDUMPS / "win-x86_breakpad_minidump2.dmp").read_bytes()
MARKER = b"kill-the-processor-that-reads-this"
WAIT = 60.0


def args(database_url: str, *extra: str) -> list[str]:
    return ["--database", database_url, *extra]


def service(
    database_url: str, tmp_path: Path, *extra: str, env: dict[str, str] | None = None
) -> RunningServer:
    return start_service(
        tmp_path / "unused.sqlite3",
        env={"REPORTING_ENDPOINT_READ_TOKEN": TOKEN, **(env or {})},
        args=args(database_url, "--blob-store", str(tmp_path / "blobs"), *extra),
    )


def upload(server: RunningServer, dump: bytes, **fields: str) -> str:
    answer = httpx2.post(
        server.url + "/crashpad",
        content=dump_upload(dump, fields),
        headers={"content-type": content_type()},
        timeout=30,
    )
    assert answer.status_code == 200, answer.text
    return str(answer.text)


def health(server: RunningServer) -> dict[str, Any]:
    return dict(httpx2.get(server.url + "/healthz", timeout=10).json())


def crashes(server: RunningServer) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    url = server.url + "/api/crashes?limit=1000"
    for _ in range(50):
        page = httpx2.get(url, headers=AUTH, timeout=10).json()
        found.update({c["id"]: c for c in page["crashes"]})
        if not page.get("next_cursor"):
            return found
        url = server.url + f"/api/crashes?limit=1000&cursor={page['next_cursor']}"
    raise AssertionError("too many pages")


def native_issue_counts(server: RunningServer) -> int:
    page = httpx2.get(
        server.url + "/api/issues?kind=native&limit=100", headers=AUTH, timeout=10
    ).json()
    return sum(int(item["count"]) for item in page["issues"])


def wait_drained(server: RunningServer, timeout: float = WAIT) -> float:
    """Until /healthz shows no crash waiting; answers how long that took."""
    start = time.monotonic()
    time.sleep(BACKLOG_TTL + 0.1)  # /healthz reads the backlog at most once a second
    while time.monotonic() - start < timeout:
        if health(server)["crash_backlog"] == 0:
            return time.monotonic() - start
        time.sleep(0.1)
    raise AssertionError(f"backlog not drained after {timeout}s: {health(server)}")


@pytest.mark.parametrize("attempts", [3, 1])
def test_a_dump_that_kills_its_processor_is_retried_then_marked_failed(
    database_url: str, tmp_path: Path, attempts: int
) -> None:
    """The processor dies (SIGKILL) mid-dump every time it reads that dump: the crash is
    retried alone and marked failed after its attempts; the crashes beside it are parsed and
    counted once each. The claim of the batch it killed counts no attempt (the batch-mates
    were not at fault): with a single attempt allowed, those that died with it are still
    parsed, and the deadly one is given up after its one attempt alone."""
    # Stored first, so the first claim takes the deadly dump together with the others.
    server = service(database_url, tmp_path, "--processors", "0")
    try:
        deadly = upload(server, DUMP + MARKER)
        fine = [upload(server, DUMP, prod=f"App{n}") for n in range(4)]
    finally:
        stop(server)
    server = service(
        database_url,
        tmp_path,
        "--processors", "2", "--process-max-attempts", str(attempts),
        # Slow parses: the crash beside the deadly one is still in its processor when the
        # pool breaks, and is one of those tried again.
        env={FAULT_VARIABLE: MARKER.hex(), DELAY_VARIABLE: "0.3"},
    )  # fmt: skip
    try:
        wait_drained(server)
        stored = crashes(server)
        assert stored[deadly]["parse_status"] == "failed"
        assert f"gave up after {attempts} attempts" in stored[deadly]["parse_error"]
        assert [stored[c]["parse_status"] for c in fine] == ["parsed"] * 4
        assert native_issue_counts(server) == 4
        assert health(server)["status"] == "ok"  # the service kept serving throughout
    finally:
        stop(server)


def test_sigkill_of_the_whole_service_mid_dump_loses_and_doubles_nothing(
    database_url: str, tmp_path: Path
) -> None:
    """Killed while its processor is inside a dump and with crashes waiting: after a restart
    every crash is parsed, each counted once in its issue."""
    slow = {DELAY_VARIABLE: "0.1"}
    server = service(database_url, tmp_path, "--processors", "0")
    try:
        ids = [upload(server, DUMP, prod=f"App{n % 3}") for n in range(24)]
        assert health(server)["crash_backlog"] == 24
    finally:
        stop(server)
    lease = ("--process-lease-seconds", "2")
    server = service(database_url, tmp_path, "--processors", "1", *lease, env=slow)
    deadline = time.monotonic() + WAIT
    while health(server)["crash_backlog"] == 24 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.15)  # inside the next dump (each takes 0.1 s)
    left = health(server)["crash_backlog"]
    server.process.send_signal(signal.SIGKILL)
    server.process.wait()
    assert 0 < left < 24  # killed mid-way: some done, some claimed, some waiting
    server = service(database_url, tmp_path, "--processors", "1", *lease)
    try:
        wait_drained(server)
        stored = crashes(server)
        assert {stored[c]["parse_status"] for c in ids} == {"parsed"}
        assert native_issue_counts(server) == 24
    finally:
        stop(server)


@contextmanager
def processor(database_url: str, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    command = [
        sys.executable, "-m", "reporting_endpoint", "process",
        *args(database_url, "--blob-store", str(tmp_path / "blobs")),
        "--processors", "1", "--process-poll-seconds", "0.2", "--log-level", "warning",
    ]  # fmt: skip
    process = subprocess.Popen(command)
    try:
        yield process
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_process_command_parses_what_serve_processors_0_stores(
    database_url: str, tmp_path: Path
) -> None:
    server = service(database_url, tmp_path, "--processors", "0")
    try:
        ids = [upload(server, DUMP, prod="Remote") for _ in range(5)]
        time.sleep(0.5)
        assert health(server)["crash_backlog"] == 5  # serve itself never parses
        with processor(database_url, tmp_path) as process:
            wait_drained(server)
            assert process.poll() is None
            later = upload(server, DUMP, prod="Remote")  # found by polling, not a wake-up
            wait_drained(server)
        assert process.returncode == 0
        stored = crashes(server)
        assert {stored[c]["parse_status"] for c in [*ids, later]} == {"parsed"}
        assert health(server)["crash_processors"] == 0
    finally:
        stop(server)


def _rss_kib(root: int) -> int:
    """Resident memory of a process and its children (the processors), in KiB."""
    total = 0
    pids = [root]
    children = Path(f"/proc/{root}/task/{root}/children")
    if children.exists():
        pids += [int(p) for p in children.read_text().split()]
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


def test_a_short_sustained_load_drains_to_zero_with_memory_bounded(
    database_url: str, tmp_path: Path
) -> None:
    """Uploads for 10 s from 4 senders (the full version is benchmarks/crashpad.py --drain):
    afterwards every crash is processed (parsed, walked) within 45 s, and the service's memory
    (processors included) grew by less than 64 MiB however many crashes came in."""
    server = service(database_url, tmp_path, "--processors", "1")
    try:
        stop_at = time.monotonic() + 10
        acknowledged: list[str] = []
        lock = threading.Lock()
        upload(server, DUMP)  # the processors started, the blob stored
        time.sleep(1.0)
        baseline = _rss_kib(server.process.pid)
        peak = baseline

        def send(sender: int) -> None:
            with httpx2.Client(timeout=30) as client:
                for n in range(10_000):
                    if time.monotonic() > stop_at:
                        return
                    answer = client.post(
                        server.url + "/crashpad",
                        content=dump_upload(DUMP, {"prod": f"S{sender}", "n": str(n)}),
                        headers={"content-type": content_type()},
                    )
                    assert answer.status_code == 200
                    with lock:
                        acknowledged.append(answer.text)

        threads = [threading.Thread(target=send, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        while any(t.is_alive() for t in threads):
            peak = max(peak, _rss_kib(server.process.pid))
            time.sleep(0.2)
        for thread in threads:
            thread.join()
        wait_drained(server, timeout=45)
        peak = max(peak, _rss_kib(server.process.pid))
        stored = crashes(server)
        assert len(acknowledged) > 50
        assert {stored[c]["parse_status"] for c in acknowledged} == {"parsed"}
        assert (peak - baseline) / 1024 < 64, (baseline, peak)
    finally:
        stop(server)


def test_processors_are_gone_with_the_service(tmp_path: Path) -> None:
    """Killing the service leaves no processor behind (they would hold leases for ever)."""
    server = start_service(tmp_path / "r.sqlite3", args=["--processors", "2"])
    try:
        upload(server, DUMP)
        wait_drained(server)
        children = Path(f"/proc/{server.process.pid}/task/{server.process.pid}/children")
        pids = [int(p) for p in children.read_text().split()]
        assert pids, "no processor started"
    finally:
        server.process.send_signal(signal.SIGKILL)
        server.process.wait()
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    alive = [pid for pid in pids if Path(f"/proc/{pid}").exists()]
    for pid in alive:
        os.kill(pid, signal.SIGKILL)
    assert alive == []


def test_serve_workers_2_takes_and_processes_crashpad_uploads(
    database_url: str, tmp_path: Path
) -> None:
    """`serve --workers 2` covers /crashpad: every upload answered 200 is stored once and
    parsed once, by processors the workers run."""
    from tests.test_workers import children, wait_for_workers

    server = service(database_url, tmp_path, "--workers", "2", "--processors", "1")
    try:
        workers = wait_for_workers(server, 2)
        acknowledged: list[str] = []
        lock = threading.Lock()

        def send(sender: int) -> None:
            with httpx2.Client(timeout=30) as client:
                for n in range(5):
                    answer = client.post(
                        server.url + "/crashpad",
                        content=dump_upload(DUMP, {"prod": f"W{sender}", "n": str(n)}),
                        headers={"content-type": content_type()},
                    )
                    assert answer.status_code == 200, answer.text
                    with lock:
                        acknowledged.append(answer.text)

        threads = [threading.Thread(target=send, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=WAIT)
        assert len(set(acknowledged)) == 40
        wait_drained(server)
        stored = crashes(server)
        assert sorted(stored) == sorted(acknowledged)
        assert {c["parse_status"] for c in stored.values()} == {"parsed"}
        assert native_issue_counts(server) == 40
        # Processors run under the workers (started at a worker's first claim of work).
        assert any(children(worker) for worker in workers)
    finally:
        stop(server)


def test_a_graceful_stop_hands_claimed_crashes_back_at_once(
    database_url: str, tmp_path: Path
) -> None:
    """Stopped (SIGINT) while its processor is inside a dump: the crashes it had claimed are
    pending again at once, so the next start parses them without waiting for the lease
    (300 s by default); and with the attempt of that claim given back (a stop is not the
    crashes' fault), so even with a single attempt allowed they are parsed, not given up."""
    server = service(database_url, tmp_path, "--processors", "0")
    try:
        ids = [upload(server, DUMP) for _ in range(3)]
    finally:
        stop(server)
    one = ("--processors", "1", "--process-max-attempts", "1")
    server = service(database_url, tmp_path, *one, env={DELAY_VARIABLE: "2"})
    time.sleep(2.5)  # claimed all three, inside the first dump
    assert stop(server) == 0
    server = service(database_url, tmp_path, *one)
    try:
        wait_drained(server, timeout=30)
        stored = crashes(server)
        assert {stored[c]["parse_status"] for c in ids} == {"parsed"}
    finally:
        stop(server)


def test_a_parse_past_the_timeout_fails_with_the_reason_and_the_processor_goes_on(
    database_url: str, tmp_path: Path
) -> None:
    """Every parse here burns 3 s of CPU (the test hook) against a 0.5 s timeout: each crash
    is failed with the reason in bounded time, and the same processor takes the next one (the
    timer ends the step, not the child)."""
    server = service(
        database_url, tmp_path, "--processors", "1", "--process-timeout-seconds", "0.5",
        env={SPIN_VARIABLE: "3"},
    )  # fmt: skip
    try:
        started = time.monotonic()
        ids = [upload(server, DUMP, prod=f"Slow{n}") for n in range(3)]
        wait_drained(server, timeout=20)
        # 3 x 3 CPU seconds without the timeout: well past this.
        assert time.monotonic() - started < 8
        stored = crashes(server)
        for crash_id in ids:
            assert stored[crash_id]["parse_status"] == "failed"
            assert "processing timeout" in stored[crash_id]["parse_error"]
        assert health(server)["status"] == "ok"
    finally:
        stop(server)
