"""Crash processing fed from the database (issue 14), on both engines: claims under a lease,
attempts counted at the claim, the backlog; and the storage behaviour processors rely on."""

from __future__ import annotations

import asyncio
import time

from reporting_endpoint.issues.triage import StatusChange
from reporting_endpoint.records import IssueKey
from reporting_endpoint.settings import Settings
from reporting_endpoint.storage import Storage, open_storage
from reporting_endpoint.storage.base import Backlog, IssueFilters
from tests.test_storage_parity import BASE, crash, run

LEASE = 60_000


def ids(*numbers: int) -> list[str]:
    return [f"{n:032x}" for n in numbers]


def test_two_claimers_never_take_the_same_crash(database_url: str) -> None:
    """Two processes (two storages on one database) claim at once: every crash goes to
    exactly one of them."""

    async def scenario(first: Storage) -> None:
        for n in range(40):
            await first.insert_crash(crash(n, BASE + n))
        second = open_storage(database_url, Settings())
        await second.start()
        try:

            async def claim_all(storage: Storage, owner: str) -> list[str]:
                taken: list[str] = []
                for _ in range(100):
                    claim = await storage.claim_crashes(owner, 1, lease_ms=LEASE, max_attempts=3)
                    if not claim.crashes:
                        return taken
                    taken += [c.id for c in claim.crashes]
                    # Spread the claims over time, so that both claimers are still claiming
                    # when the other starts, however slow the machine (it flaked at 3 a
                    # claim and no pause: one side took all 40 before the other began).
                    await asyncio.sleep(0.02)
                raise AssertionError("claims never ran out")

            a, b = await asyncio.gather(claim_all(first, "a"), claim_all(second, "b"))
        finally:
            await second.stop()
        assert a and b, (a, b)  # both got work
        assert not set(a) & set(b)
        assert sorted(a + b) == ids(*range(40))
        # Claimed is not processed: the backlog still holds them all.
        assert (await first.processing_backlog()).pending == 40

    run(database_url, scenario)


def test_claims_take_the_oldest_first_and_leave_leased_crashes_alone(database_url: str) -> None:
    async def scenario(storage: Storage) -> None:
        for n in (3, 1, 2):
            await storage.insert_crash(crash(n, BASE + n))
        first = await storage.claim_crashes("a", 2, lease_ms=LEASE, max_attempts=3)
        assert [c.id for c in first.crashes] == ids(1, 2)
        second = await storage.claim_crashes("b", 10, lease_ms=LEASE, max_attempts=3)
        assert [c.id for c in second.crashes] == ids(3)
        assert second.crashes[0].dump_path == f"blobs/00/{3:064x}"

    run(database_url, scenario)


def test_a_dead_claimers_lease_runs_out_and_another_processor_takes_the_crash(
    database_url: str,
) -> None:
    async def scenario(storage: Storage) -> None:
        await storage.insert_crash(crash(1))
        dead = await storage.claim_crashes("dead", 5, lease_ms=300, max_attempts=3)
        assert [c.id for c in dead.crashes] == ids(1)
        # The claimer died without a result: while its lease lasts nobody else takes it.
        early = await storage.claim_crashes("alive", 5, lease_ms=LEASE, max_attempts=3)
        assert early.crashes == ()
        await asyncio.sleep(0.4)
        late = await storage.claim_crashes("alive", 5, lease_ms=LEASE, max_attempts=3)
        assert [c.id for c in late.crashes] == ids(1)
        await storage.record_crash_facts(ids(1)[0], {"signature": "s"})
        parsed = await storage.get_crash(ids(1)[0])
        assert parsed is not None and parsed["parse_status"] == "parsed"
        assert await storage.processing_backlog() == Backlog(0, None)

    run(database_url, scenario)


def test_a_crash_whose_attempts_all_end_without_a_result_is_marked_failed(
    database_url: str,
) -> None:
    """Each claim counts an attempt; when every attempt ended without a result (the dump
    killed its processor each time), the next claim marks it failed, with the reason."""

    async def scenario(storage: Storage) -> None:
        await storage.insert_crash(crash(1, BASE))
        await storage.insert_crash(crash(2, BASE + 1))
        for _ in range(3):
            claim = await storage.claim_crashes("p", 1, lease_ms=0, max_attempts=3)
            assert [c.id for c in claim.crashes] == ids(1)  # lease 0: free again at once
        last = await storage.claim_crashes("p", 1, lease_ms=LEASE, max_attempts=3)
        assert last.failed == 1
        assert [c.id for c in last.crashes] == []  # the limit was used by the failed one
        failed = await storage.get_crash(ids(1)[0])
        assert failed is not None and failed["parse_status"] == "failed"
        assert "gave up after 3 attempts" in failed["parse_error"]
        assert failed["signature"] == "unparseable dump"
        nxt = await storage.claim_crashes("p", 1, lease_ms=LEASE, max_attempts=3)
        assert [c.id for c in nxt.crashes] == ids(2)

    run(database_url, scenario)


def test_a_released_crash_is_claimed_again_at_once_with_its_attempts_kept(
    database_url: str,
) -> None:
    async def scenario(storage: Storage) -> None:
        await storage.insert_crash(crash(1))
        await storage.claim_crashes("p", 1, lease_ms=LEASE, max_attempts=2)
        await storage.release_crashes("someone else", ids(1))  # not theirs: no effect
        assert (await storage.claim_crashes("q", 1, lease_ms=LEASE, max_attempts=2)).crashes == ()
        await storage.release_crashes("p", ids(1))
        again = await storage.claim_crashes("q", 1, lease_ms=LEASE, max_attempts=2)
        assert [c.id for c in again.crashes] == ids(1)
        await storage.release_crashes("q", ids(1))
        out = await storage.claim_crashes("q", 1, lease_ms=LEASE, max_attempts=2)
        assert out.failed == 1 and out.crashes == ()

    run(database_url, scenario)


def test_the_backlog_counts_pending_crashes_and_knows_the_oldest(database_url: str) -> None:
    async def scenario(storage: Storage) -> None:
        backlog = await storage.processing_backlog()
        assert (backlog.pending, backlog.oldest_received_at) == (0, None)
        now = time.time_ns() // 1_000_000
        for n in range(3):
            await storage.insert_crash(crash(n, now + n))
        backlog = await storage.processing_backlog()
        assert (backlog.pending, backlog.oldest_received_at) == (3, now)
        await storage.record_crash_facts(ids(0)[0], {"signature": "s"})
        await storage.record_crash_failure(ids(1)[0], "not a dump")
        backlog = await storage.processing_backlog()
        assert (backlog.pending, backlog.oldest_received_at) == (1, now + 2)

    run(database_url, scenario)


def test_crash_rows_queued_together_commit_together_and_a_bad_one_fails_alone(
    database_url: str,
) -> None:
    """Crash rows share a commit under load (one fsync for many uploads); a row that cannot
    be stored (a duplicate id) fails only its own upload."""

    async def scenario(storage: Storage) -> None:
        await storage.insert_crash(crash(0))
        results = await asyncio.gather(
            *(storage.insert_crash(crash(n, BASE + n)) for n in range(1, 30)),
            storage.insert_crash(crash(0)),
            return_exceptions=True,
        )
        assert [r for r in results[:-1] if r is not None] == []
        assert isinstance(results[-1], Exception)
        assert (await storage.processing_backlog()).pending == 30

    run(database_url, scenario)


def test_a_claimer_whose_lease_ran_out_does_not_record_the_crash_again(
    database_url: str,
) -> None:
    """A's lease on a crash runs out (its batch waited behind the others), B claims and
    records it, the issue is resolved; A's late result then changes nothing: neither the
    crash nor its issue (status, history, count), and no alert event is added."""

    async def scenario(storage: Storage) -> None:
        now = time.time_ns() // 1_000_000
        key = IssueKey("native-1", "native", "EXCEPTION_ACCESS_VIOLATION | app.exe", None)
        crash_id = ids(1)[0]
        await storage.insert_crash(crash(1, now))
        late = await storage.claim_crashes("a", 5, lease_ms=0, max_attempts=3)
        assert [c.id for c in late.crashes] == [crash_id]
        taken = await storage.claim_crashes("b", 5, lease_ms=LEASE, max_attempts=3)
        assert [c.id for c in taken.crashes] == [crash_id]  # A's lease ran out
        await storage.record_crash_facts(crash_id, {"signature": "s"}, key, owner="b")
        issue = (await storage.issues_page(IssueFilters(), "count", 10)).items[0]
        resolved = await storage.set_issue_status(
            issue["id"], StatusChange("resolved", "ann"), now + 1
        )
        assert resolved is not None and resolved["status"] == "resolved"
        before = (
            await storage.get_issue(issue["id"]),
            await storage.get_crash(crash_id),
            await storage.alert_events(100),
        )

        await storage.record_crash_facts(crash_id, {"signature": "other"}, key, owner="a")
        await storage.record_crash_failure(crash_id, "not a dump", owner="a")

        after = (
            await storage.get_issue(issue["id"]),
            await storage.get_crash(crash_id),
            await storage.alert_events(100),
        )
        assert after == before
        assert after[0] is not None and (after[0]["status"], after[0]["count"]) == ("resolved", 1)
        assert after[1] is not None and after[1]["signature"] == "s"

    run(database_url, scenario)


def test_a_released_crash_gets_its_attempt_back_when_asked(database_url: str) -> None:
    """A graceful stop releases its claimed crashes (most never reached a processor) with
    the claim's attempt refunded: their attempts are as before the claim."""

    async def scenario(storage: Storage) -> None:
        for n in range(3):
            await storage.insert_crash(crash(n, BASE + n))
        for _ in range(3):  # without the refund the second claim would give up on them
            claim = await storage.claim_crashes("p", 5, lease_ms=LEASE, max_attempts=1)
            assert (claim.failed, [c.id for c in claim.crashes]) == (0, ids(0, 1, 2))
            await storage.release_crashes("p", ids(0, 1, 2), refund=True)
        await storage.release_crashes("p", ids(0), refund=True)  # not claimed: no change
        claim = await storage.claim_crashes("p", 5, lease_ms=LEASE, max_attempts=1)
        assert [c.id for c in claim.crashes] == ids(0, 1, 2)
        await storage.release_crashes("p", ids(0, 1, 2))  # no refund: the attempt counts
        out = await storage.claim_crashes("p", 5, lease_ms=LEASE, max_attempts=1)
        assert (out.failed, out.crashes) == (3, ())

    run(database_url, scenario)
