"""Loading a ~100 MB Breakpad .sym: load time, peak memory and lookup time, one run.

Usage: python benchmarks/symbols.py [--megabytes 100] [--lookups 20000] [--keep DIR]

Writes a deterministic synthetic .sym (FILE, INLINE_ORIGIN, FUNC with line records and some
INLINE records, PUBLIC, then STACK CFI records as dump_syms orders them) to a temporary
directory, then loads it in a fresh child process so the peak resident memory
(``ru_maxrss``) is the load's alone, and times lookups of random offsets inside functions.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def write_sym(path: Path, megabytes: int) -> dict[str, int]:
    """Records in the proportions of a Chromium-sized .sym; returns the counts."""
    rng = random.Random(15)
    target = megabytes * 2**20
    files, origins = 20_000, 5_000
    counts = {"functions": 0, "lines": 0, "stack": 0, "end": 0}
    with path.open("w", encoding="ascii") as out:
        out.write("MODULE Linux x86_64 0123456789ABCDEF0123456789ABCDEF0 libbench.so\n")
        out.write("INFO CODE_ID 67452301EFCDAB8967452301EFCDAB89 libbench.so\n")
        out.write("".join(f"FILE {i} /src/bench/dir{i % 97}/file{i}.cc\n" for i in range(files)))
        out.write("".join(f"INLINE_ORIGIN {i} bench::Inlined{i}(int)\n" for i in range(origins)))
        address = 0x1000
        functions: list[tuple[int, int]] = []
        # About 60% of the bytes are functions and lines, 40% STACK CFI, as in real files.
        while out.tell() < target * 0.6:
            size = rng.randrange(0x20, 0x400)
            name = (
                f"bench::Class{rng.randrange(5000)}::Method{counts['functions']}(int, char const*)"
            )
            block = [f"FUNC {address:x} {size:x} 0 {name}\n"]
            if counts["functions"] % 7 == 0:
                origin = rng.randrange(origins)
                block.append(f"INLINE 0 {rng.randrange(1, 3000)} 1 {origin} {address + 8:x} 10\n")
            offset, line, file_id = 0, rng.randrange(1, 5000), rng.randrange(files)
            while offset < size:
                step = min(rng.randrange(2, 24), size - offset)
                block.append(f"{address + offset:x} {step:x} {line} {file_id}\n")
                offset += step
                line += rng.randrange(0, 3)
                counts["lines"] += 1
            out.write("".join(block))
            functions.append((address, size))
            counts["functions"] += 1
            address += size + rng.randrange(0, 0x40)
        out.write("".join(f"PUBLIC {address + i * 16:x} 0 bench_public_{i}\n" for i in range(2000)))
        index = 0
        while out.tell() < target:
            start, size = functions[index % len(functions)]
            out.write(f"STACK CFI INIT {start:x} {size:x} .cfa: $rsp 8 + .ra: .cfa -8 + ^\n")
            out.write(f"STACK CFI {start + 1:x} .cfa: $rsp 16 + $rbp: .cfa -16 + ^\n")
            out.write(f"STACK CFI {start + 4:x} .cfa: $rbp 16 +\n")
            counts["stack"] += 3
            index += 1
    counts["end"] = address
    return counts


def child(path: Path, lookups: int, end: int) -> None:
    from reporting_endpoint.native.symbols import load_symbols

    started = time.perf_counter()
    loaded = load_symbols(path)
    load_seconds = time.perf_counter() - started
    rng = random.Random(7)
    offsets = [rng.randrange(0x1000, end) for _ in range(lookups)]
    timings = []
    hits = 0
    for offset in offsets:
        began = time.perf_counter_ns()
        found = loaded.lookup(offset)
        timings.append(time.perf_counter_ns() - began)
        hits += bool(found)
    timings.sort()
    started = time.perf_counter()
    stack = loaded.stack_records()
    stack_seconds = time.perf_counter() - started
    print(
        json.dumps(
            {
                "load_seconds": load_seconds,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "size_bytes": loaded.size_bytes,
                "lookup_p50_us": statistics.median(timings) / 1000,
                "lookup_p99_us": timings[int(len(timings) * 0.99)] / 1000,
                "hit_ratio": hits / lookups,
                "stack_records": len(stack),
                "stack_records_seconds": stack_seconds,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--megabytes", type=int, default=100)
    parser.add_argument("--lookups", type=int, default=20_000)
    parser.add_argument("--keep", type=Path, help="write the .sym here and keep it")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--end", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.lookups, args.end)
        return
    with tempfile.TemporaryDirectory(prefix="symbench-") as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "libbench.so.sym"
        started = time.perf_counter()
        counts = write_sym(path, args.megabytes)
        print(
            f"generated {path.stat().st_size / 2**20:.1f} MB in "
            f"{time.perf_counter() - started:.1f} s: {counts['functions']:,} functions, "
            f"{counts['lines']:,} line records, {counts['stack']:,} STACK CFI records"
        )
        command = [sys.executable, __file__, "--child", str(path), "--lookups", str(args.lookups)]
        result = subprocess.run(
            [*command, "--end", str(counts["end"])], check=True, capture_output=True, text=True
        )
        figures = json.loads(result.stdout)
        print(f"load:           {figures['load_seconds']:.2f} s")
        print(
            f"peak RSS:       {figures['peak_rss_mb']:.0f} MB (child process, interpreter included)"
        )
        print(f"held in memory: {figures['size_bytes'] / 2**20:.1f} MB (size_bytes estimate)")
        print(
            f"lookup:         p50 {figures['lookup_p50_us']:.1f} us, "
            f"p99 {figures['lookup_p99_us']:.1f} us over {args.lookups:,} "
            f"(hit ratio {figures['hit_ratio']:.2f})"
        )
        print(
            f"stack_records:  {figures['stack_records']:,} lines split in "
            f"{figures['stack_records_seconds']:.2f} s"
        )


if __name__ == "__main__":
    main()
