"""The alert outbox in storage, the same on both engines, through the protocol only.

What ingest records (a new issue, a regression) in its own transaction, the evaluator that
turns it into throttled alerts, the counter rules (threshold, rate, digest), and the leases,
retries and delivery log of the outbox.
"""

from __future__ import annotations

import asyncio
import time

import orjson

from reporting_endpoint.alerts.channels import Result
from reporting_endpoint.alerts.outbox import Evaluator, new_alert
from reporting_endpoint.alerts.rules import (
    AlertConfig,
    Delivery,
    Filter,
    Rule,
    WebhookChannel,
)
from reporting_endpoint.alerts.sender import Sender, next_step
from reporting_endpoint.issues.triage import StatusChange
from reporting_endpoint.records import IssueKey
from reporting_endpoint.storage import Storage
from reporting_endpoint.storage.alert_store import DeliveryAttempt
from tests.alert_receivers import HttpReceiver
from tests.test_issues_storage import rep
from tests.test_storage_parity import report, run

HOUR = 3_600_000
CHANNEL = WebhookChannel("hook", "http://127.0.0.1:9/hook", "s3cret")


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def config(*rules: Rule) -> AlertConfig:
    return AlertConfig(rules=rules, channels=(CHANNEL,))


def rule(name: str, trigger: str, **extra: object) -> Rule:
    return Rule(name, trigger, ("hook",), **extra)  # type: ignore[arg-type]


async def alerts(storage: Storage) -> list[dict[str, object]]:
    page = await storage.alerts_page(100)
    return list(reversed(page.items))


def test_new_issue_and_regression_are_recorded_and_alerted_once(database_url: str) -> None:
    async def scenario(storage: Storage) -> None:
        now = now_ms()
        await storage.submit_reports([rep(now, "a"), rep(now + 1, "a"), rep(now + 2, "b")])
        events = await storage.alert_events(100)
        assert [(e.trigger, e.issue["title"] if e.issue else None) for e in events] == [
            ("new_issue", "Issue a"),
            ("new_issue", "Issue b"),
        ]
        evaluator = Evaluator(
            storage,
            config(rule("new", "new_issue"), rule("back", "regressed")),
            "https://r.example/",
        )
        assert await evaluator.events(now) == 2
        assert await storage.alert_events(100) == ()
        # More events of known issues record nothing: no per-report cost, no alert.
        await storage.submit_reports([rep(now + 3, "a") for _ in range(50)])
        assert await storage.alert_events(100) == ()
        queued = await alerts(storage)
        assert [(a["rule"], a["trigger"], a["status"]) for a in queued] == [
            ("new", "new_issue", "pending"),
            ("new", "new_issue", "pending"),
        ]
        first = queued[0]["alert"]
        assert isinstance(first, dict)
        issue_id = first["issue"]["id"]
        assert first["link"] == f"https://r.example/dashboard/issues/{issue_id}"
        assert first["title"] == "New issue: Issue a"

        await storage.set_issue_status(issue_id, StatusChange("resolved", "api"), now + 4)
        await storage.submit_reports([rep(now + 5, "a")])
        events = await storage.alert_events(100)
        assert [(e.trigger, e.issue_id) for e in events] == [("regressed", issue_id)]
        assert await evaluator.events(now + 6) == 1
        last = (await alerts(storage))[-1]
        assert (last["rule"], last["trigger"], last["issue_id"]) == ("back", "regressed", issue_id)

        # Regrouping makes new issues of old events: nothing to alert about.
        moved = await storage.regroup(
            lambda r: IssueKey("regrouped-" + str(r["type"]), str(r["type"]), "Regrouped", None),
            lambda c: None,
        )
        assert moved > 0
        assert await storage.alert_events(100) == ()

    run(database_url, scenario)


def test_filters_throttle_and_two_evaluators(database_url: str) -> None:
    async def scenario(storage: Storage) -> None:
        now = now_ms()
        await storage.submit_reports(
            [
                rep(now, "oom", url="https://a.example/x", reason="oom"),
                rep(now, "dep", kind="deprecation", site="b.example", reason=None),
            ]
        )
        # No throttle: only consuming the event in the queueing transaction stops a double.
        crashes_only = rule(
            "oom-on-a",
            "new_issue",
            filter=Filter(kind=("crash",), reason=("oom",)),
            throttle_ms=0,
        )
        # Two evaluators (two workers) over the same events: each event is queued once.
        one = Evaluator(storage, config(crashes_only), None)
        two = Evaluator(storage, config(crashes_only), None)
        counts = await asyncio.gather(one.events(now), two.events(now))
        assert sum(counts) == 1
        queued = await alerts(storage)
        assert [a["issue_id"] for a in queued] == [queued[0]["issue_id"]]
        alert = queued[0]["alert"]
        assert isinstance(alert, dict)
        assert alert["link"] is None and alert["path"].startswith("/dashboard/issues/")

    run(database_url, scenario)


def test_a_throttled_rule_sends_one_alert_per_window(database_url: str) -> None:
    async def scenario(storage: Storage) -> None:
        now = now_ms()
        await storage.submit_reports([rep(now - i, "storm") for i in range(300)])
        spike = rule("spike", "threshold", events=100, window_hours=1, throttle_ms=HOUR)
        evaluator = Evaluator(storage, config(spike), None)
        assert await evaluator.counters(now) == 1
        # Still over the threshold, within the throttle: nothing more.
        await storage.submit_reports([rep(now + 1, "storm") for _ in range(100)])
        assert await evaluator.counters(now + 60_000) == 0
        # After the throttle, still over it: one more.
        assert await evaluator.counters(now + HOUR + 1) == 1
        texts = [a["alert"]["text"] for a in await alerts(storage)]  # type: ignore[index]
        assert texts[0] == "300 events in the last 1 h (more than 100)"
        # Under the threshold, or not the kind or site the rule watches: no alert.
        quiet = rule("quiet", "threshold", events=10_000, window_hours=1)
        assert await Evaluator(storage, config(quiet), None).counters(now) == 0
        other = rule("deprecations", "threshold", events=100, filter=Filter(kind=("deprecation",)))
        assert await Evaluator(storage, config(other), None).counters(now) == 0
        elsewhere = rule("b-site", "threshold", events=100, filter=Filter(site=("b.example",)))
        assert await Evaluator(storage, config(elsewhere), None).counters(now) == 0
        here = rule("a-site", "threshold", events=100, filter=Filter(site=("a.example",)))
        assert await Evaluator(storage, config(here), None).counters(now) == 1

    run(database_url, scenario)


def test_rate_rule_compares_with_the_usual_hourly_volume(database_url: str) -> None:
    async def scenario(storage: Storage) -> None:
        now = now_ms()
        hour = now // HOUR * HOUR
        # Ten hours of 5 CSP reports an hour, then 100 this hour.
        usual = [
            report(hour - h * HOUR + 1, kind="csp-violation", reason=None)
            for h in range(1, 11)
            for _ in range(5)
        ]
        await storage.submit_reports(usual)
        surge = rule(
            "csp-surge", "rate", filter=Filter(kind=("csp-violation",)), factor=5.0,
            window_hours=1, baseline_hours=10, min_events=10,
        )  # fmt: skip
        evaluator = Evaluator(storage, config(surge), None)
        await storage.submit_reports(
            [report(hour + 1, kind="csp-violation", reason=None) for _ in range(20)]
        )
        assert await evaluator.counters(hour + 2) == 0  # 20 is not more than 5 x 5
        await storage.submit_reports(
            [report(hour + 1, kind="csp-violation", reason=None) for _ in range(80)]
        )
        assert await evaluator.counters(hour + 3) == 1
        text = (await alerts(storage))[0]["alert"]["text"]  # type: ignore[index]
        assert (
            text == "100 csp-violation reports in the last 1 h, usually 5.0 (5 times is the limit)"
        )

    run(database_url, scenario)


def test_daily_digest_once_a_day_after_its_time(database_url: str) -> None:
    async def scenario(storage: Storage) -> None:
        now = now_ms()
        await storage.submit_reports([rep(now - 1000, "x"), rep(now - 900, "x"), rep(now, "y")])
        day = now // 86_400_000 * 86_400_000
        digest = rule("daily", "digest", digest_minute=9 * 60, top=5)
        evaluator = Evaluator(storage, config(digest), None)
        assert await evaluator.counters(day + 8 * HOUR) == 0  # before 09:00 UTC
        assert await evaluator.counters(day + 9 * HOUR) == 1
        assert await evaluator.counters(day + 15 * HOUR) == 0  # once that day
        queued = await alerts(storage)
        body = queued[0]["alert"]
        assert isinstance(body, dict)
        assert body["title"].startswith("Daily digest ")
        assert "digest" in body and set(body["digest"]) == {"new", "regressed", "top"}

    run(database_url, scenario)


def test_claims_are_exclusive_and_attempts_are_logged(database_url: str) -> None:
    async def scenario(storage: Storage) -> None:
        now = now_ms()
        await storage.submit_reports([rep(now, "a")])
        await Evaluator(storage, config(rule("new", "new_issue")), None).events(now)
        first = await storage.claim_alerts("sender-1", 10, 60_000, now)
        second = await storage.claim_alerts("sender-2", 10, 60_000, now)
        assert len(first) == 1 and second == ()
        alert = first[0]
        delivery = Delivery(retry_initial_ms=1000, retry_max_ms=4000, max_attempts=3)
        outcome, due = next_step(delivery, alert, Result(False, 503, "HTTP 503"), now)
        assert outcome == "retry" and now + 1000 <= due <= now + 1100
        await storage.record_deliveries(
            [DeliveryAttempt(alert.id, 1, now, outcome, 503, "HTTP 503", 5, due)]
        )
        # Not due yet; then due again, with the same key.
        assert await storage.claim_alerts("sender-2", 10, 60_000, now + 10) == ()
        again = await storage.claim_alerts("sender-2", 10, 60_000, due)
        assert [(a.id, a.key, a.attempts) for a in again] == [(alert.id, alert.key, 1)]
        await storage.record_deliveries(
            [DeliveryAttempt(alert.id, 2, due, "delivered", 204, None, 3, due)]
        )
        assert await storage.claim_alerts("sender-2", 10, 60_000, due + HOUR) == ()
        page = await storage.alert_deliveries_page(10)
        assert [(d["attempt"], d["outcome"], d["status_code"]) for d in page.items] == [
            (2, "delivered", 204),
            (1, "retry", 503),
        ]
        listed = (await storage.alerts_page(10)).items[0]
        assert (listed["status"], listed["attempts"]) == ("delivered", 2)
        assert orjson.dumps(listed)  # JSON-ready

        # A lease that ends (its sender died) lets another sender take the row.
        await storage.submit_reports([rep(now, "b")])
        await Evaluator(storage, config(rule("new", "new_issue")), None).events(now)
        taken = await storage.claim_alerts("dies", 10, 1000, now)
        assert len(taken) == 1
        assert await storage.claim_alerts("other", 10, 1000, now + 999) == ()
        assert [a.key for a in await storage.claim_alerts("other", 10, 1000, now + 1000)] == [
            taken[0].key
        ]

    run(database_url, scenario)


def test_retries_end_failed_when_attempts_or_time_run_out() -> None:
    delivery = Delivery(retry_initial_ms=1000, retry_max_ms=2000, max_attempts=3,
                        give_up_after_ms=10_000)  # fmt: skip
    from reporting_endpoint.storage.alert_store import OutboxAlert

    fresh = OutboxAlert(1, "k", "r", "c", "new_issue", 1, "{}", 0, 0)
    fail = Result(False, None, "refused")
    assert next_step(delivery, fresh, fail, 0)[0] == "retry"
    third = OutboxAlert(1, "k", "r", "c", "new_issue", 1, "{}", 2, 0)
    assert next_step(delivery, third, fail, 0)[0] == "failed"
    late = OutboxAlert(1, "k", "r", "c", "new_issue", 1, "{}", 0, 0)
    assert next_step(delivery, late, fail, 9_500)[0] == "failed"
    assert next_step(delivery, third, Result(True, 200), 0)[0] == "delivered"


def test_a_dead_receiver_gets_one_probe_at_a_time(database_url: str) -> None:
    """After a round where the receiver does not answer, the sender tries one alert per
    backoff instead of every alert; the others wait untried and flow once it answers."""
    receiver = HttpReceiver()  # not started yet: connections are refused
    hook = WebhookChannel("hook", receiver.url("/hook"), "s3cret")
    settings = AlertConfig(
        rules=(rule("new", "new_issue", throttle_ms=0),),
        channels=(hook,),
        delivery=Delivery(retry_initial_ms=100, retry_max_ms=200, timeout_ms=2000),
    )

    async def scenario(storage: Storage) -> None:
        now = now_ms()
        await storage.submit_reports([rep(now, f"issue-{n}") for n in range(30)])
        assert await Evaluator(storage, settings, None).events(now) == 30
        sender = Sender(storage, settings, "sender-1")
        assert await sender.run_once() == 30  # the first round tries them all
        for _ in range(10):
            await asyncio.sleep(0.1)
            await sender.run_once()
        log = (await storage.alert_deliveries_page(500)).items
        assert 30 < len(log) <= 40, len(log)  # then about one probe per 100-200 ms
        assert {a["status"] for a in (await storage.alerts_page(100)).items} == {"pending"}
        receiver.start()
        try:
            for _ in range(50):
                await asyncio.sleep(0.1)
                await sender.run_once()
                if not (await storage.alerts_page(1, status="pending")).items:
                    break
            delivered = (await storage.alerts_page(100, status="delivered")).items
            assert len(delivered) == 30
            keys = sorted(r.headers["Idempotency-Key"] for r in receiver.at("/hook"))
            assert keys == sorted(str(a["idempotency_key"]) for a in delivered)
        finally:
            receiver.stop()
            await sender.close()

    run(database_url, scenario)


def test_one_round_queues_one_alert_per_rule_and_scope(database_url: str) -> None:
    async def scenario(storage: Storage) -> None:
        now = now_ms()
        spike = rule("spike", "threshold", events=1)
        first = new_alert(spike, "issue:1", "Spike", "first", now)
        again = new_alert(spike, "issue:1", "Spike", "again", now)
        other = new_alert(spike, "issue:2", "Spike", "other", now)
        unthrottled = new_alert(rule("all", "threshold", events=1, throttle_ms=0), "issue:1",
                                "Spike", "unthrottled", now)  # fmt: skip
        assert await storage.queue_alerts([first, again, other, unthrottled], (), now) == 3
        texts = [a["alert"]["text"] for a in await alerts(storage)]  # type: ignore[index]
        assert texts == ["first", "other", "unthrottled"]
        assert await storage.queue_alerts([again], (), now + 1) == 0

    run(database_url, scenario)


def test_an_attempt_is_bounded_as_a_whole_not_per_read(database_url: str) -> None:
    """A receiver that answers a byte at a time never trips a per-read timeout; the attempt
    as a whole still ends (at twice the timeout), failed, well inside the row's lease."""
    import socket
    import threading

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    stop = threading.Event()

    def drip() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.recv(65536)
                for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n":
                    if stop.is_set():
                        break
                    time.sleep(0.1)  # under the 300 ms per-read timeout, every time
                    try:
                        conn.sendall(bytes([byte]))
                    except OSError:
                        break

    thread = threading.Thread(target=drip, daemon=True)
    thread.start()
    hook = WebhookChannel("hook", f"http://127.0.0.1:{port}/hook", "s3cret")
    settings = AlertConfig(
        rules=(rule("new", "new_issue", throttle_ms=0),),
        channels=(hook,),
        delivery=Delivery(retry_initial_ms=60_000, retry_max_ms=60_000, timeout_ms=300),
    )

    async def scenario(storage: Storage) -> None:
        now = now_ms()
        await storage.submit_reports([rep(now, "slow")])
        assert await Evaluator(storage, settings, None).events(now) == 1
        sender = Sender(storage, settings, "sender-1")
        started = time.monotonic()
        try:
            assert await sender.run_once() == 1
        finally:
            await sender.close()
        took = time.monotonic() - started
        assert took < 1.5, took  # 39 bytes at 0.1 s would take 3.9 s
        [attempt] = (await storage.alert_deliveries_page(10)).items
        assert attempt["outcome"] != "delivered"
        assert "twice the timeout" in (attempt["error"] or "")

    try:
        run(database_url, scenario)
    finally:
        stop.set()
        thread.join(5)
        listener.close()
