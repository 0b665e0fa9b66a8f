"""Order, not just outcome: every 2xx leaves the server after the fsyncs that made it durable.

A real `reporting-endpoint serve` runs under strace (Debian's `strace`); requests go one at a
time, each tagged with a header, so the trace shows when each request arrived, which files and
folders were synced, and when the answer was sent. Also: the write connection runs with
``synchronous=FULL`` by default.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx2
import pytest
from starlette.testclient import TestClient

from reporting_endpoint.app import create_app
from reporting_endpoint.settings import Settings
from tests.conftest import crash_report
from tests.crashpad_client import MINIDUMPS, content_type, dump_upload
from tests.servers import free_port, wait_until_listening

STRACE = shutil.which("strace") or "/usr/bin/strace"
DUMPS = [
    "linux-x64_breakpad_linux_null_read_av.dmp",
    "mac-x64_rustminidump_simple-crashpad.dmp",
    "win-x86_breakpad_minidump2.dmp",
    "win-x64_rustminidump_invalid-parameter.dmp",
]
SYNCS = {"fsync", "fdatasync"}
SENDS = {"sendto", "write", "writev", "sendmsg"}


def strace_missing() -> str | None:
    """Why the strace tests cannot run here, or None."""
    if not os.access(STRACE, os.X_OK):
        return f"{STRACE} not found (apt-get install strace)"
    probe = subprocess.run(
        [STRACE, "-f", "-qq", "-e", "trace=none", "true"], capture_output=True, timeout=30
    )
    if probe.returncode != 0:
        return f"strace cannot trace here (ptrace not permitted?): {probe.stderr.decode()[-300:]}"
    return None


@dataclass(frozen=True)
class Call:
    name: str
    args: str  # as strace printed them, file descriptors annotated with their paths (-y)
    result: str
    started: int  # line of the trace where the call began
    finished: int  # line where it returned

    @property
    def path(self) -> str:
        match = re.match(r"\d+<(.*?)>", self.args)
        return match.group(1) if match else ""


_START = re.compile(r"^(\d+)\s+(\w+)\((.*)$")
_RESUMED = re.compile(r"^(\d+)\s+<\.\.\. (\w+) resumed>(.*)$")
_RESULT = re.compile(r"\)\s+=\s+(-?\d+.*)$")


def parse_trace(text: str) -> list[Call]:
    """The calls of an ``strace -f`` log, a call split by another thread's joined again."""
    calls: list[Call] = []
    unfinished: dict[str, tuple[str, str, int]] = {}
    for number, line in enumerate(text.splitlines()):
        if resumed := _RESUMED.match(line):
            pid, name, rest = resumed.groups()
            if pid in unfinished:
                _, args, started = unfinished.pop(pid)
                result = _RESULT.search(rest)
                calls.append(
                    Call(name, args + rest, result.group(1) if result else "", started, number)
                )
        elif start := _START.match(line):
            pid, name, rest = start.groups()
            if rest.endswith("<unfinished ...>"):
                unfinished[pid] = (name, rest.removesuffix("<unfinished ...>"), number)
            else:
                result = _RESULT.search(rest)
                calls.append(Call(name, rest, result.group(1) if result else "", number, number))
    return calls


@dataclass(frozen=True)
class Exchange:
    """One request as the server saw it: its syncs between its arrival and its answer."""

    status: str
    arrived: int
    answered: int
    syncs: list[Call]


def exchanges(calls: list[Call], markers: list[str]) -> list[Exchange]:
    found = []
    for marker in markers:
        arrivals = [c for c in calls if c.name in {"recvfrom", "read"} and marker in c.args]
        assert arrivals, f"request {marker} not in the trace"
        arrived = arrivals[0].finished
        answers = sorted(
            (c for c in calls if c.name in SENDS and '"HTTP/1.1 ' in c.args),
            key=lambda c: c.started,
        )
        answer = next(c for c in answers if c.started > arrived)
        status = answer.args.split('"HTTP/1.1 ', 1)[1][:3]
        syncs = [
            c
            for c in calls
            if c.name in SYNCS
            and c.result.startswith("0")
            and arrived < c.finished < answer.started
        ]
        found.append(Exchange(status, arrived, answer.started, syncs))
    return found


@contextmanager
def traced_service(db: Path, trace: Path) -> Iterator[str]:
    port = free_port()
    command = [
        STRACE, "-f", "-qq", "-y", "-s", "4096", "--seccomp-bpf", "-o", str(trace),
        "-e", "trace=fsync,fdatasync,sendto,write,writev,sendmsg,recvfrom,read",
        sys.executable, "-m", "reporting_endpoint", "serve",
        "--host", "127.0.0.1", "--port", str(port), "--db", str(db),
    ]  # fmt: skip
    environment = {**os.environ, "REPORTING_ENDPOINT_LOG_LEVEL": "warning"}
    process = subprocess.Popen(command, env=environment)
    try:
        wait_until_listening(port, process, timeout=60)
        yield f"http://127.0.0.1:{port}"
    finally:
        # SIGINT to the traced server (strace's child), so it drains and strace writes it all.
        for child in _children(process.pid):
            os.kill(child, signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            # The parent pid is the second field after the command name's closing parenthesis.
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def wait_parsed(db: Path, crash_id: str) -> None:
    """Until the crash's dump is parsed, so its background write cannot land in the next window."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        connection = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            row = connection.execute(
                "SELECT parse_status FROM crashes WHERE id = ?", (crash_id,)
            ).fetchone()
        finally:
            connection.close()
        if row is not None and row[0] != "pending":
            return
        time.sleep(0.05)
    raise TimeoutError(f"crash {crash_id} still pending")


def test_every_2xx_is_sent_after_the_fsyncs_that_made_it_durable(tmp_path: Path) -> None:
    if reason := strace_missing():
        print(f"SKIPPED: {reason}")
        pytest.skip(reason)
    db = tmp_path / "data" / "reports.sqlite3"
    trace = tmp_path / "strace.log"
    report_markers = [f"r{uuid.uuid4().hex}" for _ in range(4)]
    crash_markers = [f"c{uuid.uuid4().hex}" for _ in DUMPS]
    dumps = [(MINIDUMPS / name).read_bytes() for name in DUMPS]
    crash_ids = []
    with traced_service(db, trace) as url, httpx2.Client(base_url=url, timeout=30) as client:
        for n, marker in enumerate(report_markers):
            answer = client.post(
                "/reports",
                content=json.dumps([crash_report(url=f"https://order.example/{n}")]),
                headers={"content-type": "application/reports+json", "x-trace-marker": marker},
            )
            assert answer.status_code == 200, answer.text
        for marker, dump in zip(crash_markers, dumps, strict=True):
            answer = client.post(
                "/crashpad",
                content=dump_upload(dump, {"prod": "OrderTest", "ver": "1.0"}),
                headers={"content-type": content_type(), "x-trace-marker": marker},
            )
            assert answer.status_code == 200, answer.text
            crash_ids.append(answer.text)
            wait_parsed(db, answer.text)
    calls = parse_trace(trace.read_text(errors="replace"))
    wal = str(db.resolve()) + "-wal"
    data = db.resolve().with_name(db.name + ".data")

    for exchange in exchanges(calls, report_markers):
        assert exchange.status == "200"
        assert any(c.path == wal for c in exchange.syncs), "a /reports 200 before its WAL sync"

    new_prefixes: set[str] = set()
    for exchange, dump in zip(exchanges(calls, crash_markers), dumps, strict=True):
        assert exchange.status == "200"
        digest = hashlib.sha256(dump).hexdigest()
        synced = [c.path for c in exchange.syncs]
        # The dump's own bytes (fsync on the temp file's descriptor, before the rename).
        assert any(re.fullmatch(rf"{data}/tmp/upload-.*\.part", p) for p in synced), synced
        # Every folder that gained or lost an entry: the new name, the temp name gone, and
        # blobs/ whenever its sub-folder is new.
        must = [f"{data}/blobs/{digest[:2]}", f"{data}/tmp"]
        if digest[:2] not in new_prefixes:
            must.append(f"{data}/blobs")
            new_prefixes.add(digest[:2])
        for folder in must:
            assert folder in synced, f"{folder} not synced before the 200: {synced}"
        # The row commits (its WAL sync) only after every one of those.
        last_blob_sync = max(c.finished for c in exchange.syncs if c.path.startswith(str(data)))
        assert any(c.path == wal and c.finished > last_blob_sync for c in exchange.syncs), (
            "the crash row committed before its dump was durable"
        )
    # The first upload also made the data folder itself durable.
    first = exchanges(calls, crash_markers[:1])[0]
    assert {str(data), str(data.parent)} <= {c.path for c in first.syncs}
    assert len(crash_ids) == len(set(crash_ids)) == len(DUMPS)


def test_the_write_connection_runs_with_synchronous_full_by_default(tmp_path: Path) -> None:
    app = create_app(Settings(db=tmp_path / "reports.sqlite3"))

    def pragma(connection: sqlite3.Connection) -> int:
        return int(connection.execute("PRAGMA synchronous").fetchone()[0])

    with TestClient(app) as client:
        # Through the writer itself: the connection that commits every report.
        assert client.portal is not None
        level = client.portal.call(app.state.storage.run_job, pragma)
    assert level == 2  # FULL
