"""Ingest throughput with 5 alert rules and a dead webhook receiver against no rules, one run.

Usage: python benchmarks/alerts.py [--seconds 8] [--connections 32] [--size 100] [--rounds 2]
                                   [--load steady|storm] [--warmup 3]
                                   [--database sqlite|postgresql] [--postgres-url URL]

Each round starts a fresh ``reporting-endpoint serve`` twice, with no rules and with a rules
file of 5 rules (new issue, regression, threshold, rate, a digest due at once) sending to a
webhook and a Slack channel on a port where nothing listens, and drives both with the same
load as ``benchmarks/ingest.py``: 64 varied bodies over 1,000 sites. ``--load steady`` (the
default) takes the per-request marker out of the URL path, so the reports fall into a few
thousand issues that a warm-up (``--warmup`` seconds, not measured) creates: the measured load
is a service whose outbox holds thousands of alerts for a dead receiver. ``--load storm``
keeps ingest.py's URLs, where every crash report's path is new, so nearly every report opens
a new issue and an alert: the worst case there is. The two configurations alternate so drift
on a shared machine hits both; the figures are the ratio of the summed req/s and of the
service's CPU time per request. Afterwards the outbox is read through the API: the alerts
queued and the failed attempts logged show the dead receiver was really being tried.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx2
from common import MARK, CpuMeter, free_port, run_wrk, server
from ingest import bodies, postgres_server, service_server

RULES = """
[delivery]
poll_interval = "1s"
evaluate_interval = "5s"
retry_initial = "1s"
retry_max = "2s"
timeout = "2s"

[channels.hook]
type = "webhook"
url = "http://127.0.0.1:{dead}/hook"
secret = "benchmark"

[channels.chat]
type = "slack"
url = "http://127.0.0.1:{dead}/slack"

[[rule]]
name = "new"
trigger = "new_issue"
channels = ["hook", "chat"]
throttle = 0

[[rule]]
name = "regression"
trigger = "regressed"
channels = ["hook"]

[[rule]]
name = "spike"
trigger = "threshold"
events = 20
channels = ["hook", "chat"]

[[rule]]
name = "oom-surge"
trigger = "rate"
filter = {{ kind = "crash", reason = "oom" }}
factor = 2
min_events = 10
channels = ["hook"]

[[rule]]
name = "daily"
trigger = "digest"
at = "00:00"
channels = ["hook"]
"""


@contextlib.contextmanager
def database(kind: str, postgres: object | None, tmp: Path) -> Iterator[tuple[Path, str | None]]:
    url = postgres.create_database() if postgres is not None else None  # type: ignore[attr-defined]
    try:
        yield tmp / "bench.sqlite3", url
    finally:
        if postgres is not None and url is not None:
            postgres.drop_database(url)  # type: ignore[attr-defined]


def run_once(
    rules: bool, load: list[bytes], args: argparse.Namespace, postgres: object | None
) -> tuple[float, float, str]:
    """req/s, and the service's CPU milliseconds per request (steadier than req/s on a
    machine shared with other work: it counts what the service spends, not what it gets)."""
    env = {"REPORTING_ENDPOINT_LOG_LEVEL": "error", "REPORTING_ENDPOINT_READ_TOKEN": "r"}
    with (
        tempfile.TemporaryDirectory() as tmp,
        database(args.database, postgres, Path(tmp)) as (db, url),
    ):
        if rules:
            path = Path(tmp) / "alerts.toml"
            path.write_text(RULES.format(dead=free_port()))
            env["REPORTING_ENDPOINT_ALERT_RULES"] = str(path)
        port = free_port()
        command = service_server(port, db, url, 1)
        with server(command, port, env, kill=True, cwd=Path(tmp)) as process:
            meter = CpuMeter(process.pid)
            if args.warmup:
                run_wrk(
                    f"http://127.0.0.1:{port}/reports", load, args.warmup, args.connections,
                    "application/reports+json",
                )  # fmt: skip
            before = meter.snapshot()
            result = run_wrk(
                f"http://127.0.0.1:{port}/reports", load, args.seconds, args.connections,
                "application/reports+json",
            )  # fmt: skip
            cpu = CpuMeter.between(before, meter.snapshot())
            note = ""
            if rules:
                api = f"http://127.0.0.1:{port}/api/alerts"
                headers = {"Authorization": "Bearer r"}
                alerts = httpx2.get(api, params={"limit": 500}, headers=headers).json()
                log = httpx2.get(api + "/deliveries", params={"limit": 500}, headers=headers)
                tried = [d for d in log.json()["deliveries"] if d["outcome"] != "delivered"]
                more = "+" if alerts["next_cursor"] else ""
                note = (
                    f"  outbox: {len(alerts['alerts'])}{more} alerts, the latest attempts all"
                    f" failed: {len(tried)} of {len(log.json()['deliveries'])} read"
                )
    return result.rps, cpu.server * 1000 / max(result.requests, 1), note


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--size", type=int, default=100, help="reports per request")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--load", choices=("steady", "storm"), default="steady")
    parser.add_argument("--warmup", type=int, default=3, help="seconds of load not measured")
    parser.add_argument("--database", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--postgres-url")
    args = parser.parse_args()
    load = bodies(args.size)
    if args.load == "steady":
        load = [body.replace(b"/m/" + MARK.encode() + b"/", b"/m/") for body in load]
    totals = {False: 0.0, True: 0.0}
    cpu_totals = {False: 0.0, True: 0.0}
    with contextlib.ExitStack() as stack:
        postgres = (
            stack.enter_context(postgres_server(args.postgres_url))
            if args.database == "postgresql"
            else None
        )
        for round_number in range(args.rounds):
            # Alternate which goes first, so a trend on the machine cancels out.
            order = (False, True) if round_number % 2 == 0 else (True, False)
            for rules in order:
                rps, cpu_ms, note = run_once(rules, load, args, postgres)
                totals[rules] += rps
                cpu_totals[rules] += cpu_ms
                label = "5 rules, dead receiver" if rules else "no rules"
                print(
                    f"round {round_number + 1}: {label:24} {rps:8.0f} req/s"
                    f" {rps * args.size:10.0f} reports/s  service CPU {cpu_ms:6.2f} ms/request",
                    flush=True,
                )
                if note:
                    print(note, flush=True)
    ratio = totals[True] / totals[False]
    cpu_ratio = cpu_totals[True] / cpu_totals[False]
    print(
        f"{args.database}, {args.load} load, batches of {args.size},"
        f" {args.connections} connections,"
        f" {args.seconds}s x {args.rounds} each: with rules / without = {ratio:.3f} req/s"
        f" ({(ratio - 1) * 100:+.1f}%), {cpu_ratio:.3f} service CPU per request"
        f" ({(cpu_ratio - 1) * 100:+.1f}%)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
