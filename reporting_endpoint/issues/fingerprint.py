"""Default fingerprints: which stored report or crash belongs to which issue.

A fingerprint is a stable hash of a few *parts* chosen per report type, plus a title a person
can read. The defaults (issue 11):

- ``crash``: site, reason, and the normalised top frames of ``body.stack`` when it holds a
  stack; otherwise site, reason and the shape of the URL's path (ids and hashes collapsed).
- ``deprecation`` / ``intervention``: ``body.id`` and site.
- ``csp-violation``: effective directive, the blocked URL's origin (or its keyword: ``inline``,
  ``eval`` ...) and site.
- ``network-error``: ``body.type`` and the URL's origin.
- any other type: type and site.
- a native crash: product and signature.

Browser and user agent are never parts: they stay breakdowns inside an issue.

This runs for every report on the ingest path, so it avoids ``urlsplit`` and JSON parsing
where it can (the caller passes the body it already parsed) and caches the few pure string
functions whose inputs repeat.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from reporting_endpoint.records import NewReport

# Bumped when the default parts change, so old and new fingerprints never collide by accident
# (a regroup recomputes every stored one).
VERSION = "1"
NATIVE = "native"
# Frames of a JS stack that make the fingerprint: the top ones say where the page hung; deeper
# frames vary with the caller and would split one problem into many issues.
STACK_FRAMES = 5
# Bounds on attacker-controlled text that lands in a title (the hash takes any length).
MAX_TITLE_PART = 200
MAX_FRAME = 300

# A path segment that is an id or a hash, not a name, optionally with a short extension
# ("1234.json", "<sha>.png"): numbers, UUIDs, long hex with a digit (words like "facade" or
# "deadbeef" stay), and base64/base64url tokens (16+ characters with a digit and both letter
# cases: slugs like "2024-annual-report" are one case and stay). One anchored regex per
# segment: cheaper than four.
_ID_SEGMENT = re.compile(
    r"(?:\d+"
    r"|[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}"
    r"|(?=[a-fA-F]*\d)[0-9a-fA-F]{8,}"
    r"|(?=[^.]*\d)(?=[^.]*[a-z])(?=[^.]*[A-Z])[A-Za-z0-9+_=-]{16,}"
    r")(\.[A-Za-z][A-Za-z0-9]{0,5})?"
).fullmatch

# One frame of a V8 (``    at fn (url:1:2)``) or SpiderMonkey/JSC (``fn@url:1:2``) stack.
_LINE_COLUMN = re.compile(r"(?::\d+){1,2}(?=\)?$)")
_QUERY = re.compile(r"[?#][^\s)@]*")
_LOOKS_LIKE_FRAME = re.compile(r"^\s*at\s|@|:\d+(?::\d+)?\)?\s*$")
# Work bounds for attacker-sized stacks: lines read, characters of a line looked at.
MAX_STACK_LINES = 64
MAX_LINE = 1000
# Inputs longer than this are computed every time rather than cached, so a flood of huge
# URLs or stacks cannot pin memory in the caches (8192 x a 1 MiB URL would).
MAX_CACHED = 2048

# Values of a CSP report's blocked URL that are keywords, not URLs.
_CSP_KEYWORDS = frozenset(
    {"inline", "eval", "wasm-eval", "self", "trusted-types-policy", "trusted-types-sink"}
)

_REASON_TITLES = {"oom": "OOM", "unresponsive": "Unresponsive"}


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """Which issue an event belongs to.

    ``hash`` is the stable key (32 hex digits); ``kind`` the report type or ``native``;
    ``title`` a readable name for a new issue; ``rule`` the name of the fingerprint rule that
    made it, None for the defaults.
    """

    hash: str
    kind: str
    title: str
    rule: str | None = None


def fingerprint_hash(kind: str, parts: tuple[str, ...], source: str = "default") -> str:
    """The stable hash of a kind and its parts (BLAKE2b, 128 bits: fast, no collisions in
    practice, and the same on every host and Python version, unlike ``hash()``).

    The parts are hashed as a JSON array, so no part can fake a boundary between two others
    (a separator character could be sent inside a ``body.id``), and ``source`` (``default``
    or ``rule``) keeps a rule's fingerprints apart from any default one.
    """
    try:
        data = orjson.dumps((VERSION, source, kind, *parts))
    except orjson.JSONEncodeError:  # a lone surrogate: json escapes it, orjson refuses
        data = json.dumps((VERSION, source, kind, *parts)).encode()
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _fingerprint(kind: str, parts: tuple[str, ...], title: str) -> Fingerprint:
    if len(title) + sum(map(len, parts)) <= MAX_CACHED:
        return _cached_fingerprint(kind, parts, title)
    return Fingerprint(fingerprint_hash(kind, parts), kind, _short(title))


# Events repeat a few fingerprints: a hit returns the same frozen object, skipping the hash
# and the dataclass init (~1.5 us together); the key is what both are computed from.
@functools.lru_cache(maxsize=16384)
def _cached_fingerprint(kind: str, parts: tuple[str, ...], title: str) -> Fingerprint:
    return Fingerprint(fingerprint_hash(kind, parts), kind, _short(title))


def _short(text: str, limit: int = MAX_TITLE_PART) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _segment_shape(segment: str) -> str:
    match = _ID_SEGMENT(segment)
    if match is None:
        return segment
    return "*" + (match.group(1) or "")


# The path of an absolute URL without urlsplit (the stored URL is already clean): after the
# authority, up to the query or fragment. A URL with no "//" authority is all path.
_PATH = re.compile(r"(?:[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*|[A-Za-z][A-Za-z0-9+.-]*:)?([^?#]*)").match


def _path_of(url: str) -> str:
    match = _PATH(url)
    return (match.group(1) if match else "") or "/"


def path_shape(url: str) -> str:
    """The URL's path with id-like segments (numbers, UUIDs, long hex, base64-ish tokens)
    replaced by ``*``: ``https://a.example/app/123/u/5f0c...`` -> ``/app/*/u/*``."""
    return _cached_shape(url) if len(url) <= MAX_CACHED else _path_shape(url)


def _path_shape(url: str) -> str:
    return "/".join(_segment_shape(segment) for segment in _path_of(url).split("/"))


# Reports repeat a few page URLs.
_cached_shape = functools.lru_cache(maxsize=8192)(_path_shape)


def _frame(line: str) -> str | None:
    frame = line[:MAX_LINE].strip()
    if frame.startswith("at ") or frame.startswith("at\t"):
        frame = frame[3:].lstrip()
    frame = _QUERY.sub("", _LINE_COLUMN.sub("", frame))
    return frame[:MAX_FRAME] or None


def normalise_stack(stack: str, limit: int = STACK_FRAMES) -> tuple[str, ...]:
    """The top ``limit`` frames of a JS stack without line/column numbers or query strings.

    Lines that do not look like frames (an ``Error`` header, Chromium's placeholder sentence
    when it could not collect a stack) are skipped; no frames at all gives ``()``.
    """
    if len(stack) <= MAX_CACHED and limit == STACK_FRAMES:
        return _cached_stack(stack)
    return _normalise_stack(stack, limit)


def _normalise_stack(stack: str, limit: int) -> tuple[str, ...]:
    frames: list[str] = []
    for line in stack.split("\n", MAX_STACK_LINES)[:MAX_STACK_LINES]:
        if not _LOOKS_LIKE_FRAME.search(line[:MAX_LINE]):
            continue
        frame = _frame(line)
        if frame is not None:
            frames.append(frame)
            if len(frames) >= limit:
                break
    return tuple(frames)


@functools.lru_cache(maxsize=1024)
def _cached_stack(stack: str) -> tuple[str, ...]:
    return _normalise_stack(stack, STACK_FRAMES)


def _origin_or_keyword(value: object) -> str:
    """A CSP blocked URL as its origin (``https://cdn.example``), scheme (``data``) or keyword."""
    if not isinstance(value, str) or not value:
        return "none"
    if value in _CSP_KEYWORDS:
        return value
    scheme_end = value.find(":")
    if scheme_end <= 0:
        return _short(value, 64)
    scheme = value[:scheme_end].lower()
    if value.startswith("//", scheme_end + 1):
        host_end = len(value)
        for mark in "/?#":
            at = value.find(mark, scheme_end + 3)
            if 0 <= at < host_end:
                host_end = at
        # Credentials never belong to an origin.
        host = value[scheme_end + 3 : host_end].rsplit("@", 1)[-1].lower()
        return f"{scheme}://{host}"
    return scheme  # data:, blob:, about: ... carry no origin worth splitting on


def _body_of(report: NewReport) -> Mapping[str, Any]:
    try:
        body = orjson.loads(report.raw).get("body")
    except (orjson.JSONDecodeError, AttributeError):
        return {}
    return body if isinstance(body, dict) else {}


def _text(value: object) -> str:
    return value if isinstance(value, str) else "" if value is None else str(value)


def report_fingerprint(report: NewReport, body: Mapping[str, Any] | None = None) -> Fingerprint:
    """The default fingerprint of a stored W3C report.

    ``body`` is the report's body as the ingest already parsed it; without it the body is read
    back from ``report.raw`` (slower: a JSON parse).
    """
    if body is None:
        body = _body_of(report)
    kind = report.type
    site = report.site or report.origin or ""
    where = site or "(no site)"
    if kind == "crash":
        reason = _text(report.reason)
        label = _REASON_TITLES.get(reason, reason.capitalize() if reason else "")
        stack = body.get("stack")
        frames = normalise_stack(stack) if isinstance(stack, str) else ()
        prefix = f"{label} crash" if label else "Crash"
        if frames:
            return _fingerprint(
                kind, (site, reason, "stack", *frames), f"{prefix} on {where} in {frames[0]}"
            )
        shape = path_shape(report.url)
        return _fingerprint(kind, (site, reason, "path", shape), f"{prefix} on {where} {shape}")
    if kind in ("deprecation", "intervention"):
        feature = _text(body.get("id"))
        return _fingerprint(
            kind, (feature, site), f"{kind.capitalize()} {feature or '(no id)'} on {where}"
        )
    if kind == "csp-violation":
        directive = _text(
            body.get("effectiveDirective")
            or body.get("effective-directive")
            or body.get("violated-directive")
        )
        blocked = _origin_or_keyword(
            body["blockedURL"] if "blockedURL" in body else body.get("blocked-uri")
        )
        return _fingerprint(
            kind,
            (directive, blocked, site),
            f"CSP {directive or '(no directive)'} blocked {blocked} on {where}",
        )
    if kind == "network-error":
        error = _text(body.get("type"))
        origin = report.origin or ""
        return _fingerprint(
            kind,
            (error, origin),
            f"Network error {error or '(no type)'} on {origin or '(no origin)'}",
        )
    return _fingerprint(kind, (site,), f"{kind} on {where}")


def crash_fingerprint(product: str | None, signature: str | None) -> Fingerprint:
    """The default fingerprint of a native (Crashpad) crash: product and signature.

    ``signature`` is None while the dump is not parsed yet; such crashes share an
    ``unknown`` issue per product until a regroup.
    """
    signature = signature or "unknown"
    return _fingerprint(NATIVE, (product or "", signature), signature)
