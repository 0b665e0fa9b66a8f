"""A bounds-checked reader of a minidump's raw streams: system, modules, threads, memory."""

from __future__ import annotations

import bisect
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from reporting_endpoint.minidump import CPUS, PLATFORMS
from reporting_endpoint.native.records import Module

MINIDUMP_SIGNATURE = 0x504D444D  # "MDMP"

# Caps on declared counts: far above any real dump (Chromium writes a few hundred modules and
# threads), low enough that a hostile count costs nothing before the size check rejects it.
MAX_STREAMS = 4096
MAX_MODULES = 8192
MAX_THREADS = 16384
MAX_MEMORY_RANGES = 1 << 20
MAX_NAME_BYTES = 64 * 1024
MAX_CODEVIEW_BYTES = 64 * 1024
# Text taken from a dump (names, the PDB name, a build id's hex) is cut to this: real paths are
# far shorter, and a hostile dump's thousands of modules may each name the same 64 KiB string.
MAX_TEXT_CHARS = 1024
# A character is at most 4 bytes in UTF-16 and UTF-8, so this many bytes hold the first
# MAX_TEXT_CHARS of a name: no more is read, so a name costs the same however long it claims.
MAX_TEXT_BYTES = 4 * MAX_TEXT_CHARS

THREAD_LIST = 3
MODULE_LIST = 4
MEMORY_LIST = 5
EXCEPTION = 6
SYSTEM_INFO = 7
MEMORY64_LIST = 9

# The CPU bits of a CONTEXT's flags.
CONTEXT_X86 = 0x00010000
CONTEXT_AMD64 = 0x00100000
CONTEXT_ARM64 = 0x00400000
CONTEXT_ARM64_OLD = 0x80000000
CONTEXT_AMD64_SIZE = 1232
CONTEXT_X86_SIZE = 716
CONTEXT_ARM64_SIZE = 912
CONTEXT_ARM64_OLD_SIZE = 796
# ``_context`` reads nothing past the largest layout, so no more of a record is sliced out.
CONTEXT_MAX_BYTES = max(
    CONTEXT_AMD64_SIZE, CONTEXT_X86_SIZE, CONTEXT_ARM64_SIZE, CONTEXT_ARM64_OLD_SIZE
)

CV_PDB70 = 0x53445352  # "RSDS"
CV_PDB20 = 0x3031424E  # "NB10"
CV_ELF = 0x4270454C  # "BpEL", Breakpad's build-id record
# The most of a CodeView record read: the PDB70 header and its name's first MAX_TEXT_CHARS
# (which also covers a build id of MAX_TEXT_CHARS hex digits).
CODEVIEW_READ_BYTES = 24 + MAX_TEXT_BYTES
VS_FFI_SIGNATURE = 0xFEEF04BD

AMD64_REGISTERS = (
    "rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip",
)  # fmt: skip
X86_REGISTERS = ("edi", "esi", "ebx", "edx", "ecx", "eax", "ebp", "eip", "cs", "efl", "esp")
ARM64_REGISTERS = tuple(f"x{i}" for i in range(31))

_HEADER = struct.Struct("<IIII")
_DIRECTORY = struct.Struct("<III")
_MODULE = struct.Struct("<QIIII13I8s8s16x")  # MINIDUMP_MODULE, 108 bytes, packed
_THREAD = struct.Struct("<IIIIQQII II")  # MINIDUMP_THREAD, 48 bytes
_MEMORY = struct.Struct("<QII")
_MEMORY64 = struct.Struct("<QQ")
_EXCEPTION = struct.Struct("<IIIIQQII120sII")  # MINIDUMP_EXCEPTION_STREAM, 168 bytes
_SYSTEM_INFO = struct.Struct("<HHHBBIIIII")


class DumpFormatError(ValueError):
    """The file is not a minidump this reader can trust: a bad magic, an offset, size or
    count outside the file, or a structure cut short."""


@dataclass(frozen=True, slots=True)
class Context:
    """A thread's registers at the time of the dump, by the names Breakpad's CFI uses
    (``rip``/``rsp``/``rbp`` ..., ``eip``/``esp``/``ebp`` ..., ``x0``-``x30``/``sp``/``pc``)."""

    cpu: str
    registers: Mapping[str, int]

    @property
    def instruction_pointer(self) -> int:
        return self.registers.get(_IP[self.cpu], 0)

    @property
    def stack_pointer(self) -> int:
        return self.registers.get(_SP[self.cpu], 0)


_IP = {"amd64": "rip", "x86": "eip", "arm64": "pc"}
_SP = {"amd64": "rsp", "x86": "esp", "arm64": "sp"}


@dataclass(frozen=True, slots=True)
class MemoryRange:
    """Bytes of the process's memory the dump holds: ``size`` bytes from address ``base``."""

    base: int
    size: int
    offset: int  # where they start in the file

    @property
    def end(self) -> int:
        return self.base + self.size

    def contains(self, address: int, size: int = 1) -> bool:
        return self.base <= address and address + size <= self.base + self.size


@dataclass(frozen=True, slots=True)
class Thread:
    """A thread of the dump: its id, context and stack memory (None when the dump lacks it)."""

    thread_id: int
    stack_start: int
    stack: MemoryRange | None
    context: Context | None


@dataclass(frozen=True, slots=True)
class ExceptionInfo:
    """The exception stream: which thread crashed, how, and that thread's context at the crash
    (which replaces the thread list's context of that thread, taken inside the handler)."""

    thread_id: int
    code: int
    flags: int
    address: int
    parameters: tuple[int, ...]
    context: Context | None


@dataclass(frozen=True, slots=True)
class Dump:
    """What the stack walker needs from a minidump. Build it with ``parse_dump``."""

    cpu: str | None
    os: str | None
    modules: tuple[Module, ...]  # sorted by base address
    threads: tuple[Thread, ...]
    exception: ExceptionInfo | None
    memory: tuple[MemoryRange, ...]  # sorted by base address, overlaps dropped
    data: bytes = field(repr=False, compare=False)
    _module_bases: tuple[int, ...] = field(repr=False, compare=False, default=())
    _memory_bases: tuple[int, ...] = field(repr=False, compare=False, default=())

    def read(self, address: int, size: int) -> bytes | None:
        """``size`` bytes of process memory from ``address``, or None if the dump lacks any."""
        i = bisect.bisect_right(self._memory_bases, address) - 1
        if i < 0 or size < 0:
            return None
        region = self.memory[i]
        if not region.contains(address, size):
            return None
        start = region.offset + address - region.base
        return self.data[start : start + size]

    def read_range(self, region: MemoryRange, address: int, size: int) -> bytes | None:
        """Like ``read``, restricted to one range (a thread's stack)."""
        if size < 0 or not region.contains(address, size):
            return None
        start = region.offset + address - region.base
        return self.data[start : start + size]

    def module_at(self, address: int) -> Module | None:
        """The module whose image holds ``address``."""
        i = bisect.bisect_right(self._module_bases, address) - 1
        if i < 0:
            return None
        module = self.modules[i]
        return module if address < module.base + module.size else None

    def thread(self, thread_id: int) -> Thread | None:
        for thread in self.threads:
            if thread.thread_id == thread_id:
                return thread
        return None

    def context_of(self, thread_id: int) -> Context | None:
        """The thread's context at the crash: the exception's for the crashing thread."""
        if (
            self.exception is not None
            and self.exception.thread_id == thread_id
            and self.exception.context is not None
        ):
            return self.exception.context
        thread = self.thread(thread_id)
        return thread.context if thread is not None else None

    @property
    def crashing_thread_id(self) -> int | None:
        """The thread of the exception stream, or the first thread of a dump without one."""
        if self.exception is not None and self.thread(self.exception.thread_id) is not None:
            return self.exception.thread_id
        return self.threads[0].thread_id if self.threads else None


def read_dump(path: str | Path) -> Dump:
    """Parse the minidump file at ``path``."""
    return parse_dump(Path(path).read_bytes())


def parse_dump(data: bytes) -> Dump:
    """Parse a minidump held in memory; raises DumpFormatError on anything out of bounds."""
    reader = _Reader(bytes(data))
    return reader.dump()


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.size = len(data)
        # Many modules may name one string: each offset is decoded once, and equal texts
        # are one object (so the modules also pickle once per text, not once per module).
        self.names: dict[int, str] = {}
        self.texts: dict[str, str] = {}

    def unpack(self, fmt: struct.Struct, offset: int, what: str) -> tuple[Any, ...]:
        if offset < 0 or offset + fmt.size > self.size:
            raise DumpFormatError(f"{what} at {offset:#x} runs past the end of the file")
        return fmt.unpack_from(self.data, offset)

    def check(self, offset: int, size: int, what: str) -> None:
        # Numbers only: slicing to check would copy every stream, range and stack in full,
        # and many records may declare the same huge stretch of the file.
        if offset < 0 or size < 0 or offset + size > self.size:
            raise DumpFormatError(f"{what} ({size} bytes at {offset:#x}) is outside the file")

    def span(self, offset: int, size: int, what: str, read: int) -> bytes:
        """The first ``read`` bytes of a record of ``size`` bytes, once all of it is in bounds."""
        self.check(offset, size, what)
        return self.data[offset : offset + min(size, read)]

    def intern(self, text: str | None) -> str | None:
        return None if text is None else self.texts.setdefault(text, text)

    def dump(self) -> Dump:
        signature, _version, count, directory = self.unpack(_HEADER, 0, "header")
        if signature != MINIDUMP_SIGNATURE:
            raise DumpFormatError("not a minidump (no MDMP signature)")
        if count > MAX_STREAMS:
            raise DumpFormatError(f"{count} streams declared, more than {MAX_STREAMS}")
        self.check(directory, count * _DIRECTORY.size, "stream directory")
        streams: dict[int, tuple[int, int]] = {}
        for i in range(count):
            kind, size, rva = _DIRECTORY.unpack_from(self.data, directory + i * _DIRECTORY.size)
            self.check(rva, size, f"stream {kind}")
            # A writer that repeats a stream means the first one, as Breakpad reads it.
            streams.setdefault(kind, (rva, size))

        cpu, os = self.system_info(streams.get(SYSTEM_INFO))
        modules = self.modules(streams.get(MODULE_LIST), os)
        memory = self.memory(streams.get(MEMORY_LIST), streams.get(MEMORY64_LIST))
        threads = self.threads(streams.get(THREAD_LIST), cpu, memory)
        exception = self.exception(streams.get(EXCEPTION), cpu)
        return Dump(
            cpu=cpu,
            os=os,
            modules=modules,
            threads=threads,
            exception=exception,
            memory=memory,
            data=self.data,
            _module_bases=tuple(m.base for m in modules),
            _memory_bases=tuple(r.base for r in memory),
        )

    def system_info(self, stream: tuple[int, int] | None) -> tuple[str | None, str | None]:
        if stream is None:
            return None, None
        rva, size = stream
        if size < _SYSTEM_INFO.size:
            raise DumpFormatError("system info stream too short")
        arch, *_rest, platform, _csd = self.unpack(_SYSTEM_INFO, rva, "system info")
        return CPUS.get(arch), PLATFORMS.get(platform)

    def list_header(self, stream: tuple[int, int], entry: int, cap: int, what: str) -> int:
        rva, size = stream
        (count,) = self.unpack(struct.Struct("<I"), rva, f"{what} count")
        if count > cap:
            raise DumpFormatError(f"{count} {what} entries declared, more than {cap}")
        # Some writers pad the count to 8 bytes (64-bit alignment of the entries after it);
        # only an exact fit tells, as in Breakpad.
        if 4 + count * entry == size:
            return rva + 4
        if 8 + count * entry == size:
            return rva + 8
        if 4 + count * entry < size:
            return rva + 4
        raise DumpFormatError(f"{count} {what} entries do not fit the {size}-byte stream")

    def string(self, rva: int) -> str:
        if rva in self.names:
            return self.names[rva]
        (length,) = self.unpack(struct.Struct("<I"), rva, "string length")
        if length > MAX_NAME_BYTES:
            raise DumpFormatError(f"string of {length} bytes at {rva:#x}")
        size = length & ~1
        self.check(rva + 4, size, "string")
        # A path's end is kept: its file name is what names the module and its symbols.
        raw = self.data[rva + 4 + max(0, size - MAX_TEXT_BYTES) : rva + 4 + size]
        text = raw.decode("utf-16-le", errors="replace")[-MAX_TEXT_CHARS:]
        self.names[rva] = text = self.texts.setdefault(text, text)
        return text

    def modules(self, stream: tuple[int, int] | None, os: str | None) -> tuple[Module, ...]:
        if stream is None:
            return ()
        start = self.list_header(stream, _MODULE.size, MAX_MODULES, "module")
        count = (stream[0] + stream[1] - start) // _MODULE.size
        (declared,) = struct.unpack_from("<I", self.data, stream[0])
        modules = []
        for i in range(min(count, declared)):
            fields = _MODULE.unpack_from(self.data, start + i * _MODULE.size)
            base, size, _checksum, stamp, name_rva = fields[:5]
            version = fields[5:18]
            cv_size, cv_rva = struct.unpack("<II", fields[18])
            code_file = self.string(name_rva)
            cv_size = min(cv_size, MAX_CODEVIEW_BYTES)
            cv = self.span(cv_rva, cv_size, "CodeView record", CODEVIEW_READ_BYTES)
            module = _module(base, size, stamp, code_file, cv, version, os, self.intern)
            modules.append(module)
        modules.sort(key=lambda m: m.base)
        return tuple(modules)

    def memory(
        self, listed: tuple[int, int] | None, listed64: tuple[int, int] | None
    ) -> tuple[MemoryRange, ...]:
        ranges: list[MemoryRange] = []
        if listed is not None:
            start = self.list_header(listed, _MEMORY.size, MAX_MEMORY_RANGES, "memory")
            (count,) = struct.unpack_from("<I", self.data, listed[0])
            for i in range(count):
                base, size, rva = _MEMORY.unpack_from(self.data, start + i * _MEMORY.size)
                self.check(rva, size, "memory range")
                ranges.append(MemoryRange(base, size, rva))
        if listed64 is not None:
            rva, size = listed64
            count, data_rva = self.unpack(struct.Struct("<QQ"), rva, "Memory64List header")
            if count > MAX_MEMORY_RANGES or 16 + count * _MEMORY64.size > size:
                raise DumpFormatError(f"{count} Memory64List entries do not fit the stream")
            # The ranges' bytes follow each other from one base offset, in list order.
            offset = data_rva
            for i in range(count):
                base, length = _MEMORY64.unpack_from(self.data, rva + 16 + i * _MEMORY64.size)
                self.check(offset, length, "Memory64List range")
                ranges.append(MemoryRange(base, length, offset))
                offset += length
        ranges.sort(key=lambda r: (r.base, -r.size))
        kept: list[MemoryRange] = []
        for region in ranges:
            if region.size == 0 or region.base + region.size > 1 << 64:
                continue
            if kept and region.base < kept[-1].end:
                continue  # overlapping ranges: the first (largest) wins, so bisect stays exact
            kept.append(region)
        return tuple(kept)

    def context(self, rva: int, size: int, cpu: str | None) -> Context | None:
        if size == 0:
            return None
        return _context(self.span(rva, size, "thread context", CONTEXT_MAX_BYTES), cpu)

    def threads(
        self, stream: tuple[int, int] | None, cpu: str | None, memory: tuple[MemoryRange, ...]
    ) -> tuple[Thread, ...]:
        if stream is None:
            return ()
        start = self.list_header(stream, _THREAD.size, MAX_THREADS, "thread")
        (count,) = struct.unpack_from("<I", self.data, stream[0])
        threads = []
        bases = [r.base for r in memory]
        for i in range(count):
            fields = _THREAD.unpack_from(self.data, start + i * _THREAD.size)
            thread_id, _suspend, _cls, _prio, _teb, stack_start, stack_size, stack_rva = fields[:8]
            ctx_size, ctx_rva = fields[8:10]
            context = self.context(ctx_rva, ctx_size, cpu)
            stack: MemoryRange | None = None
            if stack_size and stack_rva:
                self.check(stack_rva, stack_size, "thread stack")
                stack = MemoryRange(stack_start, stack_size, stack_rva)
            elif context is not None:
                # Full-memory dumps leave the descriptor empty: the stack is in Memory64List.
                j = bisect.bisect_right(bases, context.stack_pointer) - 1
                if j >= 0 and memory[j].contains(context.stack_pointer):
                    stack = memory[j]
            threads.append(Thread(thread_id, stack_start, stack, context))
        return tuple(threads)

    def exception(self, stream: tuple[int, int] | None, cpu: str | None) -> ExceptionInfo | None:
        if stream is None:
            return None
        rva, size = stream
        if size < _EXCEPTION.size:
            raise DumpFormatError("exception stream too short")
        fields = self.unpack(_EXCEPTION, rva, "exception stream")
        thread_id, _align, code, flags, _record, address, nparams, _pad, info, csize, crva = fields
        params = struct.unpack("<15Q", info)[: min(nparams, 15)]
        return ExceptionInfo(
            thread_id, code, flags, address, params, self.context(crva, csize, cpu)
        )


def _guid(raw: bytes) -> str:
    data1, data2, data3 = struct.unpack_from("<IHH", raw)
    return f"{data1:08X}{data2:04X}{data3:04X}{raw[8:16].hex().upper()}"


def _basename(path: str) -> str:
    return path.replace("\\", "/").rsplit("/", 1)[-1]


def _text(raw: bytes) -> str:
    """A NUL-terminated UTF-8 name of a CodeView record, cut to MAX_TEXT_CHARS."""
    return raw.split(b"\0", 1)[0].decode("utf-8", errors="replace")[:MAX_TEXT_CHARS]


def _module(
    base: int,
    size: int,
    stamp: int,
    code_file: str,
    cv: bytes,
    version: tuple[int, ...],
    os: str | None,
    intern: Callable[[str | None], str | None],
) -> Module:
    code_id: str | None = None
    debug_file: str | None = None
    debug_id: str | None = None
    signature = struct.unpack_from("<I", cv)[0] if len(cv) >= 4 else None
    if signature == CV_PDB70 and len(cv) >= 24:
        guid = cv[4:20]
        (age,) = struct.unpack_from("<I", cv, 20)
        name = _text(cv[24:])
        if any(guid):
            debug_id = f"{_guid(guid)}{age:X}"
        if os in ("macOS", "iOS"):
            # Crashpad files a Mach-O's LC_UUID here with age 0; its code id is the UUID.
            code_id = _guid(guid) if any(guid) else None
            debug_file = _basename(name or code_file)
        else:
            # Breakpad's Linux writers filed a build id here before BpEL existed: the
            # timestamp and size mean nothing there, so only Windows gets that code id.
            code_id = f"{stamp:08X}{size:x}" if os == "Windows" else None
            debug_file = _basename(name) or None
    elif signature == CV_PDB20 and len(cv) >= 16:
        pdb_signature, age = struct.unpack_from("<II", cv, 8)
        debug_id = f"{pdb_signature:08X}{age:x}".upper()
        debug_file = _basename(_text(cv[16:])) or None
        code_id = f"{stamp:08X}{size:x}"
    elif signature == CV_ELF:
        build_id = cv[4 : 4 + MAX_TEXT_CHARS // 2]  # longer is junk; its hex would be too
        if any(build_id):
            code_id = build_id.hex()
            debug_id = _guid(build_id[:16].ljust(16, b"\0")) + "0"
            debug_file = _basename(code_file)
    elif os == "Windows":
        code_id = f"{stamp:08X}{size:x}"
    return Module(
        base=base,
        size=size,
        code_file=code_file,
        code_id=intern(code_id),
        debug_file=intern(debug_file),
        debug_id=intern(debug_id),
        version=_version(version, os),
    )


def _version(info: tuple[int, ...], os: str | None) -> str | None:
    signature, struct_version, hi, lo = info[:4]
    if (
        signature != VS_FFI_SIGNATURE
        or struct_version != 0x10000
        or os not in ("Windows", "macOS", "iOS")
    ):
        return None
    return f"{hi >> 16}.{hi & 0xFFFF}.{lo >> 16}.{lo & 0xFFFF}"


def _context(raw: bytes, cpu: str | None) -> Context | None:
    """Registers of a CONTEXT record; the layout is told by its CPU flag bits, with the
    system's CPU deciding where to look for them (amd64 keeps them at offset 48)."""
    flags = struct.unpack_from("<I", raw)[0] if len(raw) >= 4 else 0
    if cpu == "amd64" or (cpu is None and len(raw) >= CONTEXT_AMD64_SIZE):
        if len(raw) < CONTEXT_AMD64_SIZE:
            raise DumpFormatError(f"amd64 context of {len(raw)} bytes")
        (flags,) = struct.unpack_from("<I", raw, 48)
        eflags = struct.unpack_from("<I", raw, 68)[0]
        values = struct.unpack_from("<17Q", raw, 120)
        registers = dict(zip(AMD64_REGISTERS, values, strict=True))
        registers["eflags"] = eflags
        return Context("amd64", MappingProxyType(registers))
    if cpu == "x86" or (cpu is None and flags & CONTEXT_X86):
        if len(raw) < 204:  # up to SegSs; the extended registers are optional
            raise DumpFormatError(f"x86 context of {len(raw)} bytes")
        values = struct.unpack_from("<11I", raw, 156)
        registers = dict(zip(X86_REGISTERS, values, strict=True))
        return Context("x86", MappingProxyType(registers))
    if cpu == "arm64" or cpu is None:
        if flags & CONTEXT_ARM64_OLD and len(raw) >= CONTEXT_ARM64_OLD_SIZE:
            # Breakpad's first arm64 layout: u64 flags, x0-x30, sp, pc, then cpsr (packed 4).
            values = struct.unpack_from("<33Q", raw, 8)
        elif len(raw) >= CONTEXT_ARM64_SIZE:
            # Windows' ARM64 CONTEXT, which Breakpad and Crashpad now write too:
            # u32 flags, u32 cpsr, x0-x30, sp, pc.
            values = struct.unpack_from("<33Q", raw, 8)
        else:
            raise DumpFormatError(f"arm64 context of {len(raw)} bytes")
        registers = dict(zip(ARM64_REGISTERS, values[:31], strict=True))
        registers["sp"], registers["pc"] = values[31], values[32]
        return Context("arm64", MappingProxyType(registers))
    return None
