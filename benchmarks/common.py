"""Shared benchmark plumbing: start a uvicorn server, drive it with wrk, parse wrk's output."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
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


def wait_for_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {port} after {timeout}s")


@contextmanager
def server(
    command: list[str], port: int, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(command, env={**os.environ, **(env or {})}, cwd=HERE)
    try:
        wait_for_port(port)
        yield process
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def bare_server(port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "uvicorn",
        "bare_app:app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
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

    @property
    def ok(self) -> int:
        return self.requests - self.non_2xx


def _ms(value: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", value)
    if not match:
        raise ValueError(value)
    number, unit = float(match.group(1)), match.group(2)
    return number * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def run_wrk(
    url: str,
    body: bytes,
    seconds: int,
    connections: int,
    content_type: str,
    headers: dict[str, str] | None = None,
) -> WrkResult:
    wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit("wrk is needed: apt-get install wrk")
    with tempfile.TemporaryDirectory() as tmp:
        body_file = Path(tmp) / "body"
        body_file.write_bytes(body)
        script = Path(tmp) / "post.lua"
        script.write_text(
            f"local f = io.open({str(body_file)!r}, 'rb')\n"
            "wrk.method = 'POST'\n"
            "wrk.body = f:read('*a')\n"
            "f:close()\n"
            f"wrk.headers['Content-Type'] = {content_type!r}\n"
            + "".join(f"wrk.headers[{k!r}] = {v!r}\n" for k, v in (headers or {}).items())
        )
        out = subprocess.run(
            [wrk, "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(script), url],
            check=True,
            capture_output=True,
            text=True,
            timeout=seconds + 60,
        ).stdout
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
    )
