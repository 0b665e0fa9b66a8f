"""GET /metrics: the counts a real server reports (1 and 2 workers) against `stats`, the token,
scrape hooks, and labels that never carry what a client sent."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx2
import pytest
from prometheus_client import REGISTRY
from prometheus_client import Counter as PromCounter
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from reporting_endpoint import metrics
from reporting_endpoint.app import create_app
from reporting_endpoint.settings import Settings
from tests.conftest import crash_report, post_reports
from tests.crashpad_client import MINIDUMPS, content_type, dump_upload, gz
from tests.servers import RunningServer, running_service
from tests.test_workers import accepted_ports, healthy, wait_for_workers

REPORTS = {"content-type": "application/reports+json"}
DUMP = (MINIDUMPS / "linux-x64_breakpad_linux_null_read_av.dmp").read_bytes()

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: str) -> Samples:
    """Every sample of a scrape, parsed by the client library's own parser."""
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return found


def total(found: Samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    return sum(
        value
        for (sample, sample_labels), value in found.items()
        if sample == name and set(labels.items()) <= set(sample_labels)
    )


def by_label(found: Samples, name: str, label: str, **labels: str) -> dict[str, float]:
    out: Counter[str] = Counter()
    for (sample, sample_labels), value in found.items():
        given = dict(sample_labels)
        if sample == name and set(labels.items()) <= set(sample_labels):
            out[given[label]] += value
    return {key: value for key, value in out.items() if value}


def stats(db: Path, *args: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "reporting_endpoint", "stats", "--db", str(db), "--json", *args],
        check=True, capture_output=True, text=True, timeout=60,
    ).stdout  # fmt: skip
    result: dict[str, Any] = json.loads(out)
    return result


# --- a known load against a real server, then /metrics against `stats` -----------------------


class Connection:
    """One keep-alive connection (http.client), so a test knows which worker accepted it."""

    def __init__(self, server: RunningServer) -> None:
        self.connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        self.connection.connect()
        assert self.connection.sock is not None
        self.port = int(self.connection.sock.getsockname()[1])

    def post(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        self.connection.request("POST", path, body=body, headers=headers)
        answer = self.connection.getresponse()
        return answer.status, answer.read()

    def close(self) -> None:
        self.connection.close()


def load(connections: list[Connection]) -> dict[str, int]:
    """Uploads spread over ``connections``; what was sent, by kind."""
    sent: Counter[str] = Counter()
    for n, connection in enumerate(connections * 3):
        batch: list[Any] = [
            crash_report(url=f"https://a{n}.example.com/page"),
            crash_report(url=f"https://b{n}.example.org/page", body={"reason": "oom"}),
            {
                "age": 1,
                "type": "deprecation",
                "url": f"https://a{n}.example.com/x",
                "user_agent": "UA",
                "body": {"id": "x", "message": "m"},
            },
        ]
        if n % 3 == 0:
            batch.append({"type": "crash", "url": "https://c.example.net/"})  # no age: refused
        status, text = connection.post("/reports", json.dumps(batch).encode(), REPORTS)
        assert status == 200, text
        sent["reports"] += len(batch)
        sent["quarantined"] += n % 3 == 0
    for n, connection in enumerate(connections):
        # Single-report uploads too, as a browser that saw one crash sends them.
        one = [crash_report(url=f"https://single{n}.example.com/")]
        status, text = connection.post("/reports", json.dumps(one).encode(), REPORTS)
        assert status == 200, text
        sent["reports"] += 1
    gzipped = {"content-type": content_type(), "content-encoding": "gzip"}
    for n, connection in enumerate(connections):
        body = gz(dump_upload(DUMP, {"prod": "App", "ver": f"1.{n}"}))
        status, text = connection.post("/crashpad", body, gzipped)
        assert status == 200, text
        sent["crashes"] += 1
        sent["crash_bytes"] += len(body)
    status, text = connections[0].post("/reports", b"{", REPORTS)
    assert json.loads(text)["error"]["code"] == "invalid_json"
    plain = {"content-type": content_type()}
    status, text = connections[-1].post("/crashpad", dump_upload(b"ELF not a dump"), plain)
    assert text == b"Discarded=not_a_minidump"
    return dict(sent)


def connections_on_every_worker(server: RunningServer, workers: int) -> list[Connection]:
    """Connections until every worker holds at least one (bounded), so that the load is
    served by all of them."""
    pids = wait_for_workers(server, workers) if workers > 1 else [server.process.pid]
    connections: list[Connection] = []
    for _ in range(40):
        connections.append(Connection(server))
        if len(connections) < 4:
            continue
        # The worker's end of a connection shows up once it has accepted it.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            held = [accepted_ports(pid, server.port) for pid in pids]
            if sum(len(ports) for ports in held) >= len(connections):
                break
            time.sleep(0.02)
        if all(any(c.port in ports for c in connections) for ports in held):
            return connections
    raise AssertionError("the kernel never handed a connection to every worker")


@pytest.mark.parametrize("workers", [1, 2])
def test_metrics_match_stats_after_a_known_load(tmp_path: Path, workers: int) -> None:
    db = tmp_path / "r.sqlite3"
    with running_service(db, args=["--workers", str(workers)]) as server:
        healthy(server)
        connections = connections_on_every_worker(server, workers)
        try:
            sent = load(connections)
        finally:
            for connection in connections:
                connection.close()
        # Each scrape on a fresh connection lands on any worker: every one must see the sum.
        scrapes = [samples(httpx2.get(server.url + "/metrics", timeout=30).text) for _ in range(6)]

    by_type = {g["type"]: g["count"] for g in stats(db, "--by", "type")["groups"]}
    refused = {r["code"]: r["count"] for r in stats(db)["refused"]}
    crashes = sum(g["count"] for g in stats(db, "--source", "crashes")["groups"])
    assert sum(by_type.values()) + sum(refused.values()) == sent["reports"]
    assert crashes == sent["crashes"]
    for found in scrapes:
        name = "reporting_endpoint_reports_received_total"
        assert by_label(found, name, "type", outcome="stored") == by_type
        assert total(found, name, outcome="quarantined") == sent["quarantined"]
        assert by_label(found, "reporting_endpoint_reports_refused_total", "reason") == refused
        assert total(found, name) == sent["reports"]
        assert total(found, "reporting_endpoint_crash_uploads_total", outcome="stored") == crashes
        assert total(found, "reporting_endpoint_crash_upload_bytes_total") == sent["crash_bytes"]
        rejected = "reporting_endpoint_requests_rejected_total"
        assert total(found, rejected, endpoint="reports", reason="invalid_json") == 1
        assert total(found, rejected, endpoint="crashpad", reason="not_a_minidump") == 1
        assert total(found, "reporting_endpoint_crash_uploads_total", outcome="rejected") == 1
        # One commit per upload at most (every upload waited for its own): batch sizes sum
        # to the reports and crashes are not in them.
        assert total(found, "reporting_endpoint_writer_commit_reports_sum") == sent["reports"]
        commits = total(found, "reporting_endpoint_writer_commit_duration_seconds_count")
        assert 1 <= commits <= 4 * len(connections)
        assert total(found, "reporting_endpoint_writer_queue_reports") == 0
        assert total(found, "process_resident_memory_bytes") > 0
        assert total(found, "process_cpu_seconds_total") > 0


def test_process_metrics_add_up_over_the_workers(tmp_path: Path) -> None:
    """With two workers the process figures are both workers' together, not one's."""
    page = os.sysconf("SC_PAGE_SIZE")
    with running_service(tmp_path / "r.sqlite3", args=["--workers", "2"]) as server:
        pids = wait_for_workers(server, 2)
        healthy(server)
        found = samples(httpx2.get(server.url + "/metrics", timeout=30).text)
        resident = [int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * page for pid in pids]
    scraped = total(found, "process_resident_memory_bytes")
    assert abs(scraped - sum(resident)) < 0.2 * sum(resident), (scraped, resident)
    assert scraped > 1.5 * max(resident)
    assert total(found, "process_open_fds") > 0


# --- the token ------------------------------------------------------------------------------


def test_the_metrics_token_guards_metrics(tmp_path: Path) -> None:
    settings = Settings(db=tmp_path / "r.sqlite3", metrics_token="scrape-me")
    with TestClient(create_app(settings)) as client:
        missing = client.get("/metrics")
        wrong = client.get("/metrics", headers={"authorization": "Bearer nope"})
        right = client.get("/metrics", headers={"authorization": "Bearer scrape-me"})
    for answer in (missing, wrong):
        assert answer.status_code == 401
        assert answer.json()["error"]["code"] == "unauthorized"
        assert answer.headers["www-authenticate"].startswith("Bearer")
        assert "reporting_endpoint" not in answer.text
    assert right.status_code == 200
    assert right.headers["content-type"].startswith("text/plain; version=")
    assert "reporting_endpoint_reports_received_total" in right.text


def test_without_a_token_metrics_are_open(client: TestClient) -> None:
    answer = client.get("/metrics")
    assert answer.status_code == 200
    assert samples(answer.text)


# --- labels ---------------------------------------------------------------------------------


def test_no_label_takes_a_site_url_user_agent_or_type_from_a_client(tmp_path: Path) -> None:
    marker = "zz-marker-9137"
    settings = Settings(db=tmp_path / "r.sqlite3", allowed_sites=("example.com",))
    with TestClient(create_app(settings)) as client:
        before = samples(client.get("/metrics").text)
        batch = [
            crash_report(
                url=f"https://{marker}.example.com/{marker}?q={marker}", user_agent=marker
            ),
            crash_report(url=f"https://{marker}.test/", user_agent=marker),
            # Invented types: stored, quarantined, and dropped off the allow-list.
            crash_report(type=f"{marker}-type", url="https://example.com/", body={"x": marker}),
            {"type": marker, "url": "https://example.com/"},
            {"type": marker, "url": f"https://{marker}.test/"},
        ]
        assert post_reports(client, batch).status_code == 200
        assert post_reports(client, b"{" + marker.encode()).status_code == 400
        client.post(
            "/crashpad",
            content=dump_upload(DUMP, {"prod": marker, "ver": marker, marker: marker}),
            headers={"content-type": content_type()},
            params={"product": marker, "guid": marker},
        )
        text = client.get("/metrics").text
    assert marker not in text
    after = samples(text)
    name = "reporting_endpoint_reports_received_total"
    # Reports of invented types are counted under "other", whatever became of them.
    for outcome, count in {"stored": 1, "quarantined": 1, "site_not_allowed": 1}.items():
        grew = total(after, name, type="other", outcome=outcome)
        assert grew - total(before, name, type="other", outcome=outcome) == count, outcome
    for (_, labels), _value in after.items():
        for key, value in labels:
            if key in {"type", "outcome", "reason", "endpoint", "channel"}:
                assert len(value) <= 48 and "." not in value.replace("-", ""), (key, value)


def test_the_collectors_for_other_parts_bound_their_labels() -> None:
    """The functions the alert sender and the dump processing call: a channel named after
    its URL by mistake still does not become a label value."""
    metrics.alert_delivery("https://hooks.example.com/T0/B0", "failed")
    metrics.alert_delivery("webhook", "sent")
    metrics.crash_parsed("parsed")
    text = metrics.render().decode()
    assert "hooks.example.com" not in text
    found = samples(text)
    deliveries = "reporting_endpoint_alert_deliveries_total"
    assert total(found, deliveries, channel="other", outcome="failed") >= 1
    assert total(found, deliveries, channel="webhook", outcome="sent") >= 1
    assert total(found, "reporting_endpoint_crash_parse_total", outcome="parsed") >= 1


# --- scrape hooks ---------------------------------------------------------------------------


def test_scrape_hooks_set_gauges_before_the_text_is_made(tmp_path: Path) -> None:
    reads: list[float] = []

    async def backlog() -> None:
        reads.append(time.monotonic())
        metrics.crash_backlog(len(reads) * 3, 42.5)

    async def broken() -> None:
        raise RuntimeError("the storage read failed")

    app = create_app(Settings(db=tmp_path / "r.sqlite3"))
    app.state.metrics_hooks.extend([broken, backlog])
    with TestClient(app) as client:
        first = samples(client.get("/metrics").text)
        second = client.get("/metrics")
    assert second.status_code == 200
    assert total(first, "reporting_endpoint_crash_backlog_crashes") == 3
    assert total(samples(second.text), "reporting_endpoint_crash_backlog_crashes") == 6
    assert total(first, "reporting_endpoint_crash_backlog_oldest_age_seconds") == 42.5


# --- both engines' writers ------------------------------------------------------------------


def test_every_commit_is_timed_and_sized(database_url: str, tmp_path: Path) -> None:
    settings = Settings(db=tmp_path / "r.sqlite3", database=database_url)
    with TestClient(create_app(settings)) as client:
        before = samples(client.get("/metrics").text)
        batch = [crash_report(url=f"https://s{n}.example.com/") for n in range(7)]
        assert post_reports(client, batch).json()["accepted"] == 7
        after = samples(client.get("/metrics").text)
    commits = "reporting_endpoint_writer_commit_duration_seconds_count"
    assert total(after, commits) - total(before, commits) == 1
    seconds = "reporting_endpoint_writer_commit_duration_seconds_sum"
    assert 0 < total(after, seconds) - total(before, seconds) < 30
    size = "reporting_endpoint_writer_commit_reports_sum"
    assert total(after, size) - total(before, size) == 7
    # The 7 reports fall in the "at most 10" bucket, not the "at most 5" one.
    bucket = "reporting_endpoint_writer_commit_reports_bucket"
    grew = {
        dict(labels)["le"]
        for (name, labels), value in after.items()
        if name == bucket and value > before.get((name, labels), 0)
    }
    assert "5.0" not in grew and "10.0" in grew


def test_a_killed_worker_keeps_its_counts_and_leaves_the_live_sums(tmp_path: Path) -> None:
    """SIGKILL one of two workers after it stored reports: the supervisor starts another,
    the scrape still counts what the dead one stored, and its live gauges and process
    figures leave the sums. An operator-named folder is emptied of old files at start."""
    folder = tmp_path / "prometheus"
    folder.mkdir()
    (folder / "counter_1.db").write_bytes(b"left from an earlier run")
    env = {"PROMETHEUS_MULTIPROC_DIR": str(folder)}
    with running_service(tmp_path / "r.sqlite3", env=env, args=["--workers", "2"]) as server:
        healthy(server)
        assert not (folder / "counter_1.db").exists()
        pids = wait_for_workers(server, 2)
        connections = connections_on_every_worker(server, 2)
        victim = pids[0]
        held = accepted_ports(victim, server.port)
        mine = next(c for c in connections if c.port in held)
        batch = json.dumps([crash_report(url=f"https://k{n}.example.com/") for n in range(5)])
        status, _ = mine.post("/reports", batch.encode(), REPORTS)
        assert status == 200
        for connection in connections:
            connection.close()
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            now = wait_for_workers(server, 2)
            if victim not in now:
                break
            time.sleep(0.1)
        healthy(server)
        found = samples(httpx2.get(server.url + "/metrics", timeout=30).text)
        assert not list(folder.glob(f"gauge_livesum_{victim}.db"))
        live = set(wait_for_workers(server, 2))
    assert victim not in live
    name = "reporting_endpoint_reports_received_total"
    assert total(found, name, outcome="stored") == 5


def test_mounted_in_a_host_the_host_metrics_share_the_scrape(tmp_path: Path) -> None:
    """One process, the default registry: the host's own collectors and the client's process
    metrics come out of the service's /metrics too."""
    from tests.test_mounting import host_app

    host_counter = PromCounter("host_app_pages_served", "pages the host app served")
    try:
        host_counter.inc(3)
        app = host_app(Settings(db=tmp_path / "r.sqlite3"))
        with TestClient(app) as client:
            answer = client.post(
                "/reporting/reports", content=json.dumps([crash_report()]), headers=REPORTS
            )
            assert answer.status_code == 200
            found = samples(client.get("/reporting/metrics").text)
    finally:
        REGISTRY.unregister(host_counter)
    assert total(found, "host_app_pages_served_total") == 3
    assert total(found, "reporting_endpoint_reports_received_total", outcome="stored") >= 1
    assert total(found, "process_cpu_seconds_total") > 0


def test_rejections_are_counted_by_the_code_answered_and_only_for_ingest(tmp_path: Path) -> None:
    """A dashboard form past its size limit (no session needed) is not an ingest rejection;
    a Crashpad body past its limit answers ``Discarded=too_large`` and is counted so, whether
    its size was declared or found while it streamed."""
    rejected = "reporting_endpoint_requests_rejected_total"
    settings = Settings(db=tmp_path / "r.sqlite3", crashpad_max_body_bytes=1024)

    def streamed() -> Any:
        for _ in range(8):
            yield b"x" * 1024

    with TestClient(create_app(settings)) as client:
        before = samples(client.get("/metrics").text)
        form = {"content-type": "application/x-www-form-urlencoded"}
        login = client.post("/dashboard/login", content=b"x" * 20_000, headers=form)
        crash = {"content-type": content_type()}
        declared = client.post("/crashpad", content=b"x" * 4096, headers=crash)
        flowing = client.post("/crashpad", content=streamed(), headers=crash)
        after = samples(client.get("/metrics").text)
    assert login.status_code == 413
    assert declared.status_code == flowing.status_code == 413
    assert declared.text == flowing.text == "Discarded=too_large"
    assert total(after, rejected, endpoint="reports") == total(before, rejected, endpoint="reports")
    counted = total(after, rejected, endpoint="crashpad", reason="too_large") - total(
        before, rejected, endpoint="crashpad", reason="too_large"
    )
    assert counted == 2
    assert total(after, rejected, endpoint="crashpad", reason="body_too_large") == total(
        before, rejected, endpoint="crashpad", reason="body_too_large"
    )


def test_a_failing_counter_never_fails_a_committed_upload(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In multiprocess mode a count is a file write: an I/O error there, after the commit,
    is logged, and the upload is still answered as stored."""

    def broken(*args: Any, **kwargs: Any) -> None:
        raise OSError(28, "No space left on device")

    settings = Settings(database=database_url, blob_store=str(tmp_path / "blobs"), read_token="t")
    with TestClient(create_app(settings)) as client:
        monkeypatch.setattr(metrics, "reports_received", broken)
        monkeypatch.setattr(metrics, "crash_stored", broken)
        answer = post_reports(client, [crash_report()])
        dump = (MINIDUMPS / "linux-x64_breakpad_linux_null_read_av.dmp").read_bytes()
        crash = client.post(
            "/crashpad", content=dump_upload(dump), headers={"content-type": content_type()}
        )
        monkeypatch.undo()
        auth = {"authorization": "Bearer t"}
        reports = client.get("/api/reports", headers=auth).json()["reports"]
        found = client.get(f"/api/crashes/{crash.text}", headers=auth).status_code
    assert answer.status_code == 200 and answer.json()["accepted"] == 1
    assert crash.status_code == 200 and len(crash.text) == 32
    assert len(reports) == 1 and found == 200


def test_parsed_dumps_and_the_backlog_reach_metrics(database_url: str, tmp_path: Path) -> None:
    """The processors' outcomes are counted, and the backlog gauges are read from the
    database at scrape time: a dump waiting shows, then none once it is parsed."""
    settings = Settings(database=database_url, blob_store=str(tmp_path / "blobs"), processors=0)
    parsed = "reporting_endpoint_crash_parse_total"
    with TestClient(create_app(settings)) as client:
        before = total(samples(client.get("/metrics").text), parsed, outcome="parsed")
        answer = client.post(
            "/crashpad", content=dump_upload(DUMP), headers={"content-type": content_type()}
        )
        assert answer.status_code == 200, answer.text
        time.sleep(1.1)  # past /healthz's one-second cache of the backlog
        waiting = samples(client.get("/metrics").text)
        assert total(waiting, "reporting_endpoint_crash_backlog_crashes") == 1
        assert total(waiting, "reporting_endpoint_crash_backlog_oldest_age_seconds") >= 1
    with TestClient(create_app(settings.replace(processors=1))) as client:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            found = samples(client.get("/metrics").text)
            if total(found, parsed, outcome="parsed") > before:
                break
            time.sleep(0.2)
        assert total(found, parsed, outcome="parsed") == before + 1
        time.sleep(1.1)
        drained = samples(client.get("/metrics").text)
        assert total(drained, "reporting_endpoint_crash_backlog_crashes") == 0
