"""Site, origin, stored URL and user-agent family of a report."""

from __future__ import annotations

import pytest

from reporting_endpoint.grouping import (
    origin_of,
    parse_user_agent,
    site_of,
    strip_body_urls,
    strip_url,
    url_parts,
)


@pytest.mark.parametrize(
    ("url", "site"),
    [
        ("https://a.example.co.uk/x", "https://example.co.uk"),
        ("https://b.example.co.uk:8443/y?z", "https://example.co.uk"),
        ("https://x.github.io/", "https://x.github.io"),
        ("https://y.github.io/", "https://y.github.io"),
        ("https://co.uk/", "https://co.uk"),
        ("http://127.0.0.1:5000/a", "http://127.0.0.1"),
        ("https://[::1]:99/", "https://[::1]"),
        ("https://localhost:4443/", "https://localhost"),
        ("https://bücher.example.de/", "https://example.de"),
        ("https://münchen.de/", "https://xn--mnchen-3ya.de"),
        ("https://EXAMPLE.COM./", "https://example.com"),
        ("about:blank", None),
        ("not a url", None),
        ("https://bad:port:99/", None),
    ],
)
def test_site(url: str, site: str | None) -> None:
    assert site_of(url) == site
    assert url_parts(url).site == site


@pytest.mark.parametrize(
    ("url", "origin"),
    [
        ("https://a.example.co.uk/x", "https://a.example.co.uk"),
        ("https://a.example.co.uk:443/x", "https://a.example.co.uk"),
        ("http://a.example.co.uk:443/x", "http://a.example.co.uk:443"),
        ("https://127.0.0.1:54645/page", "https://127.0.0.1:54645"),
        ("https://user:secret@host.example/", "https://host.example"),
        ("data:text/html,hi", None),
    ],
)
def test_origin(url: str, origin: str | None) -> None:
    assert origin_of(url) == origin
    assert url_parts(url).origin == origin


def test_stored_url_drops_query_fragment_and_credentials() -> None:
    url = "https://user:pw@shop.example/cart?session=abc#pay"
    assert strip_url(url) == "https://shop.example/cart"
    assert url_parts(url).url == "https://shop.example/cart"
    assert url_parts(url, keep_query=True).url == "https://shop.example/cart?session=abc#pay"
    assert strip_url("weird?q=1#f") == "weird"


@pytest.mark.parametrize(
    ("ua", "browser", "major", "os"),
    [
        (
            "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
            "HeadlessChrome/156.0.0.0 Safari/537.36",
            "HeadlessChrome",
            "156",
            "Linux",
        ),
        (
            "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
            "Chrome/142.0.0.0 Safari/537.36",
            "Chrome",
            "142",
            "Windows",
        ),
        (
            "Mozilla/5.0 (X11; Linux x86_64; rv:145.0) Gecko/20100101 Firefox/145.0",
            "Firefox",
            "145",
            "Linux",
        ),
        (
            "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 "
            "(KHTML, like Gecko) Version/26.1 Safari/605.1.15",
            "Safari",
            "26",
            "Mac OS X",
        ),
        (
            "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
            "Chrome/142.0.0.0 Safari/537.36 Edg/142.0.0.0",
            "Edge",
            "142",
            "Windows",
        ),
        (
            # Chrome's reduced UA on Android: fixed model "K" and Android 10.
            "Mozilla/5.0 (Linux; Android 10; K) AppleWebKit/537.36 (KHTML, like Gecko) "
            "Chrome/142.0.0.0 Mobile Safari/537.36",
            "Chrome Mobile",
            "142",
            "Android",
        ),
        ("", None, None, None),
    ],
)
def test_user_agent(ua: str, browser: str | None, major: str | None, os: str | None) -> None:
    parsed = parse_user_agent(ua)
    assert (parsed.browser, parsed.browser_major, parsed.os) == (browser, major, os)


def test_body_urls_follow_the_report_url_rule() -> None:
    legacy_csp = {
        "document-uri": "https://a.example/p?session=1",
        "blocked-uri": "https://u:p@cdn.example/x.js#f",
        "source-file": "https://a.example/app.js?v=3",
        "referrer": "",
        "violated-directive": "script-src",
    }
    assert strip_body_urls(legacy_csp) == {
        **legacy_csp,
        "document-uri": "https://a.example/p",
        "blocked-uri": "https://cdn.example/x.js",
        "source-file": "https://a.example/app.js",
    }
    assert legacy_csp["document-uri"].endswith("?session=1")  # the input is not changed
    # Not URLs, or not strings: left alone, and the same object comes back.
    body = {"blockedURL": "inline", "sourceFile": None, "message": "see https://x.example/?q"}
    assert strip_body_urls(body) is body
    crash = {"reason": "oom", "stack": "at f (https://a.example/app.js?v=1:2:3)"}
    assert strip_body_urls(crash) is crash
