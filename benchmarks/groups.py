"""Group queries on a large database: /api/groups?by=site and ?by=site,browser, p50 and p99.

Loads N reports (default 1,000,000: about 1,000 sites and 50 user agents, spread over 30 days)
through the same write path the service uses (rows plus roll-up counters, in 1,000-row
transactions), then times the API over HTTP against a real `reporting-endpoint serve`.
Usage: python benchmarks/groups.py [--reports 1000000] [--requests 200] [--db PATH]
"""

from __future__ import annotations

import argparse
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx2
from common import free_port, server

from reporting_endpoint.grouping import parse_user_agent, url_parts
from reporting_endpoint.records import NewReport
from reporting_endpoint.storage.sqlite import migrate, open_connection
from reporting_endpoint.storage.sqlite.rollups import write_reports

TOKEN = "bench-token"
# The bar; the other queries are printed for information.
BAR_QUERIES = {"groups?by=site", "groups?by=site,browser"}


def user_agents(count: int) -> list[str]:
    agents = []
    for i in range(count):
        major = 100 + i % 40
        if i % 3 == 0:
            agents.append(
                f"Mozilla/5.0 (X11; Linux x86_64; rv:{major}.0) Gecko/20100101 Firefox/{major}.0"
            )
        elif i % 3 == 1:
            agents.append(
                f"Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko)"
                f" Chrome/{major}.0.0.0 Safari/537.36"
            )
        else:
            agents.append(
                f"Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_{i % 8}) AppleWebKit/605.1.15"
                f" (KHTML, like Gecko) Version/{16 + i % 10}.1 Safari/605.1.15"
            )
    return agents


def load(db: Path, reports: int, sites: int = 1000, agents: int = 50) -> None:
    migrate(db)
    connection = open_connection(db, "NORMAL")
    rng = random.Random(7)
    uas = user_agents(agents)
    parsed = {ua: parse_user_agent(ua) for ua in uas}
    now = int(time.time() * 1000)
    span = 30 * 86_400_000
    reasons = ["oom", "unresponsive", None]
    batch: list[tuple[object, ...]] = []
    for n in range(reports):
        site = rng.randrange(sites)
        url = f"https://www{n % 3}.shop{site}.co.uk/page/{n % 17}"
        parts = url_parts(url)
        ua = uas[rng.randrange(agents)]
        agent = parsed[ua]
        received = now - rng.randrange(span)
        reason = reasons[n % 3]
        batch.append(
            NewReport(
                received,
                received - 10,
                10,
                "crash",
                parts.url,
                parts.origin,
                parts.site,
                ua,
                agent.browser,
                agent.browser_major,
                agent.os,
                reason,
                f'{{"age":10,"type":"crash","url":"{parts.url}","body":{{}}}}',
            ).row()
        )
        if len(batch) == 1000:
            connection.execute("BEGIN IMMEDIATE")
            write_reports(connection, batch)
            connection.execute("COMMIT")
            batch.clear()
    if batch:
        connection.execute("BEGIN IMMEDIATE")
        write_reports(connection, batch)
        connection.execute("COMMIT")
    connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    connection.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reports", type=int, default=1_000_000)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--db", type=Path, help="reuse (or create) this database file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        db = args.db or Path(tmp) / "groups.sqlite3"
        if not db.exists():
            start = time.perf_counter()
            load(db, args.reports)
            print(
                f"loaded {args.reports} reports in {time.perf_counter() - start:.0f} s", flush=True
            )
        connection = sqlite3.connect(db)
        stored = connection.execute("SELECT count(*) FROM reports").fetchone()[0]
        groups = connection.execute("SELECT count(*) FROM report_groups").fetchone()[0]
        print(f"database: {stored} reports, {groups} all-time roll-up rows")
        port = free_port()
        command = [sys.executable, "-m", "reporting_endpoint", "serve", "--port", str(port),
                   "--db", str(db)]  # fmt: skip
        env = {"REPORTING_ENDPOINT_READ_TOKEN": TOKEN, "REPORTING_ENDPOINT_LOG_LEVEL": "warning"}
        failed = False
        with server(command, port, env), httpx2.Client(timeout=30) as client:
            for query in ("groups?by=site", "groups?by=site,browser",
                          "groups?by=site&type=crash&reason=oom", "groups?by=site,browser&since=7d",
                          "groups?by=reason,browser&since=7d", "timeseries?bucket=day&by=reason",
                          "timeseries?bucket=hour&type=crash"):  # fmt: skip
                limit = "&limit=100" if query.startswith("groups") else ""
                url = f"http://127.0.0.1:{port}/api/{query}{limit}"
                headers = {"authorization": f"Bearer {TOKEN}"}
                client.get(url, headers=headers).raise_for_status()  # warm the page cache
                times = []
                for _ in range(args.requests):
                    start = time.perf_counter()
                    response = client.get(url, headers=headers)
                    times.append((time.perf_counter() - start) * 1000)
                    response.raise_for_status()
                times.sort()
                p50 = statistics.median(times)
                p99 = times[int(len(times) * 0.99) - 1]
                line = f"/api/{query}: p50 {p50:6.1f} ms  p99 {p99:6.1f} ms"
                if query in BAR_QUERIES:
                    ok = p50 < 50
                    failed |= not ok
                    line += f"  (bar p50 < 50 ms: {'met' if ok else 'NOT met'})"
                print(line, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
