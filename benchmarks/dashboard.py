"""The dashboard on a large database: server time of every page (p50 and p99; issue 12's bar:
p50 < 100 ms over 1,000,000 reports and 10,000 issues) and the overview's page weight (HTML plus
every asset it references; bar: under 150 KB).

The database is the one benchmarks/issues.py builds (its ``load``: N reports over 7 days in M
issues, through the ingest's own normalisation and ``submit_reports``; a few percent resolved
or ignored), kept in a cache folder and reused by later runs (``--fresh`` rebuilds it). A real
``reporting-endpoint serve`` starts on it; a few Crashpad uploads (real minidumps) and refused
reports go in over HTTP, so the native issue, crash and quarantine pages have something to
show. A client logs in through the login form like a browser (session cookie, CSRF field) and
times each page over HTTP on 127.0.0.1, next to ``/healthz`` as the floor of an answer.

Usage: python benchmarks/dashboard.py [--reports 1000000] [--issues 10000] [--requests 20]
                                      [--cache DIR] [--fresh] [--batch 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

import httpx2
from common import HERE, free_port, server
from issues import load

sys.path.insert(0, str(HERE.parent))
from tests.crashpad_client import MINIDUMPS, content_type, dump_upload

READ_TOKEN = "bench-read-token"
WRITE_TOKEN = "bench-write-token"
BAR_P50_MS = 100.0
BAR_WEIGHT_BYTES = 150 * 1024
DUMPS = (
    "win-x86_breakpad_minidump2.dmp",
    "linux-x64_breakpad_linux_null_dereference.dmp",
    "mac-x64_electron_node-minidump_mac.dmp",
)
# Every asset a page can reference: stylesheets, scripts, images, icons.
ASSET = re.compile(r'<(?:link|script|img)\b[^>]*?\b(?:href|src)="([^"]+)"', re.IGNORECASE)


def cached_database(args: argparse.Namespace) -> Path:
    """The filled SQLite file for these sizes: built once, then reused."""
    args.cache.mkdir(parents=True, exist_ok=True)
    cache: Path = args.cache
    db = cache / f"dashboard-{args.reports}-{args.issues}.sqlite3"
    if args.fresh:
        for stale in args.cache.glob(f"{db.name}*"):
            stale.unlink()
    if db.exists():
        print(f"reusing {db}", flush=True)
        return db
    building = db.with_suffix(".building")
    for stale in args.cache.glob(f"{building.name}*"):
        stale.unlink()
    asyncio.run(load(str(building), args))
    # One self-contained file: the cache is copied for each run, without a WAL beside it.
    connection = sqlite3.connect(building)
    try:
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        connection.execute("PRAGMA journal_mode = DELETE")
    finally:
        connection.close()
    building.rename(db)
    return db


def seed_over_http(client: httpx2.Client) -> list[str]:
    """Native crashes (parsed into issues after the answer) and refused reports."""
    crash_ids = []
    for number, name in enumerate(DUMPS):
        fields = {"prod": "Electron", "ver": "33.2.0", "_productName": "Notes",
                  "_version": f"2.{number}.0", "process_type": "renderer"}  # fmt: skip
        body = dump_upload((MINIDUMPS / name).read_bytes(), fields)
        answer = client.post("/crashpad", content=body, headers={"content-type": content_type()})
        answer.raise_for_status()
        crash_ids.append(answer.text.strip())
    bad = [{"age": 1, "type": "crash", "url": "https://q.example/", "user_agent": "x",
            "body": {"reason": f"bad-{n}"}} for n in range(20)]  # fmt: skip
    client.post(
        "/reports", json=bad, headers={"content-type": "application/reports+json"}
    ).raise_for_status()
    return crash_ids


def log_in(client: httpx2.Client) -> None:
    """The login form as a browser sends it: the CSRF field from the page, both tokens."""
    page = client.get("/dashboard/login")
    page.raise_for_status()
    found = re.search(r'name="csrf" value="([^"]+)"', page.text)
    if found is None:
        raise SystemExit("no csrf field on the login page")
    form = {"token": READ_TOKEN, "write_token": WRITE_TOKEN, "csrf": found.group(1),
            "next": "/dashboard/"}  # fmt: skip
    answer = client.post("/dashboard/login", data=form)
    if answer.status_code != 303:
        raise SystemExit(f"login answered {answer.status_code}: {answer.text[:200]}")


def first_id(client: httpx2.Client, path: str, key: str) -> str:
    answer = client.get(path, headers={"authorization": f"Bearer {READ_TOKEN}"})
    answer.raise_for_status()
    items = answer.json()[key]
    if not items:
        raise SystemExit(f"{path} is empty")
    return str(items[0]["id"])


def last_id(client: httpx2.Client, path: str, key: str) -> str:
    answer = client.get(path, headers={"authorization": f"Bearer {READ_TOKEN}"})
    answer.raise_for_status()
    return str(answer.json()[key][-1]["id"])


def wait_for_native_issue(client: httpx2.Client) -> str:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        answer = client.get(
            "/api/issues?kind=native", headers={"authorization": f"Bearer {READ_TOKEN}"}
        )
        if answer.status_code == 200 and answer.json()["issues"]:
            return str(answer.json()["issues"][0]["id"])
        time.sleep(0.2)
    raise SystemExit("the uploaded dumps never became native issues")


def pages(client: httpx2.Client, crash_ids: list[str]) -> list[tuple[str, list[str] | None]]:
    top = first_id(client, "/api/issues?sort=count&limit=1", "issues")
    small = last_id(client, "/api/issues?sort=count&limit=200", "issues")
    native = wait_for_native_issue(client)
    report = first_id(client, "/api/reports?type=crash&limit=1", "reports")
    # Each page, and the JSON API requests that read what it shows (None: none do).
    return [
        ("/dashboard/", overview_reads("24h", "hour")),
        ("/dashboard/?window=7d", overview_reads("7d", "hour")),
        ("/dashboard/?window=30d", overview_reads("30d", "day")),
        ("/dashboard/issues", ["/api/issues"]),
        ("/dashboard/issues?sort=trend", ["/api/issues?sort=trend"]),
        ("/dashboard/issues?window=7d", ["/api/issues?since=7d"]),
        ("/dashboard/issues?status=resolved", ["/api/issues?status=resolved"]),
        ("/dashboard/issues?kind=crash&browser=Chrome", ["/api/issues?kind=crash&browser=Chrome"]),
        (f"/dashboard/issues/{top}", detail_reads(top)),
        (f"/dashboard/issues/{top}?window=7d", detail_reads(top, "?since=7d")),
        (f"/dashboard/issues/{small}", detail_reads(small)),
        (f"/dashboard/issues/{native}", detail_reads(native)),
        ("/dashboard/reports", ["/api/reports"]),
        ("/dashboard/reports?type=crash", ["/api/reports?type=crash"]),
        ("/dashboard/reports?type=csp-violation", ["/api/reports?type=csp-violation"]),
        (f"/dashboard/reports/{report}", [f"/api/reports/{report}"]),
        (f"/dashboard/crashes/{crash_ids[0]}", [f"/api/crashes/{crash_ids[0]}"]),
        ("/dashboard/quarantine", ["/api/quarantine"]),
        ("/dashboard/setup?url=" + urllib.parse.quote("https://www.site1.example.com/"), None),
    ]


def overview_reads(since: str, bucket: str) -> list[str]:
    """The overview's reads as API requests: its two charts and three issue lists (its top
    sites, browsers and systems are cached for a minute, so a warm page does not read them)."""
    return [
        f"/api/timeseries?by=type&since={since}&bucket={bucket}",
        f"/api/timeseries?by=reason&type=crash&since={since}&bucket={bucket}",
        f"/api/issues?since={since}&sort=count&limit=10",
        f"/api/issues?since={since}&sort=first_seen&limit=10",
        f"/api/issues?since={since}&status=regressed&sort=last_seen&limit=10",
    ]


def detail_reads(issue: str, window: str = "") -> list[str]:
    return [f"/api/issues/{issue}{window}", f"/api/issues/{issue}/events"]


def timed(
    client: httpx2.Client, path: str, requests: int, headers: dict[str, str] | None = None
) -> tuple[float, float, int]:
    """(p50 ms, p99 ms, body bytes) of ``requests`` GETs after one warm-up."""
    warm = client.get(path, headers=headers)
    if warm.status_code != 200:
        raise SystemExit(f"{path} answered {warm.status_code}: {warm.text[:300]}")
    times = []
    for _ in range(requests):
        start = time.perf_counter()
        answer = client.get(path, headers=headers)
        times.append((time.perf_counter() - start) * 1000)
        answer.raise_for_status()
    times.sort()
    return statistics.median(times), times[max(0, int(len(times) * 0.99) - 1)], len(warm.content)


def page_weight(client: httpx2.Client, path: str) -> tuple[int, dict[str, int]]:
    """Bytes of the page's HTML and of each asset it references (as sent: no compression)."""
    page = client.get(path)
    page.raise_for_status()
    assets = {}
    for link in sorted(set(ASSET.findall(page.text))):
        url = urllib.parse.urljoin(str(page.url), link.replace("&amp;", "&"))
        if url.startswith("data:"):
            continue
        answer = client.get(url)
        answer.raise_for_status()
        assets[link] = len(answer.content)
    return len(page.content), assets


def measure(port: int, requests: int) -> bool:
    met = True
    with httpx2.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
        crash_ids = seed_over_http(client)
        log_in(client)
        floor = timed(client, "/healthz", requests)
        print(
            f"{'/healthz (the floor: no page)':48} p50 {floor[0]:7.1f} ms  p99 {floor[1]:7.1f} ms"
        )
        bearer = {"authorization": f"Bearer {READ_TOKEN}"}
        for path, api in pages(client, crash_ids):
            p50, p99, size = timed(client, path, requests)
            ok = p50 < BAR_P50_MS
            met &= ok
            line = f"{path[:48]:48} p50 {p50:7.1f} ms  p99 {p99:7.1f} ms  {size / 1024:6.1f} KB"
            if api is not None:
                api_p50 = sum(timed(client, read, requests, bearer)[0] for read in api)
                reads = f"{len(api)} requests" if len(api) > 1 else "1 request"
                line += f"  (JSON API, {reads}: p50 {api_p50:6.1f} ms)"
            print(line + ("" if ok else "  (bar p50 < 100 ms: NOT met)"), flush=True)
        html, assets = page_weight(client, "/dashboard/")
        total = html + sum(assets.values())
        ok = total < BAR_WEIGHT_BYTES
        met &= ok
        listed = ", ".join(f"{name} {size / 1024:.1f} KB" for name, size in assets.items())
        print(
            f"overview page weight: {total / 1024:.1f} KB (HTML {html / 1024:.1f} KB; {listed})"
            f"  (bar < 150 KB: {'met' if ok else 'NOT met'})",
            flush=True,
        )
    return met


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reports", type=int, default=1_000_000)
    parser.add_argument("--issues", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=20, help="timed requests per page")
    parser.add_argument("--batch", type=int, default=20_000, help="reports per submit_reports")
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path(tempfile.gettempdir()) / "reporting-endpoint-bench",
        help="where the filled database is kept between runs",
    )
    parser.add_argument("--fresh", action="store_true", help="rebuild the cached database")
    args = parser.parse_args()
    if not 1 <= args.requests <= 1000:
        raise SystemExit("--requests is 1..1000")
    print(f"sqlite: {args.reports} reports, {args.issues} issues", flush=True)
    cached = cached_database(args)
    with tempfile.TemporaryDirectory() as tmp:
        # The pages run on a copy: the uploads and the service's own writes leave the cache
        # as built, so every run measures the same database.
        db = Path(tmp) / "dashboard.sqlite3"
        shutil.copyfile(cached, db)
        port = free_port()
        command = [sys.executable, "-m", "reporting_endpoint", "serve", "--host", "127.0.0.1",
                   "--port", str(port), "--db", str(db)]  # fmt: skip
        env = {
            "REPORTING_ENDPOINT_READ_TOKEN": READ_TOKEN,
            "REPORTING_ENDPOINT_WRITE_TOKEN": WRITE_TOKEN,
            "REPORTING_ENDPOINT_LOG_LEVEL": "warning",
        }
        with server(command, port, env, cwd=Path(tmp)):
            met = measure(port, args.requests)
    return 0 if met else 1


if __name__ == "__main__":
    raise SystemExit(main())
