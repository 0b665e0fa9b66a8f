"""Which release an event came from: a configured source for W3C reports, annotations for
native crashes.

A browser report says nothing about the site's release, so the operator picks where it is:

- ``query:<name>``: a query parameter of the page URL (``https://a.example/app?v=1.4.2`` with
  ``query:v``). The stored URL loses its query by default (privacy), so the ingest passes the
  URL the browser sent, before stripping.
- ``body:<name>[.<name>...]``: a member of the report body, e.g. ``body:release`` or
  ``body:crash_report_api.release`` (what a page set through ``window.crashReport``).
- ``header:<name>``: a request header the host app sets on the upload (mounted inside an app
  that knows its own release, e.g. ``header:x-release``).

A native crash's release is its app version: Electron's ``_version`` annotation, else ``ver``
(Electron's own version, better than nothing), else the ``version`` query parameter Crashpad
adds to the upload URL.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import parse_qsl

# A release is a label, not a document: longer values are cut, blank ones are no release.
MAX_RELEASE = 128
SourceKind = Literal["query", "body", "header"]
_KINDS: tuple[SourceKind, ...] = ("query", "body", "header")


class ReleaseSourceError(ValueError):
    """A release source setting that cannot be used."""


@dataclass(frozen=True, slots=True)
class ReleaseSource:
    """Where a W3C report's release is read from; see the module docstring."""

    kind: SourceKind
    name: str
    # ``body:`` paths split once here, not per report.
    path: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> ReleaseSource:
        """Parse ``query:v``, ``body:release``, ``body:a.b`` or ``header:x-release``."""
        kind, sep, name = text.strip().partition(":")
        kind = kind.strip().lower()
        name = name.strip()
        if not sep or not name:
            raise ReleaseSourceError(
                f"release source {text!r}: expected query:<param>, body:<field> or header:<name>"
            )
        if kind == "query":
            return cls("query", name)
        if kind == "body":
            path = tuple(name.split("."))
            if not all(path):
                raise ReleaseSourceError(f"release source {text!r}: empty name in body path")
            return cls("body", name, path)
        if kind == "header":
            # Header names are case-insensitive; ASGI gives them in lower case.
            return cls("header", name.lower())
        raise ReleaseSourceError(
            f"release source {text!r}: unknown source {kind!r}; use one of {', '.join(_KINDS)}"
        )

    def __str__(self) -> str:
        return f"{self.kind}:{self.name}"


def _clean(value: object) -> str | None:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        return None
    text = str(value).strip()
    return text[:MAX_RELEASE] or None


def _query_value(url: str, name: str) -> str | None:
    start = url.find("?")
    if start < 0:
        return None  # the common case costs one find
    end = url.find("#", start)
    query = url[start + 1 : end if end >= 0 else len(url)]
    for key, value in parse_qsl(query, keep_blank_values=False):
        if key == name:
            return value
    return None


def report_release(
    source: ReleaseSource | None,
    *,
    url: str,
    body: Mapping[str, Any],
    headers: Mapping[str, str] | None = None,
) -> str | None:
    """A report's release by ``source``, None when not configured or not there.

    ``url`` is the page URL as the browser sent it (with its query); ``headers`` the upload's
    request headers with lower-case names.
    """
    if source is None:
        return None
    if source.kind == "query":
        return _clean(_query_value(url, source.name))
    if source.kind == "body":
        value: object = body
        for name in source.path:
            if not isinstance(value, Mapping):
                return None
            value = value.get(name)
        return _clean(value)
    return _clean(headers.get(source.name)) if headers is not None else None


def crash_release(
    annotations: Mapping[str, str], query: Mapping[str, str] | None = None
) -> str | None:
    """A native crash's release: ``_version``, else ``ver``, else the upload's ``version``."""
    for value in (annotations.get("_version"), annotations.get("ver")):
        release = _clean(value)
        if release is not None:
            return release
    return _clean(query.get("version")) if query is not None else None
