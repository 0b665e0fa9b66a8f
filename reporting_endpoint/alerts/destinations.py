"""Where alerts go: the channels of a rules file (a webhook, a Slack-compatible webhook,
email over SMTP), parsed and checked; secrets may be named by environment variable."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

MAX_RECIPIENTS = 50


class AlertRulesError(ValueError):
    """The alert rules file cannot be used; the message names the file, rule and problem."""


@dataclass(frozen=True, slots=True)
class WebhookChannel:
    """A generic JSON webhook, signed with HMAC-SHA256 when it has a secret."""

    name: str
    url: str
    secret: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class SlackChannel:
    """A Slack-compatible incoming webhook (the URL is the secret)."""

    name: str
    url: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class EmailChannel:
    """Email over SMTP; ``security`` is ``starttls``, ``tls`` (implicit) or ``none``."""

    name: str
    host: str
    port: int
    sender: str
    recipients: tuple[str, ...]
    security: str = "starttls"
    username: str | None = None
    password: str | None = field(default=None, repr=False)


Channel = WebhookChannel | SlackChannel | EmailChannel


def known(spec: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise AlertRulesError(f"{where}unknown key {unknown[0]!r}")


def text(spec: Mapping[str, Any], key: str, *, required: bool = True) -> str | None:
    value = spec.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        raise AlertRulesError(f"{key}: must be a non-empty string")
    return value


def secret(spec: Mapping[str, Any], key: str, env: Mapping[str, str]) -> str | None:
    """``key`` written in the file, or ``key_env`` naming the environment variable holding it."""
    if key in spec and f"{key}_env" in spec:
        raise AlertRulesError(f"{key}: give {key} or {key}_env, not both")
    if f"{key}_env" in spec:
        name = text(spec, f"{key}_env")
        assert name is not None
        if name not in env:
            raise AlertRulesError(f"{key}_env: the environment variable {name} is not set")
        return env[name]
    return text(spec, key, required=False)


def http_url(value: object, key: str) -> str:
    if not isinstance(value, str) or urlsplit(value).scheme not in {"http", "https"}:
        raise AlertRulesError(f"{key}: must be an http:// or https:// URL")
    if not urlsplit(value).hostname:
        raise AlertRulesError(f"{key}: the URL has no host")
    return value


def parse_channel(name: object, spec: object, env: Mapping[str, str]) -> Channel:
    where = f"channel {name!r}: "
    if not isinstance(spec, dict):
        raise AlertRulesError(f"{where}must be a table")
    try:
        kind = spec.get("type")
        if kind == "webhook":
            known(spec, {"type", "url", "secret", "secret_env"}, "")
            return WebhookChannel(
                str(name), http_url(spec.get("url"), "url"), secret(spec, "secret", env)
            )
        if kind == "slack":
            known(spec, {"type", "url", "url_env"}, "")
            url = secret(spec, "url", env)
            return SlackChannel(str(name), http_url(url, "url"))
        if kind == "email":
            known(spec, {"type", "host", "port", "security", "username", "password",
                          "password_env", "from", "to"}, "")  # fmt: skip
            security = spec.get("security", "starttls")
            if security not in {"starttls", "tls", "none"}:
                raise AlertRulesError("security: must be starttls, tls or none")
            port = spec.get("port", {"starttls": 587, "tls": 465, "none": 25}[security])
            if not isinstance(port, int) or not 0 < port < 65536:
                raise AlertRulesError("port: must be 1..65535")
            recipients = spec.get("to")
            if isinstance(recipients, str):
                recipients = [recipients]
            if (
                not isinstance(recipients, list)
                or not 0 < len(recipients) <= MAX_RECIPIENTS
                or not all(isinstance(r, str) and "@" in r for r in recipients)
            ):
                raise AlertRulesError(f"to: must be 1..{MAX_RECIPIENTS} email addresses")
            host, sender = text(spec, "host"), text(spec, "from")
            assert host is not None and sender is not None
            return EmailChannel(
                str(name), host, port, sender, tuple(recipients), security,
                text(spec, "username", required=False), secret(spec, "password", env),
            )  # fmt: skip
        raise AlertRulesError("type: must be webhook, slack or email")
    except AlertRulesError as exc:
        raise AlertRulesError(f"{where}{exc}") from None
