"""Dashboard access over HTTP: no page without a session, forged, tampered and expired
cookies refused, CSRF on every form, tokens checked at login, read-only sessions cannot
triage, and the signing key shared by every worker on one data folder."""

from __future__ import annotations

import base64
import logging
import stat
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from itsdangerous import TimestampSigner
from starlette.testclient import TestClient

from reporting_endpoint.app import create_app
from reporting_endpoint.dashboard.auth import KEY_FILE, LOGIN_COOKIE, Sessions, secret_key
from reporting_endpoint.dashboard.login import FAILED_LOGINS_BURST
from reporting_endpoint.settings import Settings, SettingsError
from tests.conftest import crash_report, post_reports
from tests.dashboard_session import (
    BASE_URL,
    READ_TOKEN,
    csrf_of,
    dashboard_client,
    dashboard_settings,
    login,
    session_csrf,
)

# Every dashboard URL a signed-out browser may ask for (GET), and every form target (POST).
PAGES = [
    "/dashboard/",
    "/dashboard/?window=7d",
    "/dashboard/issues",
    "/dashboard/issues?status=regressed&sort=trend",
    "/dashboard/issues/1",
    "/dashboard/reports",
    "/dashboard/reports?type=native",
    "/dashboard/reports/1",
    "/dashboard/crashes/" + "a" * 32,
    "/dashboard/crashes/" + "a" * 32 + "/minidump",
    "/dashboard/quarantine",
    "/dashboard/setup?url=https://www.example.com/",
    "/dashboard/static/copy.js",
    "/dashboard/no-such-page",
]
FORMS = ["/dashboard/issues/1/status", "/dashboard/logout"]


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return dashboard_settings(f"sqlite://{tmp_path}/auth.sqlite3", tmp_path)


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with dashboard_client(settings) as test_client:
        yield test_client


def assert_sent_to_login(response: Any, wanted: str | None = None) -> None:
    assert response.status_code == 303, response.text
    location = response.headers["location"]
    assert location.startswith("/dashboard/login")
    if wanted is not None:
        assert parse_qs(urlsplit(location).query)["next"] == [wanted]


@pytest.mark.parametrize("path", PAGES)
def test_every_page_without_a_session_goes_to_login(client: TestClient, path: str) -> None:
    response = client.get(path)
    assert_sent_to_login(response, path if path != "/dashboard/" else None)
    assert "content-security-policy" in response.headers


@pytest.mark.parametrize("path", FORMS)
def test_every_form_without_a_session_goes_to_login(client: TestClient, path: str) -> None:
    assert_sent_to_login(client.post(path, data={"action": "resolve", "csrf": "x"}))


def test_the_login_page_and_its_stylesheet_need_no_session(client: TestClient) -> None:
    page = client.get("/dashboard/login")
    assert page.status_code == 200
    assert 'data-page="login"' in page.text
    assert client.get("/dashboard/static/dashboard.css").status_code == 200


def test_login_sets_a_signed_cookie_and_opens_every_page(client: TestClient) -> None:
    answer = login(client)
    assert answer.status_code == 303
    assert answer.headers["location"] == "/dashboard/"
    (cookie,) = [c for c in answer.headers.get_list("set-cookie") if c.startswith("re_session=")]
    attributes = {part.strip().split("=")[0].lower() for part in cookie.split(";")[1:]}
    assert {"httponly", "secure", "samesite", "path", "max-age"} <= attributes
    assert "SameSite=Lax" in cookie and "Path=/dashboard" in cookie
    assert client.get("/dashboard/").status_code == 200


def test_the_cookie_is_not_secure_over_plain_http(settings: Settings) -> None:
    app = create_app(settings)
    with TestClient(app, base_url="http://testserver", follow_redirects=False) as client:
        answer = login(client)
        (cookie,) = [c for c in answer.headers.get_list("set-cookie") if "re_session=" in c]
        assert "Secure" not in cookie


def test_a_wrong_read_token_is_refused(client: TestClient) -> None:
    answer = login(client, write=False, token="not-the-token")
    assert answer.status_code == 403
    assert 'data-code="invalid_token"' in answer.text
    assert not any("re_session=" in c for c in answer.headers.get_list("set-cookie"))
    assert_sent_to_login(client.get("/dashboard/issues"))


def test_a_wrong_write_token_is_refused(client: TestClient) -> None:
    form = client.get("/dashboard/login")
    fields = {"token": READ_TOKEN, "write_token": "wrong", "csrf": csrf_of(form.text)}
    answer = client.post("/dashboard/login", data=fields)
    assert answer.status_code == 403
    assert_sent_to_login(client.get("/dashboard/"))


def test_login_is_closed_without_a_read_token(tmp_path: Path) -> None:
    settings = dashboard_settings(f"sqlite://{tmp_path}/c.sqlite3", tmp_path, read_token=None)
    with dashboard_client(settings) as client:
        assert 'data-code="dashboard_disabled"' in client.get("/dashboard/login").text
        # The form is not shown; a POST with the login cookie's token is refused all the same.
        fields = {"token": "", "csrf": client.cookies["re_login"]}
        answer = client.post("/dashboard/login", data=fields)
        assert answer.status_code == 403
        assert 'data-code="dashboard_disabled"' in answer.text


def test_login_never_redirects_to_another_site(client: TestClient) -> None:
    for target in ("//evil.example/", "https://evil.example/", "/\\evil.example", "/elsewhere"):
        form = client.get("/dashboard/login")
        fields = {"token": READ_TOKEN, "csrf": csrf_of(form.text), "next": target}
        answer = client.post("/dashboard/login", data=fields)
        assert answer.headers["location"] == "/dashboard/", target


def test_login_returns_to_the_page_asked_for(client: TestClient) -> None:
    wanted = "/dashboard/issues?status=resolved&sort=count"
    form = client.get(client.get(wanted).headers["location"])
    fields = {"token": READ_TOKEN, "csrf": csrf_of(form.text), "next": wanted}
    answer = client.post("/dashboard/login", data=fields)
    assert answer.headers["location"] == wanted


def _flip(value: str, at: int) -> str:
    replacement = "A" if value[at] != "A" else "B"
    return value[:at] + replacement + value[at + 1 :]


def test_forged_and_tampered_cookies_are_refused(client: TestClient, settings: Settings) -> None:
    login(client)
    good = client.cookies["re_session"]
    payload, timestamp, signature = good.rsplit(".", 2)
    other_key = Sessions(settings.replace(secret_key="x" * 40)).issue(can_write=True)
    forged = [
        "garbage",
        base64.urlsafe_b64encode(b'{"r":"x","c":"y","w":"z"}').decode(),
        _flip(good, 3),  # the payload changed
        f"{payload}.{timestamp}.{_flip(signature, 5)}",  # the signature changed
        other_key,  # signed with another key
        good + "A" * 2000,  # longer than any cookie this service makes
    ]
    for value in forged:
        client.cookies.clear()
        client.cookies.set("re_session", value, domain="testserver.local", path="/dashboard")
        answer = client.get("/dashboard/issues")
        assert_sent_to_login(answer, "/dashboard/issues")
        # The bad cookie is dropped, so the browser does not keep sending it.
        assert any(c.startswith("re_session=;") for c in answer.headers.get_list("set-cookie"))
    client.cookies.clear()
    client.cookies.set("re_session", good, domain="testserver.local", path="/dashboard")
    assert client.get("/dashboard/issues").status_code == 200


def test_an_expired_cookie_is_refused(
    client: TestClient, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    sessions = Sessions(settings)
    with monkeypatch.context() as patched:
        ago = int(time.time()) - settings.session_max_age - 5
        patched.setattr(TimestampSigner, "get_timestamp", lambda self: ago)
        expired = sessions.issue(can_write=True)
    fresh = sessions.issue(can_write=True)
    client.cookies.set("re_session", expired, domain="testserver.local", path="/dashboard")
    assert_sent_to_login(client.get("/dashboard/"))
    client.cookies.set("re_session", fresh, domain="testserver.local", path="/dashboard")
    assert client.get("/dashboard/").status_code == 200


def test_a_session_ends_when_its_token_changes(settings: Settings) -> None:
    with dashboard_client(settings) as client:
        login(client)
        cookie = client.cookies["re_session"]
    with dashboard_client(settings.replace(read_token="rotated-token")) as client:
        client.cookies.set("re_session", cookie, domain="testserver.local", path="/dashboard")
        assert_sent_to_login(client.get("/dashboard/"))


def crash_issue(client: TestClient) -> int:
    post_reports(client, [crash_report()])
    page = client.get("/dashboard/issues")
    assert page.status_code == 200
    marker = 'data-issue="'
    start = page.text.index(marker) + len(marker)
    return int(page.text[start : page.text.index('"', start)])


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"action": "resolve"}, "csrf_missing"),
        ({"action": "resolve", "csrf": ""}, "csrf_missing"),
        ({"action": "resolve", "csrf": "not-the-token"}, "csrf_invalid"),
    ],
)
def test_a_form_without_its_csrf_token_is_refused(
    client: TestClient, fields: dict[str, str], code: str
) -> None:
    login(client)
    issue_id = crash_issue(client)
    answer = client.post(f"/dashboard/issues/{issue_id}/status", data=fields)
    assert answer.status_code == 403
    assert f'data-code="{code}"' in answer.text
    assert "text/html" in answer.headers["content-type"]
    page = client.get(f"/dashboard/issues/{issue_id}")
    assert ">unresolved<" in page.text
    # Logging out needs the token too.
    assert client.post("/dashboard/logout", data=fields).status_code == 403
    assert client.get("/dashboard/").status_code == 200


def test_a_form_sent_from_another_site_is_refused(client: TestClient) -> None:
    login(client)
    issue_id = crash_issue(client)
    fields = {"action": "resolve", "csrf": session_csrf(client)}
    target = f"/dashboard/issues/{issue_id}/status"
    answer = client.post(target, data=fields, headers={"sec-fetch-site": "cross-site"})
    assert answer.status_code == 403
    assert 'data-code="cross_site_form"' in answer.text


def test_the_login_form_needs_its_own_csrf_token(client: TestClient) -> None:
    client.get("/dashboard/login")
    for token in ("", "forged"):
        fields = {"token": READ_TOKEN, "csrf": token}
        answer = client.post("/dashboard/login", data=fields)
        assert answer.status_code == 403
        assert 'data-code="csrf_' in answer.text
    # A token from the form but without its cookie (another browser's form) is refused too.
    token = csrf_of(client.get("/dashboard/login").text)
    client.cookies.clear()
    answer = client.post("/dashboard/login", data={"token": READ_TOKEN, "csrf": token})
    assert answer.status_code == 403


def test_a_read_only_session_cannot_triage(client: TestClient) -> None:
    login(client, write=False)
    issue_id = crash_issue(client)
    page = client.get(f"/dashboard/issues/{issue_id}")
    assert 'name="action"' not in page.text
    assert "read only" in page.text
    fields = {"action": "resolve", "csrf": session_csrf(client)}
    answer = client.post(f"/dashboard/issues/{issue_id}/status", data=fields)
    assert answer.status_code == 403
    assert 'data-code="write_access_required"' in answer.text
    assert ">unresolved<" in client.get(f"/dashboard/issues/{issue_id}").text


def test_a_form_past_the_size_limit_is_refused(client: TestClient) -> None:
    login(client)
    fields = {"csrf": session_csrf(client), "action": "resolve", "release": "x" * 20_000}
    answer = client.post("/dashboard/issues/1/status", data=fields)
    assert answer.status_code == 413
    assert 'data-code="body_too_large"' in answer.text

    def chunks() -> Iterator[bytes]:
        # No Content-Length: the limit counts the bytes as they stream in.
        yield b"csrf=x&release="
        for _ in range(40):
            yield b"x" * 1000

    streamed = client.post(
        "/dashboard/issues/1/status",
        content=chunks(),
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert streamed.status_code == 413
    assert 'data-code="body_too_large"' in streamed.text


def test_logout_ends_the_session(client: TestClient) -> None:
    login(client)
    answer = client.post("/dashboard/logout", data={"csrf": session_csrf(client)})
    assert answer.status_code == 303
    assert any(c.startswith("re_session=;") for c in answer.headers.get_list("set-cookie"))
    assert_sent_to_login(client.get("/dashboard/"))


def test_the_generated_key_is_private_shared_and_never_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    settings = dashboard_settings(f"sqlite://{tmp_path}/k.sqlite3", tmp_path)
    keys: list[bytes] = []
    # Workers starting together: each makes a candidate, one wins, all read the same key.
    threads = [threading.Thread(target=lambda: keys.append(secret_key(settings))) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert len(keys) == 8 and len(set(keys)) == 1
    path = settings.data_dir / KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in settings.data_dir.iterdir() if KEY_FILE in p.name) == [KEY_FILE]
    # A session made by one worker is good in another (a second app on the same folder).
    with dashboard_client(settings) as first:
        login(first)
        cookie = first.cookies["re_session"]
    with dashboard_client(settings) as second:
        second.cookies.set("re_session", cookie, domain="testserver.local", path="/dashboard")
        assert second.get("/dashboard/").status_code == 200
    assert keys[0].decode() not in caplog.text
    assert keys[0].decode() not in repr(settings)


def test_hosts_share_sessions_through_the_secret_key_setting(tmp_path: Path) -> None:
    database = f"sqlite://{tmp_path}/h.sqlite3"
    key = "s" * 40
    one = dashboard_settings(database, tmp_path / "one", secret_key=key)
    two = dashboard_settings(database, tmp_path / "two", secret_key=key)
    with dashboard_client(one) as first:
        login(first)
        cookie = first.cookies["re_session"]
    with dashboard_client(two) as second:
        second.cookies.set("re_session", cookie, domain="testserver.local", path="/dashboard")
        assert second.get("/dashboard/").status_code == 200
    assert not (Path(f"{tmp_path}/h.sqlite3.data") / KEY_FILE).exists()
    assert key not in repr(one)


def test_a_short_secret_key_is_refused_without_showing_it() -> None:
    with pytest.raises(SettingsError) as refused:
        Settings(secret_key="short-but-secret")
    assert "short-but-secret" not in str(refused.value)
    with pytest.raises(SettingsError):
        Settings(session_max_age=5)


def test_write_token_is_only_asked_for_when_one_is_set(tmp_path: Path) -> None:
    settings = dashboard_settings(f"sqlite://{tmp_path}/w.sqlite3", tmp_path, write_token=None)
    with dashboard_client(settings) as client:
        assert 'name="write_token"' not in client.get("/dashboard/login").text
        assert login(client, write=False).status_code == 303
        assert "read only" in client.get("/dashboard/").text


def test_failed_logins_are_throttled_per_address(settings: Settings) -> None:
    """Guesses beyond the burst are refused unchecked (the right token too) with 429 and
    Retry-After, even when sent all at once; an IPv6 client is one /64; others still sign in."""
    app = create_app(settings)

    async def addressed(scope: Any, receive: Any, send: Any) -> None:
        # The test's stand-in for the peer address: taken from a header.
        if scope["type"] == "http":
            peer = dict(scope["headers"]).get(b"x-peer", b"192.0.2.1").decode()
            scope = {**scope, "client": (peer, 40000)}
        await app(scope, receive, send)

    with TestClient(addressed, base_url=BASE_URL, follow_redirects=False) as client:
        csrf = csrf_of(client.get("/dashboard/login").text)

        def attempt(token: str, peer: str = "2001:db8::1") -> Any:
            # The login cookie sent as such: each refusal sets a new one in the client's jar,
            # and concurrent attempts must not trip over each other's.
            fields = {"token": token, "csrf": csrf, "next": "/dashboard/"}
            headers = {"x-peer": peer, "cookie": f"{LOGIN_COOKIE}={csrf}"}
            return client.post("/dashboard/login", data=fields, headers=headers)

        started = time.monotonic()
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(attempt, [f"guess{n}" for n in range(40)]))
        elapsed = time.monotonic() - started
        codes = sorted(answer.status_code for answer in answers)
        assert codes == [403] * FAILED_LOGINS_BURST + [429] * (40 - FAILED_LOGINS_BURST)
        refused = next(answer for answer in answers if answer.status_code == 429)
        assert 'data-code="too_many_attempts"' in refused.text
        assert 1 <= int(refused.headers["retry-after"]) <= 60
        assert "default-src 'none'" in refused.headers["content-security-policy"]
        # Another address in the same /64 is the same client, the right token notwithstanding.
        assert attempt(READ_TOKEN, peer="2001:db8::ffff:2").status_code == 429
        assert attempt(READ_TOKEN, peer="2001:db8:0:1::1").status_code == 303
        assert attempt(READ_TOKEN, peer="192.0.2.9").status_code == 303
    assert elapsed < 30
