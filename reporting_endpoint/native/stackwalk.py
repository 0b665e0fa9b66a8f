"""The stack walker: frames of a dump's thread by CFI, frame pointers and stack scanning."""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from reporting_endpoint.native import stackwin
from reporting_endpoint.native.cfi import MASK32, MASK64, Budget, UnwindTable
from reporting_endpoint.native.dumpfile import Dump, MemoryRange
from reporting_endpoint.native.records import (
    TRUST_CFI,
    TRUST_CONTEXT,
    TRUST_FRAME_POINTER,
    TRUST_SCAN,
    Frame,
    Module,
    SourceLine,
)

# Below this an instruction pointer is a null pointer plus an offset: the walk is over.
MIN_INSTRUCTION = 4096
# A frame larger than this between a scanned return address and its saved frame pointer is
# not believed (rust-minidump's figure for x86, generous for the other CPUs).
MAX_FRAME_GAP = 128 * 1024
# Windows x64 frame pointers may point up to 240 bytes into the frame, in 16-byte steps.
WINDOWS_FP_STEPS = 16


class SymbolResolver(Protocol):
    """What the walker needs from symbols, per module."""

    def unwind_table(self, module: Module) -> UnwindTable | None:
        """The module's CFI (and WIN) records, or None when there are no symbols for it.

        None also tells stack scanning to accept any address in the module; a table (even an
        empty one) makes it accept only addresses that ``lookup`` finds a function for.
        """
        ...

    def lookup(self, module: Module, offset: int) -> tuple[SourceLine, ...]:
        """What is at a module-relative address: inlined functions innermost first, the
        containing function last; () when unknown."""
        ...


@dataclass(frozen=True, slots=True)
class WalkLimits:
    """Bounds of one thread's walk. ``max_work`` counts memory reads, CFI tokens and symbol
    lookups; when any bound is reached the walk ends with the frames found so far."""

    max_frames: int = 256
    max_scan_words: int = 40
    # After a frame found by context or CFI the scan looks this many times further, as
    # Breakpad and rust-minidump do (the first frames are the messy ones).
    trusted_scan_factor: int = 4
    max_work: int = 100_000


DEFAULT_LIMITS = WalkLimits()


@dataclass(frozen=True, slots=True)
class _Arch:
    word: int
    ip: str
    sp: str
    fp: str
    callee_saved: tuple[str, ...]
    # Return address minus this is inside the call: any byte of it on x86, the whole
    # fixed-size instruction on arm64 (as Breakpad and rust-minidump subtract).
    call_back: int = 1

    @property
    def mask(self) -> int:
        return MASK64 if self.word == 8 else MASK32


_ARCHES = {
    "amd64": _Arch(8, "rip", "rsp", "rbp", ("rbx", "rbp", "r12", "r13", "r14", "r15")),
    "x86": _Arch(4, "eip", "esp", "ebp", ("ebx", "esi", "edi", "ebp")),
    "arm64": _Arch(8, "pc", "sp", "x29", tuple(f"x{i}" for i in range(19, 30)), 4),
}


def walk_thread(
    dump: Dump,
    thread_id: int,
    resolver: SymbolResolver,
    limits: WalkLimits = WalkLimits(),
) -> tuple[Frame, ...]:
    """The symbolicated frames of a thread, innermost first; () when the dump lacks the
    thread's context or its CPU is not one the walker knows (amd64, x86, arm64)."""
    thread = dump.thread(thread_id)
    context = dump.context_of(thread_id)
    if thread is None or context is None or context.cpu not in _ARCHES:
        return ()
    walker = _Walker(dump, thread.stack, _ARCHES[context.cpu], resolver, limits)
    return walker.walk(context.registers)


def walk_crashing_thread(
    dump: Dump,
    resolver: SymbolResolver,
    limits: WalkLimits = WalkLimits(),
) -> tuple[Frame, ...]:
    """The frames of the thread the exception names (the first thread without one)."""
    thread_id = dump.crashing_thread_id
    return () if thread_id is None else walk_thread(dump, thread_id, resolver, limits)


def walk_all_threads(
    dump: Dump,
    resolver: SymbolResolver,
    limits: WalkLimits = WalkLimits(),
    max_threads: int = 64,
) -> tuple[tuple[int, tuple[Frame, ...]], ...]:
    """(thread id, frames) of the first ``max_threads`` threads, each walk with its own
    ``limits``."""
    return tuple(
        (thread.thread_id, walk_thread(dump, thread.thread_id, resolver, limits))
        for thread in dump.threads[:max_threads]
    )


class _Walker:
    def __init__(
        self,
        dump: Dump,
        stack: MemoryRange | None,
        arch: _Arch,
        resolver: SymbolResolver,
        limits: WalkLimits,
    ) -> None:
        self.dump = dump
        self.stack = stack
        self.arch = arch
        self.resolver = resolver
        self.limits = limits
        self.budget = Budget(limits.max_work)
        self.tables: dict[Module, UnwindTable | None] = {}
        # Parameter bytes of the frame just unwound by STACK WIN: its caller's .cbCalleeParams.
        self.callee_parameter_size = 0
        self.word_format = "<Q" if arch.word == 8 else "<I"
        self.pointer_mask = _pointer_auth_mask(dump) if arch.ip == "pc" else arch.mask

    def walk(self, registers: Mapping[str, int]) -> tuple[Frame, ...]:
        frames: list[Frame] = []
        arch = self.arch
        regs = dict(registers)
        trust = TRUST_CONTEXT
        while True:
            frames.append(self.symbolicate(len(frames), trust, regs[arch.ip]))
            if len(frames) >= self.limits.max_frames or self.stack is None:
                break
            found = self.caller(regs, trust)
            if found is None:
                break
            caller, trust = found
            ip, sp = caller.get(arch.ip), caller.get(arch.sp)
            # Breakpad's ends of a walk: a null-ish return address, a stack pointer that does
            # not move up (which also rules out cycles), or one that left the stack.
            if ip is None or sp is None or ip < MIN_INSTRUCTION:
                break
            if sp > self.stack.end or sp < regs[arch.sp]:
                break
            # An unchanged stack pointer is progress only for an arm64 leaf (its return
            # address is in lr) or function-entry CFI, and only with a new pc.
            if sp == regs[arch.sp] and not (
                arch.ip == "pc" and ip != regs[arch.ip] and (trust == TRUST_CFI or len(frames) == 1)
            ):
                break
            regs = caller
        return tuple(frames)

    # -- memory and modules --------------------------------------------------------------

    def read_word(self, address: int) -> int | None:
        if self.stack is None or not self.budget.spend():
            return None
        raw = self.dump.read_range(self.stack, address, self.arch.word)
        if raw is None:
            return None
        value: int = struct.unpack(self.word_format, raw)[0]
        return value

    def table(self, module: Module) -> UnwindTable | None:
        if module not in self.tables:
            self.budget.spend()
            self.tables[module] = self.resolver.unwind_table(module)
        return self.tables[module]

    def lookup(self, address: int) -> tuple[Module | None, tuple[SourceLine, ...]]:
        module = self.dump.module_at(address)
        if module is None or not self.budget.spend():
            return module, ()
        return module, self.resolver.lookup(module, address - module.base)

    # -- frames ----------------------------------------------------------------------------

    def symbolicate(self, index: int, trust: str, instruction: int) -> Frame:
        # A caller's instruction pointer is the return address, past the call: its symbols
        # (and its CFI) are those of the call instruction, one byte before.
        address = instruction if trust == TRUST_CONTEXT else instruction - self.arch.call_back
        module, lines = self.lookup(address)
        if module is None:
            return Frame(index=index, trust=trust, instruction=instruction)
        frame = Frame(
            index=index,
            trust=trust,
            instruction=instruction,
            module=module.name,
            module_offset=instruction - module.base,
        )
        if not lines:
            return frame
        outer = lines[-1]
        offset = outer.function_offset
        return Frame(
            index=index,
            trust=trust,
            instruction=instruction,
            module=module.name,
            module_offset=instruction - module.base,
            function=outer.function,
            function_offset=None if offset is None else offset + instruction - address,
            file=outer.file,
            line=outer.line,
            inlined=tuple(lines[:-1]),
        )

    def caller(self, regs: dict[str, int], trust: str) -> tuple[dict[str, int], str] | None:
        arch = self.arch
        if arch.sp not in regs or arch.ip not in regs:
            return None
        address = regs[arch.ip] if trust == TRUST_CONTEXT else regs[arch.ip] - arch.call_back
        module = self.dump.module_at(address)
        table = self.table(module) if module is not None else None
        callee_parameter_size, self.callee_parameter_size = self.callee_parameter_size, 0
        if module is not None and table is not None:
            offset = address - module.base
            # Breakpad's x86 order: MSVC's STACK WIN first, then DWARF-style CFI.
            record = table.win_record(offset) if arch.ip == "eip" else None
            if record is not None:
                self.callee_parameter_size = record.parameter_size
                frame = stackwin.WinFrame(
                    regs, record, callee_parameter_size, trust == TRUST_CONTEXT,
                    self.scan_words(trust),
                )  # fmt: skip
                found = stackwin.caller_registers(
                    frame, self.read_word, self.budget, self.in_module, self.find_return_address
                )
                if found is not None:
                    return found
            caller = self.by_cfi(regs, table, offset)
            if caller is not None:
                return caller, TRUST_CFI
        if self.budget.remaining <= 0:
            return None
        caller = self.by_frame_pointer(regs)
        if caller is not None:
            return caller, TRUST_FRAME_POINTER
        caller = self.by_scan(regs, trust)
        if caller is not None:
            return caller, TRUST_SCAN
        return None

    def by_cfi(
        self, regs: dict[str, int], table: UnwindTable, offset: int
    ) -> dict[str, int] | None:
        arch = self.arch
        recovered = table.caller_registers(offset, regs, self.read_word, arch.mask, self.budget)
        if recovered is None:
            return None
        # Callee-saved registers the rules do not mention kept their values across the call.
        caller = {name: regs[name] for name in arch.callee_saved if name in regs}
        for name, value in recovered.items():
            if not name.startswith("."):
                caller[name] = value
        caller[arch.sp] = recovered[".cfa"]
        caller[arch.ip] = self.strip(recovered[".ra"])
        if arch.fp in caller:
            caller[arch.fp] = self.strip(caller[arch.fp])
        return caller

    def by_frame_pointer(self, regs: dict[str, int]) -> dict[str, int] | None:
        arch, word = self.arch, self.arch.word
        fp, sp = regs.get(arch.fp), regs[arch.sp]
        if fp == 0 and arch.ip == "pc":
            # arm64's outermost frame record holds fp 0: the walk is over (a caller that
            # does not move the stack pointer ends it), no scan for garbage past it.
            return {arch.ip: regs[arch.ip], arch.sp: sp}
        if fp is None or fp == 0 or fp >= arch.mask - 2 * word:
            return None
        steps = WINDOWS_FP_STEPS if self.dump.os == "Windows" and arch.ip == "rip" else 1
        for step in range(steps):
            base = fp + step * 2 * word
            caller_fp, caller_ip = self.read_word(base), self.read_word(base + word)
            if caller_fp is None or caller_ip is None:
                return None
            caller_fp, caller_ip = self.strip(caller_fp), self.strip(caller_ip)
            caller_sp = base + 2 * word
            if caller_sp <= sp:
                continue
            if arch.ip != "pc":
                # The x86 chain must stay ordered and inside the stack; arm64's last record
                # legitimately holds fp 0.
                if caller_fp < caller_sp or self.read_word(caller_fp) is None:
                    continue
                if _non_canonical(caller_ip, arch):
                    continue
            return {arch.ip: caller_ip, arch.sp: caller_sp, arch.fp: caller_fp}
        return None

    def scan_words(self, trust: str) -> int:
        words = self.limits.max_scan_words
        if trust in (TRUST_CONTEXT, TRUST_CFI):
            words *= self.limits.trusted_scan_factor
        return words

    def find_return_address(self, start: int, words: int) -> tuple[int, int] | None:
        """The first stack word from ``start`` that can be a return address: (where, word)."""
        for i in range(min(words, self.limits.max_scan_words * self.limits.trusted_scan_factor)):
            address = start + i * self.arch.word
            value = self.read_word(address)
            if value is None:
                return None
            candidate = self.strip(value)
            if self.instruction_seems_valid(candidate):
                return address, candidate
        return None

    def by_scan(self, regs: dict[str, int], trust: str) -> dict[str, int] | None:
        arch, word = self.arch, self.arch.word
        last_fp = regs.get(arch.fp)
        found = self.find_return_address(regs[arch.sp], self.scan_words(trust))
        if found is None:
            return None
        address, candidate = found
        caller_sp = address + word
        caller = {arch.ip: candidate, arch.sp: caller_sp}
        # The caller's frame pointer: pushed just below the return address by a standard
        # prologue, or left untouched by a function that does not use one.
        saved = self.read_word(address - word) if address > regs[arch.sp] else None
        if (
            last_fp == address - word
            and saved is not None
            and saved > address
            and saved - address <= MAX_FRAME_GAP
            and self.read_word(saved) is not None
        ):
            caller[arch.fp] = saved
        elif last_fp is not None and last_fp >= caller_sp:
            caller[arch.fp] = last_fp
        return caller

    def in_module(self, address: int) -> bool:
        return self.dump.module_at(address) is not None

    def instruction_seems_valid(self, address: int) -> bool:
        """Whether a word found on the stack can be a return address: it points into a
        module, and into a known function when the module has symbols."""
        if address < MIN_INSTRUCTION or _non_canonical(address, self.arch):
            return False
        module = self.dump.module_at(address - 1)
        if module is None:
            return False
        if self.table(module) is None:
            return True
        return bool(self.lookup(address - 1)[1])

    def strip(self, value: int) -> int:
        """Drop arm64 pointer-authentication bits (a no-op mask elsewhere)."""
        return value & self.pointer_mask


def _non_canonical(address: int, arch: _Arch) -> bool:
    return arch.ip == "rip" and 0x7FFF_FFFF_FFFF < address < 0xFFFF_8000_0000_0000


def _pointer_auth_mask(dump: Dump) -> int:
    """The bits of a real arm64 address: pointer authentication signs return addresses and
    frame pointers in the high bits. Apple uses 47 address bits; modules or memory mapped
    higher widen the mask (rust-minidump's heuristic)."""
    highest = (1 << 47) - 1
    for module in dump.modules[-1:]:
        highest = max(highest, module.base + module.size)
    for region in dump.memory[-1:]:
        highest = max(highest, region.end)
    return (1 << highest.bit_length()) - 1
