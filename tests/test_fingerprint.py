"""Default fingerprints, releases and retry detection, over reports real browsers sent and
dumps real crash handlers wrote."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import pytest

from reporting_endpoint.issues.duplicates import (
    DuplicateKey,
    DuplicateWindow,
    duplicate_key,
    report_duplicate_key,
)
from reporting_endpoint.issues.fingerprint import (
    NATIVE,
    crash_fingerprint,
    normalise_stack,
    path_shape,
    report_fingerprint,
)
from reporting_endpoint.issues.releases import (
    ReleaseSource,
    ReleaseSourceError,
    crash_release,
    report_release,
)
from reporting_endpoint.minidump import parse_dump
from reporting_endpoint.records import NewReport
from reporting_endpoint.reports import normalise
from tests.conftest import captured_reports

DUMPS = Path(__file__).parent / "fixtures" / "minidumps"
NOW = 1_764_370_000_000
FIREFOX_UA = "Mozilla/5.0 (X11; Linux x86_64; rv:140.0) Gecko/20100101 Firefox/140.0"


def stored(report: dict[str, Any], received_at: int = NOW) -> NewReport:
    """A captured report as the ingest stores it (query stripped)."""
    return normalise(report, received_at, keep_query=False)


def of_type(name: str, kind: str) -> list[dict[str, Any]]:
    return [r for r in captured_reports(name) if r["type"] == kind]


# --- W3C crash ---------------------------------------------------------------------------


def test_captured_page_crashes_share_one_fingerprint_across_ports_and_queries() -> None:
    reports = of_type("crash-pagecrash", "crash")
    assert len(reports) == 3
    prints = {report_fingerprint(stored(r), r["body"]) for r in reports}
    # Three runs on three ports: one site (127.0.0.1), one path, no reason.
    assert len(prints) == 1
    (fp,) = prints
    assert fp.kind == "crash"
    assert fp.title == "Crash on https://127.0.0.1 /page"
    assert len(fp.hash) == 32 and fp.rule is None


def test_captured_oom_crashes_are_their_own_issue() -> None:
    oom = of_type("oom", "crash")
    page = of_type("crash-pagecrash", "crash")[0]
    prints = {report_fingerprint(stored(r), r["body"]) for r in oom}
    assert len(prints) == 1
    (fp,) = prints
    assert fp.title == "OOM crash on https://127.0.0.1 /page"
    assert fp != report_fingerprint(stored(page), page["body"])


def test_body_read_back_from_raw_gives_the_same_fingerprint() -> None:
    for name, kind in [("oom", "crash"), ("csp", "csp-violation"), ("deprecation", "deprecation")]:
        report = of_type(name, kind)[0]
        assert report_fingerprint(stored(report)) == report_fingerprint(
            stored(report), report["body"]
        )


def test_crash_with_a_stack_groups_by_its_top_frames_not_the_url() -> None:
    base = of_type("oom", "crash")[0]
    stack = (
        "Error\n    at busy (https://127.0.0.1:1/app.js?v=3:10:5)\n"
        "    at loop (https://127.0.0.1:1/app.js:20:3)"
    )
    body = {**base["body"], "reason": "unresponsive", "stack": stack}
    one = {**base, "body": body, "url": "https://127.0.0.1:1/orders/123"}
    moved = {
        **base,
        "body": {**body, "stack": stack.replace(":10:5", ":11:9").replace("v=3", "v=4")},
        "url": "https://127.0.0.1:1/settings",
    }
    fp = report_fingerprint(stored(one), one["body"])
    assert fp == report_fingerprint(stored(moved), moved["body"])
    assert (
        fp.title == "Unresponsive crash on https://127.0.0.1 in busy (https://127.0.0.1:1/app.js)"
    )
    other = {**one, "body": {**body, "stack": stack.replace("busy", "spin")}}
    assert report_fingerprint(stored(other), other["body"]) != fp


def test_a_placeholder_instead_of_a_stack_falls_back_to_the_path_shape() -> None:
    base = of_type("oom", "crash")[0]
    body = {**base["body"], "stack": "Unable to collect JS call stack."}
    report = {**base, "body": body}
    assert report_fingerprint(stored(report), body) == report_fingerprint(
        stored(base), base["body"]
    )


def test_crashes_on_pages_differing_only_in_ids_share_a_fingerprint() -> None:
    base = of_type("oom", "crash")[0]
    a = {
        **base,
        "url": "https://shop.example.com/orders/1234/items/550e8400-e29b-41d4-a716-446655440000",
    }
    b = {
        **base,
        "url": "https://www.shop.example.com/orders/98/items/6ba7b810-9dad-11d1-80b4-00c04fd430c8?x=1",
    }
    c = {**base, "url": "https://shop.example.com/orders/98/reviews"}
    fa, fb, fc = (report_fingerprint(stored(r), r["body"]) for r in (a, b, c))
    assert fa == fb
    assert fa.title == "OOM crash on https://example.com /orders/*/items/*"
    assert fc != fa


def test_user_agent_is_not_part_of_any_default_fingerprint() -> None:
    for name, kind in [
        ("crash-pagecrash", "crash"),
        ("oom", "crash"),
        ("deprecation", "deprecation"),
        ("deprecation", "intervention"),
        ("csp", "csp-violation"),
        ("nel", "network-error"),
    ]:
        report = of_type(name, kind)[0]
        firefox = {**report, "user_agent": FIREFOX_UA}
        a, b = stored(report), stored(firefox)
        assert a.user_agent != b.user_agent and a.browser != b.browser
        assert report_fingerprint(a, report["body"]) == report_fingerprint(b, firefox["body"])


# --- path shapes and stacks ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shape"),
    [
        ("https://a.example/", "/"),
        ("https://a.example", "/"),
        ("https://a.example?next=/x/1", "/"),
        ("https://a.example/app/123/edit", "/app/*/edit"),
        ("https://a.example/u/550e8400-e29b-41d4-a716-446655440000", "/u/*"),
        ("https://a.example/u/550e8400e29b41d4a716446655440000/x", "/u/*/x"),
        ("https://a.example/blob/3f9a1c2b7d/file", "/blob/*/file"),
        ("https://a.example/t/aGVsbG8gV29ybGQ9MTIz", "/t/*"),
        ("https://a.example/t/eyJhbGciOiJIUzI1NiJ9_x-Y", "/t/*"),
        ("https://a.example/img/1234.png", "/img/*.png"),
        ("https://a.example/a/1?b=2#c/3", "/a/*"),
        # Names stay: words, slugs, version tags, hex-looking words, short hex.
        ("https://a.example/settings-and-privacy/2024-annual-report", None),
        ("https://a.example/deadbeef/facade/cafe12/v2/app.v3.js", None),
        ("https://a.example/static/main.3f9a1c2b.js", None),
    ],
)
def test_path_shape_collapses_ids_and_hashes_only(url: str, shape: str | None) -> None:
    expected = shape if shape is not None else url.split("a.example", 1)[1]
    assert path_shape(url) == expected


def test_stack_frames_lose_line_numbers_and_query_strings() -> None:
    v8 = (
        "Error: hang\n"
        "    at busy (https://a.example/app.js?v=3:10:5)\n"
        "    at https://a.example/app.js#x:20:3\n"
        "    at HTMLButtonElement.onclick (https://a.example/page?user=alice:1:1)\n"
        "    at <anonymous>\n"
    )
    assert normalise_stack(v8) == (
        "busy (https://a.example/app.js)",
        "https://a.example/app.js",
        "HTMLButtonElement.onclick (https://a.example/page)",
        "<anonymous>",
    )
    gecko = "busy@https://a.example/app.js?v=3:10:5\n@https://a.example/app.js:20:3\n"
    assert normalise_stack(gecko) == ("busy@https://a.example/app.js", "@https://a.example/app.js")
    deep = "\n".join(f"    at f{i} (https://a.example/app.js:{i}:1)" for i in range(20))
    assert normalise_stack(deep) == tuple(f"f{i} (https://a.example/app.js)" for i in range(5))
    assert normalise_stack("Unable to collect JS call stack.") == ()


# --- other report types --------------------------------------------------------------------


def test_captured_deprecations_group_by_feature_id() -> None:
    reports = of_type("deprecation", "deprecation")
    prints = {r["body"]["id"]: report_fingerprint(stored(r), r["body"]) for r in reports}
    assert set(prints) == {
        "UnloadHandler",
        "XMLHttpRequestSynchronousInNonWorkerOutsideBeforeUnload",
    }
    assert len(set(prints.values())) == 2
    unload = prints["UnloadHandler"]
    assert unload.kind == "deprecation"
    assert unload.title == "Deprecation UnloadHandler on https://127.0.0.1"
    # The same feature on another line of another page is the same issue.
    moved = {**reports[0], "url": "https://127.0.0.1/other"}
    moved["body"] = {**reports[0]["body"], "lineNumber": 99}
    assert report_fingerprint(stored(moved), moved["body"]) == prints[reports[0]["body"]["id"]]


def test_captured_intervention_groups_by_feature_id_and_not_with_deprecations() -> None:
    (report,) = of_type("deprecation", "intervention")
    fp = report_fingerprint(stored(report), report["body"])
    assert fp.kind == "intervention"
    assert fp.title == "Intervention NavigatorVibrate on https://127.0.0.1"
    as_deprecation = {**report, "type": "deprecation"}
    assert report_fingerprint(stored(as_deprecation), report["body"]).hash != fp.hash
    other_site = {**report, "url": "https://b.example/page"}
    assert report_fingerprint(stored(other_site), report["body"]) != fp


def test_captured_csp_violation_groups_by_directive_blocked_origin_and_site() -> None:
    (report,) = of_type("csp", "csp-violation")
    fp = report_fingerprint(stored(report), report["body"])
    assert fp.kind == "csp-violation"
    assert fp.title == "CSP script-src-elem blocked inline on https://127.0.0.1"
    body = report["body"]
    same = {**body, "lineNumber": 40, "sourceFile": "https://127.0.0.1:41761/other"}
    assert report_fingerprint(stored({**report, "body": same}), same) == fp
    cdn = {**body, "blockedURL": "https://cdn.example/lib.js?v=1"}
    cdn2 = {**body, "blockedURL": "https://cdn.example/other.js"}
    f_cdn = report_fingerprint(stored({**report, "body": cdn}), cdn)
    assert f_cdn == report_fingerprint(stored({**report, "body": cdn2}), cdn2)
    assert f_cdn.title == "CSP script-src-elem blocked https://cdn.example on https://127.0.0.1"
    style = {**body, "effectiveDirective": "style-src-elem"}
    assert report_fingerprint(stored({**report, "body": style}), style) != fp
    legacy = {"effective-directive": "script-src-elem", "blocked-uri": "inline"}
    assert report_fingerprint(stored({**report, "body": legacy}), legacy) == fp


def test_captured_network_errors_group_by_error_type_and_origin() -> None:
    reports = of_type("nel", "network-error")
    by_origin: dict[tuple[str, str], set[Any]] = {}
    for report in reports:
        fp = report_fingerprint(stored(report), report["body"])
        assert fp.kind == "network-error"
        key = (report["url"].split("/")[2], report["body"]["type"])
        by_origin.setdefault(key, set()).add(fp)
    # Origin A: a 404 image, the missing favicon and a 500 fetch, all `http.error`: one issue
    # whatever the path or status. Origin B (another port, the same site): its own
    # `http.error` issue, and a separate `tcp.refused` one.
    assert len(by_origin) == 3
    assert all(len(prints) == 1 for prints in by_origin.values())
    assert len({next(iter(p)) for p in by_origin.values()}) == 3
    refused = next(iter(next(p for (_, kind), p in by_origin.items() if kind == "tcp.refused")))
    port = next(host for host, kind in by_origin if kind == "tcp.refused").split(":")[1]
    assert refused.title == f"Network error tcp.refused on https://127.0.0.1:{port}"
    firefox = {**reports[0], "user_agent": FIREFOX_UA}
    assert report_fingerprint(stored(firefox), firefox["body"]) == report_fingerprint(
        stored(reports[0]), reports[0]["body"]
    )


def test_other_types_group_by_type_and_site() -> None:
    base = of_type("csp", "csp-violation")[0]
    coep = {**base, "type": "coep", "body": {"type": "corp", "blockedURL": "https://x.example/a"}}
    other = {**coep, "body": {"type": "navigation"}, "url": "https://127.0.0.1:9/else"}
    fp = report_fingerprint(stored(coep), coep["body"])
    assert fp == report_fingerprint(stored(other), other["body"])
    assert (fp.kind, fp.title) == ("coep", "coep on https://127.0.0.1")


# --- native crashes ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dump", "title"),
    [
        (
            "win-x64_electron_node-minidump_windows.dmp",
            "EXCEPTION_ACCESS_VIOLATION_WRITE | electron.exe+0x",
        ),
        ("win-x86_breakpad_minidump2.dmp", "EXCEPTION_ACCESS_VIOLATION_WRITE | test_app.exe+0x"),
        ("mac-x64_electron_node-minidump_mac.dmp", "EXC_BAD_INSTRUCTION | Electron Framework+0x"),
        ("linux-x64_breakpad_linux_divide_by_zero.dmp", "SIGFPE | driver+0x"),
    ],
)
def test_native_crash_groups_by_product_and_the_dump_signature(dump: str, title: str) -> None:
    facts = parse_dump(DUMPS / dump)
    fp = crash_fingerprint("ExampleApp", facts.signature)
    assert fp.kind == NATIVE
    assert fp.title == facts.signature and fp.title.startswith(title)
    assert crash_fingerprint("ExampleApp", parse_dump(DUMPS / dump).signature) == fp
    assert crash_fingerprint("OtherApp", facts.signature).hash != fp.hash


def test_different_dumps_are_different_native_issues() -> None:
    names = [
        "win-x64_electron_node-minidump_windows.dmp",
        "win-x86_breakpad_minidump2.dmp",
        "win-x86_breakpad_null_read_av.dmp",
        "linux-x64_breakpad_linux_raise_sigabrt.dmp",
    ]
    hashes = {crash_fingerprint("App", parse_dump(DUMPS / n).signature).hash for n in names}
    assert len(hashes) == len(names)


def test_unparsed_native_crash_gets_an_unknown_fingerprint_per_product() -> None:
    assert crash_fingerprint("App", None) == crash_fingerprint("App", "unknown")
    assert crash_fingerprint("App", None).title == "unknown"
    assert crash_fingerprint(None, None) != crash_fingerprint("App", None)


# --- releases ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "kind", "name"),
    [
        ("query:v", "query", "v"),
        ("body:release", "body", "release"),
        (" body : crash_report_api.release ", "body", "crash_report_api.release"),
        ("header:X-Release", "header", "x-release"),
    ],
)
def test_release_source_parses(text: str, kind: str, name: str) -> None:
    source = ReleaseSource.parse(text)
    assert (source.kind, source.name) == (kind, name)
    assert str(source) == f"{kind}:{name}"


@pytest.mark.parametrize("text", ["", "query", "query:", "cookie:v", "body:a..b", ":v"])
def test_release_source_rejects_bad_settings(text: str) -> None:
    with pytest.raises(ReleaseSourceError, match="release source"):
        ReleaseSource.parse(text)


def test_release_from_the_original_page_url_query() -> None:
    # The captured page URL has a query the stored URL loses: the ingest passes the original.
    report = of_type("oom", "crash")[0]
    source = ReleaseSource.parse("query:js")
    assert report_release(source, url=report["url"], body=report["body"]) == "oom"
    assert report_release(source, url=stored(report).url, body=report["body"]) is None
    v = ReleaseSource.parse("query:v")
    assert report_release(v, url="https://a.example/p?x=1&v=1.4.2#v=9", body={}) == "1.4.2"
    assert report_release(v, url="https://a.example/p?v=", body={}) is None


def test_release_from_the_body_and_from_a_header() -> None:
    body = {"release": "1.2.3", "crash_report_api": {"release": " 2.0 "}, "n": {"release": 7}}
    url = "https://a.example/"
    assert report_release(ReleaseSource.parse("body:release"), url=url, body=body) == "1.2.3"
    nested = ReleaseSource.parse("body:crash_report_api.release")
    assert report_release(nested, url=url, body=body) == "2.0"
    assert report_release(ReleaseSource.parse("body:n.release"), url=url, body=body) == "7"
    assert report_release(ReleaseSource.parse("body:release.x"), url=url, body=body) is None
    assert report_release(ReleaseSource.parse("body:missing"), url=url, body=body) is None
    header = ReleaseSource.parse("header:X-Release")
    assert report_release(header, url=url, body={}, headers={"x-release": "3.1"}) == "3.1"
    assert report_release(header, url=url, body={}) is None
    assert report_release(None, url=url, body=body) is None
    long = {"release": "x" * 1000}
    assert len(report_release(ReleaseSource.parse("body:release"), url=url, body=long) or "") == 128


def test_native_release_from_version_annotations() -> None:
    # The annotations Electron's crashReporter sends (fixtures/crashpad/b_.../headers.json).
    annotations = {
        "prod": "Electron",
        "ver": "33.2.1",
        "_productName": "ExampleApp",
        "_version": "1.2.3",
    }
    assert crash_release(annotations) == "1.2.3"
    assert crash_release({"prod": "Electron", "ver": "33.2.1"}) == "33.2.1"
    assert crash_release({}, {"product": "X", "version": "4.5"}) == "4.5"
    assert crash_release({}) is None


# --- duplicates ----------------------------------------------------------------------------


def test_a_retry_with_a_larger_age_has_the_same_key_within_tolerance() -> None:
    report = of_type("crash-pagecrash", "crash")[0]
    first = stored(report, NOW)
    # Retried 60 s later (Chromium's first backoff); the browser's age grew by ~60 s.
    retry_report = {**report, "age": report["age"] + 60_000 - 40}
    retry = stored(retry_report, NOW + 60_000)
    a, b = report_duplicate_key(first, report["body"]), report_duplicate_key(retry)
    assert a.digest == b.digest and abs(a.generated_at - b.generated_at) == 40
    window = DuplicateWindow()
    assert window.check_and_add(a, NOW) is False
    assert window.check_and_add(b, NOW + 60_000) is True
    assert len(window) == 1


def test_two_crashes_of_one_page_a_second_apart_are_not_duplicates() -> None:
    report = of_type("crash-pagecrash", "crash")[0]
    window = DuplicateWindow()
    first = report_duplicate_key(stored(report, NOW))
    second = report_duplicate_key(stored(report, NOW + 1_000))
    assert first.digest == second.digest
    assert window.check_and_add(first, NOW) is False
    assert window.check_and_add(second, NOW + 1_000) is False
    assert len(window) == 2


def test_duplicate_key_covers_type_url_user_agent_and_body_in_any_member_order() -> None:
    body = {"a": 1, "b": [1, 2]}
    key = duplicate_key("crash", "https://a.example/", "UA", body, 5)
    assert key == duplicate_key("crash", "https://a.example/", "UA", {"b": [1, 2], "a": 1}, 5)
    for changed in [
        duplicate_key("oom", "https://a.example/", "UA", body, 5),
        duplicate_key("crash", "https://a.example/x", "UA", body, 5),
        duplicate_key("crash", "https://a.example/", "UA2", body, 5),
        duplicate_key("crash", "https://a.example/", "UA", {**body, "a": 2}, 5),
    ]:
        assert changed.digest != key.digest
    # Field boundaries are part of the key.
    assert duplicate_key("ab", "c", "", {}, 0).digest != duplicate_key("a", "bc", "", {}, 0).digest


def test_window_tolerance_is_inclusive_and_crosses_bucket_edges() -> None:
    window = DuplicateWindow(tolerance_ms=500)
    digest = b"d" * 16
    base = NOW - NOW % 500  # the first ms of a bucket
    window.add(DuplicateKey(digest, base + 499), NOW)  # the last ms of that bucket
    assert window.seen(DuplicateKey(digest, base + 999))  # the next bucket, 500 ms later
    assert window.seen(DuplicateKey(digest, base - 1))
    assert not window.seen(DuplicateKey(digest, base + 1_000))
    assert not window.seen(DuplicateKey(b"e" * 16, base + 499))


def test_window_forgets_keys_past_the_horizon() -> None:
    window = DuplicateWindow(tolerance_ms=500, horizon_ms=60_000)
    old = DuplicateKey(b"o" * 16, NOW)
    window.add(old, NOW)
    window.add(DuplicateKey(b"n" * 16, NOW + 59_000), NOW + 59_000)
    assert window.seen(old) and len(window) == 2
    window.add(DuplicateKey(b"m" * 16, NOW + 61_000), NOW + 61_000)
    assert not window.seen(old) and len(window) == 2


def test_window_never_holds_a_key_already_past_the_horizon(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A stale key (the schema allows ages of days) must cost nothing: holding it would make
    every such add sort all buckets to expire it again."""
    import reporting_endpoint.issues.duplicates as duplicates

    sorts: list[int] = []

    def counting_sorted(items: Any) -> list[Any]:
        sorts.append(1)
        return sorted(items)

    monkeypatch.setattr(duplicates, "sorted", counting_sorted, raising=False)
    window = DuplicateWindow(tolerance_ms=500, horizon_ms=60_000)
    window.add(DuplicateKey(b"n" * 16, NOW), NOW)
    for i in range(100):
        window.add(DuplicateKey(i.to_bytes(16, "little"), NOW - 3_600_000 - i), NOW)
    assert len(window) == 1
    assert sorts == []


def test_window_is_bounded_and_drops_the_oldest_first() -> None:
    window = DuplicateWindow(tolerance_ms=100, max_entries=1_000)
    keys = [DuplicateKey(i.to_bytes(16, "little"), NOW + i * 10) for i in range(5_000)]
    for key in keys:
        window.add(key, NOW + 50_000)
    assert len(window) <= 1_000
    assert window.seen(keys[-1]) and not window.seen(keys[0])


def test_window_rejects_nonsense_bounds() -> None:
    with pytest.raises(ValueError):
        DuplicateWindow(tolerance_ms=0)


def test_fingerprint_is_stable_across_processes() -> None:
    # The hash is stored with each event: it may never depend on PYTHONHASHSEED or the host.
    report = of_type("oom", "crash")[0]
    fp = report_fingerprint(stored(report), report["body"])
    again = report_fingerprint(dataclasses.replace(stored(report), received_at=0), report["body"])
    assert fp.hash == again.hash
    assert crash_fingerprint("App", "SIGSEGV | libc.so+0x10").hash == (
        crash_fingerprint("App", "SIGSEGV | libc.so+0x10").hash
    )


def test_parts_cannot_fake_a_boundary() -> None:
    base = of_type("deprecation", "deprecation")[0]
    # A body.id ending in what a separator-joined hash would read as the next part.
    crafted = {**base["body"], "id": 'UnloadHandler", "https://127.0.0.1'}
    assert report_fingerprint(stored(base), crafted) != report_fingerprint(
        stored(base), base["body"]
    )
    assert crash_fingerprint("a\x1fb", "c").hash != crash_fingerprint("a", "b\x1fc").hash
    assert crash_fingerprint("a\ud800", "c").hash == crash_fingerprint("a\ud800", "c").hash


def test_hostile_sizes_stay_bounded_and_fast() -> None:
    base = of_type("oom", "crash")[0]
    # About 1 MiB each, the size of the largest upload the ingest accepts.
    spaces = "a" + " " * 50_000 + "b"
    stack = "\n".join([f"    at f (https://a.example/app.js:{spaces}:1)"] * 20)
    body = {**base["body"], "reason": "unresponsive", "stack": stack, "id": "x" * 1_000_000}
    url = "https://a.example/" + "/".join(["1a" * 5_000] * 100)
    huge = {**base, "url": url, "body": body}
    start = time.perf_counter()
    fp = report_fingerprint(stored(huge), body)
    assert time.perf_counter() - start < 0.5
    assert len(fp.title) <= 200
    deprecation = {**huge, "type": "deprecation"}
    assert len(report_fingerprint(stored(deprecation), body).title) <= 200
    assert len(path_shape(huge["url"])) < len(huge["url"])
