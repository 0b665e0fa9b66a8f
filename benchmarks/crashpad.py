"""Minidump uploads (issue 14): this service with --workers 2 against a bare endpoint, same wrk.

The three bodies of crashpad_bodies.py: (1) a real Crashpad capture of an Electron dump with its
7 handler annotations, (2) the same with the largest public dump, (3) (2) plus 19 attachments.
Each is sent over and over (the same content: after the first upload the blobs exist, and a
stored blob is not written again). One run measures, per body, a bare Starlette endpoint (one
worker, reads the body, answers 200 with an id) and `serve --workers 2`, and prints req/s, MB/s
(as sent), p50/p99 and the ratio. With --drain it then measures how long the processors take to
empty the crash backlog. Afterwards the service is SIGKILLed (nothing drained) and every
acknowledged crash id must have its row and its dump file (same sha256); the rows may outnumber
the 2xx by the uploads wrk sent but stopped reading the answer of.
Usage: python benchmarks/crashpad.py [--seconds 10] [--connections 16] [--processors N] [--drain]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sqlite3
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from common import bare_server, free_port, peak_rss_mib, run_wrk, server
from crashpad_bodies import Body, bodies

# Targets of issue 14: three times antenna's ratio to the bare endpoint on the same bodies.
TARGETS = (0.13, 0.13, 0.12)
# The longest --drain waits for the backlog to empty (seconds).
DRAIN_LIMIT = 300


def stored(db: Path) -> dict[str, tuple[str, str, str]]:
    connection = sqlite3.connect(db)
    try:
        return {
            crash_id: (path, digest, status)
            for crash_id, path, digest, status in connection.execute(
                "SELECT id, dump_path, dump_sha256, parse_status FROM crashes"
            )
        }
    finally:
        connection.close()


def lost(db: Path, acknowledged: list[str]) -> list[str]:
    """Acknowledged crash ids without their row, or whose dump file is gone or changed."""
    rows = stored(db)
    data = db.with_name(db.name + ".data")
    digests: dict[Path, str] = {}
    missing = []
    for crash_id in acknowledged:
        row = rows.get(crash_id)
        if row is None:
            missing.append(crash_id)
            continue
        dump = data / row[0]
        if dump not in digests:
            digests[dump] = hashlib.sha256(dump.read_bytes()).hexdigest() if dump.is_file() else ""
        if digests[dump] != row[1]:
            missing.append(crash_id)
    return missing


def healthz(port: int) -> dict[str, object]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as answer:
        return dict(json.loads(answer.read()))


def service(port: int, db: Path, processors: int | None) -> list[str]:
    command = [sys.executable, "-m", "reporting_endpoint", "serve", "--port", str(port),
               "--db", str(db), "--workers", "2"]  # fmt: skip
    if processors is not None:
        command += ["--processors", str(processors)]
    return command


def run_body(body: Body, target: float, args: argparse.Namespace) -> bool:
    url_path = "/crashpad"
    headers = {"Content-Encoding": "gzip"}
    port = free_port()
    with server(bare_server(port), port) as process:
        bare = run_wrk(f"http://127.0.0.1:{port}{url_path}", [body.gzip], args.seconds,
                       args.connections, body.content_type, headers, record="body")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "bench.sqlite3"
        port = free_port()
        env = {"REPORTING_ENDPOINT_LOG_LEVEL": "warning"}
        command = service(port, db, args.processors)
        with server(command, port, env, kill=True, workers=2) as process:
            ours = run_wrk(f"http://127.0.0.1:{port}{url_path}", [body.gzip], args.seconds,
                           args.connections, body.content_type, headers, record="body")  # fmt: skip
            backlog = healthz(port)
            drained = None
            if args.drain:
                # The load stopped: how long the processors take to empty the backlog.
                start = time.monotonic()
                while time.monotonic() - start < DRAIN_LIMIT:
                    if healthz(port)["crash_backlog"] == 0:
                        drained = time.monotonic() - start
                        break
                    time.sleep(0.2)
            peak = peak_rss_mib(process.pid)
        # SIGKILLed on leaving the block: nothing drained, only what each 200 promised.
        missing = lost(db, ours.acknowledged)
        rows = stored(db)
    mb = len(body.gzip) / 1e6
    ratio = ours.rps / bare.rps
    print(f"{body.name}: {len(body.gzip) / 1024:.0f} KB gzip, {body.unpacked / 1024:.0f} KB"
          f" unpacked, {body.files} file(s), {args.connections} connections,"
          f" {args.seconds} s")  # fmt: skip
    for label, result in (("bare endpoint", bare), ("serve -w 2", ours)):
        print(f"  {label:13}: {result.rps:7.0f} req/s  {result.rps * mb:6.1f} MB/s  "
              f"p50 {result.p50_ms:6.1f} ms  p99 {result.p99_ms:6.1f} ms  "
              f"non-2xx {result.non_2xx}  errors {result.errors}")  # fmt: skip
    met = ratio >= target
    print(f"  ratio        : {ratio:.3f}x the bare endpoint's req/s (target {target}x:"
          f" {'met' if met else 'NOT met'}); supervisor peak RSS {peak:.0f} MiB")  # fmt: skip
    print(f"  backlog      : {backlog['crash_backlog']} of {len(rows)} crashes still pending"
          f" when the load stopped, the oldest {backlog['crash_backlog_age_seconds']} s"
          " old")  # fmt: skip
    if args.drain:
        statuses = [row[2] for row in rows.values()]
        took = "not within the limit" if drained is None else f"{drained:.1f} s after the load"
        print(f"  drained      : backlog empty {took};"
              f" {statuses.count('parsed')} parsed, {statuses.count('failed')} failed,"
              f" {statuses.count('pending')} pending")  # fmt: skip
    # wrk stops mid-request: uploads it sent but whose 200 it did not read are stored too
    # (rows >= 2xx); each of the other direction would be a lost crash.
    durable = not missing and len(rows) >= len(ours.acknowledged)
    print(f"  durable      : {len(ours.acknowledged)} 2xx, {len(rows)} rows after SIGKILL"
          f" ({len(rows) - len(ours.acknowledged)} answered after wrk stopped reading),"
          f" {len(missing)} acknowledged crashes lost {missing[:3]}", flush=True)  # fmt: skip
    return durable and bool(ours.acknowledged)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--processors", type=int, default=None)
    parser.add_argument("--drain", action="store_true")
    parser.add_argument("--body", type=int, choices=[1, 2, 3], action="append")
    args = parser.parse_args()
    ok = True
    for number, (body, target) in enumerate(zip(bodies(), TARGETS, strict=True), 1):
        if args.body and number not in args.body:
            continue
        ok = run_body(body, target, args) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
