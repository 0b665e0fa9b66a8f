"""Settings: every field can come from the environment, and every field is documented."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import pytest

from reporting_endpoint.settings import ENV_PREFIX, Settings, SettingsError

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.mark.parametrize("name", [f.name for f in fields(Settings)])
def test_every_setting_is_documented_in_the_readme(name: str) -> None:
    variable = ENV_PREFIX + name.upper()
    assert re.search(rf"^\|\s*`{name}`\s*\|\s*`{variable}`", README.read_text(), re.M), (
        f"README.md's settings table has no row for {name} / {variable}"
    )


def test_from_env_converts_every_kind() -> None:
    env = {
        "REPORTING_ENDPOINT_PORT": "9000",
        "REPORTING_ENDPOINT_DB": "/tmp/x.sqlite3",
        "REPORTING_ENDPOINT_KEEP_URL_QUERY": "yes",
        "REPORTING_ENDPOINT_CORS_ALLOW_ORIGINS": "https://a.example, https://b.example",
        "REPORTING_ENDPOINT_READ_TOKEN": "s3cret",
        "UNRELATED": "x",
    }
    settings = Settings.from_env(env)
    assert settings.port == 9000
    assert settings.db == Path("/tmp/x.sqlite3")
    assert settings.keep_url_query is True
    assert settings.cors_allow_origins == ("https://a.example", "https://b.example")
    assert settings.read_token == "s3cret"
    assert "s3cret" not in repr(settings)


def test_explicit_values_beat_the_environment() -> None:
    settings = Settings.from_env({"REPORTING_ENDPOINT_PORT": "9000"}, port=9100, host=None)
    assert settings.port == 9100
    assert settings.host == "127.0.0.1"


@pytest.mark.parametrize(
    "env",
    [
        {"REPORTING_ENDPOINT_PORT": "eighty"},
        {"REPORTING_ENDPOINT_PORT": "0"},
        {"REPORTING_ENDPOINT_KEEP_URL_QUERY": "maybe"},
        {"REPORTING_ENDPOINT_MAX_BODY_BYTES": "-1"},
        {"REPORTING_ENDPOINT_SQLITE_SYNCHRONOUS": "OFF"},
        {"REPORTING_ENDPOINT_SSL_CERTFILE": "/tmp/cert.pem"},
    ],
)
def test_bad_values_are_refused_with_a_message(env: dict[str, str]) -> None:
    with pytest.raises(SettingsError):
        Settings.from_env(env)


def test_serve_reports_a_bad_setting_without_a_traceback(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from reporting_endpoint.cli import main

    assert main(["serve", "--port", "70000"]) == 2
    assert "port must be" in capsys.readouterr().err
