"""Minidump uploads: this service against a bare endpoint, same wrk load, one run.

Each upload is a gzip-compressed multipart body of about 250 KB: a real Electron dump plus
230 KB that barely compresses, as the memory in bigger real dumps does. Prints req/s, MB/s,
p50/p99 and each server's peak resident memory, and checks every 2xx is a stored row.
Usage: python benchmarks/crashpad.py [--seconds 10] [--connections 16]
"""

from __future__ import annotations

import argparse
import gzip
import random
import sqlite3
import sys
import tempfile
from pathlib import Path

from common import bare_server, free_port, peak_rss_mib, run_wrk, server

BOUNDARY = "---MultipartBoundary-bench---"


DUMP = (
    Path(__file__).resolve().parent.parent
    / "tests/fixtures/minidumps"
    / ("win-x64_electron_node-minidump_windows.dmp")
)


def upload_body(extra: int = 230 * 1024) -> bytes:
    # A real Electron dump (it parses) followed by bytes that barely compress, standing in for
    # the memory a bigger dump carries: gzip brings the upload to roughly 250 KB.
    rng = random.Random(5)
    dump = DUMP.read_bytes() + rng.randbytes(extra)
    form = (
        (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="prod"\r\n\r\nElectron\r\n'
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="_productName"\r\n\r\nBench\r\n'
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="upload_file_minidump"; '
            f'filename="bench.dmp"\r\nContent-Type: application/octet-stream\r\n\r\n'
        ).encode()
        + dump
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )
    return gzip.compress(form)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args()
    body = upload_body()
    content_type = f"multipart/form-data; boundary={BOUNDARY}"
    extra = {"Content-Encoding": "gzip"}
    mb = len(body) / 1e6
    print(f"upload: {len(body) / 1024:.0f} KB gzip-compressed, {args.connections} connections")

    port = free_port()
    with server(bare_server(port), port) as process:
        bare = run_wrk(f"http://127.0.0.1:{port}/crashpad", body, args.seconds,
                       args.connections, content_type, extra)  # fmt: skip
        bare_peak = peak_rss_mib(process.pid)
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "bench.sqlite3"
        port = free_port()
        command = [sys.executable, "-m", "reporting_endpoint", "serve", "--port", str(port),
                   "--db", str(db)]  # fmt: skip
        with server(command, port, {"REPORTING_ENDPOINT_LOG_LEVEL": "warning"}) as process:
            idle_peak = peak_rss_mib(process.pid)
            ours = run_wrk(f"http://127.0.0.1:{port}/crashpad", body, args.seconds,
                           args.connections, content_type, extra)  # fmt: skip
            our_peak = peak_rss_mib(process.pid)
        stored = sqlite3.connect(db).execute("SELECT count(*) FROM crashes").fetchone()[0]
    for label, result, peak in (
        ("bare endpoint", bare, bare_peak),
        ("this service", ours, our_peak),
    ):
        print(f"  {label:13}: {result.rps:7.0f} req/s  {result.rps * mb:6.1f} MB/s  "
              f"p50 {result.p50_ms:6.1f} ms  p99 {result.p99_ms:6.1f} ms  "
              f"peak RSS {peak:6.1f} MiB  non-2xx {result.non_2xx}")  # fmt: skip
    print(f"  ratio        : {ours.rps / bare.rps:.2f}x the bare endpoint's req/s")
    print(f"  memory       : idle {idle_peak:.1f} MiB, {our_peak - idle_peak:+.1f} MiB under load"
          f" with {args.connections} uploads in flight ({len(body) / 1024:.0f} KB each,"
          f" {args.connections * len(body) / 2**20:.1f} MiB of bodies)")  # fmt: skip
    durable = stored >= ours.ok
    print(f"  durable      : {stored} stored >= {ours.ok} acknowledged: {durable}")
    return 0 if durable else 1


if __name__ == "__main__":
    raise SystemExit(main())
