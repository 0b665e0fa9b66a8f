"""W3C ingest throughput: this service against a bare Starlette endpoint, same load, one run.

Usage: python benchmarks/ingest.py [--seconds 10] [--connections 64] [--sizes 1,100]
                                   [--database sqlite|postgresql] [--workers N] [--matrix]
Prints req/s, reports/s, p50/p99 latency and the ratio to the bare endpoint (run with the same
number of workers), for 1-report and 100-report batches. ``--matrix`` runs SQLite and
PostgreSQL with 1 and 2 workers each in one go and ends with a table and the issue's target
(PostgreSQL with 2 workers at least 1.5x SQLite with 1 worker, on 100-report batches).
PostgreSQL is a throw-away cluster the benchmark starts itself (tests/postgres.py: Debian's
initdb and pg_ctl, run as the ``postgres`` user when we are root), or the server of
``--postgres-url`` (a role allowed to create databases); every run gets a fresh database.

The load is varied, not a best case: 64 different bodies cycle, over 1,000 hosts, 200 user
agents and every report type Chromium sends (crash with each reason, deprecation, intervention,
csp-violation), each report's URL carrying a marker unique to its request. Afterwards the server
and its workers are SIGKILLed (nothing drained) and every report of every acknowledged request
must be in the database.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import sqlite3
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from common import MARK, CpuMeter, CpuUse, WrkResult, bare_server, free_port, run_wrk, server

if TYPE_CHECKING:
    from tests.postgres import PostgresServer

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "chromium"
DATABASES = ("sqlite", "postgresql")
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


def service_server(port: int, db: Path, database: str | None, workers: int) -> list[str]:
    command = [sys.executable, "-m", "reporting_endpoint", "serve", "--host", "127.0.0.1",
               "--port", str(port), "--workers", str(workers)]  # fmt: skip
    return [*command, "--database", database] if database else [*command, "--db", str(db)]


def stored_markers_sqlite(db: Path) -> Counter[str]:
    connection = sqlite3.connect(db)
    try:
        return Counter(
            match.group(1)
            for (url,) in connection.execute("SELECT url FROM reports")
            if (match := _MARKER.search(str(url)))
        )
    finally:
        connection.close()


def stored_markers_postgres(url: str) -> Counter[str]:
    import asyncpg

    async def fetch() -> list[str]:
        connection = await asyncpg.connect(url)
        try:
            return [str(row[0]) for row in await connection.fetch("SELECT url FROM reports")]
        finally:
            await connection.close()

    return Counter(match.group(1) for url in asyncio.run(fetch()) if (match := _MARKER.search(url)))


def missing(stored: Counter[str], acknowledged: list[str], size: int) -> list[str]:
    """Markers of acknowledged requests that do not have all ``size`` reports stored."""
    return [marker for marker in acknowledged if stored[marker] != size]


@contextlib.contextmanager
def postgres_server(url: str | None) -> Iterator[PostgresServer]:
    """The server PostgreSQL runs get their databases from: ``url``'s, or a throw-away
    cluster started here (initdb + pg_ctl on a temp folder, a Unix socket only)."""
    sys.path.insert(0, str(ROOT))
    from tests.postgres import _external, start_cluster

    started: PostgresServer | None = _external(url) if url else start_cluster()
    if started is None:
        raise SystemExit(
            "PostgreSQL runs need initdb and pg_ctl (apt-get install -y postgresql)"
            " or --postgres-url"
        )
    try:
        yield started
    finally:
        started.close()


def postmaster_pid(postgres: PostgresServer | None) -> int | None:
    """The root of the local cluster's processes, for CPU accounting (None: not ours)."""
    data = getattr(postgres, "data", None)
    if data is None:
        return None
    return int((Path(data) / "postmaster.pid").read_text().split()[0])


@dataclass
class Cell:
    size: int
    database: str
    workers: int
    bare: WrkResult
    bare_cpu: CpuUse
    ours: WrkResult
    ours_cpu: CpuUse
    lost: list[str] = field(default_factory=list)


def measure(
    process_group: int, database_root: int | None, url: str, load: list[bytes], args: Any
) -> tuple[WrkResult, CpuUse]:
    meter = CpuMeter(process_group, database_root)
    before = meter.snapshot()
    result = run_wrk(url, load, args.seconds, args.connections, "application/reports+json")
    return result, CpuMeter.between(before, meter.snapshot())


def run_service(
    size: int,
    load: list[bytes],
    database: str,
    workers: int,
    args: argparse.Namespace,
    postgres: PostgresServer | None,
) -> tuple[WrkResult, CpuUse, list[str]]:
    """One load against a fresh database; the acknowledged reports not stored after SIGKILL."""
    env = {"REPORTING_ENDPOINT_LOG_LEVEL": "warning"}
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "bench.sqlite3"
        url = postgres.create_database() if postgres is not None else None
        try:
            port = free_port()
            command = service_server(port, db, url, workers)
            # The temp folder as the working directory: with a database server the data folder
            # (uploads in progress, blobs) is ./reporting-endpoint.data.
            with server(command, port, env, kill=True, workers=workers, cwd=Path(tmp)) as process:
                ours, cpu = measure(
                    process.pid, postmaster_pid(postgres), f"http://127.0.0.1:{port}/reports",
                    load, args,
                )  # fmt: skip
            stored = stored_markers_postgres(url) if url else stored_markers_sqlite(db)
        finally:
            if postgres is not None and url is not None:
                postgres.drop_database(url)
    return ours, cpu, missing(stored, ours.acknowledged, size)


def print_cell(cell: Cell, args: argparse.Namespace, bodies: int) -> None:
    bare, ours, size = cell.bare, cell.ours, cell.size
    print(
        f"batch of {size} report(s), {cell.database}, {cell.workers} worker(s),"
        f" {args.connections} connections, {args.seconds}s each, {bodies} different bodies"
    )
    print(
        f"  bare endpoint : {bare.rps:9.0f} req/s  "
        f"p50 {bare.p50_ms:7.2f} ms  p99 {bare.p99_ms:7.2f} ms"
    )
    print(
        f"  this service  : {ours.rps:9.0f} req/s  {ours.rps * size:10.0f} reports/s  "
        f"p50 {ours.p50_ms:7.2f} ms  p99 {ours.p99_ms:7.2f} ms  non-2xx {ours.non_2xx}"
    )
    print(f"  ratio         : {ours.rps / bare.rps:.2f}x the bare endpoint's req/s")
    print(f"  CPU, bare     : {cell.bare_cpu}")
    print(f"  CPU, service  : {cell.ours_cpu}")
    print(
        f"  durable       : {len(ours.acknowledged)} acknowledged requests, checked one by"
        f" one after SIGKILL: {len(cell.lost)} incomplete {cell.lost[:3]}",
        flush=True,
    )


def print_table(cells: list[Cell]) -> None:
    print()
    print("| batch | database | workers | bare req/s | req/s | reports/s | vs bare |"
          " p99 ms | non-2xx | lost | CPU s: service / db / wrk / other |")  # fmt: skip
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for c in cells:
        u = c.ours_cpu
        print(f"| {c.size} | {c.database} | {c.workers} | {c.bare.rps:.0f} | {c.ours.rps:.0f} |"
              f" {c.ours.rps * c.size:.0f} | {c.ours.rps / c.bare.rps:.2f}x |"
              f" {c.ours.p99_ms:.1f} | {c.ours.non_2xx} | {len(c.lost)} |"
              f" {u.server:.1f} / {u.database:.1f} / {u.wrk:.1f} / {u.other:.1f}"
              f" of {u.seconds * u.cores:.0f} |")  # fmt: skip
    base = {(c.size, c.database, c.workers): c.ours.rps for c in cells}
    for size in sorted({c.size for c in cells}):
        sqlite_1, postgres_2 = base.get((size, "sqlite", 1)), base.get((size, "postgresql", 2))
        if sqlite_1 and postgres_2:
            ratio = postgres_2 / sqlite_1
            verdict = "met" if ratio >= 1.5 else "NOT met"
            target = f" (target 1.5x: {verdict})" if size == 100 else ""
            print(f"batch of {size}: PostgreSQL 2 workers / SQLite 1 worker = {ratio:.2f}x{target}")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=int, default=10, help="per run (default 10)")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--sizes", default="1,100", help="reports per request (default 1,100)")
    parser.add_argument("--database", choices=DATABASES, default="sqlite")
    parser.add_argument("--workers", type=int, default=1, help="serve processes (default 1)")
    parser.add_argument(
        "--matrix",
        action="store_true",
        help="SQLite and PostgreSQL, 1 and 2 workers each (ignores --database and --workers)",
    )
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get("REPORTING_ENDPOINT_TEST_POSTGRES"),
        help="a server to create the databases on instead of a throw-away cluster",
    )
    args = parser.parse_args()
    runs = (
        [(database, workers) for database in DATABASES for workers in (1, 2)]
        if args.matrix
        else [(args.database, args.workers)]
    )
    needs_postgres = any(database == "postgresql" for database, _ in runs)
    cells: list[Cell] = []
    with contextlib.ExitStack() as stack:
        postgres = (
            stack.enter_context(postgres_server(args.postgres_url)) if needs_postgres else None
        )
        for size in (int(s) for s in args.sizes.split(",")):
            load = bodies(size)
            bare_by_workers: dict[int, tuple[WrkResult, CpuUse]] = {}
            for database, workers in runs:
                if workers not in bare_by_workers:
                    port = free_port()
                    with server(bare_server(port, workers), port, workers=workers) as process:
                        bare_by_workers[workers] = measure(
                            process.pid, None, f"http://127.0.0.1:{port}/reports", load, args
                        )
                ours, cpu, lost = run_service(
                    size, load, database, workers, args,
                    postgres if database == "postgresql" else None,
                )  # fmt: skip
                bare, bare_cpu = bare_by_workers[workers]
                cell = Cell(size, database, workers, bare, bare_cpu, ours, cpu, lost)
                cells.append(cell)
                print_cell(cell, args, len(load))
    if len(cells) > 1:
        print_table(cells)
    failed = any(cell.lost or not cell.ours.acknowledged for cell in cells)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
