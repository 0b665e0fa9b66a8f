"""Intake rules: the allow-list of sites, per-type sampling, and the per-client rate limit, as
a browser, a Crashpad client and an operator (stats, /metrics) see them."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path
from typing import Any

import httpx2
import pytest
from starlette.testclient import TestClient

from reporting_endpoint.app import create_app
from reporting_endpoint.intake import RateLimitMiddleware, TokenBuckets, client_key
from reporting_endpoint.middleware import json_rejection
from reporting_endpoint.settings import Settings, SettingsError
from tests.conftest import crash_report, post_reports
from tests.crashpad_client import content_type, dump_upload
from tests.servers import running_service
from tests.test_metrics import samples, total

RECEIVED = "reporting_endpoint_reports_received_total"
OUTCOMES = ("stored", "quarantined", "duplicate", "site_not_allowed", "sampled_out")


def outcomes(client: TestClient) -> Counter[str]:
    found = samples(client.get("/metrics").text)
    return Counter({outcome: int(total(found, RECEIVED, outcome=outcome)) for outcome in OUTCOMES})


def stored_by_type(client: TestClient) -> dict[str, int]:
    answer = client.get("/api/groups?by=type", headers={"authorization": "Bearer t"})
    assert answer.status_code == 200, answer.text
    return {group["type"]: group["count"] for group in answer.json()["groups"]}


def stored_count(client: TestClient) -> int:
    return sum(stored_by_type(client).values())


def deprecation(n: int, site: str = "example.com") -> dict[str, Any]:
    return {
        "age": 1,
        "type": "deprecation",
        "url": f"https://www.{site}/{n}",
        "user_agent": "UA",
        "body": {"id": f"d{n}", "message": "m"},
    }


# --- allow-list ---------------------------------------------------------------------------


def test_reports_for_other_sites_are_answered_2xx_not_stored_and_counted(
    database_url: str, tmp_path: Path
) -> None:
    settings = Settings(
        db=tmp_path / "r.sqlite3",
        database=database_url,
        allowed_sites=("https://www.example.co.uk", "example.com"),
        read_token="t",
    )
    batch = [
        crash_report(url="https://shop.example.co.uk/a"),  # the registrable domain is listed
        crash_report(url="http://example.com/b"),  # either scheme
        crash_report(url="https://example.com.evil.test/c"),
        crash_report(url="https://co.uk/d"),
        crash_report(url="https://other.test/e"),
        {"type": "crash", "url": "https://junk.test/"},  # refused, and from elsewhere
        {"type": "crash", "url": "https://example.com/"},  # refused, from a listed site
        # Refused, and nothing shows they come from a listed site: not quarantined either, or
        # anyone could churn the bounded quarantine.
        {"type": "crash"},
        {"type": "crash", "url": "http://["},
        {"type": "crash", "url": 7},
        7,
    ]
    with TestClient(create_app(settings)) as client:
        before = outcomes(client)
        answer = post_reports(client, batch)
        after = outcomes(client)
        stored = stored_count(client)
        quarantine = client.get("/api/quarantine", headers={"authorization": "Bearer t"})
    assert answer.status_code == 200
    summary = answer.json()
    assert summary["accepted"] == 2
    assert [r["index"] for r in summary["rejected"]] == [6]
    assert summary["dropped"] == {"site_not_allowed": 8}
    assert stored == 2
    assert [item["raw"] for item in quarantine.json()["quarantine"]] == [
        {"type": "crash", "url": "https://example.com/"}
    ]
    counted = after - before
    assert counted == Counter(stored=2, quarantined=1, site_not_allowed=8)
    assert sum(counted.values()) == len(batch)


def test_without_an_allow_list_every_site_is_stored(client: TestClient) -> None:
    answer = post_reports(client, [crash_report(url="https://any.test/")])
    assert answer.json() == {"accepted": 1, "rejected": []}


@pytest.mark.parametrize(
    "changes",
    [
        {"allowed_sites": ("ftp://example.com",)},
        {"allowed_sites": ("https://",)},
        {"sample_rates": ("crash=1.5",)},
        {"sample_rates": ("crash",)},
        {"sample_rates": ("crash=half",)},
        {"sample_rates": ("crash=0.1", "crash=0.2")},
        {"rate_limit_per_minute": -1},
        {"metrics_token": " "},
    ],
)
def test_bad_intake_settings_are_refused(changes: dict[str, Any]) -> None:
    with pytest.raises(SettingsError):
        Settings(**changes)


def test_intake_settings_come_from_the_environment() -> None:
    settings = Settings.from_env(
        {
            "REPORTING_ENDPOINT_ALLOWED_SITES": "example.com, example.org",
            "REPORTING_ENDPOINT_SAMPLE_RATES": "csp-violation=0.1,deprecation=0.5",
            "REPORTING_ENDPOINT_RATE_LIMIT_PER_MINUTE": "60",
            "REPORTING_ENDPOINT_METRICS_TOKEN": "m-secret",
        }
    )
    assert settings.allowed_sites == ("example.com", "example.org")
    assert settings.sample_rates == ("csp-violation=0.1", "deprecation=0.5")
    assert settings.rate_limit_per_minute == 60
    assert "m-secret" not in repr(settings)


# --- sampling -----------------------------------------------------------------------------


def test_sampling_keeps_a_share_of_a_type_and_every_report_is_counted(
    database_url: str, tmp_path: Path
) -> None:
    settings = Settings(
        db=tmp_path / "r.sqlite3",
        database=database_url,
        sample_rates=("deprecation=0.5", "intervention=0"),
        read_token="t",
    )
    sent = 400
    with TestClient(create_app(settings)) as client:
        before = outcomes(client)
        answers = []
        for start in range(0, sent, 100):
            batch = [deprecation(n) for n in range(start, start + 100)]
            batch += [crash_report(url=f"https://example.com/{start}")]
            batch += [{**deprecation(start), "type": "intervention"}]
            answers.append(post_reports(client, batch).json())
        after = outcomes(client)
        stored = stored_by_type(client)
    counted = after - before
    sampled_out = sum(a.get("dropped", {}).get("sampled_out", 0) for a in answers)
    # Every report sent is counted once: stored or sampled out, nothing lost in between.
    assert counted["stored"] + counted["sampled_out"] == sent + 8
    assert counted["sampled_out"] == sampled_out
    assert sum(stored.values()) == counted["stored"]
    # Crashes (no rate) are all kept, interventions (rate 0) none; deprecations about half:
    # outside 140..260 of 400 happens with a chance below 1e-9 at rate 0.5.
    assert stored.get("crash") == 4
    assert "intervention" not in stored
    assert 140 <= stored["deprecation"] <= 260


def test_a_rate_of_one_keeps_everything(tmp_path: Path) -> None:
    settings = Settings(db=tmp_path / "r.sqlite3", sample_rates=("deprecation=1",))
    with TestClient(create_app(settings)) as client:
        answer = post_reports(client, [deprecation(n) for n in range(50)])
    assert answer.json() == {"accepted": 50, "rejected": []}


# --- rate limit ---------------------------------------------------------------------------


def test_the_rate_limit_answers_each_client_as_it_behaves(tmp_path: Path) -> None:
    """Browsers get 429 + Retry-After (they keep the reports and send them again later);
    Crashpad gets 429 ``Discarded=rate_limited``; each endpoint has its own allowance."""
    env = {
        "REPORTING_ENDPOINT_RATE_LIMIT_PER_MINUTE": "2",
        "REPORTING_ENDPOINT_RATE_LIMIT_BURST": "2",
    }
    reports = {"content-type": "application/reports+json", "origin": "https://example.com"}
    with (
        running_service(tmp_path / "r.sqlite3", env=env) as server,
        httpx2.Client(base_url=server.url, timeout=30) as client,
    ):
        body = json.dumps([crash_report()])
        ok = [client.post("/reports", content=body, headers=reports) for _ in range(2)]
        limited = client.post("/reports", content=body, headers=reports)
        preflight = client.options(
            "/reports",
            headers={
                "origin": "https://example.com",
                "access-control-request-method": "POST",
                "access-control-request-headers": "content-type",
            },
        )
        upload = dump_upload(b"MDMP" + b"\0" * 64)
        crash = {"content-type": content_type()}
        crashes = [client.post("/crashpad", content=upload, headers=crash) for _ in range(2)]
        crash_limited = client.post("/crashpad", content=upload, headers=crash)
        found = samples(client.get("/metrics").text)
    assert [a.status_code for a in ok] == [200, 200]
    assert limited.status_code == 429
    assert limited.json()["error"]["code"] == "rate_limited"
    assert 1 <= int(limited.headers["retry-after"]) <= 30
    assert limited.headers["access-control-allow-origin"] == "*"
    assert preflight.status_code == 204
    assert [a.status_code for a in crashes] == [200, 200]
    assert crash_limited.status_code == 429
    assert crash_limited.text == "Discarded=rate_limited"
    assert 1 <= int(crash_limited.headers["retry-after"]) <= 30
    rejected = "reporting_endpoint_requests_rejected_total"
    assert total(found, rejected, endpoint="reports", reason="rate_limited") == 1
    assert total(found, rejected, endpoint="crashpad", reason="rate_limited") == 1


def test_a_bucket_refills_at_the_rate_and_holds_at_most_the_burst() -> None:
    now = [0.0]
    buckets = TokenBuckets(per_minute=60, burst=3, clock=lambda: now[0])
    assert [buckets.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("a") == pytest.approx(1.0)
    assert buckets.take("b") == 0.0  # each address has its own bucket
    now[0] += 1.0
    assert buckets.take("a") == 0.0
    now[0] += 3600.0
    assert [buckets.take("a") for _ in range(4)][-1] > 0  # refilled to the burst, not past it


def test_many_addresses_cannot_grow_the_buckets_past_their_bound() -> None:
    buckets = TokenBuckets(per_minute=1, burst=1, max_clients=100)
    for n in range(1000):
        buckets.take(f"10.0.{n // 256}.{n % 256}")
    assert len(buckets) == 100
    # The most recent addresses are the ones kept: the last one is still limited.
    assert buckets.take("10.0.3.231") > 0


def test_an_address_seen_often_keeps_its_bucket_while_others_come_and_go() -> None:
    buckets = TokenBuckets(per_minute=1, burst=1, max_clients=100)
    assert buckets.take("busy") == 0.0
    waits = []
    for n in range(1000):
        buckets.take(f"10.1.{n // 256}.{n % 256}")
        if n % 50 == 0:
            waits.append(buckets.take("busy"))
    # Never evicted (and so never handed a fresh, full bucket): limited every time.
    assert all(wait > 0 for wait in waits)


def test_an_ipv6_client_is_limited_by_its_slash_64_and_a_mapped_ipv4_as_ipv4() -> None:
    """A host usually holds a whole /64: rotating addresses inside it must not buy new
    buckets. An IPv4 client seen through a dual-stack socket shares its IPv4 bucket."""

    async def ok(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    limiter = RateLimitMiddleware(
        ok, TokenBuckets(per_minute=1, burst=1), json_rejection, "reports"
    )

    async def status(address: str) -> int:
        answered: list[int] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b""}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                answered.append(message["status"])

        scope = {"type": "http", "method": "POST", "path": "/reports", "headers": [],
                 "client": (address, 1234)}  # fmt: skip
        await limiter(scope, receive, send)
        return answered[0]

    async def run() -> list[int]:
        addresses = ["2001:db8::1", "2001:db8::2", "2001:db8::ffff:0:9", "2001:db8:0:1::1",
                     "192.0.2.7", "::ffff:192.0.2.7", "192.0.2.8"]  # fmt: skip
        return [await status(address) for address in addresses]

    assert asyncio.run(run()) == [200, 429, 429, 200, 200, 429, 200]
    assert client_key("2001:DB8::abcd:1") == "2001:db8::/64"
    assert client_key("::ffff:10.0.0.1") == "10.0.0.1"
    assert client_key("10.0.0.1") == "10.0.0.1"
    assert client_key("testclient") == "testclient"
