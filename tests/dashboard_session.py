"""Signing in to the dashboard as a browser does (the login form, its CSRF token, the cookie),
for the dashboard tests."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from starlette.testclient import TestClient

from reporting_endpoint.app import create_app
from reporting_endpoint.settings import Settings

READ_TOKEN = "read-secret"
WRITE_TOKEN = "write-secret"
SECRET_KEY = "k" * 48
# Answers are looked at over https, so the cookie carries Secure as it does in production.
BASE_URL = "https://testserver"

_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def dashboard_settings(database_url: str, tmp_path: Path, **changes: Any) -> Settings:
    return Settings(
        database=database_url,
        blob_store=str(tmp_path / "blobs"),
        read_token=READ_TOKEN,
        write_token=WRITE_TOKEN,
        release_source="query:v",
        # On SQLite the key is generated beside the file (in the test's folder); a database
        # server's data folder is the working directory, so those tests set the key.
        secret_key=None if database_url.startswith("sqlite") else SECRET_KEY,
    ).replace(**changes)


def dashboard_client(settings: Settings) -> TestClient:
    return TestClient(create_app(settings), base_url=BASE_URL, follow_redirects=False)


def csrf_of(html: str) -> str:
    """The CSRF token of the first form on a page."""
    found = _CSRF.search(html)
    assert found is not None, "the page has no form with a CSRF token"
    return found.group(1)


def login(client: TestClient, write: bool = True, token: str = READ_TOKEN) -> Any:
    """Sign in through the form; answers the login POST's response."""
    form = client.get("/dashboard/login")
    assert form.status_code == 200, form.text
    fields = {"token": token, "csrf": csrf_of(form.text), "next": "/dashboard/"}
    if write:
        fields["write_token"] = WRITE_TOKEN
    return client.post("/dashboard/login", data=fields)


def session_csrf(client: TestClient) -> str:
    """The signed-in session's CSRF token (from the logout form every page carries)."""
    page = client.get("/dashboard/setup")
    assert page.status_code == 200, page.text
    return csrf_of(page.text)
