"""Parses stored minidumps off the event loop and records their facts on the crash row, with
the issue the crash belongs to (its fingerprint needs the signature the parse finds)."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from reporting_endpoint.blobstores import BlobStore
from reporting_endpoint.issue_keys import crash_issue_key, stored_crash
from reporting_endpoint.issues.rules import RuleSet
from reporting_endpoint.minidump import parse_dump
from reporting_endpoint.records import NewCrash
from reporting_endpoint.storage.base import Storage, StorageError

log = logging.getLogger("reporting_endpoint.analysis")

QUEUE_SIZE = 10000


class DumpAnalyzer:
    """A background task: every stored dump is parsed once; a failure is recorded, the upload
    itself is never touched. Rows still ``pending`` at start (the process died between the
    answer and the parse) are picked up again."""

    def __init__(self, storage: Storage, blobs: BlobStore, rules: RuleSet | None = None) -> None:
        self.storage = storage
        self.blobs = blobs
        self.rules = rules if rules is not None else RuleSet()
        self.queue: asyncio.Queue[tuple[str, str, NewCrash | None]] | None = None
        self.task: asyncio.Task[None] | None = None

    def submit(self, crash_id: str, dump_path: str, crash: NewCrash | None = None) -> None:
        """Parse this crash's dump; ``crash`` is its record when the caller has it (else the
        row is read back for the fingerprint)."""
        if self.queue is None:
            return
        with contextlib.suppress(asyncio.QueueFull):  # still 'pending': parsed at next start
            self.queue.put_nowait((crash_id, dump_path, crash))

    def stored(self, crash: NewCrash) -> None:
        """The upload endpoint's callback once a crash is committed."""
        self.submit(crash.id, crash.dump_path, crash)

    async def start(self) -> None:
        self.queue = asyncio.Queue(QUEUE_SIZE)
        for pending in await self.storage.pending_crashes(QUEUE_SIZE):
            self.submit(pending.id, pending.dump_path)
        self.task = asyncio.create_task(self._run(), name="reporting-endpoint-analyzer")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
            self.task = None

    async def idle(self) -> None:
        """Wait until everything submitted so far is parsed (tests use it to observe results)."""
        if self.queue is not None:
            await self.queue.join()

    async def _run(self) -> None:
        assert self.queue is not None
        while True:
            crash_id, dump_path, crash = await self.queue.get()
            try:
                await self.analyse(crash_id, dump_path, crash)
            except StorageError:
                log.exception("could not record the facts of crash %s", crash_id)
            finally:
                self.queue.task_done()

    async def analyse(self, crash_id: str, dump_path: str, crash: NewCrash | None = None) -> None:
        try:
            # On S3 a temp download for the parse; on the folder store the blob file itself.
            async with self.blobs.local_file(dump_path) as path:
                facts = await asyncio.to_thread(parse_dump, path)
        except Exception as exc:
            log.info("crash %s: dump not parsed: %s", crash_id, exc)
            await self.storage.record_crash_failure(crash_id, f"{type(exc).__name__}: {exc}")
            return
        if crash is None:
            # A crash left pending by an earlier process: its fields from the row.
            row = await self.storage.get_crash(crash_id)
            if row is None:
                return  # deleted meanwhile
            crash = stored_crash(row)
        # Rules first, then product and signature; computed here, not in the storage, so
        # that a rules file never runs inside a write transaction.
        try:
            issue = crash_issue_key(self.rules, crash, facts.signature)
        except Exception:
            # A failing rule must not stop the analyzer (every later dump would stay pending):
            # the facts are recorded, the crash without an issue until a regroup.
            log.exception("crash %s: fingerprint rules failed", crash_id)
            issue = None
        await self.storage.record_crash_facts(crash_id, facts.as_dict(), issue=issue)
