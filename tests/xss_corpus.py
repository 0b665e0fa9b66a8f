"""An XSS corpus: script, attribute, URL and SVG payloads in every field of reports and crash
uploads, stored through the service's real ingest endpoints."""

from __future__ import annotations

import ssl
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx2
import orjson

from tests.crashpad_client import MINIDUMPS, content_type, multipart

# Every payload, if a page ever ran it, sets this global; the tests read it back in Chromium.
FLAG = "__xss"

# Each one runs without a click once a parser takes it for markup (or a URL attribute for a
# link), in the contexts a template puts data in: element text, double- and single-quoted
# attributes, unquoted attributes, href/src, <title>, <textarea>, <pre>, comments, SVG.
PAYLOADS: tuple[str, ...] = (
    "<script>window.__xss=1</script>",
    "<img src=x onerror=window.__xss=2>",
    '"><svg onload=window.__xss=3>',
    "'><svg/onload=window.__xss=4>",
    '" autofocus onfocus="window.__xss=5" x="',
    "' autofocus onfocus='window.__xss=6' x='",
    "javascript:window.__xss=7",
    "</textarea></pre></title></style></noscript><script>window.__xss=8</script>",
    "--><script>window.__xss=9</script><!--",
    "<svg><script>window.__xss=10</script></svg>",
    "<svg><a href=javascript:window.__xss=11><text y=9>svg link</text></a></svg>",
    "<a href=javascript:window.__xss=12>a link</a>",
    "<math><mtext><table><mglyph><style><img src=x onerror=window.__xss=13>",
    "<details open ontoggle=window.__xss=14>",
    "<iframe srcdoc='<script>parent.__xss=15</script>'></iframe>",
    "data:text/html,<script>window.__xss=16</script>",
    "<input autofocus onfocus=window.__xss=17>",
    " onmouseover=window.__xss=18 x=",
    "{{ 7*7 }}${7*7}<%= 7*7 %>",
)
# Payloads with neither quote nor slash nor backslash: what a multipart header's quoted name
# or filename can carry (the parser would end the value, or strip a path, at those).
HEADER_SAFE = tuple(p for p in PAYLOADS if not set(p) & set("\"'/\\"))
# A real dump, so the crash parses and gets a native issue with a signature.
DUMP = (MINIDUMPS / "win-x86_breakpad_minidump2.dmp").read_bytes()

_ALL = " ".join(PAYLOADS)


def payloads() -> Iterator[str]:
    """The payloads over and over: field after field gets the next one."""
    while True:
        yield from PAYLOADS


def _url(path_payload: str) -> str:
    quoted = urllib.parse.quote(path_payload, safe="")
    return f"https://xss.example/{path_payload}/{quoted}?q={path_payload}#{path_payload}"


def w3c_reports() -> list[dict[str, Any]]:
    """Valid reports of every type, each string field (and object key) a payload: the schema
    lets all of these through, so they are stored and grouped into issues."""
    next_payload = payloads().__next__
    agents = [
        "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
        "<svg onload=window.__xss=3> Chrome/131.0.0.0 Safari/537.36",
        "Mozilla/5.0 (<script>window.__xss=1</script>; rv:132.0) Gecko/20100101 Firefox/132.0",
        _ALL,
    ]
    urls = [
        _url("<script>window.__xss=1</script>"),
        _url('"><svg onload=window.__xss=3>'),
        "javascript:window.__xss=7",
        "https://<svg onload=window.__xss=3>.example/x",
        "data:text/html,<script>window.__xss=16</script>",
    ]
    reports: list[dict[str, Any]] = []

    def report(kind: str, body: dict[str, Any], index: int) -> dict[str, Any]:
        return {
            "age": 10 + index,
            "type": kind,
            "url": urls[index % len(urls)],
            "user_agent": agents[index % len(agents)],
            "body": body,
        }

    crash_bodies: list[dict[str, Any]] = [
        {},
        {"reason": "oom"},
        {"reason": "unresponsive", "stack": _ALL},
        {
            "stack": "\n".join(f"    at {p} ({p}:1:2)" for p in PAYLOADS),
            "is_top_level": "true",
            "visibility_state": "hidden",
            "crash_report_api": {p: next_payload() for p in PAYLOADS[:8]},
            "release": next_payload(),
            next_payload(): next_payload(),
        },
    ]
    for index, body in enumerate(crash_bodies):
        # Each crash from every URL once, so every URL payload heads an issue of its own.
        for shift in range(len(urls)):
            reports.append(report("crash", {**body, "release": next_payload()}, index + shift))
    others: dict[str, dict[str, Any]] = {
        "deprecation": {
            "id": next_payload(),
            "message": _ALL,
            "sourceFile": "javascript:window.__xss=7",
            "lineNumber": 1,
            "columnNumber": 2,
            "anticipatedRemoval": next_payload(),
        },
        "intervention": {"id": next_payload(), "message": next_payload(), "sourceFile": _url("i")},
        "csp-violation": {
            "documentURL": _url("<img src=x onerror=window.__xss=2>"),
            "referrer": "javascript:window.__xss=7",
            "blockedURL": "data:text/html,<script>window.__xss=16</script>",
            "effectiveDirective": next_payload(),
            "originalPolicy": _ALL,
            "sourceFile": next_payload(),
            "sample": "<script>window.__xss=1</script>",
            "disposition": next_payload(),
            "statusCode": 200,
            "lineNumber": 3,
        },
        "network-error": {
            "sampling_fraction": 1.0,
            "elapsed_time": 12,
            "phase": next_payload(),
            "type": next_payload(),
            "server_ip": next_payload(),
            "protocol": next_payload(),
            "referrer": "javascript:window.__xss=7",
            "method": next_payload(),
            "status_code": 0,
            "url": _url("<svg><script>window.__xss=10</script></svg>"),
        },
        "coep": {"type": next_payload(), "blockedURL": next_payload(), "destination": "script"},
        "permissions-policy-violation": {
            "featureId": next_payload(),
            "sourceFile": next_payload(),
            "message": next_payload(),
            "disposition": "enforce",
        },
        # A type that is itself markup, and nested containers with payload keys and values.
        "<img src=x onerror=window.__xss=2>": {
            "nested": {next_payload(): [next_payload(), {next_payload(): next_payload()}]},
            "list": list(PAYLOADS),
        },
        '"><svg onload=window.__xss=3>': {"message": next_payload()},
    }
    for index, (kind, body) in enumerate(others.items()):
        reports.append(report(kind, body, index))
    return reports


def quarantined_reports() -> list[Any]:
    """Reports the schema refuses (each for a different reason): they land in quarantine, which
    the dashboard shows with their raw JSON."""
    good = {
        "age": 1,
        "type": "crash",
        "url": _url("<script>window.__xss=1</script>"),
        "user_agent": _ALL,
        "body": {},
    }
    return [
        {**good, "body": {"reason": "<script>window.__xss=1</script>", "stack": _ALL}},
        {**good, "age": -1, "body": {"message": _ALL}},
        {**good, "type": "<svg onload=window.__xss=3>" * 10},  # longer than 128
        {key: value for key, value in good.items() if key != "body"} | {"extra": _ALL},
        {**good, "url": ["<img src=x onerror=window.__xss=2>"]},
        "<script>window.__xss=1</script>",
        [_ALL, {"<svg onload=window.__xss=3>": _ALL}],
    ]


def crash_uploads() -> list[tuple[str, bytes]]:
    """Crashpad uploads (query string, multipart body) with payloads in the product, version,
    platform, process type and guid fields, in annotation names and values, in the query, and
    in the file names of the dump and an attachment."""
    next_payload = payloads().__next__
    electron = {
        "prod": "Electron",
        "ver": next_payload(),
        "_productName": "<script>window.__xss=1</script>",
        "_version": '"><svg onload=window.__xss=3>',
        "platform": next_payload(),
        "process_type": next_payload(),
        "guid": next_payload(),
        "_companyName": _ALL,
    }
    electron |= {name: next_payload() for name in HEADER_SAFE}
    crashpad = {
        "prod": "<img src=x onerror=window.__xss=2>",
        "ver": "javascript:window.__xss=7",
        "plat": next_payload(),
        "ptype": next_payload(),
        "list_annotations": _ALL,
    }
    crashpad |= {f"{name} 2": next_payload() for name in HEADER_SAFE}
    query = urllib.parse.urlencode(
        {"product": next_payload(), "version": next_payload(), "guid": next_payload()}
    )
    uploads = []
    for fields, dump_name in (
        (electron, f"{HEADER_SAFE[0]}.dmp"),
        (crashpad, f"{HEADER_SAFE[1]}.dmp"),
    ):
        files = [
            ("upload_file_minidump", dump_name, DUMP),
            (f"attachment {HEADER_SAFE[2]}", f"{HEADER_SAFE[3]}.txt", _ALL.encode()),
        ]
        uploads.append((query, multipart(fields, files)))
    return uploads


@dataclass
class Stored:
    """What the ingest answered for the corpus."""

    accepted: int = 0
    quarantined: int = 0
    crash_ids: list[str] = field(default_factory=list)


def post_reports(client: httpx2.Client, batch: list[Any]) -> list[dict[str, Any]]:
    """POST one W3C batch; returns the refused reports the service listed (quarantined)."""
    answer = client.post(
        "/reports",
        content=orjson.dumps(batch),
        headers={"content-type": "application/reports+json"},
    )
    answer.raise_for_status()
    return list(answer.json().get("rejected", []))


def post_crash(client: httpx2.Client, query: str, body: bytes) -> str:
    """POST one Crashpad upload; returns the crash id the service answered with."""
    answer = client.post(
        f"/crashpad?{query}", content=body, headers={"content-type": content_type()}
    )
    answer.raise_for_status()
    return answer.text.strip()


def store_corpus(base_url: str, verify: ssl.SSLContext | bool = True) -> Stored:
    """POST the whole corpus to a running service; raises unless each upload is accepted."""
    stored = Stored()
    with httpx2.Client(base_url=base_url, verify=verify, timeout=30) as client:
        for batch in (w3c_reports(), quarantined_reports()):
            refused = post_reports(client, batch)
            stored.quarantined += len(refused)
            stored.accepted += len(batch) - len(refused)
        for query, body in crash_uploads():
            stored.crash_ids.append(post_crash(client, query, body))
    return stored
