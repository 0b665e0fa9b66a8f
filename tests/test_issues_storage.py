"""Issues in storage (issue 11), the same on every backend, through the protocol only.

Reports carry their fingerprint (ingest computes it); the storage keeps issues, their counters
and their triage state in the insert's transaction. No SQL here: a backend passes by
implementing ``Storage``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from reporting_endpoint.issues.triage import StatusChange
from reporting_endpoint.records import IssueKey, NewReport
from reporting_endpoint.storage import Storage
from reporting_endpoint.storage.base import IssueFilters
from tests.test_storage_parity import BASE, HOUR, crash, report, run

WINDOW = IssueFilters(since=BASE, until=BASE + 3 * HOUR)


def rep(received_at: int, fingerprint: str, release: str | None = None, **extra: Any) -> NewReport:
    return report(
        received_at,
        fingerprint=fingerprint,
        issue_title=f"Issue {fingerprint}",
        release=release,
        **extra,
    )


async def only(storage: Storage, filters: IssueFilters = WINDOW) -> dict[str, Any]:
    page = await storage.issues_page(filters, "count", 10)
    assert len(page.items) == 1, page.items
    return page.items[0]


async def by_fingerprint(storage: Storage, filters: IssueFilters = WINDOW) -> dict[str, Any]:
    page = await storage.issues_page(filters, "count", 100)
    assert page.next is None
    return {item["fingerprint"]: item for item in page.items}


def test_reports_are_grouped_by_fingerprint_with_counters(database_url: str) -> None:
    async def scenario(storage: Storage) -> None:
        await storage.submit_reports(
            [
                rep(BASE + 1, "a", "1.9", url="https://a.example/app/123"),
                rep(BASE + 2, "a", "1.10", browser="Firefox", browser_major="130"),
                rep(BASE + 2 * HOUR, "a", None, os="Windows"),
                rep(BASE + 5, "b", kind="deprecation", site="b.example", reason=None),
                report(BASE + 6),  # no fingerprint: no issue
            ]
        )
        issues = await by_fingerprint(storage)
        assert sorted(issues) == ["a", "b"]
        a = issues["a"]
        assert a["kind"] == "crash" and a["title"] == "Issue a" and a["site"] == "a.example"
        assert a["status"] == "unresolved"
        assert (a["count"], a["window_count"], a["previous_count"]) == (3, 3, 0)
        assert a["change"] is None
        assert a["series"] == [2, 0, 1]
        assert a["first_seen"] == "2023-11-14T22:00:00.001Z"
        assert a["last_seen"] == "2023-11-15T00:00:00.000Z"
        # Releases in version order, not arrival order: 1.10 is newer than 1.9.
        assert (a["first_release"], a["last_release"]) == ("1.9", "1.10")
        assert a["browsers"] == [
            {"value": "Chrome", "count": 2},
            {"value": "Firefox", "count": 1},
        ]
        assert a["os"] == [{"value": "Linux", "count": 2}, {"value": "Windows", "count": 1}]
        assert issues["b"]["kind"] == "deprecation"
        assert issues["b"]["count"] == 1

        one = await storage.get_issue(a["id"], BASE, BASE + 3 * HOUR)
        assert one is not None
        assert {k: one[k] for k in a} == a
        breakdowns = one["breakdowns"]
        assert breakdowns["release"] == [
            {"value": "1.10", "count": 1},
            {"value": "1.9", "count": 1},
        ]
        assert breakdowns["browser_major"][0] == {"value": "140", "count": 2}
        assert {v["value"] for v in breakdowns["path"]} == {"/page", "/app/*"}
        assert one["history"] == []
        assert await storage.get_issue(10**9) is None

        first = await storage.issue_events(a["id"], 2)
        assert [e["received_at"] for e in first.items] == [
            "2023-11-15T00:00:00.000Z",
            "2023-11-14T22:00:00.002Z",
        ]
        assert first.next is not None
        rest = await storage.issue_events(a["id"], 2, first.next)
        assert [e["received_at"] for e in rest.items] == ["2023-11-14T22:00:00.001Z"]
        assert rest.next is None
        assert rest.items[0]["type"] == "crash" and "body" in rest.items[0]

    run(database_url, scenario)


def test_window_previous_change_and_sorts(database_url: str) -> None:
    async def scenario(storage: Storage) -> None:
        previous, current = BASE - 2 * HOUR, BASE + HOUR
        await storage.submit_reports(
            [rep(previous, "x"), *[rep(current + n, "x") for n in range(3)]]
            + [rep(previous + n, "y") for n in range(4)]
            + [rep(current + n, "y") for n in range(2)]
            + [rep(current, "z")]
            + [rep(previous, "gone")]
        )
        window = IssueFilters(since=BASE, until=BASE + 3 * HOUR)
        issues = await by_fingerprint(storage, window)
        # "gone" had no event in the window: left out unless a status is asked for.
        assert sorted(issues) == ["x", "y", "z"]
        assert (issues["x"]["window_count"], issues["x"]["previous_count"]) == (3, 1)
        assert issues["x"]["change"] == 2.0
        assert issues["y"]["change"] == -0.5
        assert issues["z"]["change"] is None
        assert issues["y"]["count"] == 6

        async def order(sort: Any, filters: IssueFilters = window) -> list[str]:
            page = await storage.issues_page(filters, sort, 10)
            return [item["fingerprint"] for item in page.items]

        assert await order("count") == ["x", "y", "z"]
        assert await order("trend") == ["x", "z", "y"]
        # Newest first; x and y were first seen at the same time: the newer id first.
        assert await order("first_seen") == ["z", "y", "x"]
        assert await order("last_seen") == ["x", "y", "z"]
        with_status = IssueFilters(status="unresolved", since=BASE, until=BASE + 3 * HOUR)
        assert sorted(await order("count", with_status)) == ["gone", "x", "y", "z"]
        assert (await order("count", with_status))[-1] == "gone"

    run(database_url, scenario)


def test_filters_and_paging(database_url: str) -> None:
    async def scenario(storage: Storage) -> None:
        await storage.submit_reports(
            [rep(BASE + n, f"i{n}", f"1.{n}") for n in range(5)]
            + [rep(BASE + 10, "ff", browser="Firefox", os="Mac OS X", site="b.example")]
            + [rep(BASE + 11, "nel", kind="network-error", reason=None)]
        )
        everything = await by_fingerprint(storage)
        assert len(everything) == 7

        async def fingerprints(filters: IssueFilters) -> set[str]:
            page = await storage.issues_page(filters, "count", 100)
            return {item["fingerprint"] for item in page.items}

        assert await fingerprints(IssueFilters(kind="network-error", since=BASE)) == {"nel"}
        assert await fingerprints(IssueFilters(site="b.example", since=BASE)) == {"ff"}
        assert await fingerprints(IssueFilters(release="1.3", since=BASE)) == {"i3"}
        assert await fingerprints(IssueFilters(browser="Firefox", since=BASE)) == {"ff"}
        assert await fingerprints(IssueFilters(os="Mac OS X", since=BASE)) == {"ff"}
        assert await fingerprints(IssueFilters(status="resolved", since=BASE)) == set()

        for sort in ("count", "last_seen", "first_seen", "trend"):
            seen: list[str] = []
            after = None
            while True:
                page = await storage.issues_page(
                    IssueFilters(since=BASE, until=BASE + HOUR), sort, 3, after
                )
                seen.extend(item["fingerprint"] for item in page.items)
                if page.next is None:
                    break
                after = page.next
            assert sorted(seen) == sorted(everything), sort
            assert len(seen) == len(set(seen))

    run(database_url, scenario)


async def _status_of(storage: Storage, issue_id: int) -> str:
    issue = await storage.get_issue(issue_id)
    assert issue is not None
    return str(issue["status"])


def test_triage_cycle_resolve_then_regress(database_url: str) -> None:
    async def scenario(storage: Storage) -> None:
        now = time.time_ns() // 1_000_000
        await storage.submit_reports([rep(now, "a")])
        issue_id = (await only(storage, IssueFilters()))["id"]
        resolved = await storage.set_issue_status(
            issue_id, StatusChange("resolved", "ann", "fixed in the deploy"), now
        )
        assert resolved is not None and resolved["status"] == "resolved"
        assert await storage.set_issue_status(10**9, StatusChange("resolved", "ann"), now) is None
        await storage.submit_reports([rep(now + 1, "a")])
        assert await _status_of(storage, issue_id) == "regressed"
        issue = await storage.get_issue(issue_id)
        assert issue is not None
        history = [(h["actor"], h["from"], h["to"]) for h in issue["history"]]
        assert history == [("ann", "unresolved", "resolved"), ("system", "resolved", "regressed")]
        assert issue["history"][0]["reason"] == "fixed in the deploy"
        assert issue["history"][1]["reason"]
        assert issue["history"][0]["at"] is not None

    run(database_url, scenario)


def test_resolved_in_release_regresses_only_on_newer(database_url: str) -> None:
    async def scenario(storage: Storage) -> None:
        now = time.time_ns() // 1_000_000
        await storage.submit_reports([rep(now, "a", "1.1")])
        issue_id = (await only(storage, IssueFilters()))["id"]
        change = StatusChange("resolved", "ann", resolved_in_release="1.2")
        issue = await storage.set_issue_status(issue_id, change, now)
        assert issue is not None and issue["resolved_in_release"] == "1.2"
        await storage.submit_reports([rep(now + 1, "a", "1.1"), rep(now + 2, "a", None)])
        assert await _status_of(storage, issue_id) == "resolved"
        await storage.submit_reports([rep(now + 3, "a", "1.3")])
        assert await _status_of(storage, issue_id) == "regressed"
        issue = await storage.get_issue(issue_id)
        assert issue is not None
        assert issue["count"] == 4 and issue["last_release"] == "1.3"
        assert issue["history"][0]["resolved_in_release"] == "1.2"

    run(database_url, scenario)


def test_ignore_until_more_events_and_until_a_time(database_url: str) -> None:
    async def scenario(storage: Storage) -> None:
        now = time.time_ns() // 1_000_000
        await storage.submit_reports([rep(now, "a"), rep(now, "b")])
        ids = {k: v["id"] for k, v in (await by_fingerprint(storage, IssueFilters())).items()}
        ignored = await storage.set_issue_status(
            ids["a"], StatusChange("ignored", "ann", ignore_more_events=5), now
        )
        assert ignored is not None
        assert (ignored["status"], ignored["ignore_until_count"]) == ("ignored", 6)
        await storage.submit_reports([rep(now + n, "a") for n in range(4)])
        assert await _status_of(storage, ids["a"]) == "ignored"
        await storage.submit_reports([rep(now + 10, "a")])
        assert await _status_of(storage, ids["a"]) == "unresolved"

        # Ignored until a time already past: the next event ends it.
        await storage.set_issue_status(
            ids["b"], StatusChange("ignored", "ann", ignore_until_ms=now - 1), now
        )
        b = await storage.get_issue(ids["b"])
        assert b is not None and b["ignore_until"] is not None and b["status"] == "ignored"
        await storage.submit_reports([rep(now + 11, "b")])
        assert await _status_of(storage, ids["b"]) == "unresolved"
        # Ignored for ever: stays ignored; reopening is recorded.
        await storage.set_issue_status(ids["b"], StatusChange("ignored", "ann"), now)
        await storage.submit_reports([rep(now + 12, "b") for _ in range(3)])
        assert await _status_of(storage, ids["b"]) == "ignored"
        reopened = await storage.set_issue_status(
            ids["b"], StatusChange("unresolved", "bob", "look again"), now
        )
        assert reopened is not None
        assert [h["to"] for h in reopened["history"]] == [
            "ignored",
            "unresolved",
            "ignored",
            "unresolved",
        ]

    run(database_url, scenario)


def test_regroup_recomputes_and_keeps_surviving_triage(database_url: str) -> None:
    async def scenario(storage: Storage) -> None:
        now = time.time_ns() // 1_000_000
        await storage.submit_reports(
            [
                rep(now, "old-a", site="a.example"),
                rep(now + 1, "old-b", site="a.example"),
                rep(now + 2, "keep", site="k.example", kind="deprecation", reason=None),
            ]
        )
        ids = {k: v["id"] for k, v in (await by_fingerprint(storage, IssueFilters())).items()}
        await storage.set_issue_status(ids["keep"], StatusChange("resolved", "ann"), now)

        def report_key(stored: Mapping[str, Any]) -> IssueKey:
            assert "raw" in stored
            if stored["type"] == "deprecation":
                return IssueKey("keep", "deprecation", "Kept", stored["site"])
            return IssueKey(f"site:{stored['site']}", stored["type"], "By site", stored["site"])

        def crash_key(stored: Mapping[str, Any]) -> IssueKey | None:
            return None

        moved = await storage.regroup(report_key, crash_key)
        assert moved == 2
        after = await by_fingerprint(storage, IssueFilters(status="unresolved"))
        assert sorted(after) == ["site:a.example"]
        assert after["site:a.example"]["count"] == 2
        assert await storage.get_issue(ids["old-a"]) is None  # no event left
        kept = await storage.get_issue(ids["keep"])
        assert kept is not None
        assert (kept["status"], kept["count"], kept["title"]) == ("resolved", 1, "Kept")
        assert [h["to"] for h in kept["history"]] == ["resolved"]
        events = await storage.issue_events(after["site:a.example"]["id"], 10)
        assert len(events.items) == 2
        assert await storage.regroup(report_key, crash_key) == 0  # idempotent

    run(database_url, scenario)


def test_deletion_and_prune_keep_issue_counts_exact(database_url: str) -> None:
    async def scenario(storage: Storage) -> None:
        await storage.submit_reports(
            [rep(BASE + n, "a", "1.0") for n in range(3)]
            + [rep(BASE + HOUR, "a", "2.0", browser="Firefox")]
            + [rep(BASE + 2 * HOUR, "b")]
        )
        issues = await by_fingerprint(storage)
        a_id = issues["a"]["id"]
        events = await storage.issue_events(a_id, 10)
        newest = events.items[0]
        assert await storage.delete_report(newest["id"])
        a = await storage.get_issue(a_id, BASE, BASE + 3 * HOUR)
        assert a is not None
        assert (a["count"], a["window_count"], a["series"]) == (3, 3, [3, 0, 0])
        assert a["last_seen"] == "2023-11-14T22:00:00.002Z"
        assert a["last_release"] == "1.0"
        assert a["browsers"] == [{"value": "Chrome", "count": 3}]
        assert a["breakdowns"]["release"] == [{"value": "1.0", "count": 3}]

        await storage.prune(BASE + 1, crashes=False)  # takes the first report of "a"
        a = await storage.get_issue(a_id, BASE, BASE + 3 * HOUR)
        assert a is not None
        assert (a["count"], a["series"]) == (2, [2, 0, 0])
        assert a["first_seen"] == "2023-11-14T22:00:00.001Z"

        await storage.prune(BASE + HOUR)  # every event of "a" is gone: so is the issue
        assert await storage.get_issue(a_id) is None
        left = await by_fingerprint(storage)
        assert sorted(left) == ["b"] and left["b"]["count"] == 1

    run(database_url, scenario)


def test_crash_issues_come_with_their_facts(database_url: str) -> None:
    async def scenario(storage: Storage) -> None:
        now = time.time_ns() // 1_000_000
        key = IssueKey("native-1", "native", "EXCEPTION_ACCESS_VIOLATION | app.exe", None)
        await storage.insert_crash(crash(1, now, release="3.1"))
        await storage.insert_crash(crash(2, now + 1, release="3.2"))
        await storage.insert_crash(crash(3, now + 2))
        await storage.record_crash_facts(f"{1:032x}", {"os": "Windows NT", "signature": "s"}, key)
        await storage.record_crash_facts(f"{2:032x}", {"os": "Linux", "signature": "s"}, key)
        await storage.record_crash_facts(f"{3:032x}", {"signature": "s"})  # no issue
        issue = await only(storage, IssueFilters())
        assert (issue["kind"], issue["count"], issue["title"]) == ("native", 2, key.title)
        assert (issue["first_release"], issue["last_release"]) == ("3.1", "3.2")
        assert {o["value"] for o in issue["os"]} == {"Windows NT", "Linux"}
        events = await storage.issue_events(issue["id"], 10)
        assert [e["id"] for e in events.items] == [f"{2:032x}", f"{1:032x}"]
        assert events.items[0]["signature"] == "s"
        # Parsed again (a re-run of the analysis): counted once, not twice.
        await storage.record_crash_facts(f"{2:032x}", {"os": "Linux", "signature": "s"}, key)
        again = await storage.get_issue(issue["id"])
        assert again is not None and again["count"] == 2

        await storage.delete_crash(f"{1:032x}")
        left = await storage.get_issue(issue["id"])
        assert left is not None
        assert (left["count"], left["first_release"]) == (1, "3.2")
        await storage.delete_crash(f"{2:032x}")
        assert await storage.get_issue(issue["id"]) is None

    run(database_url, scenario)
