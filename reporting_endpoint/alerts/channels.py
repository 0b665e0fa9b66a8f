"""Delivery channels: a signed JSON webhook, a Slack-compatible incoming webhook, and email.

Each renders the channel-neutral alert (the outbox payload) its own way and sends it once;
retrying is the sender's business. Network I/O is async (httpx2, aiosmtplib) and bounded by
the delivery timeout, so a dead receiver holds up nothing but its own delivery.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate
from typing import Any

import aiosmtplib
import httpx2
import orjson

from reporting_endpoint.alerts.destinations import (
    Channel,
    EmailChannel,
    SlackChannel,
    WebhookChannel,
)
from reporting_endpoint.alerts.signing import IDEMPOTENCY_HEADER, SIGNATURE_HEADER, sign

USER_AGENT = "reporting-endpoint-alerts/1"
# What a line of a message may hold: titles come from reports, i.e. from anyone.
MAX_LINE = 300
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


@dataclass(frozen=True, slots=True)
class Result:
    """One attempt: ``ok`` means the receiver took it (2xx, or the SMTP server queued it)."""

    ok: bool
    status_code: int | None = None
    error: str | None = None


def plain(value: object, limit: int = MAX_LINE) -> str:
    """One line of text: control characters (newlines too) become spaces, length capped."""
    text = _CONTROL.sub(" ", str(value)).strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _slack_escape(text: str) -> str:
    # Slack's mrkdwn reads <...> as links and mentions: a title must not make one.
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _issue_line(item: dict[str, Any]) -> str:
    where = item.get("link") or item.get("path") or ""
    return f"{plain(item.get('title', ''))} ({item.get('count', 0)} events) {where}".rstrip()


def lines(alert: dict[str, Any]) -> list[str]:
    """The alert as plain text lines (email body; Slack renders its own links)."""
    out = [plain(alert.get("title", "")), plain(alert.get("text", ""))]
    if alert.get("link"):
        out.append(f"Open the issue: {alert['link']}")
    elif alert.get("path"):
        out.append(f"The issue in the dashboard: {alert['path']} (set public_url for a link)")
    digest = alert.get("digest")
    if isinstance(digest, dict):
        for section, heading in (("new", "New"), ("regressed", "Regressed"), ("top", "Top")):
            items = digest.get(section) or []
            out.append(f"{heading} issues: {len(items)}")
            out.extend(f"- {_issue_line(item)}" for item in items)
    return [line for line in out if line]


def slack_message(alert: dict[str, Any]) -> dict[str, Any]:
    title = _slack_escape(plain(alert.get("title", "")))
    parts = [f"*{title}*", _slack_escape(plain(alert.get("text", "")))]
    if alert.get("link"):
        parts.append(f"<{alert['link']}|Open the issue in the dashboard>")
    elif alert.get("path"):
        parts.append(f"Dashboard: {alert['path']}")
    digest = alert.get("digest")
    if isinstance(digest, dict):
        for section, heading in (("new", "New"), ("regressed", "Regressed"), ("top", "Top")):
            items = digest.get(section) or []
            parts.append(f"*{heading} issues: {len(items)}*")
            for item in items:
                name = _slack_escape(plain(item.get("title", "")))
                text = f"<{item['link']}|{name}>" if item.get("link") else name
                parts.append(f"• {text} ({item.get('count', 0)} events)")
    return {"text": "\n".join(part for part in parts if part)}


def email_message(channel: EmailChannel, alert: dict[str, Any], key: str) -> EmailMessage:
    message = EmailMessage()
    message["Subject"] = plain(alert.get("title", "alert"), 200)
    message["From"] = channel.sender
    message["To"] = ", ".join(channel.recipients)
    message["Date"] = formatdate(usegmt=True)
    # A stable Message-ID: a mail system that saw it already can drop a repeat.
    message["Message-ID"] = f"<{key}@reporting-endpoint>"
    message[IDEMPOTENCY_HEADER] = key
    message.set_content("\n".join(lines(alert)) + "\n")
    return message


class Channels:
    """Sends alerts through the configured channels with one shared HTTP client."""

    def __init__(self, timeout_ms: int) -> None:
        self.timeout = timeout_ms / 1000
        self._client: httpx2.AsyncClient | None = None

    def client(self) -> httpx2.AsyncClient:
        if self._client is None:
            self._client = httpx2.AsyncClient(
                timeout=self.timeout, follow_redirects=False, headers={"User-Agent": USER_AGENT}
            )
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def send(self, channel: Channel, alert: dict[str, Any], key: str) -> Result:
        try:
            if isinstance(channel, EmailChannel):
                return await self._email(channel, alert, key)
            if isinstance(channel, SlackChannel):
                body = orjson.dumps(slack_message(alert))
                return await self._post(channel.url, body, {IDEMPOTENCY_HEADER: key})
            body = orjson.dumps({"idempotency_key": key, **alert})
            headers = {IDEMPOTENCY_HEADER: key}
            if isinstance(channel, WebhookChannel) and channel.secret:
                headers[SIGNATURE_HEADER] = sign(channel.secret, body, int(time.time()))
            return await self._post(channel.url, body, headers)
        except Exception as exc:  # a receiver's failure of any kind is one failed attempt
            return Result(False, None, plain(f"{type(exc).__name__}: {exc}"))

    async def _post(self, url: str, body: bytes, headers: dict[str, str]) -> Result:
        response = await self.client().post(
            url, content=body, headers={"Content-Type": "application/json", **headers}
        )
        if 200 <= response.status_code < 300:
            return Result(True, response.status_code)
        return Result(False, response.status_code, f"HTTP {response.status_code}")

    async def _email(self, channel: EmailChannel, alert: dict[str, Any], key: str) -> Result:
        await aiosmtplib.send(
            email_message(channel, alert, key),
            hostname=channel.host,
            port=channel.port,
            username=channel.username,
            password=channel.password,
            use_tls=channel.security == "tls",
            start_tls=channel.security == "starttls",
            timeout=self.timeout,
        )
        return Result(True)
