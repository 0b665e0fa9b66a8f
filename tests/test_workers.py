"""`serve --workers N`: N processes on one port, each with its own writer, one database.

Real servers only: the workers are found through /proc (children of the `serve` process), and a
connection is traced to the worker that accepted it through the socket inodes each worker holds.
Every 2xx must be stored whichever worker answered it, also after SIGKILL of the whole process
group; a graceful stop drains every worker; N workers starting at once on a fresh database come
up with one schema; every setting, flags included, reaches every worker.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from multiprocessing.synchronize import Barrier
from pathlib import Path

import httpx2
import pytest

from reporting_endpoint.server import HeaderTimeoutProtocol, ServiceConfig, service_app
from reporting_endpoint.settings import Settings
from reporting_endpoint.storage.sqlite.schema import migrations
from tests.conftest import crash_report
from tests.servers import (
    RunningServer,
    free_port,
    make_certificate,
    running_service,
    stop,
    wait_until_listening,
)
from tests.test_server import export

WORKERS = 2
TOKEN = "worker-test-token"
REPORTS = {"content-type": "application/reports+json"}
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


# --- finding the workers and what they accepted, through /proc --------------------------------


def children(pid: int) -> list[int]:
    """Processes whose parent is ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: fields start after the last ")".
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == pid:
            found.append(int(entry.name))
    return found


def workers_of(server: RunningServer) -> list[int]:
    """The serving processes of a `serve --workers N` (not multiprocessing's resource tracker)."""
    found = []
    for pid in children(server.process.pid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in cmdline:
            found.append(pid)
    return sorted(found)


def wait_for_workers(server: RunningServer, count: int, timeout: float = 30) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = workers_of(server)
        if len(pids) == count:
            return pids
        time.sleep(0.05)
    raise AssertionError(f"expected {count} workers, found {workers_of(server)}")


def accepted_ports(pid: int, server_port: int) -> set[int]:
    """Client ports of the established connections to ``server_port`` that ``pid`` holds."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    ports = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
        if state == "01" and int(local.split(":")[1], 16) == server_port and inode in inodes:
            ports.add(int(remote.split(":")[1], 16))
    return ports


def healthy(server: RunningServer) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx2.get(server.url + "/healthz", timeout=2).status_code == 200:
                return
        except httpx2.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError("the server never became healthy")


# --- load ----------------------------------------------------------------------------------


def send_batches(
    url: str, senders: int, seconds: float, prefix: str, per_batch: int = 2
) -> list[str]:
    """``senders`` threads post batches, each its own connection, for ``seconds``; the URL of
    every report whose request got a 2xx (stopping at the first connection error: the server
    may be gone on purpose)."""
    acknowledged: list[str] = []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def send(sender: int) -> None:
        with httpx2.Client(timeout=10) as client:
            n = 0
            while time.monotonic() < deadline:
                n += 1
                urls = [f"https://{prefix}.example/{sender}/{n}/{i}" for i in range(per_batch)]
                batch = [crash_report(url=u) for u in urls]
                try:
                    answer = client.post(url, content=json.dumps(batch), headers=REPORTS)
                except httpx2.HTTPError:
                    return
                if 200 <= answer.status_code < 300:
                    with lock:
                        acknowledged.extend(urls)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(senders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=seconds + 30)
    return acknowledged


def stored_urls(db: Path) -> set[str]:
    return {str(report["url"]) for report in export(db)}


@dataclass(frozen=True)
class Store:
    """The database a test's servers share: a SQLite file, or a PostgreSQL database."""

    db: Path
    url: str | None = None

    def args(self) -> list[str]:
        return ["--workers", str(WORKERS), *(["--database", self.url] if self.url else [])]

    def stored_urls(self) -> set[str]:
        if self.url is None:
            return stored_urls(self.db)
        out = subprocess.run(
            [sys.executable, "-m", "reporting_endpoint", "export", "--database", self.url],
            check=True, capture_output=True, text=True, timeout=120,
        ).stdout  # fmt: skip
        return {str(json.loads(line)["url"]) for line in out.splitlines()}


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "postgresql":
        return Store(tmp_path / "r.sqlite3", request.getfixturevalue("postgres_url"))
    return Store(tmp_path / "r.sqlite3")


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Servers run here: with a PostgreSQL URL the data folder is ``reporting-endpoint.data``
    in the working directory, which must not land in the source tree."""
    monkeypatch.chdir(tmp_path)


# --- the settings reach the workers -----------------------------------------------------------


def test_the_config_pickles_with_every_setting() -> None:
    """Workers are spawned, not forked: the config crosses as a pickle and must keep every
    setting, and the protocol must be the importable class, not a class made at run time."""
    settings = Settings(
        port=9999,
        workers=3,
        header_timeout=1.25,
        body_timeout=2.5,
        read_token="secret",
        cors_allow_origins=("https://a.example",),
        retention_days=7,
        database="sqlite:///tmp/x.sqlite3",
    )
    config = ServiceConfig(settings)
    copy = pickle.loads(pickle.dumps(config))
    assert copy.settings == settings
    assert copy.settings.read_token == "secret"
    assert copy.header_timeout == 1.25
    assert copy.workers == 3
    assert copy.http is HeaderTimeoutProtocol
    assert copy.factory
    assert copy.app.func is service_app
    assert copy.app.args == (settings,)


def test_flags_reach_every_worker(tmp_path: Path) -> None:
    """A read token and a header deadline given as flags (not environment) hold in both
    workers: every connection, whichever worker accepts it, is answered with the token and
    cut after the deadline."""
    args = ["--workers", str(WORKERS), "--read-token", TOKEN, "--header-timeout", "1"]
    with running_service(tmp_path / "r.sqlite3", args=args) as server:
        pids = wait_for_workers(server, WORKERS)
        healthy(server)
        auth = {"authorization": f"Bearer {TOKEN}"}
        clients = [httpx2.Client(timeout=10) for _ in range(40)]
        try:
            seen: dict[int, int] = {pid: 0 for pid in pids}
            for client in clients:
                answer = client.get(server.url + "/api/groups", headers=auth)
                assert answer.status_code == 200
                assert client.get(server.url + "/api/groups").status_code == 401
            # Each client keeps its connection open: count which worker holds each one.
            for pid in pids:
                seen[pid] = len(accepted_ports(pid, server.port))
            assert all(seen.values()), f"a worker accepted nothing: {seen}"
        finally:
            for client in clients:
                client.close()

        # Slow headers: open connections until both workers hold one; each is cut after
        # about a second whichever worker has it.
        holder: dict[int, int] = {}  # worker pid -> connections it holds
        socks: list[tuple[socket.socket, float]] = []
        try:
            while len(socks) < 60 and len(holder) < len(pids):
                sock = socket.create_connection(("127.0.0.1", server.port))
                socks.append((sock, time.monotonic()))
                sock.sendall(b"POST /reports HTTP/1.1\r\nHost: x\r\n")
                client_port = sock.getsockname()[1]
                deadline = time.monotonic() + 0.5
                while time.monotonic() < deadline:
                    owner = [p for p in pids if client_port in accepted_ports(p, server.port)]
                    if owner:
                        holder[owner[0]] = holder.get(owner[0], 0) + 1
                        break
                    time.sleep(0.01)
            assert len(holder) == len(pids), f"slow connections held: {holder}"
            for sock, _ in socks:
                sock.settimeout(10)
                received = b""
                while chunk := sock.recv(4096):
                    received += chunk
                assert b"408" in received
            # The last one was read at once after it closed: its lifetime is the deadline's.
            assert time.monotonic() - socks[-1][1] < 1 + 2.5
        finally:
            for sock, _ in socks:
                sock.close()


# --- every 2xx stored, whichever worker answered ---------------------------------------------


def test_two_workers_share_the_load_and_store_every_2xx(store: Store) -> None:
    with running_service(store.db, args=store.args()) as server:
        pids = wait_for_workers(server, WORKERS)
        healthy(server)
        busy: dict[int, set[int]] = {pid: set() for pid in pids}
        sampling = True

        def sample() -> None:
            # Connections come and go: look often while the load runs.
            while sampling:
                for pid in pids:
                    busy[pid] |= accepted_ports(pid, server.port)
                time.sleep(0.02)

        sampler = threading.Thread(target=sample)
        sampler.start()
        acknowledged: list[str] = []
        try:
            # The kernel hands each new connection to whichever worker accepts first, so a few
            # keep-alive connections can all land on one; fresh rounds of connections (bounded)
            # until every worker has served some.
            for round_number in range(6):
                acknowledged += send_batches(
                    server.url + "/reports", 8, 1.0, f"share{round_number}"
                )
                if all(busy.values()):
                    break
        finally:
            sampling = False
            sampler.join()
        assert sorted(workers_of(server)) == pids, "a worker died or was replaced"
        assert len(acknowledged) > 100, "the load never got going"
        assert all(busy.values()), {pid: len(ports) for pid, ports in busy.items()}
        assert stop(server) == 0
    assert not workers_of(server)
    stored = store.stored_urls()
    missing = [url for url in acknowledged if url not in stored]
    assert not missing, f"{len(missing)} acknowledged reports missing, e.g. {missing[:3]}"


def test_a_graceful_stop_drains_every_worker(store: Store) -> None:
    """SIGTERM under load: every worker finishes, no 2xx is lost, the parent exits 0."""
    with running_service(store.db, args=store.args()) as server:
        pids = wait_for_workers(server, WORKERS)
        healthy(server)
        result: list[str] = []
        load = threading.Thread(
            target=lambda: result.extend(send_batches(server.url + "/reports", 8, 6.0, "term"))
        )
        load.start()
        time.sleep(1.5)
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=60) == 0
        load.join(timeout=60)
        for pid in pids:
            assert not Path(f"/proc/{pid}").exists() or _zombie(pid), f"worker {pid} still runs"
    assert len(result) > 50, "the load never got going"
    stored = store.stored_urls()
    missing = [url for url in result if url not in stored]
    assert not missing, f"{len(missing)} acknowledged reports missing, e.g. {missing[:3]}"


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def start_in_own_group(db: Path, args: list[str]) -> RunningServer:
    """`serve` in a process group of its own, so that the test can SIGKILL all of it."""
    port = free_port()
    command = [
        sys.executable, "-m", "reporting_endpoint", "serve",
        "--host", "127.0.0.1", "--port", str(port), "--db", str(db), *args,
    ]  # fmt: skip
    env = {**os.environ, "REPORTING_ENDPOINT_LOG_LEVEL": "warning"}
    process = subprocess.Popen(command, env=env, start_new_session=True)
    try:
        wait_until_listening(port, process)
    except BaseException:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        raise
    return RunningServer(process, port, "http", db)


def test_sigkill_of_every_process_keeps_every_acknowledged_report(store: Store) -> None:
    server = start_in_own_group(store.db, store.args())
    try:
        pids = wait_for_workers(server, WORKERS)
        healthy(server)
        result: list[str] = []
        load = threading.Thread(
            target=lambda: result.extend(send_batches(server.url + "/reports", 8, 20.0, "kill"))
        )
        load.start()
        time.sleep(2.5)
    finally:
        # The parent and both workers at once: nothing gets to drain or finish a commit.
        os.killpg(server.process.pid, signal.SIGKILL)
    assert server.process.wait(timeout=10) == -signal.SIGKILL
    load.join(timeout=60)
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() and not _zombie(pid) for pid in pids):
        assert time.monotonic() < deadline, "a worker outlived SIGKILL"
        time.sleep(0.05)
    assert len(result) > 100, "the load never got going"

    # Restart on the same database (two workers again): every acknowledged report is there.
    with running_service(store.db, args=store.args()) as restarted:
        wait_for_workers(restarted, WORKERS)
        healthy(restarted)
    stored = store.stored_urls()
    missing = [url for url in result if url not in stored]
    assert not missing, f"{len(missing)} acknowledged reports lost, e.g. {missing[:3]}"


def test_a_worker_that_cannot_start_stops_serve(tmp_path: Path) -> None:
    """A certificate that is not PEM fails in each worker: `serve` exits 3 at once instead of
    restarting workers for ever."""
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate\n")
    command = [
        sys.executable, "-m", "reporting_endpoint", "serve", "--host", "127.0.0.1",
        "--port", str(free_port()), "--db", str(tmp_path / "r.sqlite3"), "--workers", "2",
        "--ssl-certfile", str(bad), "--ssl-keyfile", str(bad),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 3, result.stderr[-2000:]
    assert "cannot start the server" in result.stderr
    assert result.stderr.count("cannot start the server") <= 2, "workers were restarted"


# --- startup on a fresh database ------------------------------------------------------------


@pytest.mark.parametrize("workers", [2, 4])
def test_workers_start_together_on_a_fresh_database(tmp_path: Path, workers: int) -> None:
    """N workers on a database that does not exist yet: one schema, applied once, all serve."""
    db = tmp_path / "fresh" / "r.sqlite3"
    with running_service(db, args=["--workers", str(workers)]) as server:
        assert len(wait_for_workers(server, workers)) == workers
        healthy(server)
        acknowledged = send_batches(server.url + "/reports", 4, 1.0, "fresh")
        assert len(workers_of(server)) == workers, "a worker failed at startup"
    assert acknowledged
    connection = sqlite3.connect(db)
    try:
        version = connection.execute("PRAGMA user_version").fetchone()[0]
        check = connection.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        connection.close()
    assert version == len(migrations())
    assert check == "ok"
    assert set(acknowledged) <= stored_urls(db)


def _start_storage(path: str, barrier: Barrier) -> None:
    """In a child process: open the storage the way each worker does, all at the same moment."""
    import asyncio

    from reporting_endpoint.storage import open_storage

    storage = open_storage(path, Settings())
    barrier.wait()

    async def start_and_stop() -> None:
        await storage.start()
        await storage.stop()

    asyncio.run(start_and_stop())


def test_processes_migrating_one_fresh_sqlite_file_at_once(tmp_path: Path) -> None:
    """Two `serve` processes (not workers of one) on a fresh file: each migration once."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    for trial in range(8):
        path = str(tmp_path / f"race{trial}.sqlite3")
        barrier = context.Barrier(4)
        processes = [context.Process(target=_start_storage, args=(path, barrier)) for _ in range(4)]
        for process in processes:
            process.start()
        for process in processes:
            process.join(timeout=60)
        assert [process.exitcode for process in processes] == [0] * 4


# --- the two-host example ---------------------------------------------------------------------


def test_the_two_host_nginx_example_is_valid(tmp_path: Path) -> None:
    nginx = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/sbin/nginx") if Path(p).exists()), None
    )
    if nginx is None:
        pytest.skip("nginx is not installed (apt-get install -y nginx)")
    # The example as a reader edits it: only the certificate paths change (nginx -t loads them).
    certificate = make_certificate(tmp_path / "tls")
    text = (EXAMPLES / "two-hosts" / "nginx.conf").read_text()
    text = text.replace("/etc/ssl/certs/reports.example.com.pem", str(certificate.cert_file))
    text = text.replace("/etc/ssl/private/reports.example.com.key", str(certificate.key_file))
    assert str(certificate.key_file) in text, "the example's certificate paths changed"
    conf = tmp_path / "nginx.conf"
    conf.write_text(text)
    # Writable paths into the temp folder, so that the check needs no root-owned files.
    result = subprocess.run(
        [nginx, "-t", "-q", "-p", str(tmp_path), "-c", str(conf),
         "-e", str(tmp_path / "error.log"), "-g", f"pid {tmp_path / 'nginx.pid'};"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
