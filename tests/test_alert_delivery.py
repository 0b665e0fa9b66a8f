"""Alerts delivered end to end: a real captured Chromium crash batch, a real HTTP receiver
(signed webhook and Slack-compatible posts) and a real SMTP server on 127.0.0.1, on both
storage engines; then a dead receiver and a restarted service."""

from __future__ import annotations

import json
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from reporting_endpoint.alerts.signing import SIGNATURE_HEADER, verify
from reporting_endpoint.app import create_app
from reporting_endpoint.settings import Settings
from tests.alert_receivers import HttpReceiver, SmtpReceiver, wait_for
from tests.conftest import captured_requests
from tests.servers import start_service, stop

READ = {"Authorization": "Bearer read-secret"}
WRITE = {"Authorization": "Bearer write-secret"}
SECRET = "webhook-signing-secret"
PUBLIC = "https://crashes.example.com"
# Fast delivery for tests: README "Alerts" documents the production defaults.
FAST = """
[delivery]
poll_interval = "100ms"
evaluate_interval = "200ms"
retry_initial = "200ms"
retry_max = "1s"
max_attempts = 1000
give_up_after = "10m"
timeout = "2s"
"""


def crash_batch() -> bytes:
    """The body of the captured crash delivery of a real headless Chromium."""
    posts = [r for r in captured_requests("crash-pagecrash") if r["method"] == "POST"]
    return str(posts[0]["body"]).encode()


def post(client: TestClient, body: bytes) -> None:
    response = client.post(
        "/reports", content=body, headers={"content-type": "application/reports+json"}
    )
    assert response.status_code == 200, response.text


@pytest.fixture
def receivers() -> Iterator[tuple[HttpReceiver, SmtpReceiver]]:
    http, smtp = HttpReceiver().start(), SmtpReceiver().start()
    try:
        yield http, smtp
    finally:
        http.stop()
        smtp.stop()


def rules_file(tmp_path: Path, http: HttpReceiver, smtp: SmtpReceiver) -> Path:
    path = tmp_path / "alerts.toml"
    path.write_text(
        FAST
        + f"""
[channels.hook]
type = "webhook"
url = "{http.url("/hook")}"
secret_env = "TEST_ALERT_WEBHOOK_SECRET"

[channels.chat]
type = "slack"
url = "{http.url("/slack")}"

[channels.mail]
type = "email"
host = "127.0.0.1"
port = {smtp.port}
security = "none"
from = "alerts@crashes.example.com"
to = ["oncall@example.com"]

[[rule]]
name = "new"
trigger = "new_issue"
channels = ["hook", "chat", "mail"]

[[rule]]
name = "regression"
trigger = "regressed"
channels = ["hook", "chat", "mail"]
"""
    )
    return path


def webhook_bodies(http: HttpReceiver) -> list[dict[str, Any]]:
    return [json.loads(r.body) for r in http.at("/hook")]


def test_a_new_crash_sends_one_webhook_slack_and_email_then_a_regression(
    database_url: str,
    tmp_path: Path,
    receivers: tuple[HttpReceiver, SmtpReceiver],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    http, smtp = receivers
    monkeypatch.setenv("TEST_ALERT_WEBHOOK_SECRET", SECRET)
    settings = Settings(
        database=database_url,
        blob_store=str(tmp_path / "blobs"),
        read_token="read-secret",
        write_token="write-secret",
        alert_rules=rules_file(tmp_path, http, smtp),
        public_url=PUBLIC,
        duplicate_tolerance_ms=0,  # the storm below repeats one captured report
    )
    batch = crash_batch()
    with TestClient(create_app(settings)) as client:
        sent_before = delivered_by_kind(client)
        post(client, batch)
        wait_for(
            lambda: len(http.at("/hook")) and len(http.at("/slack")) and len(smtp.messages),
            what="one webhook, one Slack message and one email",
        )
        issues = client.get("/api/issues", headers=READ).json()["issues"]
        assert len(issues) == 1
        link = f"{PUBLIC}/dashboard/issues/{issues[0]['id']}"

        [hook] = http.at("/hook")
        body = json.loads(hook.body)
        assert verify(SECRET, hook.body, hook.headers[SIGNATURE_HEADER])
        assert not verify("another secret", hook.body, hook.headers[SIGNATURE_HEADER])
        assert hook.headers["Idempotency-Key"] == body["idempotency_key"]
        assert (body["trigger"], body["rule"], body["link"]) == ("new_issue", "new", link)
        assert body["issue"]["id"] == issues[0]["id"]
        assert body["title"] == f"New issue: {issues[0]['title']}"
        [slack] = http.at("/slack")
        assert f"<{link}|Open the issue in the dashboard>" in json.loads(slack.body)["text"]
        [mail] = smtp.messages
        assert mail["Subject"] == f"New issue: {issues[0]['title']}"
        assert mail["To"] == "oncall@example.com"
        assert link in mail.get_payload()

        # A storm of 10,000 events for that issue: no more messages.
        storm = json.loads(batch) * 1000
        for _ in range(10):
            post(client, json.dumps(storm).encode())
        assert client.get(f"/api/issues/{issues[0]['id']}", headers=READ).json()["count"] == (
            10_001
        )
        time.sleep(1.5)  # many evaluation and delivery rounds
        assert (len(http.at("/hook")), len(http.at("/slack")), len(smtp.messages)) == (1, 1, 1)

        # Resolved, then a new event: a regression alert on every channel.
        resolved = client.patch(
            f"/api/issues/{issues[0]['id']}", json={"status": "resolved"}, headers=WRITE
        )
        assert resolved.status_code == 200, resolved.text
        post(client, batch)
        wait_for(
            lambda: len(http.at("/hook")) == 2 and len(http.at("/slack")) == 2
            and len(smtp.messages) == 2,
            what="the regression on every channel",
        )  # fmt: skip
        regression = webhook_bodies(http)[1]
        assert (regression["trigger"], regression["link"]) == ("regressed", link)
        assert regression["title"].startswith("Regressed: ")
        assert link in smtp.messages[1].get_payload()

        # The outbox and the delivery log through the read API. A message arrives before
        # its delivery is recorded (the round's log is one transaction after the sends).
        wait_for(
            lambda: (
                {a["status"] for a in client.get("/api/alerts", headers=READ).json()["alerts"]}
                == {"delivered"}
            ),
            what="every delivery recorded",
        )
        listed = client.get("/api/alerts", headers=READ).json()
        assert [(a["rule"], a["channel"], a["status"]) for a in listed["alerts"]] == [
            ("regression", "mail", "delivered"),
            ("regression", "chat", "delivered"),
            ("regression", "hook", "delivered"),
            ("new", "mail", "delivered"),
            ("new", "chat", "delivered"),
            ("new", "hook", "delivered"),
        ]
        deliveries = client.get("/api/alerts/deliveries?limit=2", headers=READ).json()
        assert len(deliveries["deliveries"]) == 2 and deliveries["next_cursor"] is not None
        rest = client.get(
            f"/api/alerts/deliveries?cursor={deliveries['next_cursor']}", headers=READ
        ).json()
        everything = deliveries["deliveries"] + rest["deliveries"]
        assert len(everything) == 6
        assert {d["outcome"] for d in everything} == {"delivered"}
        assert client.get("/api/alerts").status_code == 401
        bad = client.get("/api/alerts?status=lost", headers=READ)
        assert (bad.status_code, bad.json()["error"]["code"]) == (400, "invalid_status")
        # /metrics counts each delivered alert once, by the kind of its channel.
        sent = delivered_by_kind(client)
        assert {kind: sent[kind] - sent_before.get(kind, 0) for kind in sent} == {
            "webhook": 2,
            "slack": 2,
            "email": 2,
        }


def delivered_by_kind(client: TestClient) -> dict[str, float]:
    """``alert_deliveries_total{outcome="sent"}`` per channel kind, as /metrics shows it (the
    counters live as long as the process, so tests compare before and after)."""
    text = client.get("/metrics").text
    return {
        sample.labels["channel"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "reporting_endpoint_alert_deliveries_total"
        and sample.labels["outcome"] == "sent"
    }


CAPTURED = ("crash-pagecrash", "csp", "deprecation")


def test_a_dead_receiver_and_a_restart_lose_nothing(database_url: str, tmp_path: Path) -> None:
    """Three new issues while the receiver is down; the service is killed and started again
    meanwhile; once the receiver is back every alert arrives, and a repeat carries the same
    idempotency key. (Down for seconds, not a minute: the backoff is set short here.)"""
    receiver = HttpReceiver()  # not started: connections are refused
    rules = tmp_path / "alerts.toml"
    rules.write_text(
        FAST
        + f"""
[channels.hook]
type = "webhook"
url = "{receiver.url("/hook")}"
secret = "{SECRET}"

[[rule]]
name = "new"
trigger = "new_issue"
channels = ["hook"]
"""
    )
    db = tmp_path / "reports.sqlite3"
    args = ["--alert-rules", str(rules), "--read-token", "read-secret", "--database", database_url]
    args += ["--blob-store", str(tmp_path / "blobs")]
    server = start_service(db, args=args)
    try:
        for name in CAPTURED:
            for request in captured_requests(name):
                if request["method"] == "POST":
                    response = httpx2.post(
                        server.url + "/reports",
                        content=request["body"].encode(),
                        headers={"Content-Type": "application/reports+json"},
                    )
                    assert response.status_code == 200
        with httpx2.Client(base_url=server.url, headers=READ) as api:
            wait_for(
                lambda: any(
                    d["outcome"] == "retry"
                    for d in api.get("/api/alerts/deliveries").json()["deliveries"]
                ),
                what="a failed attempt against the dead receiver",
            )
            issues = api.get("/api/issues?status=unresolved").json()["issues"]
            assert len(issues) >= 3
            wait_for(
                lambda: len(api.get("/api/alerts").json()["alerts"]) == len(issues),
                what="an alert queued per new issue",
            )
    finally:
        server.process.send_signal(signal.SIGKILL)
        server.process.wait()
    time.sleep(1)
    server = start_service(db, args=args)
    try:
        time.sleep(1)  # still down after the restart
        receiver.start()
        with httpx2.Client(base_url=server.url, headers=READ) as api:
            wait_for(
                lambda: all(
                    a["status"] == "delivered" for a in api.get("/api/alerts").json()["alerts"]
                ),
                what="every alert delivered",
            )
            alerts = api.get("/api/alerts").json()["alerts"]
            log = api.get("/api/alerts/deliveries?limit=500").json()["deliveries"]
    finally:
        stop(server)
        receiver.stop()
    keys = {a["idempotency_key"] for a in alerts}
    received = webhook_bodies(receiver)
    assert {b["idempotency_key"] for b in received} == keys
    # Each arrival is an alert; the same alert twice carries the same key (counted once).
    assert len({(b["idempotency_key"], b["issue"]["id"]) for b in received}) == len(keys)
    assert len({b["issue"]["id"] for b in received}) == len(keys) == len(issues)
    assert all(verify(SECRET, r.body, r.headers[SIGNATURE_HEADER]) for r in receiver.at("/hook"))
    assert {d["outcome"] for d in log} == {"retry", "delivered"}


def test_a_hanging_receiver_never_slows_ingest(database_url: str, tmp_path: Path) -> None:
    """The receiver takes the connection and never answers: the sender waits out its timeout
    while uploads with new issues keep being answered at once."""
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(100)  # never accepted: connections sit in the backlog, no answer ever comes
    port = hole.getsockname()[1]
    rules = tmp_path / "alerts.toml"
    rules.write_text(
        FAST.replace('timeout = "2s"', 'timeout = "30s"')
        + f"""
[channels.hook]
type = "webhook"
url = "http://127.0.0.1:{port}/hook"

[[rule]]
name = "new"
trigger = "new_issue"
channels = ["hook"]
"""
    )
    settings = Settings(
        database=database_url,
        blob_store=str(tmp_path / "blobs"),
        read_token="read-secret",
        alert_rules=rules,
    )
    try:
        with TestClient(create_app(settings)) as client:
            post(client, crash_batch())
            wait_for(
                lambda: client.get("/api/alerts", headers=READ).json()["alerts"] != [],
                what="the first alert queued",
            )
            time.sleep(0.5)  # the sender is now waiting on the dead receiver
            started = time.monotonic()
            for n in range(20):
                report = json.loads(crash_batch())
                for item in report:
                    item["url"] = f"https://site{n}.example/page"  # a new issue each time
                post(client, json.dumps(report).encode())
            elapsed = time.monotonic() - started
            # Every upload answered while no delivery attempt has finished.
            assert client.get("/api/alerts/deliveries", headers=READ).json()["deliveries"] == []
            assert elapsed < 10, elapsed
            wait_for(
                lambda: len(client.get("/api/alerts", headers=READ).json()["alerts"]) == 21,
                what="an alert queued for each new issue meanwhile",
            )
    finally:
        hole.close()
