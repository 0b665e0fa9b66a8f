"""The crash processor: claims unprocessed crashes from the database, parses their dumps in
worker processes, and records their facts with the issue each crash belongs to (its
fingerprint needs the signature the parse finds).

Fed from the rows, not from memory, as Socorro's processors are: a crash is pending until a
result is recorded, so nothing is lost to a full queue or a restart. A claim leases a small
batch to this process and counts an attempt per crash (``storage.claim_crashes``): two
processors never work on one crash at once, and a crash whose attempts all ended without a
result (its dump killed the processor, or the whole process died) is marked failed after
``max_attempts``. An upload committed here wakes the processor at once; uploads committed by
other processes and hosts are found by polling.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reporting_endpoint.blobstores import BlobStore
from reporting_endpoint.issue_keys import crash_issue_key, stored_crash
from reporting_endpoint.issues.rules import RuleSet
from reporting_endpoint.native.symbol_finder import SymbolFinder
from reporting_endpoint.processing import ProcessingTimeout, ProcessorDied, ProcessorPool
from reporting_endpoint.records import IssueKey, NewCrash
from reporting_endpoint.storage.base import PendingCrash, Storage, StorageError

if TYPE_CHECKING:
    from reporting_endpoint.native.blob_cache import SymbolBlobCache
    from reporting_endpoint.native.upstream import UpstreamSymbols

log = logging.getLogger("reporting_endpoint.analysis")

# Records of crashes stored by this process, kept for their fingerprint (else read back).
REMEMBERED = 1024
# How often a processor sends back crashes whose symbols were stored while their result was
# being recorded (each committed without seeing the other; seconds).
LATE_SYMBOLS_EVERY = 60.0
# How long ``idle`` waits at most for the backlog this processor can claim to empty.
IDLE_TIMEOUT = 120.0


@dataclass(frozen=True, slots=True)
class ProcessingOptions:
    """How a processor works: ``processors`` child processes (0: this process does not
    process, another one does), how many crashes one claim takes at most, how long a claim
    lasts, how many attempts a crash gets, and how often the database is polled for work
    committed elsewhere, and how long one step on one crash may take."""

    processors: int = 1
    batch: int = 8
    lease_seconds: float = 300.0
    max_attempts: int = 3
    poll_seconds: float = 2.0
    timeout_seconds: float = 120.0


class DumpAnalyzer:
    """Claims, parses and records crashes while the service (or ``process``) runs."""

    def __init__(
        self,
        storage: Storage,
        blobs: BlobStore,
        rules: RuleSet | None = None,
        options: ProcessingOptions | None = None,
        upstream: UpstreamSymbols | None = None,
        symbol_cache: SymbolBlobCache | None = None,
    ) -> None:
        self.storage = storage
        self.blobs = blobs
        self.symbols = SymbolFinder(storage, blobs, upstream, symbol_cache)
        self.rules = rules if rules is not None else RuleSet()
        self.options = options or ProcessingOptions()
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.pool = ProcessorPool(max(1, self.options.processors), self.options.timeout_seconds)
        self.processed = 0
        self.failed = 0
        # Told the outcome of every crash this processor finishes or gives up on: "parsed",
        # "failed" (the dump could not be read), "gave_up" (out of attempts) or
        # "processor_died" (tried again); for the metrics' crash_parse_total{outcome}.
        self.on_outcome: Callable[[str], None] | None = None
        self._known: OrderedDict[str, NewCrash] = OrderedDict()
        self._wake = asyncio.Event()
        self._empty_rounds = 0
        self._isolate = 0  # crashes to run one at a time (a processor died among them)
        self._claimed: set[str] = set()  # leased to this processor, no result recorded yet
        self.task: asyncio.Task[None] | None = None

    def stored(self, crash: NewCrash) -> None:
        """The upload endpoint's callback once a crash is committed: process it now."""
        if self.options.processors <= 0:
            return
        self._known[crash.id] = crash
        while len(self._known) > REMEMBERED:
            self._known.popitem(last=False)
        self._wake.set()

    async def start(self) -> None:
        if self.options.processors > 0 and self.task is None:
            self.task = asyncio.create_task(self._run(), name="reporting-endpoint-processor")

    async def stop(self) -> None:
        """Stop claiming; crashes in flight go back to pending at once (without waiting for
        their lease) for the next start or another processor."""
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
            self.task = None
            if self._claimed:
                # Best effort: if the database is gone too, the leases run out instead.
                with contextlib.suppress(StorageError):
                    # Stopping is not the crashes' fault (most never reached a processor): their
                    # claim's attempt is given back.
                    await self.storage.release_crashes(
                        self.owner, sorted(self._claimed), refund=True
                    )
                self._claimed.clear()
        await self.pool.close()
        if self.symbols.upstream is not None:
            await self.symbols.upstream.aclose()

    async def idle(self) -> None:
        """Wait until a claim that began after this call found nothing to do (tests use it to
        observe results). Returns at once when this process does not process."""
        if self.task is None:
            return
        start = self._empty_rounds
        loop = asyncio.get_running_loop()
        deadline = loop.time() + IDLE_TIMEOUT
        # Two empty rounds: the first may have begun before this call.
        while self._empty_rounds < start + 2:
            if self.task.done() or loop.time() > deadline:
                raise TimeoutError("the crash processor did not become idle")
            self._wake.set()
            await asyncio.sleep(0.005)

    async def _run(self) -> None:
        poll = self.options.poll_seconds
        late_check = 0.0
        loop = asyncio.get_running_loop()
        while True:
            if loop.time() >= late_check:
                late_check = loop.time() + LATE_SYMBOLS_EVERY
                await self._requeue_late_symbols()
            try:
                busy = await self.run_once()
            except StorageError as exc:
                log.warning("crash processing paused: %s", exc)
                busy = False
            except Exception:
                log.exception("crash processing failed; trying again")
                busy = False
            if busy:
                continue
            self._empty_rounds += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), poll)
            self._wake.clear()

    async def _requeue_late_symbols(self) -> None:
        try:
            found = await self.storage.requeue_late_symbols()
        except Exception as exc:  # the next round tries again
            log.warning("late symbols not checked: %s", exc)
            return
        if found:
            log.info("%d crash(es) went back to processing: their symbols came late", found)

    async def run_once(self) -> bool:
        """Claim one batch and process it; False when there was nothing to claim."""
        limit = 1 if self._isolate else self.options.batch
        claim = await self.storage.claim_crashes(
            self.owner,
            limit,
            lease_ms=int(self.options.lease_seconds * 1000),
            max_attempts=self.options.max_attempts,
        )
        if claim.failed:
            self.failed += claim.failed
            for _ in range(claim.failed):
                self._outcome("gave_up")
            log.warning("%d crash(es) marked failed: out of attempts", claim.failed)
        if not claim.crashes:
            return claim.failed > 0
        self._claimed.update(pending.id for pending in claim.crashes)
        gate = asyncio.Semaphore(self.pool.size)

        async def one(pending: PendingCrash) -> str | None:
            # Only the parse holds a processor; the result is recorded after, beside the next
            # parse (and beside other results: they share a commit).
            async with gate:
                try:
                    parsed = await self.parse(pending.dump_path)
                except ProcessorDied:
                    return pending.id
            await self.record(pending.id, parsed, owner=self.owner)
            return None

        # Cancelled (stop) in the middle, the ids stay in _claimed: stop() releases them.
        outcomes = await asyncio.gather(*(one(pending) for pending in claim.crashes))
        self._claimed.difference_update(pending.id for pending in claim.crashes)
        died = [crash_id for crash_id in outcomes if crash_id is not None]
        if self._isolate:
            self._isolate = max(0, self._isolate - len(claim.crashes))
        for _ in died:
            self._outcome("processor_died")
        if died:
            # Which of them killed its processor is unknown: each is tried again, alone, so
            # that only the one that does it again uses up its attempts.
            log.warning("a processor died under %d crash(es); retrying them one by one", len(died))
            self._isolate = max(self._isolate, len(died))
            # In a batch of several, each gets back the attempt this claim counted: it may not
            # be the one at fault; alone, the attempt counts.
            await self.storage.release_crashes(self.owner, died, refund=len(claim.crashes) > 1)
        return True

    async def analyse(self, crash_id: str, dump_path: str, crash: NewCrash | None = None) -> None:
        """Parse one crash's dump in a processor and record the result (``ProcessorDied``
        when the processor died under it: nothing is recorded)."""
        await self.record(crash_id, await self.parse(dump_path), crash)

    async def parse(self, dump_path: str) -> dict[str, Any] | Exception:
        """The dump's facts, or why it could not be read (``ProcessorDied`` is raised); with
        its modules, frames, missing symbols and a signature from the frames when the stack
        could be walked."""
        try:
            # On S3 a temp download for the parse; on the folder store the blob file itself.
            async with self.blobs.local_file(dump_path) as path:
                facts = await self.pool.parse(path)
                first = facts.pop("stack", None) or {}
                modules = first.get("modules")
                if isinstance(modules, list) and modules:
                    first.update(
                        await self._stack(path, modules, str(facts.get("signature")), first)
                    )
                facts.update(first)
                return facts
        except (ProcessorDied, StorageError):
            # Not the dump's fault: the crash stays claimed and is tried again.
            raise
        except ProcessingTimeout as exc:
            return TimeoutError(str(exc))
        except Exception as exc:
            return exc

    async def _stack(
        self, path: Path, modules: list[dict[str, Any]], fallback: str, first: dict[str, Any]
    ) -> dict[str, Any]:
        """The stack walked again with the symbols found for ``modules``; ``first`` (the walk
        without symbols) when there are none or the walk with them fails or runs out of time.
        Each missing module is recorded with the symbol file the store had for it then
        (``storage.record_crash_facts``). A processor that dies here raises ``ProcessorDied``
        like one that dies parsing."""
        seen: dict[tuple[str, str], str] = {}
        stack = first
        try:
            async with self.symbols.stored(modules) as (found, seen):
                if found:
                    stack = await self.pool.stack(path, found, fallback)
                missing = stack.get("missing_symbols") or []
                if missing and self.symbols.upstream is not None:
                    fetched = await self.symbols.from_upstream(missing)
                    if fetched:
                        stack = await self.pool.stack(path, {**found, **fetched}, fallback)
        except (ProcessorDied, StorageError):
            raise
        except (Exception, ProcessingTimeout) as exc:
            log.warning("stack of %s not walked with symbols (%s); the walk without is kept",
                        path, exc)  # fmt: skip
            stack = first
        return {
            **stack,
            "missing_symbols": [
                [*entry[:3], seen.get((entry[0], entry[1]))]
                for entry in stack.get("missing_symbols") or []
            ],
        }

    async def record(
        self,
        crash_id: str,
        parsed: dict[str, Any] | Exception,
        crash: NewCrash | None = None,
        *,
        owner: str | None = None,
    ) -> None:
        """Record the result; with ``owner`` (a claim's), only if the crash is still pending
        and leased to it (a lease that ran out may have let another processor record it)."""
        if isinstance(parsed, Exception):
            log.info("crash %s: dump not parsed: %s", crash_id, parsed)
            await self.storage.record_crash_failure(
                crash_id, f"{type(parsed).__name__}: {parsed}", owner=owner
            )
            self.processed += 1
            self._outcome("failed")
            return
        crash = crash or self._known.pop(crash_id, None)
        if crash is None:
            # Stored by another process, or before a restart: its fields from the row.
            row = await self.storage.get_crash(crash_id)
            if row is None:
                return  # deleted meanwhile
            crash = stored_crash(row)
        await self.storage.record_crash_facts(
            crash_id, parsed, issue=self._issue(crash, parsed), owner=owner
        )
        self.processed += 1
        self._outcome("parsed")

    def _outcome(self, outcome: str) -> None:
        if self.on_outcome is not None:
            try:
                self.on_outcome(outcome)
            except Exception:
                log.exception("the crash outcome callback failed")

    def _issue(self, crash: NewCrash, facts: Mapping[str, Any]) -> IssueKey | None:
        # Rules run here, not in the storage, so that a rules file never runs inside a write
        # transaction.
        signature = facts.get("signature")
        try:
            return crash_issue_key(
                self.rules, crash, signature if isinstance(signature, str) else None
            )
        except Exception:
            # A failing rule must not stop processing (every later dump would stay pending):
            # the facts are recorded, the crash without an issue until a regroup.
            log.exception("crash %s: fingerprint rules failed", crash.id)
            return None
