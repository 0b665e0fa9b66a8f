"""Issues over HTTP, on the real app and both storage engines: the triage cycle (resolve,
regress, resolved in a release, ignore until N more events), every default fingerprint from
real captured reports and a real Crashpad upload, parameters and tokens."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from reporting_endpoint.app import create_app
from reporting_endpoint.settings import Settings
from tests.conftest import captured_reports, crash_report, post_reports
from tests.crashpad_client import MINIDUMPS, captured, content_type, dump_upload

READ = {"Authorization": "Bearer read-secret"}
WRITE = {"Authorization": "Bearer write-secret"}
PAGE = "https://shop.example.com/app/checkout"
# Distinct events must not look like retries of each other (same report generated within
# the duplicate tolerance): each one is generated 2 s before the previous.
_AGES = itertools.count(13, 2000)


def service(database_url: str, tmp_path: Path, **changes: Any) -> TestClient:
    settings = Settings(
        database=database_url,
        blob_store=str(tmp_path / "blobs"),
        read_token="read-secret",
        write_token="write-secret",
        release_source="query:v",
    ).replace(**changes)
    return TestClient(create_app(settings))


@pytest.fixture
def client(database_url: str, tmp_path: Path) -> Iterator[TestClient]:
    with service(database_url, tmp_path) as test_client:
        yield test_client


def send_crash(client: TestClient, release: str | None = None, count: int = 1) -> None:
    url = PAGE if release is None else f"{PAGE}?v={release}"
    batch = [crash_report(url=url, age=next(_AGES)) for _ in range(count)]
    response = post_reports(client, batch)
    assert response.status_code == 200
    assert response.json() == {"accepted": count, "rejected": []}


def issues(client: TestClient, query: str = "") -> list[dict[str, Any]]:
    response = client.get(f"/api/issues{query}", headers=READ)
    assert response.status_code == 200, response.text
    found: list[dict[str, Any]] = response.json()["issues"]
    return found


def issue(client: TestClient, issue_id: int) -> dict[str, Any]:
    response = client.get(f"/api/issues/{issue_id}", headers=READ)
    assert response.status_code == 200, response.text
    found: dict[str, Any] = response.json()
    return found


def patch(client: TestClient, issue_id: int, body: dict[str, Any]) -> dict[str, Any]:
    response = client.patch(f"/api/issues/{issue_id}", json=body, headers=WRITE)
    assert response.status_code == 200, response.text
    found: dict[str, Any] = response.json()
    return found


def the_crash_issue(client: TestClient) -> dict[str, Any]:
    (found,) = issues(client, "?kind=crash")
    return found


def test_resolve_then_a_new_event_regresses(client: TestClient) -> None:
    send_crash(client)
    first = the_crash_issue(client)
    assert first["status"] == "unresolved"
    assert first["title"] == "Crash on https://example.com /app/checkout"
    assert first["count"] == first["window_count"] == 1

    resolved = patch(client, first["id"], {"status": "resolved", "reason": "fixed in #42"})
    assert resolved["status"] == "resolved"
    send_crash(client)
    after = issue(client, first["id"])
    assert after["status"] == "regressed"
    assert after["count"] == 2
    assert [(h["actor"], h["from"], h["to"]) for h in after["history"]] == [
        ("api", "unresolved", "resolved"),
        ("system", "resolved", "regressed"),
    ]
    assert after["history"][0]["reason"] == "fixed in #42"
    assert issues(client, "?status=regressed")[0]["id"] == first["id"]


def test_resolved_in_a_release_regresses_only_on_a_newer_one(client: TestClient) -> None:
    send_crash(client, "1.0")
    issue_id = the_crash_issue(client)["id"]
    resolved = patch(client, issue_id, {"status": "resolved", "release": "1.2"})
    assert (resolved["status"], resolved["resolved_in_release"]) == ("resolved", "1.2")

    send_crash(client, "1.1")  # a straggler on the old release
    send_crash(client)  # no release: says nothing about the build
    assert issue(client, issue_id)["status"] == "resolved"

    send_crash(client, "1.3")
    after = issue(client, issue_id)
    assert after["status"] == "regressed"
    assert (after["first_release"], after["last_release"]) == ("1.0", "1.3")
    releases = {b["value"]: b["count"] for b in after["breakdowns"]["release"]}
    assert releases == {"1.0": 1, "1.1": 1, "1.3": 1}
    assert issues(client, "?release=1.1")[0]["id"] == issue_id
    assert issues(client, "?release=9.9") == []


def test_ignore_until_five_more_events(client: TestClient) -> None:
    send_crash(client)
    issue_id = the_crash_issue(client)["id"]
    ignored = patch(client, issue_id, {"status": "ignored", "ignore_events": 5})
    assert ignored["status"] == "ignored"
    assert ignored["ignore_until_count"] == 6

    send_crash(client, count=4)
    assert issue(client, issue_id)["status"] == "ignored"
    send_crash(client)
    after = issue(client, issue_id)
    assert after["status"] == "unresolved"
    assert after["count"] == 6
    assert after["history"][-1]["actor"] == "system"


def test_ignore_for_a_time_and_reopen(client: TestClient) -> None:
    send_crash(client)
    issue_id = the_crash_issue(client)["id"]
    ignored = patch(client, issue_id, {"status": "ignored", "ignore_minutes": 60})
    assert ignored["status"] == "ignored" and ignored["ignore_until"] is not None
    send_crash(client)
    assert issue(client, issue_id)["status"] == "ignored"
    reopened = patch(client, issue_id, {"status": "unresolved", "reason": "still happens"})
    assert reopened["status"] == "unresolved" and reopened["ignore_until"] is None


def test_events_are_keyset_paged_newest_first(client: TestClient) -> None:
    send_crash(client, count=5)
    issue_id = the_crash_issue(client)["id"]
    shown = issue(client, issue_id)
    assert len(shown["events"]) == 5 and shown["events_next_cursor"] is None

    seen: list[int] = []
    cursor = ""
    while True:
        response = client.get(
            f"/api/issues/{issue_id}/events?limit=2" + (f"&cursor={cursor}" if cursor else ""),
            headers=READ,
        )
        assert response.status_code == 200
        page = response.json()
        seen += [event["id"] for event in page["events"]]
        if page["next_cursor"] is None:
            break
        cursor = page["next_cursor"]
    assert len(seen) == len(set(seen)) == 5
    assert seen == sorted(seen, reverse=True)


def test_issues_are_keyset_paged(client: TestClient) -> None:
    reports = [
        {**captured_reports("deprecation")[0], "body": {"id": f"Feature{n}", "message": "m"}}
        for n in range(7)
    ]
    assert post_reports(client, reports).json()["accepted"] == 7
    seen: list[int] = []
    query = "?kind=deprecation&limit=3"
    while True:
        response = client.get(f"/api/issues{query}", headers=READ)
        assert response.status_code == 200
        page = response.json()
        seen += [item["id"] for item in page["issues"]]
        if page["next_cursor"] is None:
            break
        query = f"?kind=deprecation&limit=3&cursor={page['next_cursor']}"
    assert len(seen) == len(set(seen)) == 7


def test_every_default_fingerprint_from_real_reports_and_a_real_upload(
    client: TestClient,
) -> None:
    names = ("crash-pagecrash", "oom", "deprecation", "csp", "nel")
    reports = [report for name in names for report in captured_reports(name)]
    # A crash with a JS stack (Chromium's unresponsive-page report with the Document-Policy
    # include-js-call-stacks-in-crash-reports), and a type no default knows.
    stack = (
        "Error\n    at busy (https://127.0.0.1/app.js?x=1:3:7)\n    at https://127.0.0.1/app.js:9:1"
    )
    reports.append(
        {**captured_reports("crash-pagecrash")[0],
         "body": {"reason": "unresponsive", "stack": stack, "is_top_level": True}}
    )  # fmt: skip
    reports.append({**captured_reports("csp")[0], "type": "coep", "body": {"blockedURL": "x"}})
    response = post_reports(client, reports)
    assert response.json() == {"accepted": len(reports), "rejected": []}

    upload = captured("b_debian_gzip-chunked_win-electron-dump")
    uploaded = client.post("/crashpad", content=upload.body, headers=upload.headers)
    assert uploaded.status_code == 200
    analyzer = client.app.state.analyzer  # type: ignore[attr-defined]
    client.portal.call(analyzer.idle)  # type: ignore[union-attr]

    found = issues(client, "?limit=200")
    titles = {item["kind"]: [] for item in found}  # type: dict[str, list[str]]
    for item in found:
        titles[item["kind"]].append(item["title"])
    assert set(titles) == {
        "crash", "deprecation", "intervention", "csp-violation", "network-error", "coep", "native",
    }  # fmt: skip
    crashes = titles["crash"]
    assert any(t.startswith("OOM crash on https://127.0.0.1") for t in crashes)
    assert any(t.startswith("Unresponsive crash on") and " in busy " in t for t in crashes)
    assert any(t.startswith("Deprecation ") for t in titles["deprecation"])
    assert all(t.startswith("CSP ") for t in titles["csp-violation"])
    assert all(t.startswith("Network error ") for t in titles["network-error"])
    assert titles["coep"] == ["coep on https://127.0.0.1"]
    (native,) = [item for item in found if item["kind"] == "native"]
    crash_id = uploaded.text
    crash = client.get(f"/api/crashes/{crash_id}", headers=READ).json()
    assert native["title"] == crash["signature"] and native["site"] is None
    events = client.get(f"/api/issues/{native['id']}/events", headers=READ).json()["events"]
    assert [event["id"] for event in events] == [crash_id]
    # Browser and user agent stay breakdowns, not part of the fingerprint.
    assert all(item["browsers"] for item in found if item["kind"] != "native")
    assert sum(item["count"] for item in found) == len(reports) + 1


def test_the_write_token_is_needed_to_change_a_status(database_url: str, tmp_path: Path) -> None:
    with service(database_url, tmp_path) as client:
        send_crash(client)
        issue_id = the_crash_issue(client)["id"]
        url = f"/api/issues/{issue_id}"
        body = {"status": "resolved"}
        for headers in ({}, READ, {"Authorization": "Bearer wrong"}):
            refused = client.patch(url, json=body, headers=headers)
            assert refused.status_code == 401
            assert refused.json()["error"]["code"] == "invalid_token"
        assert client.get(url, headers=WRITE).status_code == 401  # the write token only writes
        assert issue(client, issue_id)["status"] == "unresolved"
        assert client.patch(url, json=body, headers=WRITE).status_code == 200
    with service(database_url, tmp_path, write_token=None) as client:
        refused = client.patch(url, json=body, headers=READ)
        assert refused.status_code == 401
        assert refused.json()["error"]["code"] == "write_api_disabled"


@pytest.mark.parametrize(
    ("query", "code"),
    [
        ("?sort=loudest", "invalid_sort"),
        ("?status=fixed", "invalid_status"),
        ("?since=yesterday", "invalid_time"),
        ("?since=1h&until=2h", "invalid_time"),
        ("?limit=0", "invalid_limit"),
        ("?limit=5000", "invalid_limit"),
        ("?colour=red", "unknown_parameter"),
        ("?kind=crash&kind=oom", "repeated_parameter"),
        ("?cursor=bm90IGEgY3Vyc29y", "invalid_cursor"),
        ("?cursor=%25%25", "invalid_cursor"),
    ],
)
def test_bad_list_parameters_are_400(client: TestClient, query: str, code: str) -> None:
    response = client.get(f"/api/issues{query}", headers=READ)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == code


def test_bad_ids_and_missing_issues(client: TestClient) -> None:
    for path in ("/api/issues/abc", "/api/issues/0", "/api/issues/-1/events"):
        response = client.get(path, headers=READ)
        assert (response.status_code, response.json()["error"]["code"]) == (400, "invalid_id")
    for path in ("/api/issues/999", "/api/issues/999/events"):
        response = client.get(path, headers=READ)
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "issue_not_found"
    response = client.patch("/api/issues/999", json={"status": "resolved"}, headers=WRITE)
    assert (response.status_code, response.json()["error"]["code"]) == (404, "issue_not_found")
    bad_cursor = client.get("/api/issues/1/events?cursor=xyz", headers=READ)
    assert bad_cursor.json()["error"]["code"] == "invalid_cursor"


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"{not json", "invalid_json"),
        (b"[]", "invalid_change"),
        (b"{}", "invalid_change"),
        (b'{"status": "fixed"}', "invalid_change"),
        (b'{"status": "resolved", "colour": "red"}', "invalid_change"),
        (b'{"status": "ignored", "release": "1.2"}', "invalid_change"),
        (b'{"status": "resolved", "ignore_events": 5}', "invalid_change"),
        (b'{"status": "ignored", "ignore_events": 0}', "invalid_change"),
        (b'{"status": "ignored", "ignore_minutes": true}', "invalid_change"),
        (b'{"status": "resolved", "release": "  "}', "invalid_change"),
        (b'{"status": "resolved", "reason": 5}', "invalid_change"),
    ],
)
def test_bad_changes_are_400_and_change_nothing(client: TestClient, body: bytes, code: str) -> None:
    send_crash(client)
    issue_id = the_crash_issue(client)["id"]
    response = client.patch(
        f"/api/issues/{issue_id}",
        content=body,
        headers={**WRITE, "content-type": "application/json"},
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == code
    assert issue(client, issue_id)["history"] == []


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            {"status": "resolved", "release": "1.2", "ignore_minutes": 5},
            "ignore_minutes and ignore_events go only with status 'ignored'",
        ),
        (
            {"status": "unresolved", "ignore_events": 3},
            "ignore_minutes and ignore_events go only with status 'ignored'",
        ),
        ({"status": "ignored", "release": "1.2"}, "release goes only with status 'resolved'"),
    ],
)
def test_a_mixed_change_is_refused_in_the_api_field_names(
    client: TestClient, body: dict[str, Any], message: str
) -> None:
    """The 400 names the fields a PATCH body has (ignore_minutes, ignore_events, release),
    not the internal ones (ignore_until, ignore_more_events, resolved_in_release)."""
    send_crash(client)
    issue_id = the_crash_issue(client)["id"]
    response = client.patch(f"/api/issues/{issue_id}", json=body, headers=WRITE)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["code"], error["message"]) == ("invalid_change", message)
    assert issue(client, issue_id)["history"] == []


def test_a_crash_left_pending_gets_its_issue_after_a_restart(
    database_url: str, tmp_path: Path
) -> None:
    """The process died between the answer and the parse: the next start parses the dump
    and files the crash under its issue, from the stored row (release included)."""
    # The annotations Electron's crashReporter sends (the handler arguments in
    # fixtures/crashpad/b_.../headers.json), around a real Electron dump.
    fields = {"prod": "Electron", "ver": "33.2.1", "_productName": "ExampleApp",
              "_version": "1.2.3", "platform": "win32", "process_type": "browser"}  # fmt: skip
    body = dump_upload(
        (MINIDUMPS / "win-x64_electron_node-minidump_windows.dmp").read_bytes(), fields
    )
    with service(database_url, tmp_path, processors=0) as client:  # stores, never parses
        posted = client.post("/crashpad", content=body, headers={"content-type": content_type()})
        crash_id = posted.text
        assert issues(client, "?kind=native") == []
        pending = client.get(f"/api/crashes/{crash_id}", headers=READ).json()
        assert pending["parse_status"] == "pending"
    with service(database_url, tmp_path) as client:
        analyzer = client.app.state.analyzer  # type: ignore[attr-defined]
        client.portal.call(analyzer.idle)  # type: ignore[union-attr]
        (native,) = issues(client, "?kind=native")
        crash = client.get(f"/api/crashes/{crash_id}", headers=READ).json()
        assert native["title"] == crash["signature"] != "unknown"
        assert (native["first_release"], native["last_release"]) == ("1.2.3", "1.2.3")
        assert native["title"] == crash["signature"]
