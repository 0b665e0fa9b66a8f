"""`reporting-endpoint header` and the header builders: values browsers will accept."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import http_sfv
import pytest

from reporting_endpoint.cli import main
from reporting_endpoint.headers import HeaderError, HeaderOptions, build_headers, render

URL = "https://reports.example.com/reports"


def run_header(*args: str) -> tuple[int, str]:
    out = io.StringIO()
    code = main(["header", *args], out=out)
    return code, out.getvalue()


def parse_http_lines(text: str) -> dict[str, str]:
    headers = {}
    for line in text.splitlines():
        name, _, value = line.partition(": ")
        headers[name] = value
    return headers


def test_default_output_parses_back_to_what_was_asked() -> None:
    code, text = run_header("--url", URL)
    assert code == 0
    headers = parse_http_lines(text)
    assert set(headers) == {"Reporting-Endpoints", "Report-To"}
    endpoints = http_sfv.Dictionary()
    endpoints.parse(headers["Reporting-Endpoints"].encode())
    assert {name: member.value for name, member in endpoints.items()} == {
        "default": URL,
        "crash-reporting": URL,
    }
    assert json.loads(headers["Report-To"]) == {
        "group": "default",
        "max_age": 86400,
        "endpoints": [{"url": URL}],
    }


def test_every_option() -> None:
    code, text = run_header(
        "--url", URL, "--max-age", "600", "--include-subdomains", "--no-crash-reporting",
        "--nel", "--success-fraction", "0.25", "--failure-fraction", "0.5", "--js-stacks",
    )  # fmt: skip
    assert code == 0
    headers = parse_http_lines(text)
    endpoints = http_sfv.Dictionary()
    endpoints.parse(headers["Reporting-Endpoints"].encode())
    assert list(endpoints) == ["default"]
    assert json.loads(headers["Report-To"]) == {
        "group": "default",
        "max_age": 600,
        "endpoints": [{"url": URL}],
        "include_subdomains": True,
    }
    assert json.loads(headers["NEL"]) == {
        "report_to": "default",
        "max_age": 600,
        "include_subdomains": True,
        "success_fraction": 0.25,
        "failure_fraction": 0.5,
    }
    assert headers["Document-Policy"] == "include-js-call-stacks-in-crash-reports"


def test_json_format_maps_names_to_the_same_values() -> None:
    _, http_text = run_header("--url", URL, "--nel")
    code, json_text = run_header("--url", URL, "--nel", "--format", "json")
    assert code == 0
    assert json.loads(json_text) == parse_http_lines(http_text)


@pytest.mark.parametrize(
    ("fmt", "marker"),
    [
        ("nginx", "add_header Reporting-Endpoints '"),
        ("caddy", "\tReporting-Endpoints `"),
        ("apache", 'Header always set Reporting-Endpoints "'),
    ],
)
def test_server_formats_quote_the_values(fmt: str, marker: str) -> None:
    code, text = run_header("--url", URL, "--nel", "--format", fmt)
    assert code == 0
    assert marker in text
    assert text.count("Report-To") == 1
    assert text.count("NEL") == 1


def test_apache_value_unescapes_to_the_header() -> None:
    _, text = run_header("--url", URL, "--format", "apache")
    line = text.splitlines()[0]
    quoted = line.split(" ", 4)[4]
    assert json.loads(quoted) == build_headers(HeaderOptions(url=URL))["Reporting-Endpoints"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--url", "http://reports.example.com/r"], "https://"),
        (["--url", "/reports"], "absolute"),
        (["--url", "reports.example.com"], "absolute"),
        (["--url", "https://exa mple.com/"], "ASCII"),
        (["--url", 'https://example.com/"x'], "quotes"),
        (["--url", "https://bücher.example/"], "ASCII"),
        (["--url", "https://user:pw@example.com/"], "credentials"),
        (["--url", "https://example.com:99999/"], "not a valid URL"),
        (["--url", URL, "--max-age", "-1"], "max-age"),
        (["--url", URL, "--nel", "--success-fraction", "1.5"], "success-fraction"),
        (["--url", URL, "--nel", "--failure-fraction", "-0.1"], "failure-fraction"),
    ],
)
def test_bad_input_fails_clearly(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, text = run_header(*args)
    assert code == 2
    assert text == ""
    assert message in capsys.readouterr().err


def test_allow_insecure_for_local_testing() -> None:
    code, text = run_header("--url", "http://127.0.0.1:8000/reports", "--allow-insecure")
    assert code == 0
    assert 'default="http://127.0.0.1:8000/reports"' in text


def test_unknown_format_is_refused() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "reporting_endpoint", "header", "--url", URL, "--format", "iis"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "invalid choice" in result.stderr
    with pytest.raises(HeaderError):
        render({"A": "b"}, "iis")


def test_header_command_imports_nothing_heavy() -> None:
    """Kept lazy so the command starts fast: no web framework, database or parser modules."""
    code = (
        "import sys, io\n"
        "from reporting_endpoint.cli import main\n"
        f"main(['header', '--url', {URL!r}], out=io.StringIO())\n"
        "heavy = [m for m in ('starlette', 'uvicorn', 'aiosqlite', 'jsonschema_rs', 'ua_parser',"
        " 'publicsuffixlist', 'orjson') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == ""
