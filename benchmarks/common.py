"""Shared benchmark plumbing: start a uvicorn server, drive it with wrk, parse wrk's output."""

from __future__ import annotations

import contextlib
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def peak_rss_mib(pid: int) -> float:
    """The process's peak resident memory (VmHWM), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def wait_for_port(
    port: int, timeout: float = 20.0, process: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode} before listening")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {port} after {timeout}s")


def wait_for_http(port: int, timeout: float = 60.0) -> None:
    """Until an HTTP answer comes back: with several workers the parent listens before any
    worker has started, and connections made meanwhile wait in the backlog."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                if sock.recv(16).startswith(b"HTTP/1.1 "):
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"no HTTP answer on {port} after {timeout}s")


@contextmanager
def server(
    command: list[str],
    port: int,
    env: dict[str, str] | None = None,
    kill: bool = False,
    workers: int = 1,
    cwd: Path = HERE,
) -> Iterator[subprocess.Popen[bytes]]:
    """A server process (and its workers) for the block. ``kill`` ends them all with SIGKILL:
    nothing queued gets drained after the load, so the durability check sees only what each
    2xx promised."""
    # A process group of its own: SIGKILL reaches the workers too (orphans would keep the port).
    process = subprocess.Popen(
        command, env={**os.environ, **(env or {})}, cwd=cwd, start_new_session=True
    )
    try:
        wait_for_port(port, process=process)
        if workers > 1:
            wait_for_http(port)
            # The first answer came from one worker; the others start alongside it.
            time.sleep(1.0)
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            if kill:
                os.killpg(process.pid, signal.SIGKILL)
            else:
                # The parent stops its workers (each drains) and waits for them.
                process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: str) -> list[str]:
    # The command name may hold spaces and parentheses: the fields start after the last ")".
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _processes() -> dict[int, tuple[int, int, float]]:
    """pid -> (parent, process group, CPU seconds used) of every process still running."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = _stat_fields(entry.name)
            except OSError:
                continue  # gone meanwhile
            # Fields 3 (ppid), 4 (pgrp), 13 and 14 (utime, stime) counted from "state" as 0.
            cpu = (int(fields[11]) + int(fields[12])) / _TICKS
            found[int(entry.name)] = (int(fields[1]), int(fields[2]), cpu)
    return found


def _machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, all cores."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values[:8]) - idle) / _TICKS, sum(values[:8]) / _TICKS


@dataclass
class CpuUse:
    """CPU seconds spent during a run, by whom: the server under test (its process group),
    the database server (its process tree), wrk, and everything else on the machine."""

    seconds: float
    cores: int
    server: float
    database: float
    wrk: float
    other: float

    def __str__(self) -> str:
        text = f"server {self.server:.1f} s"
        if self.database:
            text += f", database {self.database:.1f} s"
        return (
            f"{text}, wrk {self.wrk:.1f} s, everything else {self.other:.1f} s"
            f" (of {self.seconds * self.cores:.1f} core-seconds)"
        )


class CpuMeter:
    """Snapshots of CPU use before and after a run (Linux /proc only)."""

    def __init__(self, server_group: int, database_root: int | None = None) -> None:
        self.server_group = server_group
        self.database_root = database_root

    def snapshot(self) -> tuple[float, float, float, float, float, float]:
        processes = _processes()
        server = sum(cpu for _, group, cpu in processes.values() if group == self.server_group)
        database = 0.0
        if self.database_root is not None:
            tree = {self.database_root}
            # Parents come before children in pid order, except after pid wrap-around.
            for pid in sorted(processes):
                if processes[pid][0] in tree:
                    tree.add(pid)
            database = sum(processes[pid][2] for pid in tree if pid in processes)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        busy, total = _machine_cpu()
        now = time.monotonic()
        return now, server, database, children.ru_utime + children.ru_stime, busy, total

    @staticmethod
    def between(
        before: tuple[float, float, float, float, float, float],
        after: tuple[float, float, float, float, float, float],
    ) -> CpuUse:
        change = [a - b for a, b in zip(after, before, strict=True)]
        seconds, server, database, wrk, busy, _ = change
        return CpuUse(
            seconds=seconds,
            cores=os.cpu_count() or 1,
            server=server,
            database=database,
            wrk=wrk,
            other=max(0.0, busy - server - database - wrk),
        )


def bare_server(port: int, workers: int = 1) -> list[str]:
    return [
        sys.executable,
        "-m",
        "uvicorn",
        "bare_app:app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--no-access-log",
        "--log-level",
        "warning",
    ]


@dataclass
class WrkResult:
    requests: int
    seconds: float
    rps: float
    non_2xx: int
    errors: int
    p50_ms: float
    p99_ms: float
    acknowledged: list[str] = field(default_factory=list, repr=False)

    @property
    def ok(self) -> int:
        return self.requests - self.non_2xx


def _ms(value: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", value)
    if not match:
        raise ValueError(value)
    number, unit = float(match.group(1)), match.group(2)
    return number * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


# Replaced in a request body by a value unique to that request (thread number and counter).
MARK = "@@MARK@@"

# wrk calls request() and response() per thread; with one connection per thread each response
# pairs with the latest request() (not a queue of them: wrk also calls request() once on the
# first thread to check the script, and that request is never sent). Acknowledged requests (2xx) are
# appended, one line each, to the thread's own file: the marker, or with ``record = "body"``
# the response body (Crashpad's answer is the crash id).
_SCRIPT = """
local folder, count, content_type, record = {folder!r}, {count}, {content_type!r}, {record!r}
local extra = {{ {extra} }}
local bodies = {{}}
for i = 1, count do
  local f = assert(io.open(folder .. "/body" .. (i - 1), "rb"))
  bodies[i] = f:read("*a")
  f:close()
end
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("number", threads)
end
local last, out, n = nil, nil, 0
function init(args)
  out = assert(io.open(folder .. "/acks-" .. number, "w"))
  out:setvbuf("line")
end
function request()
  n = n + 1
  local marker = number .. "-" .. n
  local body = bodies[(n % count) + 1]
  if record == "marker" then body = body:gsub("{mark}", marker) end
  last = marker
  local headers = {{ ["Content-Type"] = content_type }}
  for k, v in pairs(extra) do headers[k] = v end
  return wrk.format("POST", nil, headers, body)
end
function response(status, headers, body)
  if status >= 200 and status < 300 then
    out:write((record == "body" and body or last), "\\n")
  end
end
"""


def run_wrk(
    url: str,
    bodies: Sequence[bytes],
    seconds: int,
    connections: int,
    content_type: str,
    headers: dict[str, str] | None = None,
    record: str = "marker",
) -> WrkResult:
    """Drive ``url`` with wrk, one thread a connection, cycling through ``bodies``.

    Every ``MARK`` in a body becomes a marker unique to the request; ``WrkResult.acknowledged``
    holds the marker (``record="marker"``) or response body (``record="body"``) of every 2xx.
    """
    wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit("wrk is needed: apt-get install wrk")
    with tempfile.TemporaryDirectory() as tmp:
        for number, body in enumerate(bodies):
            (Path(tmp) / f"body{number}").write_bytes(body)
        script = Path(tmp) / "post.lua"
        extra = ", ".join(f"[{k!r}] = {v!r}" for k, v in (headers or {}).items())
        script.write_text(
            _SCRIPT.format(
                folder=tmp,
                count=len(bodies),
                content_type=content_type,
                record=record,
                extra=extra,
                mark=MARK,
            )
        )
        out = subprocess.run(
            [wrk, f"-t{connections}", f"-c{connections}", f"-d{seconds}s", "--latency",
             "-s", str(script), url],
            check=True,
            capture_output=True,
            text=True,
            timeout=seconds + 60,
        ).stdout  # fmt: skip
        acknowledged = [
            line
            for acks in sorted(Path(tmp).glob("acks-*"))
            for line in acks.read_text().splitlines()
            if line
        ]
    requests = int(re.search(r"(\d+) requests in ([\d.]+)(\w+)", out).group(1))  # type: ignore[union-attr]
    dur = re.search(r"requests in ([\d.]+\w+)", out).group(1)  # type: ignore[union-attr]
    non = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errs = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    p50 = re.search(r"^\s+50%\s+([\d.]+\w+)", out, re.M).group(1)  # type: ignore[union-attr]
    p99 = re.search(r"^\s+99%\s+([\d.]+\w+)", out, re.M).group(1)  # type: ignore[union-attr]
    seconds_run = _ms(dur) / 1000
    return WrkResult(
        requests=requests,
        seconds=seconds_run,
        rps=requests / seconds_run,
        non_2xx=int(non.group(1)) if non else 0,
        errors=sum(int(x) for x in errs.groups()) if errs else 0,
        p50_ms=_ms(p50),
        p99_ms=_ms(p99),
        acknowledged=acknowledged,
    )
