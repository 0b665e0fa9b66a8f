"""Walking and symbolicating an Electron-sized dump with cached symbols, p50 over N runs.

No public symbols exist for the Electron builds in the fixtures, so this writes synthetic .sym
files for every module the crashing thread of the Linux Electron dump runs in (``electron``,
66 MB of code, gets one function every 64 bytes: ~1 M functions, ~70 MB of text, the size of a
real Electron .sym's function records), filed under the modules' own debug ids. It then runs
the processors' own step (``native.symbolication.analyse_stack``: read the dump, walk the
crashing thread, symbolicate every frame, compute the signature) once to load the symbols, and
times it warm, as a processor child runs it for the crashes of one release.

Usage: python benchmarks/symbolicate.py [--runs 50] [--spacing 64]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
from pathlib import Path

from reporting_endpoint.native.dumpfile import read_dump
from reporting_endpoint.native.records import Module
from reporting_endpoint.native.stackwalk import walk_crashing_thread
from reporting_endpoint.native.symbolication import SymbolPaths, analyse_stack

ROOT = Path(__file__).resolve().parent.parent
DUMP = ROOT / "tests" / "fixtures" / "minidumps" / "linux-x64_electron_node-minidump_linux.dmp"


class _NoSymbols:
    def unwind_table(self, module: Module) -> None:
        return None

    def lookup(self, module: Module, offset: int) -> tuple[()]:
        return ()


def write_sym(path: Path, module: Module, spacing: int) -> int:
    """FUNC records (with one line record each) covering the module's whole range."""
    functions = 0
    with path.open("w", encoding="ascii") as out:
        out.write(f"MODULE Linux x86_64 {module.debug_id} {module.debug_file}\n")
        out.write("".join(f"FILE {i} /src/electron/part{i % 31}/file{i}.cc\n" for i in range(4096)))
        for start in range(0, module.size, spacing):
            out.write(f"FUNC {start:x} {spacing:x} 0 bench::Function{functions}(int)\n")
            out.write(f"{start:x} {spacing:x} {100 + functions % 900} {functions % 4096}\n")
            functions += 1
    return functions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--spacing", type=int, default=64)
    args = parser.parse_args()
    dump = read_dump(DUMP)
    used = {frame.module for frame in walk_crashing_thread(dump, _NoSymbols()) if frame.module}
    with tempfile.TemporaryDirectory() as folder:
        symbols: dict[tuple[str, str], SymbolPaths] = {}
        total = functions = 0
        for module in dump.modules:
            key = module.symbol_key
            if key is None or module.name not in used or key in symbols:
                continue
            path = Path(folder) / f"{module.debug_id}.sym"
            functions += write_sym(path, module, args.spacing)
            total += path.stat().st_size
            symbols[key] = SymbolPaths(f"bench-{module.debug_id}", str(path))
        print(f"symbols: {len(symbols)} modules, {functions:,} functions, {total / 2**20:.0f} MB")
        started = time.perf_counter()
        first = analyse_stack(str(DUMP), symbols, "SIGSEGV | ?")
        cold = time.perf_counter() - started
        named = sum(1 for frame in first["frames"] if frame["function"])
        print(f"frames: {len(first['frames'])} ({named} named); signature: {first['signature']}")
        print(f"first run (symbols loaded): {cold:.2f} s")
        times = []
        for _ in range(args.runs):
            started = time.perf_counter()
            analyse_stack(str(DUMP), symbols, "SIGSEGV | ?")
            times.append(time.perf_counter() - started)
        times.sort()
        p50 = statistics.median(times) * 1000
        p99 = times[min(len(times) - 1, int(len(times) * 0.99))] * 1000
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"warm walk + symbolication: p50 {p50:.1f} ms, p99 {p99:.1f} ms ({args.runs} runs)")
        print(f"target p50 < 200 ms: {'met' if p50 < 200 else 'NOT met'}; peak RSS {rss:.0f} MB")


if __name__ == "__main__":
    main()
