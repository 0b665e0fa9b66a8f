"""W3C ingest throughput: this service against a bare Starlette endpoint, same load, one run.

Usage: python benchmarks/ingest.py [--seconds 10] [--connections 64] [--sizes 1,100]
Prints req/s, reports/s, p50/p99 latency and the ratio to the bare endpoint, for 1-report and
100-report batches. The load is varied, not a best case: 64 different bodies cycle, over 1,000
hosts, 200 user agents and every report type Chromium sends (crash with each reason,
deprecation, intervention, csp-violation), each report's URL carrying a marker unique to its
request. Afterwards the server is SIGKILLed (nothing drained) and every report of every
acknowledged request must be in the database.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sqlite3
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
from common import MARK, bare_server, free_port, run_wrk, server

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "chromium"
BODIES = 64
HOSTS = 1000
AGENTS = 200
_MARKER = re.compile(r"/m/([0-9]+-[0-9]+)/[0-9]+$")


def user_agents(count: int) -> list[str]:
    """Browsers, versions and platforms as a real site's traffic mixes them."""
    platforms = [
        "Windows NT 10.0; Win64; x64",
        "X11; Linux x86_64",
        "Macintosh; Intel Mac OS X 10_15_7",
        "Linux; Android 14; Pixel 8",
        "Linux; Android 13; SM-S918B",
        "X11; CrOS x86_64 15633.69.0",
    ]
    agents = []
    for i in range(count):
        major = 110 + i % 47
        platform = platforms[i % len(platforms)]
        mobile = " Mobile" if "Android" in platform else ""
        tail = [
            f"Chrome/{major}.0.0.0{mobile} Safari/537.36",
            f"Chrome/{major}.0.0.0{mobile} Safari/537.36 Edg/{major}.0.{i}.{i % 90}",
            f"Chrome/{major}.0.0.0{mobile} Safari/537.36 OPR/{major - 14}.0.0.0",
            f"SamsungBrowser/{20 + i % 6}.0 Chrome/{major}.0.0.0{mobile} Safari/537.36",
        ][i // len(platforms) % 4]
        agents.append(f"Mozilla/5.0 ({platform}) AppleWebKit/537.36 (KHTML, like Gecko) {tail}")
    return agents


def captured() -> list[dict[str, Any]]:
    """Every report a real Chromium sent in the test fixtures: the templates of the mix."""
    reports = []
    for path in sorted(FIXTURES.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            request = json.loads(line) if line.strip() else None
            if request and request["method"] == "POST":
                reports.extend(json.loads(request["body"]))
    return reports


def bodies(size: int, count: int = BODIES) -> list[bytes]:
    rng = random.Random(size)
    templates = captured()
    hosts = [f"site{n}.example{'.co.uk' if n % 5 == 0 else '.com'}" for n in range(HOSTS)]
    agents = user_agents(AGENTS)
    out = []
    for _ in range(count):
        batch = []
        for i in range(size):
            report = json.loads(json.dumps(rng.choice(templates)))
            report["url"] = (
                f"https://{rng.choice(hosts)}/m/{MARK}/{i}?session={rng.randrange(10**9)}"
            )
            report["user_agent"] = rng.choice(agents)
            report["age"] = rng.randrange(0, 60_000)
            if report["type"] == "crash":
                reason = rng.choice([None, "oom", "unresponsive"])
                report["body"] = {k: v for k, v in report["body"].items() if k != "reason"}
                if reason:
                    report["body"]["reason"] = reason
            batch.append(report)
        out.append(orjson.dumps(batch))
    return out


def service_server(port: int, db: Path) -> list[str]:
    return [sys.executable, "-m", "reporting_endpoint", "serve", "--host", "127.0.0.1",
            "--port", str(port), "--db", str(db)]  # fmt: skip


def missing(db: Path, acknowledged: list[str], size: int) -> list[str]:
    """Markers of acknowledged requests that do not have all ``size`` reports stored."""
    connection = sqlite3.connect(db)
    try:
        stored = Counter(
            match.group(1)
            for (url,) in connection.execute("SELECT url FROM reports")
            if (match := _MARKER.search(str(url)))
        )
    finally:
        connection.close()
    return [marker for marker in acknowledged if stored[marker] != size]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--sizes", default="1,100")
    args = parser.parse_args()
    failed = False
    for size in (int(s) for s in args.sizes.split(",")):
        load = bodies(size)
        port = free_port()
        with server(bare_server(port), port):
            bare = run_wrk(f"http://127.0.0.1:{port}/reports", load, args.seconds,
                           args.connections, "application/reports+json")  # fmt: skip
        with tempfile.TemporaryDirectory() as tmp:
            db = Path(tmp) / "bench.sqlite3"
            port = free_port()
            env = {"REPORTING_ENDPOINT_LOG_LEVEL": "warning"}
            with server(service_server(port, db), port, env, kill=True):
                ours = run_wrk(f"http://127.0.0.1:{port}/reports", load, args.seconds,
                               args.connections, "application/reports+json")  # fmt: skip
            lost = missing(db, ours.acknowledged, size)
        failed |= bool(lost) or not ours.acknowledged
        ratio = ours.rps / bare.rps
        print(f"batch of {size} report(s), {args.connections} connections, {args.seconds}s each,"
              f" {len(load)} different bodies")  # fmt: skip
        print(
            f"  bare endpoint : {bare.rps:9.0f} req/s  "
            f"p50 {bare.p50_ms:7.2f} ms  p99 {bare.p99_ms:7.2f} ms"
        )
        print(
            f"  this service  : {ours.rps:9.0f} req/s  {ours.rps * size:10.0f} reports/s  "
            f"p50 {ours.p50_ms:7.2f} ms  p99 {ours.p99_ms:7.2f} ms  non-2xx {ours.non_2xx}"
        )
        print(f"  ratio         : {ratio:.2f}x the bare endpoint's req/s")
        print(f"  durable       : {len(ours.acknowledged)} acknowledged requests, checked one by"
              f" one after SIGKILL: {len(lost)} incomplete {lost[:3]}")  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
