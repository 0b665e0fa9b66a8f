"""The stack walker: real dumps against Breakpad's output, synthetic arm64 stacks, hostile input."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from reporting_endpoint.native.cfi import Budget, UnwindTable, evaluate
from reporting_endpoint.native.dumpfile import parse_dump, read_dump
from reporting_endpoint.native.records import (
    TRUST_CFI,
    TRUST_CONTEXT,
    TRUST_FRAME_POINTER,
    TRUST_SCAN,
    Frame,
    Module,
    SourceLine,
)
from reporting_endpoint.native.stackwalk import (
    SymbolResolver,
    WalkLimits,
    walk_all_threads,
    walk_crashing_thread,
    walk_thread,
)
from tests.native_dumps import (
    SynthDump,
    SynthModule,
    SynthThread,
    amd64_context,
    arm64_context,
    words,
)
from tests.native_symbols import NoSymbols, SymFolderResolver

DUMPS = Path(__file__).parent / "fixtures" / "minidumps"
EXPECTED = DUMPS / "win-x86_breakpad_minidump2.stackwalk.expected.txt"
BREAKPAD_TRUST = {
    "given as instruction pointer in context": TRUST_CONTEXT,
    "call frame info": TRUST_CFI,
    "previous frame's frame pointer": TRUST_FRAME_POINTER,
    "stack scanning": TRUST_SCAN,
}


def breakpad_frames(text: str) -> list[dict[str, object]]:
    """The crashing thread's frames from minidump_stackwalk's text output."""
    frames: list[dict[str, object]] = []
    block = text.split("(crashed)", 1)[1].split("\n\n", 1)[0]
    for line in block.splitlines():
        head = re.match(r"\s*(\d+)\s+([^!\s]+)!(.+?)(?: \[(\S+) : (\d+) \+ 0x[0-9a-f]+\])?$", line)
        if head and not line.strip().startswith(("eip", "esp", "esi", "edx", "Found")):
            function = head.group(3)
            offset = None
            plain = re.match(r"(.+) \+ (0x[0-9a-f]+)$", function)
            if plain:
                function, offset = plain.group(1), int(plain.group(2), 16)
            frames.append(
                {
                    "module": head.group(2),
                    "function": function,
                    "file": head.group(4),
                    "line": int(head.group(5)) if head.group(5) else None,
                    "function_offset": offset,
                }
            )
        elif "eip = " in line:
            frames[-1]["instruction"] = int(re.search(r"eip = (0x[0-9a-f]+)", line).group(1), 16)  # type: ignore[union-attr]
        elif "Found by: " in line:
            frames[-1]["trust"] = BREAKPAD_TRUST[line.split("Found by: ", 1)[1].strip()]
    return frames


def ours(frame: Frame) -> dict[str, object]:
    file = frame.file.replace("\\", "/").rsplit("/", 1)[-1] if frame.file else None
    return {
        "module": frame.module,
        "function": frame.function,
        "file": file,
        "line": frame.line if file else None,
        # Breakpad prints a function offset only for frames without a source line.
        "function_offset": None if file else frame.function_offset,
        "instruction": frame.instruction,
        "trust": frame.trust,
    }


def test_minidump2_matches_breakpads_output() -> None:
    """Windows x86: frame 0 from the exception context, then STACK WIN (which Breakpad
    reports as "call frame info") through main, the CRT and kernel32, where it ends."""
    expected = breakpad_frames(EXPECTED.read_text())
    assert len(expected) == 4
    frames = walk_crashing_thread(
        read_dump(DUMPS / "win-x86_breakpad_minidump2.dmp"), SymFolderResolver()
    )
    assert [ours(f) for f in frames] == expected


def test_minidump2_without_symbols_walks_the_ebp_chain() -> None:
    frames = walk_crashing_thread(read_dump(DUMPS / "win-x86_breakpad_minidump2.dmp"), NoSymbols())
    expected = breakpad_frames(EXPECTED.read_text())
    # The same return addresses, found by the frame pointer chain, and no names.
    assert [f.instruction for f in frames[:4]] == [e["instruction"] for e in expected]
    assert [f.trust for f in frames[:4]] == [TRUST_CONTEXT] + [TRUST_FRAME_POINTER] * 3
    assert all(f.function is None for f in frames)


def test_linux_null_read_av_by_cfi() -> None:
    dump = read_dump(DUMPS / "linux-x64_breakpad_linux_null_read_av.dmp")
    resolver = SymFolderResolver()
    frames = walk_crashing_thread(dump, resolver)
    crash, main, libc = frames[0], frames[1], frames[2]
    assert (crash.trust, crash.module, crash.function, crash.line) == (
        TRUST_CONTEXT, "null_read_av", "crash()", 18,
    )  # fmt: skip
    assert crash.file == "/home/mattdr/crashing-programs/null_read_av.cc"
    assert (crash.instruction, crash.module_offset, crash.function_offset) == (0x402170, 0x2170, 0)
    # main's return address, as Breakpad prints it: the instruction after the call.
    assert (main.trust, main.function, main.line) == (TRUST_CFI, "main", 27)
    assert (main.instruction, main.module_offset) == (0x401FCF, 0x1FCF)
    assert main.function_offset == 0x1FCF - 0x1F40  # FUNC 1f40 in the .sym
    # libc has no symbols here: found by main's CFI, located but not named.
    assert (libc.trust, libc.module, libc.function) == (TRUST_CFI, "libc-2.13.so", None)
    assert libc.module_offset == libc.instruction - next(
        m.base for m in dump.modules if m.name == "libc-2.13.so"
    )


def test_linux_null_read_av_without_symbols_scans() -> None:
    frames = walk_crashing_thread(
        read_dump(DUMPS / "linux-x64_breakpad_linux_null_read_av.dmp"), NoSymbols()
    )
    # crash() keeps no frame pointer: the return address is found by scanning.
    assert (frames[1].trust, frames[1].instruction) == (TRUST_SCAN, 0x401FCF)


def test_symbolication_uses_the_call_instruction_and_fills_inlines() -> None:
    class Inlining:
        def __init__(self) -> None:
            self.asked: list[int] = []

        def unwind_table(self, module: Module) -> UnwindTable | None:
            return None

        def lookup(self, module: Module, offset: int) -> tuple[SourceLine, ...]:
            self.asked.append(offset)
            return (
                SourceLine("inner", "a.h", 3, 2),
                SourceLine("middle", "b.h", 7, 5),
                SourceLine("outer", "c.cc", 11, 0x40),
            )

    resolver = Inlining()
    frames = walk_crashing_thread(read_dump(DUMPS / "win-x86_breakpad_minidump2.dmp"), resolver)
    assert resolver.asked[:2] == [0x429E, 0x41FF]  # frame 0 as is, frame 1 minus one
    assert frames[1].module_offset == 0x4200
    assert (frames[1].function, frames[1].file, frames[1].line) == ("outer", "c.cc", 11)
    assert frames[1].function_offset == 0x41  # of the return address, as Breakpad prints it
    assert frames[0].function_offset == 0x40
    assert [s.function for s in frames[1].inlined] == ["inner", "middle"]


@pytest.mark.parametrize(
    "name", sorted(p.name for p in DUMPS.glob("*.dmp") if "bad_" not in p.name)
)
def test_every_fixture_walks_quickly_without_symbols(name: str) -> None:
    dump = read_dump(DUMPS / name)
    started = time.perf_counter()
    stacks = walk_all_threads(dump, NoSymbols())
    assert time.perf_counter() - started < 0.5
    crashing = dict(stacks)[dump.crashing_thread_id]
    assert crashing[0].trust == TRUST_CONTEXT
    assert crashing[0].module is not None
    for frames in dict(stacks).values():
        assert [f.index for f in frames] == list(range(len(frames)))


# -- synthetic stacks ------------------------------------------------------------------------

ARM_BASE = 0x1_0000_0000
ARM_SP = 0x16F0_0000
PAC = 0x002D_0000_0000_0000  # pointer-authentication bits as arm64e signs return addresses


def arm64_dump(
    stack: list[int], registers: dict[str, int], old: bool = False, modules: int = 1
) -> bytes:
    return SynthDump(
        "arm64",
        os="macOS",
        modules=[
            SynthModule(ARM_BASE + i * 0x100000, 0x10000, f"/usr/lib/lib{i}.dylib", bytes(16))
            for i in range(modules)
        ],
        threads=[SynthThread(5, arm64_context(registers, old=old), ARM_SP, words(stack))],
        exception_thread=5,
    ).build()


def frame_chain_stack() -> list[int]:
    """Three frame records (fp, lr) at sp+0x20, +0x60, +0xa0, the last one ending the chain."""
    stack = [0xDEAD] * 48
    stack[4:6] = [(ARM_SP + 0x60) | PAC, (ARM_BASE + 0x2004) | PAC]
    stack[12:14] = [ARM_SP + 0xA0, ARM_BASE + 0x3008]
    stack[20:22] = [0, ARM_BASE + 0x400C]
    return stack


@pytest.mark.parametrize("old", [False, True])
def test_arm64_frame_pointer_chain_with_pointer_auth(old: bool) -> None:
    registers = {"pc": ARM_BASE + 0x1000, "sp": ARM_SP, "x29": ARM_SP + 0x20, "x30": 0}
    frames = walk_crashing_thread(
        parse_dump(arm64_dump(frame_chain_stack(), registers, old)), NoSymbols()
    )
    assert [(f.trust, f.module_offset) for f in frames] == [
        (TRUST_CONTEXT, 0x1000),
        (TRUST_FRAME_POINTER, 0x2004),  # signed in memory, stripped here
        (TRUST_FRAME_POINTER, 0x3008),
        (TRUST_FRAME_POINTER, 0x400C),
    ]
    assert all(f.module == "lib0.dylib" for f in frames)


class TableResolver:
    """One module's STACK CFI lines; every address named "f_<offset>"."""

    def __init__(self, lines: list[str]) -> None:
        self.table = UnwindTable.from_lines(lines)

    def unwind_table(self, module: Module) -> UnwindTable | None:
        return self.table

    def lookup(self, module: Module, offset: int) -> tuple[SourceLine, ...]:
        return (SourceLine(f"f_{offset:x}", None, None, 0),)


def test_arm64_leaf_by_cfi_then_frame_pointers() -> None:
    """A leaf function that saved nothing: its CFI takes the return address from x30."""
    registers = {"pc": ARM_BASE + 0x1000, "sp": ARM_SP + 0x10, "x29": ARM_SP + 0x20}
    registers["x30"] = (ARM_BASE + 0x5010) | PAC
    stack = frame_chain_stack()
    resolver = TableResolver(
        [
            "STACK CFI INIT 1000 40 .cfa: sp 0 + .ra: x30",
            # The caller at 0x5000 pushed a frame record: fp/lr at cfa-16/cfa-8.
            "STACK CFI INIT 5000 100 .cfa: x29 16 + .ra: .cfa -8 + ^ x29: .cfa -16 + ^",
        ]
    )
    frames = walk_crashing_thread(parse_dump(arm64_dump(stack, registers)), resolver)
    assert [(f.trust, f.module_offset) for f in frames] == [
        (TRUST_CONTEXT, 0x1000),
        (TRUST_CFI, 0x5010),
        (TRUST_CFI, 0x2004),
        (TRUST_FRAME_POINTER, 0x3008),
        (TRUST_FRAME_POINTER, 0x400C),
    ]
    assert frames[1].function == "f_500c"  # looked up at the bl instruction, 4 bytes back


def test_arm64_scan_when_frame_pointer_is_garbage() -> None:
    stack = [0x1234] * 16
    stack[6] = ARM_BASE + 0x7000
    registers = {"pc": ARM_BASE + 0x1000, "sp": ARM_SP, "x29": 0xFFFF_0000_0000}
    frames = walk_crashing_thread(parse_dump(arm64_dump(stack, registers)), NoSymbols())
    assert [(f.trust, f.module_offset) for f in frames[:2]] == [
        (TRUST_CONTEXT, 0x1000),
        (TRUST_SCAN, 0x7000),
    ]


# -- hostile input ---------------------------------------------------------------------------

AMD_BASE = 0x40_0000
AMD_SP = 0x7FFF_0000_0000


def amd64_dump(stack: list[int], registers: dict[str, int]) -> bytes:
    return SynthDump(
        "amd64",
        modules=[SynthModule(AMD_BASE, 0x10000, "/usr/bin/app", bytes(range(1, 21)))],
        threads=[SynthThread(3, amd64_context(registers), AMD_SP, words(stack))],
        exception_thread=3,
    ).build()


def finishes_fast(
    dump: bytes, resolver: SymbolResolver | None = None, limits: WalkLimits | None = None
) -> tuple[Frame, ...]:
    """Walk the dump's crashing thread, asserting it takes well under a second."""
    started = time.perf_counter()
    frames = walk_crashing_thread(parse_dump(dump), resolver or NoSymbols(), limits or WalkLimits())
    assert time.perf_counter() - started < 0.5
    return frames


def test_cyclic_frame_pointers_end() -> None:
    stack = [0] * 32
    # Two frames whose saved rbp point at each other, return addresses in the module.
    stack[2:4] = [AMD_SP + 0x40, AMD_BASE + 0x100]
    stack[8:10] = [AMD_SP + 0x10, AMD_BASE + 0x200]
    frames = finishes_fast(
        amd64_dump(stack, {"rip": AMD_BASE + 0x50, "rsp": AMD_SP, "rbp": AMD_SP + 0x10})
    )
    assert [f.module_offset for f in frames[:3]] == [0x50, 0x100, 0x200]
    # The chain's way back down is refused (a caller's stack pointer must be above), so
    # the cycle is never followed again.
    assert len(frames) < 40
    assert [f.module_offset for f in frames].count(0x100) == 1


def test_self_pointing_frame_pointer_and_full_stack_of_return_addresses() -> None:
    stack = [AMD_BASE + 0x10 + i for i in range(4096)]
    stack[0] = AMD_SP  # rbp points at itself
    frames = finishes_fast(
        amd64_dump(stack, {"rip": AMD_BASE + 0x50, "rsp": AMD_SP, "rbp": AMD_SP}),
        limits=WalkLimits(max_frames=1024),
    )
    assert len(frames) == 1024  # every word scans as a frame: the frame cap ends it
    frames = finishes_fast(
        amd64_dump(stack, {"rip": AMD_BASE + 0x50, "rsp": AMD_SP, "rbp": AMD_SP}),
        limits=WalkLimits(max_frames=1024, max_work=300),
    )
    assert 1 < len(frames) < 1024  # the work budget ends it first


def test_stack_memory_cut_short() -> None:
    stack = [AMD_SP + 0x10, AMD_BASE + 0x100]  # 16 bytes: the frame record's target is gone
    frames = finishes_fast(
        amd64_dump(stack, {"rip": AMD_BASE + 0x50, "rsp": AMD_SP, "rbp": AMD_SP})
    )
    assert frames[0].trust == TRUST_CONTEXT
    assert all(f.module_offset is not None for f in frames)
    # The thread's stack pointer outside the stack it has: just the context frame.
    frames = finishes_fast(amd64_dump(stack, {"rip": AMD_BASE + 0x50, "rsp": AMD_SP + 0x1000}))
    assert len(frames) == 1


def test_absurd_cfi_rules_are_bounded() -> None:
    stack = [AMD_BASE + 0x300] * 64
    deep = " ".join(["$rsp"] + ["8 +"] * 100_000)
    derefs = "$rsp " + " ^" * 5000
    lines = [
        "STACK CFI INIT 0 1000 .cfa: " + deep + " .ra: .cfa -8 + ^",
        "STACK CFI 10 .cfa: " + derefs + " .ra: .cfa ^",
        "STACK CFI 20 .cfa: $rsp 0 / .ra: 1 0 %",
        "STACK CFI 30 .cfa: .ra: + + + ^ ^ @ @",
        "STACK CFI 40 .cfa: 99999999999999999999999999 .ra: $nosuch",
        "STACK CFI INIT zz 10 garbage",
        "STACK CFI INIT 2000 10",
        "STACK WIN 4 0 xx",
    ] + [f"STACK CFI {i:x} .cfa: $rsp {i} + .ra: $rip" for i in range(50, 1000)]
    resolver = TableResolver(lines)
    for rip in (0x5, 0x15, 0x25, 0x35, 0x45, 0x100):
        frames = finishes_fast(
            amd64_dump(stack, {"rip": AMD_BASE + rip, "rsp": AMD_SP, "rbp": 0}), resolver
        )
        assert frames[0].trust == TRUST_CONTEXT and len(frames) <= 256


def test_postfix_evaluator() -> None:
    memory = {0x1000: 0xABC}
    read = memory.get
    regs = {"rsp": 0x1008, "x29": 0x20}
    budget = Budget(1000)
    mask = (1 << 64) - 1
    assert evaluate(("$rsp", "-8", "+", "^"), regs, read, mask, budget) == 0xABC
    assert evaluate(("fp", "3", "*", "7", "%"), regs, read, mask, budget) == 0x60 % 7
    assert evaluate(("$rsp", "16", "@"), regs, read, mask, budget) == 0x1000
    assert evaluate(("0", "1", "-"), regs, read, mask, budget) == mask
    assert evaluate(("1", "0", "/"), regs, read, mask, budget) is None
    assert evaluate(("$rsp", "^"), regs, read, mask, budget) is None  # unreadable
    assert evaluate(("1", "2"), regs, read, mask, budget) is None  # two values left
    assert evaluate(("$nosuch",), regs, read, mask, budget) is None
    assert evaluate(("1", "+"), regs, read, mask, budget) is None
    assert evaluate(("1",) * 10, regs, read, mask, Budget(5)) is None  # out of budget


def test_unwind_table_rules_accumulate_by_address() -> None:
    table = UnwindTable.from_lines(
        [
            b"STACK CFI INIT 100 20 .cfa: $rsp 8 + .ra: .cfa -8 + ^",
            b"STACK CFI 104 .cfa: $rsp 16 + $rbx: .cfa -16 + ^",
            b"STACK CFI 110 .cfa: $rbp 16 +",
            b"STACK CFI 500 .cfa: $rsp 99 +",  # outside its INIT: dropped
            b"MODULE Linux x86_64 0 x",
        ]
    )
    assert table.cfi_rules(0xFF) is None
    assert table.cfi_rules(0x100) == {".cfa": ("$rsp", "8", "+"), ".ra": (".cfa", "-8", "+", "^")}
    assert table.cfi_rules(0x104)[".cfa"] == ("$rsp", "16", "+")  # type: ignore[index]
    assert table.cfi_rules(0x10F)["rbx"] == (".cfa", "-16", "+", "^")  # type: ignore[index]
    assert table.cfi_rules(0x11F)[".cfa"] == ("$rbp", "16", "+")  # type: ignore[index]
    assert table.cfi_rules(0x120) is None


def test_walk_thread_unknown_thread_and_all_threads_bound() -> None:
    dump = read_dump(DUMPS / "win-x64_electron_node-minidump_windows.dmp")
    assert walk_thread(dump, 0xDEAD, NoSymbols()) == ()
    assert len(walk_all_threads(dump, NoSymbols(), max_threads=3)) == 3
    assert all(
        len(f) <= 5 for _, f in walk_all_threads(dump, NoSymbols(), WalkLimits(max_frames=5))
    )
