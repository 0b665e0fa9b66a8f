"""Pure functions that derive grouping keys: the site and origin of a URL, the user-agent family."""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass
from typing import Any
from urllib.parse import SplitResult, urlsplit, urlunsplit

from publicsuffixlist import PublicSuffixList

_DEFAULT_PORTS = {"http": 80, "https": 443}


@functools.cache
def _psl() -> PublicSuffixList:
    # The list ships inside the package: no network at run time.
    return PublicSuffixList()


@dataclass(frozen=True, slots=True)
class UrlParts:
    """A report URL made safe to store, with its origin and site."""

    url: str
    origin: str | None
    site: str | None


def _split(url: str) -> SplitResult | None:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        return None
    return parts


def strip_url(url: str, keep_query: bool = False) -> str:
    """Drop credentials always, and the query string and fragment unless asked to keep them."""
    parts = _split(url)
    if parts is None or not parts.scheme:
        return url if keep_query else url.split("?", 1)[0].split("#", 1)[0]
    netloc = parts.netloc.rsplit("@", 1)[-1]
    if keep_query:
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


# Body members that hold a URL, by report type (the names do not clash across types, so one
# set serves all): CSP and integrity violations (`documentURL`, `blockedURL`, `referrer`,
# `sourceFile`, and the legacy `csp-report` spellings `document-uri`, `blocked-uri`,
# `source-file`; `document-url` is a common misspelling of the first), deprecation,
# intervention, permissions- and document-policy violations (`sourceFile`), network errors
# (`referrer`), COEP (`blockedURL`) and COOP (the `*URL` members). They carry query strings just
# like the report's own `url` (often the same page URL), so they get the same privacy rule.
# Values that are not URLs (`inline`, `eval`, `self`, "") pass through unchanged.
BODY_URL_FIELDS = frozenset(
    {
        "documentURL",
        "blockedURL",
        "referrer",
        "sourceFile",
        "previousResponseURL",
        "nextResponseURL",
        "openeeURL",
        "openerURL",
        "otherDocumentURL",
        "initialPopupURL",
        "document-uri",
        "document-url",
        "blocked-uri",
        "source-file",
    }
)


def strip_body_urls(body: dict[str, Any], keep_query: bool = False) -> dict[str, Any]:
    """``body`` with every known URL member passed through `strip_url`; the same object when
    nothing changes, so the common case (a crash body) copies nothing."""
    if body.keys().isdisjoint(BODY_URL_FIELDS):
        return body
    changed: dict[str, Any] | None = None
    for name in BODY_URL_FIELDS.intersection(body):
        value = body[name]
        if not isinstance(value, str):
            continue
        stored = strip_url(value, keep_query)
        if stored != value:
            if changed is None:
                changed = dict(body)
            changed[name] = stored
    return body if changed is None else changed


def origin_of(url: str) -> str | None:
    """``scheme://host[:port]``, the port only when it is not the scheme's default."""
    parts = _split(url)
    if parts is None or parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
        return None
    return _origin(parts)


def _origin(parts: SplitResult) -> str:
    assert parts.hostname is not None
    host = _host_for_url(_ascii_host(parts.hostname))
    port = parts.port
    if port is None or port == _DEFAULT_PORTS[parts.scheme]:
        return f"{parts.scheme}://{host}"
    return f"{parts.scheme}://{host}:{port}"


def site_of(url: str) -> str | None:
    """The web's "site": scheme plus registrable domain (eTLD+1), no port.

    An IP address, ``localhost`` or a host that is itself a public suffix is its own site.
    """
    parts = _split(url)
    if parts is None or parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
        return None
    return _site(parts.scheme, parts.hostname)


# Reports from one site repeat the same few hosts; the PSL walk costs ~15 us a call.
@functools.lru_cache(maxsize=8192)
def _site(scheme: str, hostname: str) -> str:
    ascii_host = _ascii_host(hostname)
    if _is_ip(ascii_host):
        return f"{scheme}://{_host_for_url(ascii_host)}"
    registrable = _psl().privatesuffix(ascii_host)
    return f"{scheme}://{registrable or ascii_host}"


def url_parts(url: str, keep_query: bool = False) -> UrlParts:
    """The stored URL, origin and site of a report URL, splitting it once."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return UrlParts(strip_url(url, keep_query), None, None)
    info = _authority(parts.scheme, parts.netloc)
    if info is None:
        return UrlParts(strip_url(url, keep_query), None, None)
    netloc, origin, site = info
    stored = f"{parts.scheme}://{netloc}{parts.path}"
    if keep_query:
        if parts.query:
            stored += "?" + parts.query
        if parts.fragment:
            stored += "#" + parts.fragment
    return UrlParts(stored, origin, site)


# Reports repeat a few hosts; parsing the authority and walking the PSL cost ~15 us a call.
@functools.lru_cache(maxsize=8192)
def _authority(scheme: str, netloc: str) -> tuple[str, str, str] | None:
    """(netloc without credentials, origin, site) of an http(s) authority, None otherwise."""
    if scheme not in _DEFAULT_PORTS or not netloc:
        return None
    parts = _split(f"{scheme}://{netloc}/")
    if parts is None or not parts.hostname:
        return None
    return netloc.rsplit("@", 1)[-1], _origin(parts), _site(scheme, parts.hostname)


def _ascii_host(host: str) -> str:
    """Lower case, no trailing dot, IDN labels in their ``xn--`` form."""
    host = host.rstrip(".")
    if host.isascii():
        return host
    try:
        return host.encode("idna").decode("ascii")
    except UnicodeError:
        return host


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _host_for_url(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def warm_up() -> None:
    """Load the Public Suffix List and the user-agent rules now, not on the first report."""
    _psl()
    parse_user_agent("Mozilla/5.0 (X11; Linux x86_64; rv:140.0) Gecko/20100101 Firefox/140.0")


@dataclass(frozen=True, slots=True)
class UserAgent:
    """What a user-agent string says about the browser and the OS."""

    browser: str | None
    browser_major: str | None
    os: str | None


@functools.lru_cache(maxsize=4096)
def parse_user_agent(user_agent: str) -> UserAgent:
    """Browser family, major version and OS family, from the maintained uap-core rules."""
    if not user_agent:
        return UserAgent(None, None, None)
    from ua_parser import parse  # deferred: loading the rules costs ~50 ms at first use

    result = parse(user_agent[:2048])
    browser = result.user_agent
    os = result.os
    return UserAgent(
        browser.family if browser else None,
        browser.major if browser else None,
        os.family if os else None,
    )
