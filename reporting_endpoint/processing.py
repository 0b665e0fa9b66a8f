"""Worker processes that parse dumps: a spawn-started process pool, replaced when a child dies.

The parse runs here, not in a serving process, so that parsing (and later stack walking and
symbolication) never takes CPU or the GIL from ingest: the children run at a lower priority
(``nice``), so under a crash storm uploads win the CPU and the backlog waits in the database.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

# Processors run this much nicer than the server: ingest first, parsing with what is left
# (measured on body 1 of benchmarks/crashpad.py: at nice 10 the processors took a third of
# the upload rate; see the README's performance section).
NICENESS = 19
# How often a processor checks that its parent is still there (seconds).
ORPHAN_CHECK = 0.5
# Test hook: a dump that holds these bytes (hex in the variable) kills the processor that
# parses it, as a dump that crashes a native parser would. Unset in production.
FAULT_VARIABLE = "REPORTING_ENDPOINT_TEST_PROCESSOR_FAULT"
# Test hook: seconds every parse takes at least (a slow parse, to kill a process mid-dump).
DELAY_VARIABLE = "REPORTING_ENDPOINT_TEST_PROCESSOR_DELAY"
# Test hook: CPU seconds every parse burns (a parse that never ends, for the timeout).
SPIN_VARIABLE = "REPORTING_ENDPOINT_TEST_PROCESSOR_SPIN"


class ProcessorDied(Exception):
    """The process parsing a dump died (killed, or crashed by the dump itself)."""


class ProcessingTimeout(BaseException):
    """One step on one dump used more CPU than the processors' timeout (raised in the child by
    its timer, so the child lives on for the next crash). A BaseException: the parsers and the
    walker catch Exception to keep going past bad input, and must not swallow this."""


def _on_timer(signum: int, frame: Any) -> None:
    raise ProcessingTimeout("took longer than the processing timeout")


@contextlib.contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    # CPU time, not wall time: processors run at nice 19 so that ingest wins the CPU, and a
    # starved one must not time out. The timer interrupts Python code only (a long call inside
    # a native library ends first); tasks run on the child's main thread, where signals go.
    signal.setitimer(signal.ITIMER_PROF, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)


def default_processors(workers: int = 1) -> int:
    """What the machine can spare per serving process: its cores less the serving processes,
    shared among them, at least one."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, ((cores or 1) - workers) // max(1, workers))


def _start_child(parent: int) -> None:
    # Ctrl-C reaches the whole process group; the parent decides when its children stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGPROF, _on_timer)
    with contextlib.suppress(OSError):
        os.nice(NICENESS)
    # The parent's pid from the parent itself: one killed before this line ran would make
    # os.getppid() here already the reaper's.
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()


def _exit_with_parent(parent: int) -> None:
    # A child holds both ends of the pool's queues, so a parent killed with SIGKILL leaves it
    # waiting for work for ever: it notices being orphaned instead (measured: without this,
    # both processors of a killed service stayed alive).
    while os.getppid() == parent:
        time.sleep(ORPHAN_CHECK)
    os._exit(0)


def parse_in_child(path: str, timeout: float = 120.0) -> dict[str, Any]:
    """The facts of one dump as a dict (what crosses back to the parent)."""
    from reporting_endpoint.minidump import parse_dump

    fault = os.environ.get(FAULT_VARIABLE)
    if fault and bytes.fromhex(fault) in Path(path).read_bytes():
        os.kill(os.getpid(), signal.SIGKILL)
    with _deadline(timeout):
        delay = os.environ.get(DELAY_VARIABLE)
        if delay:
            time.sleep(float(delay))
        spin = os.environ.get(SPIN_VARIABLE)
        if spin:
            until = time.process_time() + float(spin)
            while time.process_time() < until:
                pass
        facts = parse_dump(Path(path)).as_dict()
        if facts.get("parser") == "minidump":
            from reporting_endpoint.native.symbolication import analyse_stack

            # The stack walked without symbols in the same call: most dumps have none in the
            # store, and then this is the whole result (one call, one read of the file).
            try:
                facts["stack"] = analyse_stack(path, {}, str(facts.get("signature")))
            except ProcessingTimeout:
                facts["stack"] = {}  # the facts stand without a stack
    return facts


def stack_in_child(
    path: str, symbols: dict[tuple[str, str], Any], fallback_signature: str, timeout: float = 120.0
) -> dict[str, Any]:
    """The crashing thread's frames, missing symbols and signature (``native.symbolication``)."""
    from reporting_endpoint.native.symbolication import analyse_stack

    with _deadline(timeout):
        return analyse_stack(path, symbols, fallback_signature)


class ProcessorPool:
    """``size`` child processes; one that dies breaks the executor, which is then replaced
    (the parses it had in flight raise ``ProcessorDied``)."""

    def __init__(self, size: int, timeout: float = 120.0) -> None:
        self.size = size
        self.timeout = timeout
        self._executor: concurrent.futures.ProcessPoolExecutor | None = None

    def _current(self) -> concurrent.futures.ProcessPoolExecutor:
        if self._executor is None:
            # Spawn, not fork: the parent has threads (the writer's, the reader's) and an
            # event loop, which a forked child would inherit half-copied.
            self._executor = concurrent.futures.ProcessPoolExecutor(
                self.size,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_child,
                initargs=(os.getpid(),),
            )
        return self._executor

    async def parse(self, path: Path) -> dict[str, Any]:
        return await self._run(parse_in_child, str(path), self.timeout)

    async def _run(self, function: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
        executor = self._current()
        try:
            return await asyncio.get_running_loop().run_in_executor(executor, function, *args)
        except BrokenProcessPool as exc:
            if self._executor is executor:
                self._executor = None
                executor.shutdown(wait=False, cancel_futures=True)
            raise ProcessorDied(str(exc) or "a processor died") from None

    async def stack(
        self, path: Path, symbols: dict[tuple[str, str], Any], fallback_signature: str
    ) -> dict[str, Any]:
        """Walk and symbolicate the dump's crashing thread in a child."""
        return await self._run(stack_in_child, str(path), symbols, fallback_signature, self.timeout)

    def pids(self) -> list[int]:
        """The children alive now (tests kill one)."""
        processes = getattr(self._executor, "_processes", None) or {}
        return sorted(processes)

    async def close(self) -> None:
        executor, self._executor = self._executor, None
        if executor is not None:
            await asyncio.to_thread(executor.shutdown, wait=True, cancel_futures=True)
