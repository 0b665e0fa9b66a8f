"""A real `reporting-endpoint serve` process over HTTPS, and what `export` then prints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx2

from tests.conftest import CHROME_UA, captured_requests, crash_report
from tests.servers import make_certificate, running_service


def export(db: Path) -> list[dict[str, object]]:
    out = subprocess.run(
        [sys.executable, "-m", "reporting_endpoint", "export", "--db", str(db)],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    return [json.loads(line) for line in out.splitlines()]


def test_https_server_stores_what_chromium_sent(tmp_path: Path) -> None:
    certificate = make_certificate(tmp_path / "tls")
    db = tmp_path / "data" / "reports.sqlite3"  # folder and file created on start
    preflight, post = captured_requests("preflight")
    with (
        running_service(db, certificate) as server,
        httpx2.Client(verify=certificate.client_context(), timeout=10) as client,
    ):
        drop = {"host", "content-length", "connection"}
        headers = {k: v for k, v in preflight["headers"] if k.lower() not in drop}
        answer = client.options(server.url + "/reports", headers=headers)
        assert answer.status_code == 204
        assert answer.headers["access-control-allow-origin"] == "*"
        headers = {k: v for k, v in post["headers"] if k.lower() not in drop}
        answer = client.post(server.url + "/reports", content=post["body"], headers=headers)
        assert answer.status_code == 200
        assert answer.json() == {"accepted": 1, "rejected": []}
        assert client.get(server.url + "/healthz").json()["writer_alive"] is True
    [stored] = export(db)
    sent = json.loads(post["body"])[0]
    assert stored["type"] == "crash"
    assert stored["url"] == "https://127.0.0.1:45365/page"
    assert stored["user_agent"] == sent["user_agent"]
    assert stored["age"] == sent["age"]
    assert stored["body"] == sent["body"]
    assert stored["site"] == "https://127.0.0.1"
    assert stored["browser"] == "HeadlessChrome"
    assert str(stored["received_at"]).endswith("Z")


def test_settings_from_the_environment(tmp_path: Path) -> None:
    db = tmp_path / "env.sqlite3"
    env = {"REPORTING_ENDPOINT_KEEP_URL_QUERY": "true", "REPORTING_ENDPOINT_MAX_BODY_BYTES": "600"}
    with running_service(db, env=env) as server, httpx2.Client(timeout=10) as client:
        report = crash_report(url="https://a.example/p?q=1", user_agent=CHROME_UA)
        answer = client.post(
            server.url + "/reports",
            content=json.dumps([report]),
            headers={"content-type": "application/reports+json"},
        )
        assert answer.status_code == 200
        big = json.dumps([crash_report(url="https://a.example/" + "x" * 700)])
        answer = client.post(
            server.url + "/reports", content=big, headers={"content-type": "application/json"}
        )
        assert answer.status_code == 413
    [stored] = export(db)
    assert stored["url"] == "https://a.example/p?q=1"


def test_export_of_a_missing_database_fails_clearly(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "reporting_endpoint", "export", "--db", str(tmp_path / "no.db")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "no database" in result.stderr
    assert not (tmp_path / "no.db").exists()
