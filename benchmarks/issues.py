"""The issues page on a large database: GET /api/issues p50 and p99 (issue 11's bar: p50 < 50 ms
over 1,000,000 reports and 10,000 issues, for the default request).

Fills a fresh database with N reports (default 1,000,000) over the last 7 days, in M issues
(default 10,000: a few big ones and a long tail, about 1/rank in size, each at least one
report; some issues new in the last day, some not seen in it). Every report is built by the
ingest's own ``reports.normalise`` (fingerprint, title, release from the page URL's ``v``
query parameter) and committed through the storage protocol's ``submit_reports`` in large
batches, so the rows, roll-ups and issue counters are exactly what ingest writes. Then a few
percent of the issues are resolved or ignored (``set_issue_status``), a real
``reporting-endpoint serve`` starts on 127.0.0.1, and each request is timed over HTTP.

Usage: python benchmarks/issues.py [--reports 1000000] [--issues 10000] [--requests 50]
                                   [--database sqlite|postgresql] [--postgres-url URL]
                                   [--batch 20000] [--db PATH]
PostgreSQL is a throw-away cluster started here (tests/postgres.py, as benchmarks/ingest.py
does), or the server of ``--postgres-url``; either way a fresh database that is dropped after.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
from common import free_port, server
from ingest import postgres_server, user_agents

from reporting_endpoint.issues.releases import ReleaseSource
from reporting_endpoint.issues.triage import StatusChange
from reporting_endpoint.records import NewReport
from reporting_endpoint.reports import normalise
from reporting_endpoint.settings import Settings
from reporting_endpoint.storage import Storage, open_storage
from reporting_endpoint.storage.base import IssueFilters

TOKEN = "bench-token"
HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
SPAN_DAYS = 7
SITES = 500
AGENTS = 60
# Releases roll forward over the week: a report carries one of the two newest at its time.
RELEASES_PER_DAY = 1
# Reports in flight at once: the next batch is built while the previous one commits.
IN_FLIGHT = 2
# The default request is the bar; the others are printed for information.
QUERIES = (
    ("issues", True),
    ("issues?sort=trend", False),
    ("issues?since=7d", False),
    ("issues?since=7d&sort=trend", False),
    ("issues?status=unresolved", False),
    ("issues?status=resolved", False),
    ("issues?since=7d&release=1.6.0", False),
)
DIRECTIVES = ("script-src-elem", "img-src", "connect-src", "style-src-elem", "frame-src")
NEL_TYPES = ("tcp.timed_out", "dns.name_not_resolved", "http.error", "tcp.reset")
REASONS = (None, "oom", "unresponsive")


def letters(number: int) -> str:
    """A name made of letters only (path shapes and stacks keep it, never collapse it)."""
    out = ""
    number += 1
    while number:
        number, digit = divmod(number - 1, 26)
        out = chr(97 + digit) + out
    return out


def template(issue: int) -> dict[str, Any]:
    """The report an issue is made of: its fingerprint is unique to ``issue`` (checked)."""
    name = letters(issue)
    host = f"www.site{issue % SITES}.example{'.co.uk' if issue % 7 == 0 else '.com'}"
    kind = issue % 20
    if kind < 6:  # a crash with a stack: site, reason and top frames
        stack = "\n".join(
            f"    at {fn}_{name} (https://{host}/static/app.js:{10 + n}:{20 + n})"
            for n, fn in enumerate(("render", "update", "dispatch"))
        )
        body = {"reason": REASONS[issue % 3], "stack": stack, "is_top_level": True,
                "visibility_state": "visible"}  # fmt: skip
        return {"type": "crash", "url": f"https://{host}/app/{name}/", "body": body}
    if kind < 12:  # a crash without a stack: site, reason and the path's shape
        body = {"reason": REASONS[issue % 3], "is_top_level": issue % 2 == 0,
                "visibility_state": "hidden" if issue % 5 == 0 else "visible"}  # fmt: skip
        return {"type": "crash", "url": f"https://{host}/shop/{name}/item/", "body": body}
    if kind < 15:
        body = {"id": f"Feature{name.capitalize()}", "message": "deprecated", "lineNumber": 12,
                "columnNumber": 3, "sourceFile": f"https://{host}/static/app.js"}  # fmt: skip
        return {"type": "deprecation", "url": f"https://{host}/page/", "body": body}
    if kind < 17:
        body = {"id": f"Intervention{name.capitalize()}", "message": "blocked"}
        return {"type": "intervention", "url": f"https://{host}/page/", "body": body}
    if kind < 19:
        body = {
            "effectiveDirective": DIRECTIVES[issue % len(DIRECTIVES)],
            "blockedURL": f"https://cdn-{name}.example.net/lib.js",
            "disposition": "enforce",
            "documentURL": f"https://{host}/page/",
        }
        return {"type": "csp-violation", "url": f"https://{host}/page/", "body": body}
    body = {"type": NEL_TYPES[issue % len(NEL_TYPES)], "phase": "connection", "status_code": 0,
            "elapsed_time": 300, "sampling_fraction": 1.0}  # fmt: skip
    return {"type": "network-error", "url": f"https://api-{name}.example.org/v1/", "body": body}


def sizes(reports: int, issues: int, rng: random.Random) -> list[int]:
    """Reports per issue: one each, the rest shared about 1/rank (largest remainder), in a
    shuffled order so issue ids do not follow size."""
    if reports < issues:
        raise SystemExit("--reports must be at least --issues (every issue has a report)")
    weights = [1 / (rank + 1) for rank in range(issues)]
    total = sum(weights)
    rest = reports - issues
    shares = [rest * w / total for w in weights]
    counts = [int(s) for s in shares]
    by_remainder = sorted(range(issues), key=lambda i: shares[i] - counts[i], reverse=True)
    for i in by_remainder[: rest - sum(counts)]:
        counts[i] += 1
    out = [1 + c for c in counts]
    rng.shuffle(out)
    return out


def lifetimes(issues: int, now: int, rng: random.Random) -> list[tuple[int, int]]:
    """When each issue is seen, [start, end) ms: most all week from some day on, some fixed
    (no event in the last day), some new (first seen in the last day)."""
    week = now - SPAN_DAYS * DAY_MS
    spans = []
    for _ in range(issues):
        roll = rng.random()
        if roll < 0.15:  # new today
            spans.append((now - rng.randrange(1, DAY_MS), now))
        elif roll < 0.40:  # gone before the last day
            start = week + rng.randrange(0, 5 * DAY_MS)
            spans.append((start, rng.randrange(start + HOUR_MS, now - DAY_MS)))
        else:
            spans.append((week + rng.randrange(0, 6 * DAY_MS), now))
    return spans


def release_at(received: int, start: int) -> int:
    return (received - start) // (DAY_MS // RELEASES_PER_DAY)


def events(counts: list[int], spans: list[tuple[int, int]], rng: random.Random) -> list[int]:
    """Every report as ``received_at * issues + issue``, in time order."""
    issues = len(counts)
    out = []
    for issue, (count, (start, end)) in enumerate(zip(counts, spans, strict=True)):
        out.extend((start + rng.randrange(end - start)) * issues + issue for _ in range(count))
    out.sort()
    return out


def batches(
    order: list[int], templates: list[dict[str, Any]], week: int, size: int, seed: int
) -> Iterator[list[NewReport]]:
    """The reports, ``size`` at a time, each normalised as the ingest does."""
    rng = random.Random(seed)
    agents = user_agents(AGENTS)
    source = ReleaseSource.parse("query:v")
    issues = len(templates)
    batch: list[NewReport] = []
    for code in order:
        received, issue = divmod(code, issues)
        sent = templates[issue]
        day = release_at(received, week)
        release = f"1.{day + rng.randrange(2)}.0"
        url = sent["url"]
        if sent["type"] == "crash" and "/shop/" in url:
            url = f"{url}{rng.randrange(10**6)}"
        report = {
            "type": sent["type"],
            "url": f"{url}?v={release}&session={rng.randrange(10**9)}",
            "age": rng.randrange(0, 60_000),
            "user_agent": agents[rng.randrange(AGENTS)],
            "body": sent["body"],
        }
        batch.append(normalise(report, received, False, release=source))
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


async def fill(storage: Storage, args: argparse.Namespace) -> None:
    rng = random.Random(11)
    now = time.time_ns() // 1_000_000
    week = now - SPAN_DAYS * DAY_MS
    templates = [template(i) for i in range(args.issues)]
    counts = sizes(args.reports, args.issues, rng)
    order = events(counts, lifetimes(args.issues, now, rng), rng)
    started = time.perf_counter()
    built = committed = 0.0
    inflight: list[asyncio.Task[None]] = []
    fingerprints: set[str] = set()
    generator = batches(order, templates, week, args.batch, 13)
    for _ in range(len(order) // args.batch + 2):  # bounded: one turn per batch
        tick = time.perf_counter()
        batch = next(generator, None)
        built += time.perf_counter() - tick
        if batch is None:
            break
        fingerprints.update(report.fingerprint for report in batch)
        inflight.append(asyncio.create_task(storage.submit_reports(batch)))
        # Let the writer take it, then build the next batch while it commits.
        await asyncio.sleep(0)
        if len(inflight) >= IN_FLIGHT:
            tick = time.perf_counter()
            await inflight.pop(0)
            committed += time.perf_counter() - tick
    tick = time.perf_counter()
    await asyncio.gather(*inflight)
    committed += time.perf_counter() - tick
    if len(fingerprints) != args.issues:
        raise SystemExit(f"{len(fingerprints)} fingerprints, not {args.issues}: a template bug")
    elapsed = time.perf_counter() - started
    print(
        f"filled {len(order)} reports in {len(fingerprints)} issues in {elapsed:.1f} s"
        f" ({len(order) / elapsed:,.0f} reports/s; building reports {built:.1f} s,"
        f" waiting for commits {committed:.1f} s; largest issue {max(counts)} reports,"
        f" {sum(1 for c in counts if c <= 10)} issues with 10 or fewer)",
        flush=True,
    )
    await triage(storage, args.issues, now)


async def triage(storage: Storage, issues: int, now: int) -> None:
    """Resolve 5% and ignore 2% of the issues, through the storage protocol."""
    started = time.perf_counter()
    filters = IssueFilters(status="unresolved", since=now - SPAN_DAYS * DAY_MS - DAY_MS)
    ids: list[int] = []
    cursor = None
    for _ in range(issues // 200 + 2):  # bounded: pages of 200
        page = await storage.issues_page(filters, "count", 200, cursor)
        ids.extend(int(item["id"]) for item in page.items)
        cursor = page.next
        if cursor is None:
            break
    rng = random.Random(17)
    rng.shuffle(ids)
    resolved, ignored = ids[: issues // 20], ids[issues // 20 : issues // 20 + issues // 50]
    for number, issue_id in enumerate(resolved):
        release = "1.5.0" if number % 2 else None
        change = StatusChange("resolved", "bench", "fixed", resolved_in_release=release)
        await storage.set_issue_status(issue_id, change, now)
    for issue_id in ignored:
        await storage.set_issue_status(issue_id, StatusChange("ignored", "bench", "noise"), now)
    print(
        f"triage: {len(resolved)} resolved, {len(ignored)} ignored in"
        f" {time.perf_counter() - started:.1f} s",
        flush=True,
    )


async def load(database: str, args: argparse.Namespace) -> None:
    settings = Settings(queue_size=args.batch * (IN_FLIGHT + 1), sqlite_synchronous="NORMAL")
    storage = open_storage(database, settings)
    await storage.start()
    try:
        await fill(storage, args)
    finally:
        await storage.stop()


def measure(port: int, requests: int) -> bool:
    """Times each query; True when the bar was met."""
    met = True
    headers = {"authorization": f"Bearer {TOKEN}"}
    with httpx2.Client(timeout=60) as client:
        for query, bar in QUERIES:
            url = f"http://127.0.0.1:{port}/api/{query}"
            first = client.get(url, headers=headers)  # warms the caches
            first.raise_for_status()
            shown = len(first.json()["issues"])
            times = []
            for _ in range(requests):
                start = time.perf_counter()
                response = client.get(url, headers=headers)
                times.append((time.perf_counter() - start) * 1000)
                response.raise_for_status()
            times.sort()
            p50 = statistics.median(times)
            p99 = times[max(0, int(len(times) * 0.99) - 1)]
            line = f"/api/{query}: p50 {p50:7.1f} ms  p99 {p99:7.1f} ms  ({shown} issues)"
            if bar:
                ok = p50 < 50
                met &= ok
                line += f"  (bar p50 < 50 ms: {'met' if ok else 'NOT met'})"
            print(line, flush=True)
    return met


def serve_and_measure(command: list[str], port: int, requests: int, cwd: Path) -> bool:
    env = {"REPORTING_ENDPOINT_READ_TOKEN": TOKEN, "REPORTING_ENDPOINT_LOG_LEVEL": "warning"}
    with server(command, port, env, cwd=cwd):
        return measure(port, requests)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reports", type=int, default=1_000_000)
    parser.add_argument("--issues", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=50, help="timed requests per query")
    parser.add_argument("--batch", type=int, default=20_000, help="reports per submit_reports")
    parser.add_argument("--database", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--postgres-url", help="a server to create the database on")
    parser.add_argument("--db", type=Path, help="SQLite: reuse (or create) this file")
    args = parser.parse_args()
    port = free_port()
    base = [sys.executable, "-m", "reporting_endpoint", "serve", "--host", "127.0.0.1",
            "--port", str(port)]  # fmt: skip
    print(
        f"{args.database}: {args.reports} reports, {args.issues} issues, {SPAN_DAYS} days",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        if args.database == "sqlite":
            db = args.db or Path(tmp) / "issues.sqlite3"
            if not db.exists():
                asyncio.run(load(str(db), args))
            met = serve_and_measure([*base, "--db", str(db)], port, args.requests, Path(tmp))
            return 0 if met else 1
        with contextlib.ExitStack() as stack:
            postgres = stack.enter_context(postgres_server(args.postgres_url))
            url = postgres.create_database()
            stack.callback(postgres.drop_database, url)
            asyncio.run(load(url, args))
            met = serve_and_measure([*base, "--database", url], port, args.requests, Path(tmp))
            return 0 if met else 1


if __name__ == "__main__":
    raise SystemExit(main())
