"""Stack walking: parse a dump and walk (and symbolicate) its crashing thread, p50 over N runs.

The Electron dumps are walked without their symbols (none are public for those builds): CFI
does not apply, so frame pointers and stack scanning do the work, which is the slow path. The
two Breakpad dumps are walked with their .sym files (STACK records, names via symbolic).
Usage: PYTHONPATH=. python benchmarks/stackwalk.py [--runs 200]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from reporting_endpoint.native.dumpfile import read_dump
from reporting_endpoint.native.stackwalk import walk_all_threads, walk_crashing_thread

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.native_symbols import NoSymbols, SymFolderResolver  # noqa: E402

DUMPS = ROOT / "tests" / "fixtures" / "minidumps"
CASES = [
    ("win-x64_electron_node-minidump_windows.dmp", False),
    ("linux-x64_electron_node-minidump_linux.dmp", False),
    ("mac-x64_electron_node-minidump_mac.dmp", False),
    ("win-x86_breakpad_minidump2.dmp", True),
    ("linux-x64_breakpad_linux_null_read_av.dmp", True),
]


def p50_ms(action: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    print(f"{'dump':48} {'frames':>6} {'parse':>9} {'walk':>9} {'all threads':>12}")
    for name, with_symbols in CASES:
        path = DUMPS / name
        dump = read_dump(path)
        # Symbols load once per process in real use: warm the resolver before timing.
        resolver = SymFolderResolver() if with_symbols else NoSymbols()
        frames = walk_crashing_thread(dump, resolver)
        parse = p50_ms(lambda path=path: read_dump(path), args.runs)
        walk = p50_ms(lambda d=dump, r=resolver: walk_crashing_thread(d, r), args.runs)
        every = p50_ms(lambda d=dump, r=resolver: walk_all_threads(d, r), max(args.runs // 4, 1))
        label = name + (" (+sym)" if with_symbols else "")
        print(f"{label:48} {len(frames):6d} {parse:7.2f}ms {walk:7.2f}ms {every:10.2f}ms")


if __name__ == "__main__":
    main()
