"""CORS as Chromium's Reporting API needs it, from the captured preflight."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from starlette.testclient import TestClient

from reporting_endpoint.app import create_app
from reporting_endpoint.settings import Settings
from tests.conftest import captured_requests, crash_report, post_reports, stored_rows


def _replay(client: TestClient, request: dict[str, Any]) -> Any:
    headers = {
        k: v
        for k, v in request["headers"]
        if k.lower() not in {"host", "content-length", "connection"}
    }
    body = str(request.get("body", "")).encode()
    return client.request(str(request["method"]), "/reports", content=body, headers=headers)


def test_chromium_preflight_passes_with_the_default_settings(client: TestClient) -> None:
    preflight, post = captured_requests("preflight")
    assert preflight["method"] == "OPTIONS"
    response = _replay(client, preflight)
    # What Chromium checks before it sends the POST:
    assert 200 <= response.status_code < 300
    headers = response.headers
    assert headers["access-control-allow-origin"] == "*"
    assert "content-type" in headers["access-control-allow-headers"].lower()
    assert "POST" in headers["access-control-allow-methods"]
    assert int(headers["access-control-max-age"]) > 0
    response = _replay(client, post)
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == "*"


def test_allow_list_echoes_a_listed_origin(tmp_path: Path) -> None:
    settings = Settings(db=tmp_path / "r.sqlite3", cors_allow_origins=("https://127.0.0.1:45365",))
    preflight, post = captured_requests("preflight")
    with TestClient(create_app(settings)) as client:
        response = _replay(client, preflight)
        assert response.status_code == 204
        allowed = response.headers["access-control-allow-origin"]
        assert allowed == "https://127.0.0.1:45365"
        assert response.headers["vary"] == "Origin"
        response = _replay(client, post)
        assert response.status_code == 200
    assert len(stored_rows(settings.db)) == 1


def test_allow_list_refuses_other_origins(tmp_path: Path) -> None:
    settings = Settings(db=tmp_path / "r.sqlite3", cors_allow_origins=("https://good.example",))
    preflight, post = captured_requests("preflight")
    with TestClient(create_app(settings)) as client:
        response = _replay(client, preflight)
        assert response.status_code == 403
        assert "access-control-allow-origin" not in response.headers
        assert response.json()["error"]["code"] == "origin_not_allowed"
        response = _replay(client, post)
        assert response.status_code == 403
        # A request without Origin (curl, a server) is not a browser page: accepted.
        assert post_reports(client, [crash_report()]).status_code == 200
    assert len(stored_rows(settings.db)) == 1
