"""The issue commands (``issues list|show|resolve|ignore|reopen``, ``regroup``) and the issue
settings at startup: a bad rules file or release source stops ``serve`` with a message."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from reporting_endpoint.app import create_app
from reporting_endpoint.cli import main
from reporting_endpoint.settings import Settings, SettingsError
from tests.conftest import captured_reports, crash_report, post_reports
from tests.crashpad_client import captured

READ = {"Authorization": "Bearer read-secret"}
BAD_RULES = """\
[[rule]]
name = "fine"
match = { type = "crash" }
fixed = "all-crashes"

[[rule]]
name = "checkout-oom"
match = { bdy.id = "x" }
fixed = "checkout"
"""


def cli(*args: str) -> tuple[int, str]:
    out = io.StringIO()
    code = main(list(args), out=out)
    return code, out.getvalue()


def service(database_url: str, tmp_path: Path, **changes: Any) -> TestClient:
    settings = Settings(
        database=database_url, blob_store=str(tmp_path / "blobs"), read_token="read-secret"
    ).replace(**changes)
    return TestClient(create_app(settings))


def api_issues(client: TestClient, query: str = "?limit=200") -> list[dict[str, Any]]:
    response = client.get(f"/api/issues{query}", headers=READ)
    assert response.status_code == 200, response.text
    found: list[dict[str, Any]] = response.json()["issues"]
    return found


# --- startup checks -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("rules.toml", BAD_RULES, "rule 2 (\"checkout-oom\"): match: unknown field 'bdy'"),
        ("rules.toml", "[[rule]\n", "not valid TOML"),
        ("rules.json", '{"rule": [{"match": {"type": "crash"}}]}', "rule 1: needs exactly one"),
        ("rules.yaml", "rule: []", "a rules file ends in .toml or .json"),
    ],
)
def test_a_bad_rules_file_stops_serve_with_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, text: str, message: str
) -> None:
    rules = tmp_path / name
    rules.write_text(text)
    code = main(["serve", "--db", str(tmp_path / "r.sqlite3"), "--fingerprint-rules", str(rules)])
    assert code == 2
    error = capsys.readouterr().err
    assert error.startswith("reporting-endpoint: fingerprint_rules: ")
    assert str(rules) in error and message in error
    assert not (tmp_path / "r.sqlite3").exists()  # stopped before anything was opened


def test_a_missing_rules_file_stops_serve(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nowhere.toml"
    assert (
        main(["serve", "--db", str(tmp_path / "r.sqlite3"), "--fingerprint-rules", str(missing)])
        == 2
    )
    assert "cannot read the rules file" in capsys.readouterr().err


def test_a_real_serve_process_refuses_a_bad_rules_file(tmp_path: Path) -> None:
    """The command as an operator runs it, from the environment variable, with workers."""
    rules = tmp_path / "rules.toml"
    rules.write_text(BAD_RULES)
    result = subprocess.run(
        [sys.executable, "-m", "reporting_endpoint", "serve", "--port", "1", "--workers", "2",
         "--db", str(tmp_path / "r.sqlite3")],
        env={"REPORTING_ENDPOINT_FINGERPRINT_RULES": str(rules), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert 'rule 2 ("checkout-oom")' in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("value", ["release", "query:", "cookie:v", "body:a..b"])
def test_a_bad_release_source_is_refused(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SettingsError, match="release_source"):
        Settings(release_source=value)
    assert main(["serve", "--release-source", value]) == 2
    assert "release_source" in capsys.readouterr().err


def test_a_good_rules_file_is_used_by_the_service(tmp_path: Path) -> None:
    rules = tmp_path / "rules.toml"
    rules.write_text(
        textwrap.dedent(
            """\
            [[rule]]
            name = "every-deprecation"
            match = { type = "deprecation" }
            fixed = "deprecations"
            title = "Deprecations on {site}"
            """
        )
    )
    with service(f"sqlite://{tmp_path}/r.sqlite3", tmp_path, fingerprint_rules=rules) as client:
        post_reports(client, captured_reports("deprecation"))
        titles = sorted(item["title"] for item in api_issues(client))
    # Both deprecation reports in the rule's one issue; the intervention keeps its default.
    assert len(titles) == 2
    assert titles[0] == "Deprecations on https://127.0.0.1"
    assert titles[1].startswith("Intervention ")


# --- issues list / show / resolve / ignore / reopen -----------------------------------------


@pytest.fixture
def stored(database_url: str, tmp_path: Path) -> tuple[str, int]:
    """A store with captured reports and a few crashes of one page (release 1.0); answers
    the database and the crash issue's id."""
    with service(database_url, tmp_path, release_source="query:v") as client:
        post_reports(client, [*captured_reports("deprecation"), *captured_reports("nel")])
        page = "https://shop.example.com/app?v=1.0"
        post_reports(client, [crash_report(url=page, age=13 + n * 2000) for n in range(3)])
        (crash,) = api_issues(client, "?kind=crash")
    return database_url, int(crash["id"])


def test_issues_list_and_show(stored: tuple[str, int]) -> None:
    database, crash_id = stored
    code, text = cli("issues", "list", "--database", database)
    assert code == 0
    lines = text.splitlines()
    assert lines[0].split() == [
        "id", "status", "kind", "window", "change", "total", "last_seen", "title",
    ]  # fmt: skip
    assert any(line.split()[0] == str(crash_id) and " 3 " in line for line in lines[1:])

    code, text = cli("issues", "list", "--database", database, "--kind", "crash", "--json")
    assert [item["id"] for item in json.loads(text)["issues"]] == [crash_id]

    code, text = cli("issues", "show", str(crash_id), "--database", database)
    assert code == 0
    assert "title: Crash on https://example.com /app" in text
    assert "release: 1.0 (3)" in text
    assert "latest events:" in text

    code, text = cli("issues", "show", str(crash_id), "--database", database, "--json")
    shown = json.loads(text)
    assert shown["count"] == 3 and len(shown["events"]) == 3


def test_issues_resolve_ignore_reopen(stored: tuple[str, int], tmp_path: Path) -> None:
    database, crash_id = stored
    issue = str(crash_id)
    assert cli("issues", "resolve", issue, "--database", database, "--release", "1.2") == (
        0,
        f"issue {crash_id} is resolved in release 1.2\n",
    )
    code, text = cli("issues", "ignore", issue, "--database", database, "--events", "5")
    assert (code, text) == (0, f"issue {crash_id} is ignored until it has 8 events\n")
    code, text = cli("issues", "ignore", issue, "--database", database, "--minutes", "30")
    assert code == 0 and text.startswith(f"issue {crash_id} is ignored until 20")
    code, text = cli("issues", "reopen", issue, "--database", database, "--reason", "back")
    assert (code, text) == (0, f"issue {crash_id} is unresolved\n")

    _, text = cli("issues", "show", issue, "--database", database, "--json")
    history = json.loads(text)["history"]
    assert [(h["actor"], h["to"]) for h in history] == [
        ("cli", "resolved"), ("cli", "ignored"), ("cli", "ignored"), ("cli", "unresolved"),
    ]  # fmt: skip
    assert history[0]["resolved_in_release"] == "1.2" and history[-1]["reason"] == "back"


def test_issue_commands_refuse_what_they_cannot_do(
    stored: tuple[str, int], capsys: pytest.CaptureFixture[str]
) -> None:
    database, _ = stored
    assert cli("issues", "resolve", "999", "--database", database)[0] == 1
    assert "no issue 999" in capsys.readouterr().err
    assert cli("issues", "show", "abc", "--database", database)[0] == 2
    assert cli("issues", "ignore", "1", "--database", database, "--events", "0")[0] == 2
    assert cli("issues", "list", "--database", database, "--status", "fixed")[0] == 2
    with pytest.raises(SystemExit):  # argparse: one of --minutes / --events
        cli("issues", "ignore", "1", "--minutes", "5", "--events", "5")


# --- regroup --------------------------------------------------------------------------------


def test_regroup_after_changing_the_rules(database_url: str, tmp_path: Path) -> None:
    with service(database_url, tmp_path) as client:
        post_reports(client, [*captured_reports("deprecation"), *captured_reports("oom")])
        upload = captured("b_debian_gzip-chunked_win-electron-dump")
        assert (
            client.post("/crashpad", content=upload.body, headers=upload.headers).status_code == 200
        )
        analyzer = client.app.state.analyzer  # type: ignore[attr-defined]
        client.portal.call(analyzer.idle)  # type: ignore[union-attr]
        before = api_issues(client)
        (oom,) = [item for item in before if item["kind"] == "crash"]
        resolved = client.patch(
            f"/api/issues/{oom['id']}",
            json={"status": "resolved"},
            headers={"Authorization": "Bearer w"},
        )
    assert resolved.status_code == 401  # (no write token here: resolve through the CLI)
    assert cli("issues", "resolve", str(oom["id"]), "--database", database_url)[0] == 0
    deprecations = [item for item in before if item["kind"] == "deprecation"]
    assert len(deprecations) == 2  # two features

    rules = tmp_path / "rules.toml"
    rules.write_text(
        textwrap.dedent(
            """\
            [[rule]]
            name = "all-deprecations"
            match = { type = "deprecation" }
            fixed = "deprecations"
            title = "Deprecations"

            [[rule]]
            name = "native-by-product"
            match = { kind = "native" }
            group_by = ["product"]
            title = "{product} crashes"
            """
        )
    )
    code, text = cli("regroup", "--database", database_url, "--fingerprint-rules", str(rules))
    assert code == 0
    # Both deprecation reports and the native crash changed issue; the rest did not.
    assert text == f"regrouped with {rules}: 3 event(s) changed issue\n"

    with service(database_url, tmp_path) as client:
        after = api_issues(client, "?limit=200&status=unresolved") + api_issues(
            client, "?limit=200&status=resolved"
        )
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for item in after:
        by_kind.setdefault(item["kind"], []).append(item)
    assert [(i["title"], i["count"]) for i in by_kind["deprecation"]] == [("Deprecations", 2)]
    (native,) = by_kind["native"]
    assert native["title"].endswith(" crashes") and native["count"] == 1
    # The OOM issue's fingerprint survived: same id, its status and history kept.
    (oom_after,) = by_kind["crash"]
    assert (oom_after["id"], oom_after["status"], oom_after["count"]) == (oom["id"], "resolved", 3)
    assert len(by_kind["intervention"]) == 1

    # Back to the defaults: the merged issue splits again.
    assert cli("regroup", "--database", database_url)[1].endswith(": 3 event(s) changed issue\n")


def test_regroup_refuses_a_bad_rules_file_before_touching_the_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rules = tmp_path / "rules.toml"
    rules.write_text(BAD_RULES)
    db = tmp_path / "r.sqlite3"
    assert cli("regroup", "--db", str(db), "--fingerprint-rules", str(rules))[0] == 2
    assert "checkout-oom" in capsys.readouterr().err
    assert not db.exists()
