"""Minidump uploads: this service against a bare endpoint, same wrk load, one run.

Each upload is a gzip-compressed multipart body of about 200 KB. The load is varied, not one
identical upload: 32 bodies cycle, each a different real dump from tests/fixtures/minidumps
(Windows, macOS, Linux, iOS; Breakpad, Crashpad, Electron) with its own product, version,
platform, process type and annotations, followed by bytes that barely compress (as the memory in
bigger real dumps does) and differ per body, so every body is a new blob. Prints req/s, MB/s,
p50/p99 and each server's peak resident memory. Afterwards the server is SIGKILLed (nothing
drained) and every acknowledged crash id must have its row and its dump file, same sha256.
Usage: python benchmarks/crashpad.py [--seconds 10] [--connections 16]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import random
import sqlite3
import sys
import tempfile
from pathlib import Path

from common import bare_server, free_port, peak_rss_mib, run_wrk, server

BOUNDARY = "---MultipartBoundary-bench---"


MINIDUMPS = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "minidumps"
BODIES = 32
SIZE = 250 * 1024


def part(name: str, value: str) -> bytes:
    return (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
    )


def upload_bodies(count: int = BODIES) -> list[bytes]:
    rng = random.Random(5)
    # Only dumps that start with the MDMP magic: anything else is refused (400), not stored.
    dumps = [d for d in sorted(MINIDUMPS.glob("*.dmp")) if d.read_bytes()[:4] == b"MDMP"]
    bodies = []
    for n in range(count):
        dump = dumps[n % len(dumps)].read_bytes()
        dump += rng.randbytes(max(0, SIZE - len(dump)))
        fields = {
            "prod": rng.choice(["Electron", "Chrome", "Bench"]),
            "ver": f"{rng.randrange(20, 40)}.{rng.randrange(10)}.{rng.randrange(100)}",
            "_productName": rng.choice(["Notes", "Mailer", "Studio", "Player"]),
            "_version": f"{rng.randrange(1, 9)}.{rng.randrange(30)}.{rng.randrange(200)}",
            "platform": rng.choice(["win32", "darwin", "linux"]),
            "process_type": rng.choice(["browser", "renderer", "gpu-process", "utility"]),
            "guid": f"{rng.randrange(16**32):032x}",
            "url-chunk-1": f"https://app{rng.randrange(100)}.example/view/{rng.randrange(10**6)}",
        }
        form = (
            b"".join(part(name, value) for name, value in fields.items())
            + (
                f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="upload_file_minidump"; '
                f'filename="{n}.dmp"\r\nContent-Type: application/octet-stream\r\n\r\n'
            ).encode()
            + dump
            + f"\r\n--{BOUNDARY}--\r\n".encode()
        )
        bodies.append(gzip.compress(form))
    return bodies


def lost(db: Path, acknowledged: list[str]) -> list[str]:
    """Acknowledged crash ids without their row, or whose dump file is gone or changed."""
    connection = sqlite3.connect(db)
    try:
        rows = {
            crash_id: (path, digest)
            for crash_id, path, digest in connection.execute(
                "SELECT id, dump_path, dump_sha256 FROM crashes"
            )
        }
    finally:
        connection.close()
    data = db.with_name(db.name + ".data")
    missing = []
    for crash_id in acknowledged:
        row = rows.get(crash_id)
        dump = data / row[0] if row else None
        if (
            row is None
            or dump is None
            or not dump.is_file()
            or hashlib.sha256(dump.read_bytes()).hexdigest() != row[1]
        ):
            missing.append(crash_id)
    return missing


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args()
    load = upload_bodies()
    content_type = f"multipart/form-data; boundary={BOUNDARY}"
    extra = {"Content-Encoding": "gzip"}
    average = sum(len(body) for body in load) / len(load)
    mb = average / 1e6
    print(f"upload: {average / 1024:.0f} KB gzip-compressed on average, {len(load)} different"
          f" bodies, {args.connections} connections")  # fmt: skip

    port = free_port()
    with server(bare_server(port), port) as process:
        bare = run_wrk(f"http://127.0.0.1:{port}/crashpad", load, args.seconds,
                       args.connections, content_type, extra, record="body")  # fmt: skip
        bare_peak = peak_rss_mib(process.pid)
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "bench.sqlite3"
        port = free_port()
        command = [sys.executable, "-m", "reporting_endpoint", "serve", "--port", str(port),
                   "--db", str(db)]  # fmt: skip
        env = {"REPORTING_ENDPOINT_LOG_LEVEL": "warning"}
        with server(command, port, env, kill=True) as process:
            idle_peak = peak_rss_mib(process.pid)
            ours = run_wrk(f"http://127.0.0.1:{port}/crashpad", load, args.seconds,
                           args.connections, content_type, extra, record="body")  # fmt: skip
            our_peak = peak_rss_mib(process.pid)
        missing = lost(db, ours.acknowledged)
    for label, result, peak in (
        ("bare endpoint", bare, bare_peak),
        ("this service", ours, our_peak),
    ):
        print(f"  {label:13}: {result.rps:7.0f} req/s  {result.rps * mb:6.1f} MB/s  "
              f"p50 {result.p50_ms:6.1f} ms  p99 {result.p99_ms:6.1f} ms  "
              f"peak RSS {peak:6.1f} MiB  non-2xx {result.non_2xx}")  # fmt: skip
    print(f"  ratio        : {ours.rps / bare.rps:.2f}x the bare endpoint's req/s")
    print(f"  memory       : idle {idle_peak:.1f} MiB, {our_peak - idle_peak:+.1f} MiB under load"
          f" with {args.connections} uploads in flight ({average / 1024:.0f} KB each,"
          f" {args.connections * average / 2**20:.1f} MiB of bodies)")  # fmt: skip
    print(f"  durable      : {len(ours.acknowledged)} acknowledged crash ids, each checked after"
          f" SIGKILL (row, dump file, sha256): {len(missing)} lost {missing[:3]}")  # fmt: skip
    return 0 if ours.acknowledged and not missing else 1


if __name__ == "__main__":
    raise SystemExit(main())
