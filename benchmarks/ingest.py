"""W3C ingest throughput: this service against a bare Starlette endpoint, same load, one run.

Usage: python benchmarks/ingest.py [--seconds 10] [--connections 64]
Prints req/s, reports/s, p50/p99 latency and the ratio to the bare endpoint, for 1-report and
100-report batches, and checks that every 2xx is in the database afterwards.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import tempfile
from pathlib import Path

import orjson
from common import bare_server, free_port, run_wrk, server

UA = (
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/156.0.0.0 Safari/537.36"
)


def batch(size: int) -> bytes:
    reports = [
        {
            "age": 13 + i,
            "body": {"crash_report_api": {}, "is_top_level": True, "visibility_state": "visible"},
            "type": "crash",
            "url": f"https://shop{i % 7}.example.co.uk/page/{i}?session=abc",
            "user_agent": UA,
        }
        for i in range(size)
    ]
    return orjson.dumps(reports)


def service_server(port: int, db: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "reporting_endpoint",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--db",
        str(db),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--sizes", default="1,100")
    args = parser.parse_args()
    failed = False
    for size in (int(s) for s in args.sizes.split(",")):
        body = batch(size)
        port = free_port()
        with server(bare_server(port), port):
            bare = run_wrk(
                f"http://127.0.0.1:{port}/reports",
                body,
                args.seconds,
                args.connections,
                "application/reports+json",
            )
        with tempfile.TemporaryDirectory() as tmp:
            db = Path(tmp) / "bench.sqlite3"
            port = free_port()
            with server(
                service_server(port, db), port, {"REPORTING_ENDPOINT_LOG_LEVEL": "warning"}
            ):
                ours = run_wrk(
                    f"http://127.0.0.1:{port}/reports",
                    body,
                    args.seconds,
                    args.connections,
                    "application/reports+json",
                )
            stored = sqlite3.connect(db).execute("SELECT count(*) FROM reports").fetchone()[0]
        durable = stored >= ours.ok * size
        failed |= not durable
        ratio = ours.rps / bare.rps
        print(f"batch of {size} report(s), {args.connections} connections, {args.seconds}s each")
        print(
            f"  bare endpoint : {bare.rps:9.0f} req/s  "
            f"p50 {bare.p50_ms:7.2f} ms  p99 {bare.p99_ms:7.2f} ms"
        )
        print(
            f"  this service  : {ours.rps:9.0f} req/s  {ours.rps * size:10.0f} reports/s  "
            f"p50 {ours.p50_ms:7.2f} ms  p99 {ours.p99_ms:7.2f} ms  non-2xx {ours.non_2xx}"
        )
        print(f"  ratio         : {ratio:.2f}x the bare endpoint's req/s")
        print(f"  durable       : {stored} stored >= {ours.ok * size} acknowledged: {durable}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
