"""Synthetic minidumps for the dump reader and walker tests: only the streams they read."""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

ARCH_CODES = {"x86": 0, "amd64": 9, "arm64": 12}
PLATFORM_CODES = {"Windows": 2, "Linux": 0x8201, "macOS": 0x8101}
AMD64_ORDER = (
    "rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip",
)  # fmt: skip


def amd64_context(registers: Mapping[str, int]) -> bytes:
    raw = bytearray(1232)
    struct.pack_into("<I", raw, 48, 0x0010000B)
    struct.pack_into("<17Q", raw, 120, *(registers.get(name, 0) for name in AMD64_ORDER))
    return bytes(raw)


def arm64_context(registers: Mapping[str, int], old: bool = False) -> bytes:
    """Windows' ARM64 CONTEXT (what Crashpad writes), or Breakpad's first layout."""
    values = [registers.get(f"x{i}", 0) for i in range(31)]
    values += [registers.get("sp", 0), registers.get("pc", 0)]
    if old:
        raw = bytearray(796)
        struct.pack_into("<Q", raw, 0, 0x80000003)
    else:
        raw = bytearray(912)
        struct.pack_into("<I", raw, 0, 0x00400003)
    struct.pack_into("<33Q", raw, 8, *values)
    return bytes(raw)


@dataclass
class SynthModule:
    base: int
    size: int
    name: str
    build_id: bytes = b""  # written as a Breakpad BpEL record when set


@dataclass
class SynthThread:
    thread_id: int
    context: bytes
    stack_base: int
    stack: bytes


@dataclass
class SynthDump:
    cpu: str
    os: str = "Linux"
    modules: Sequence[SynthModule] = ()
    threads: Sequence[SynthThread] = ()
    exception_thread: int | None = None
    extra_streams: list[tuple[int, bytes]] = field(default_factory=list)

    def build(self) -> bytes:
        """Lay the streams out after a header and directory; every offset is real."""
        blobs: list[tuple[int, bytes]] = []
        body = bytearray()
        stream_count = 4 + (self.exception_thread is not None) + len(self.extra_streams)
        start = 32 + 12 * stream_count

        def place(data: bytes) -> int:
            offset = start + len(body)
            body.extend(data)
            body.extend(b"\0" * (-len(body) % 8))
            return offset

        system = struct.pack(
            "<HHHBBIIIII", ARCH_CODES[self.cpu], 0, 0, 1, 0, 0, 0, 0, PLATFORM_CODES[self.os], 0
        ) + bytes(24)
        blobs.append((7, system))

        entries = b""
        for module in self.modules:
            encoded = module.name.encode("utf-16-le")
            name_rva = place(struct.pack("<I", len(encoded)) + encoded + b"\0\0")
            cv = b"LEpB" + module.build_id if module.build_id else b""
            cv_rva = place(cv) if cv else 0
            entries += struct.pack(
                "<QIIII13III16x", module.base, module.size, 0, 0, name_rva,
                *([0] * 13), len(cv), cv_rva,
            ) + bytes(8)  # fmt: skip
        blobs.append((4, struct.pack("<I", len(self.modules)) + entries))

        entries = b""
        ranges = b""
        for thread in self.threads:
            ctx_rva = place(thread.context)
            stack_rva = place(thread.stack)
            entries += struct.pack(
                "<IIIIQQIIII", thread.thread_id, 0, 0, 0, 0,
                thread.stack_base, len(thread.stack), stack_rva, len(thread.context), ctx_rva,
            )  # fmt: skip
            ranges += struct.pack("<QII", thread.stack_base, len(thread.stack), stack_rva)
        blobs.append((3, struct.pack("<I", len(self.threads)) + entries))
        blobs.append((5, struct.pack("<I", len(self.threads)) + ranges))

        if self.exception_thread is not None:
            thread = next(t for t in self.threads if t.thread_id == self.exception_thread)
            ctx_rva = place(thread.context)
            record = struct.pack("<IIQQII120s", 0xB, 0, 0, 0, 0, 0, bytes(120))
            stream = struct.pack("<II", thread.thread_id, 0) + record
            blobs.append((6, stream + struct.pack("<II", len(thread.context), ctx_rva)))
        blobs.extend(self.extra_streams)

        directory = b""
        for kind, data in blobs:
            directory += struct.pack("<III", kind, len(data), place(data))
        header = struct.pack("<IIIIIIQ", 0x504D444D, 0xA793, len(blobs), 32, 0, 0, 0)
        return header + directory + bytes(body)


def words(values: Sequence[int], width: int = 8) -> bytes:
    return struct.pack(f"<{len(values)}{'Q' if width == 8 else 'I'}", *values)


class RawDump:
    """A dump laid out by hand, for hostile files: blobs go where ``place`` puts them, so
    records may share (or overlap) the bytes they point at, which ``SynthDump`` never does."""

    def __init__(self) -> None:
        self.body = bytearray(32)  # the header, written by ``build``
        self.streams: list[tuple[int, int, int]] = []

    def place(self, data: bytes) -> int:
        offset = len(self.body)
        self.body.extend(data)
        self.body.extend(b"\0" * (-len(self.body) % 8))
        return offset

    def stream(self, kind: int, data: bytes) -> int:
        offset = self.place(data)
        self.streams.append((kind, len(data), offset))
        return offset

    def build(self) -> bytes:
        directory = self.place(b"".join(struct.pack("<III", *entry) for entry in self.streams))
        struct.pack_into(
            "<IIIIIIQ", self.body, 0, 0x504D444D, 0xA793, len(self.streams), directory, 0, 0, 0
        )
        return bytes(self.body)


def system_info(cpu: str, os: str) -> bytes:
    """A MINIDUMP_SYSTEM_INFO stream (kind 7) for ``cpu`` on ``os``."""
    return struct.pack(
        "<HHHBBIIIII", ARCH_CODES[cpu], 0, 0, 1, 0, 0, 0, 0, PLATFORM_CODES[os], 0
    ) + bytes(24)
