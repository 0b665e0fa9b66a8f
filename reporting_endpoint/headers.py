"""Builders for the headers that point browsers at the service, and the middleware adding them."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:  # the header command must start fast: no Starlette import at run time
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

DEFAULT_MAX_AGE = 86400
DOCUMENT_POLICY_JS_STACKS = "include-js-call-stacks-in-crash-reports"
# Characters RFC 3986 never allows unencoded; they would also break the config formats' quoting
# (and keep out Caddy's {placeholders} and Apache's ${DEFINES}).
_NOT_IN_URLS = frozenset(' "<>\\^`{|}')
# Longer endpoint URLs only bloat every response; no real endpoint needs more.
MAX_URL_LENGTH = 2048


class HeaderError(ValueError):
    """The header cannot be built from these values (browsers would drop it)."""


@dataclass(frozen=True, slots=True)
class HeaderOptions:
    """What to ask browsers for; ``build_headers`` turns it into header values."""

    url: str
    max_age: int = DEFAULT_MAX_AGE
    include_subdomains: bool = False
    crash_reporting: bool = True
    nel: bool = False
    success_fraction: float = 0.0
    failure_fraction: float = 1.0
    js_stacks: bool = False
    allow_insecure: bool = False

    def __post_init__(self) -> None:
        check_endpoint_url(self.url, self.allow_insecure)
        if isinstance(self.max_age, bool) or self.max_age < 0:
            raise HeaderError(f"max-age must be 0 or more seconds, got {self.max_age}")
        for name in ("success_fraction", "failure_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise HeaderError(f"{name.replace('_', '-')} must be between 0 and 1, got {value}")


def check_endpoint_url(url: str, allow_insecure: bool = False) -> None:
    """Refuse what a browser would ignore: relative URLs, non-HTTPS, non-ASCII, credentials."""
    if len(url) > MAX_URL_LENGTH:
        raise HeaderError(f"the URL is {len(url)} characters long; at most {MAX_URL_LENGTH}")
    if not url.isascii() or not url.isprintable() or any(c in _NOT_IN_URLS for c in url):
        raise HeaderError(
            "the URL must be printable ASCII without spaces, quotes or <>\\^`{|} "
            "(percent-encode them)"
        )
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError as exc:
        raise HeaderError(f"not a valid URL: {url!r} ({exc})") from None
    if parts.scheme not in {"https", "http"} or not parts.hostname:
        raise HeaderError(f"the endpoint must be an absolute https:// URL, got {url!r}")
    if parts.scheme != "https" and not allow_insecure:
        raise HeaderError(
            "browsers only deliver reports to https:// endpoints "
            "(use --allow-insecure for local testing)"
        )
    if parts.username or parts.password:
        raise HeaderError("the endpoint URL must not carry credentials")


def reporting_endpoints(options: HeaderOptions) -> str:
    """``Reporting-Endpoints``: a Structured Field Dictionary of ``name="url"`` members."""
    from http_sfv import Dictionary, Item

    members = Dictionary()
    members["default"] = Item(options.url)
    if options.crash_reporting:
        # Chrome 139+ routes crash reports to this name when it exists, else to "default".
        members["crash-reporting"] = Item(options.url)
    return str(members)


def _compact(value: object) -> str:
    return json.dumps(value, separators=(",", ":"))


def report_to(options: HeaderOptions) -> str:
    """Legacy ``Report-To`` (the ``default`` group), still needed for NEL."""
    group: dict[str, object] = {
        "group": "default",
        "max_age": options.max_age,
        "endpoints": [{"url": options.url}],
    }
    if options.include_subdomains:
        group["include_subdomains"] = True
    return _compact(group)


def nel(options: HeaderOptions) -> str:
    policy: dict[str, object] = {"report_to": "default", "max_age": options.max_age}
    if options.include_subdomains:
        policy["include_subdomains"] = True
    policy["success_fraction"] = options.success_fraction
    policy["failure_fraction"] = options.failure_fraction
    return _compact(policy)


def build_headers(options: HeaderOptions) -> dict[str, str]:
    """Header name -> value, in the order they are best pasted."""
    headers = {
        "Reporting-Endpoints": reporting_endpoints(options),
        "Report-To": report_to(options),
    }
    if options.nel:
        headers["NEL"] = nel(options)
    if options.js_stacks:
        headers["Document-Policy"] = DOCUMENT_POLICY_JS_STACKS
    return headers


FORMATS = ("http", "json", "nginx", "caddy", "apache")


def render(headers: Mapping[str, str], fmt: str = "http") -> str:
    """The headers as text for a person or a server's config file.

    Each server format is written so the server sends exactly these values: quoting for its
    config syntax, and escaping of what it would otherwise expand at run time.
    """
    if fmt == "http":
        return "".join(f"{name}: {value}\n" for name, value in headers.items())
    if fmt == "json":
        return json.dumps(dict(headers), indent=2) + "\n"
    if fmt == "nginx":
        return _nginx(headers)
    if fmt == "caddy":
        # Caddy's backquoted tokens take double quotes verbatim; the values cannot hold a
        # backquote or a {placeholder} (the URL check refuses ` { }, the JSON has no "{x}").
        block = "".join(f"\t{name} `{value}`\n" for name, value in headers.items())
        return "header {\n" + block + "}\n"
    if fmt == "apache":
        return _apache(headers)
    raise HeaderError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")


def _nginx(headers: Mapping[str, str]) -> str:
    # add_header values are expanded at run time: "$host" becomes the client's Host header, and
    # nginx has no escape for a literal "$". Refuse rather than serve a value the client chose.
    for value in headers.values():
        if "$" in value:
            raise HeaderError(
                "nginx would expand the '$' in the URL as a variable and has no escape for it; "
                "write it as %24 in the URL, or use another --format"
            )
    # Single quotes: the values hold double quotes; "always" adds them to error pages too.
    quoted = {
        name: value.replace("\\", "\\\\").replace("'", "\\'") for name, value in headers.items()
    }
    lines = (f"add_header {name} '{value}' always;" for name, value in quoted.items())
    return "\n".join(lines) + "\n"


def _apache(headers: Mapping[str, str]) -> str:
    # mod_headers reads %D, %t, %{VAR}e ... in values: "%%" is its literal percent sign. Then
    # the config file's own double-quoted string syntax.
    escaped = {
        name: value.replace("%", "%%").replace("\\", "\\\\").replace('"', '\\"')
        for name, value in headers.items()
    }
    lines = (f'Header always set {name} "{value}"' for name, value in escaped.items())
    return "\n".join(lines) + "\n"


class ReportingHeadersMiddleware:
    """Adds the reporting headers to a host application's responses (pure ASGI).

    Only responses whose media type is in ``content_types`` get them (HTML by default: the
    documents browsers attach reporting to), and a header the app already set is left alone.
    """

    def __init__(
        self,
        app: ASGIApp,
        headers: Mapping[str, str],
        content_types: Iterable[str] = ("text/html",),
    ) -> None:
        self.app = app
        self.headers = [
            (k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()
        ]
        self.content_types = frozenset(t.lower() for t in content_types)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {bytes(k).lower(): v for k, v in message.get("headers", [])}
                media_type = bytes(present.get(b"content-type", b"")).partition(b";")[0]
                if media_type.strip().lower().decode("latin-1") in self.content_types:
                    extra = [(k, v) for k, v in self.headers if k not in present]
                    message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        await self.app(scope, receive, send_with_headers)
