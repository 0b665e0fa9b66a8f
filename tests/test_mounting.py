"""The service inside a host app: Starlette and FastAPI mounts, the header middleware."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx2
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.testclient import TestClient

import reporting_endpoint
from reporting_endpoint.headers import HeaderOptions, ReportingHeadersMiddleware, build_headers
from reporting_endpoint.settings import Settings
from tests.conftest import crash_report, stored_rows
from tests.servers import free_port, make_certificate, wait_until_listening

ROOT = Path(__file__).resolve().parent.parent
HEADERS = build_headers(HeaderOptions(url="https://r.example/reporting/reports", nel=True))


def host_app(settings: Settings, with_lifespan: bool = True) -> Starlette:
    reporting = reporting_endpoint.create_app(settings)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with reporting_endpoint.lifespan(reporting):
            yield

    async def page(request: Request) -> Response:
        return HTMLResponse("<h1>hi</h1>")

    async def own_policy(request: Request) -> Response:
        return HTMLResponse("<h1>hi</h1>", headers={"Report-To": '{"group":"mine"}'})

    async def data(request: Request) -> Response:
        return JSONResponse({"ok": True})

    return Starlette(
        routes=[
            Route("/", page),
            Route("/own", own_policy),
            Route("/data", data),
            Mount("/reporting", app=reporting),
        ],
        middleware=[Middleware(ReportingHeadersMiddleware, headers=HEADERS)],
        lifespan=lifespan if with_lifespan else None,
    )


def test_mounted_service_stores_reports(settings: Settings) -> None:
    with TestClient(host_app(settings)) as client:
        response = client.post(
            "/reporting/reports",
            content=json.dumps([crash_report()]),
            headers={"content-type": "application/reports+json"},
        )
        assert response.status_code == 200
        assert client.get("/reporting/healthz").json()["writer_alive"] is True
    assert len(stored_rows(settings.db)) == 1


def test_middleware_adds_headers_to_html_only_and_never_clobbers(settings: Settings) -> None:
    with TestClient(host_app(settings)) as client:
        page = client.get("/")
        for name, value in HEADERS.items():
            assert page.headers[name] == value
        assert "reporting-endpoints" not in client.get("/data").headers
        own = client.get("/own")
        assert own.headers["report-to"] == '{"group":"mine"}'
        assert own.headers.get_list("report-to") == ['{"group":"mine"}']
        assert own.headers["reporting-endpoints"] == HEADERS["Reporting-Endpoints"]


def test_mounted_without_starting_answers_503_with_a_code(settings: Settings) -> None:
    with TestClient(host_app(settings, with_lifespan=False)) as client:
        response = client.post(
            "/reporting/reports",
            content=json.dumps([crash_report()]),
            headers={"content-type": "application/reports+json"},
        )
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "storage_not_started"


def test_fastapi_example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("fastapi", reason="FastAPI is a test-only dependency: pip install .[test]")
    db = tmp_path / "fastapi.sqlite3"
    monkeypatch.setenv("REPORTING_ENDPOINT_DB", str(db))
    monkeypatch.setenv("REPORT_URL", "https://r.example/reporting/reports")
    sys.modules.pop("examples.fastapi_app", None)
    module = importlib.import_module("examples.fastapi_app")
    with TestClient(module.app) as client:
        assert client.get("/").headers["reporting-endpoints"].startswith('default="https://r.')
        response = client.post(
            "/reporting/reports",
            content=json.dumps([crash_report()]),
            headers={"content-type": "application/reports+json"},
        )
        assert response.json() == {"accepted": 1, "rejected": []}
    assert len(stored_rows(db)) == 1


def test_host_app_example_under_real_uvicorn(tmp_path: Path) -> None:
    certificate = make_certificate(tmp_path / "tls")
    db = tmp_path / "host.sqlite3"
    port = free_port()
    env = {
        **os.environ,
        "REPORTING_ENDPOINT_DB": str(db),
        "REPORT_URL": f"https://127.0.0.1:{port}/reporting/reports",
    }
    command = [
        sys.executable, "-m", "uvicorn", "examples.host_app:app", "--host", "127.0.0.1",
        "--port", str(port), "--log-level", "warning",
        "--ssl-certfile", str(certificate.cert_file), "--ssl-keyfile", str(certificate.key_file),
    ]  # fmt: skip
    process = subprocess.Popen(command, cwd=ROOT, env=env)
    try:
        wait_until_listening(port, process)
        base = f"https://127.0.0.1:{port}"
        with httpx2.Client(verify=certificate.client_context(), timeout=10) as client:
            page = client.get(base + "/")
            assert page.status_code == 200
            endpoints = page.headers["reporting-endpoints"]
            assert f'default="{base}/reporting/reports"' in endpoints
            assert f'crash-reporting="{base}/reporting/reports"' in endpoints
            response = client.post(
                base + "/reporting/reports",
                content=json.dumps([crash_report()]),
                headers={"content-type": "application/reports+json", "origin": base},
            )
            assert response.status_code == 200
            assert response.json()["accepted"] == 1
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert [row["type"] for row in stored_rows(db)] == ["crash"]
