"""The raw minidump reader: module identity as symbol stores file it, threads, memory, bad files."""

from __future__ import annotations

import pickle
import struct
import time
import tracemalloc
from pathlib import Path

import pytest

from reporting_endpoint.native.dumpfile import (
    MAX_MODULES,
    MAX_NAME_BYTES,
    MAX_STREAMS,
    MAX_TEXT_CHARS,
    MAX_THREADS,
    DumpFormatError,
    parse_dump,
    read_dump,
)
from tests.native_dumps import (
    RawDump,
    SynthDump,
    SynthModule,
    SynthThread,
    amd64_context,
    arm64_context,
    system_info,
)

DUMPS = Path(__file__).parent / "fixtures" / "minidumps"
SYMBOLS = DUMPS / "symbols"


def module(dump_name: str, code_file_tail: str):  # type: ignore[no-untyped-def]
    dump = read_dump(DUMPS / dump_name)
    found = [m for m in dump.modules if m.code_file.endswith(code_file_tail)]
    assert found, [m.code_file for m in dump.modules]
    return found[0]


@pytest.mark.parametrize(
    ("dump_name", "code_file", "debug_file", "debug_id", "code_id"),
    [
        # Windows PDB70: GUID + age, code id = timestamp + size.
        (
            "win-x86_breakpad_minidump2.dmp", "test_app.exe", "test_app.pdb",
            "5A9832E5287241C1838ED98914E9B7FF1", "45D35F6C2d000",
        ),
        (
            "win-x86_breakpad_minidump2.dmp", "kernel32.dll", "kernel32.pdb",
            "BCE8785C57B44245A669896B6A19B9542", "44AB9A84f4000",
        ),
        (
            "win-x64_electron_node-minidump_windows.dmp", "electron.exe", "electron.exe.pdb",
            "2AC9BCFD148345439667328ACC4760541", "57F6101B545a000",
        ),
        # Linux, an RSDS record from Breakpad before BpEL: no code id.
        (
            "linux-x64_breakpad_linux_null_read_av.dmp", "/null_read_av", "null_read_av",
            "7B7D1968FF0D47AE4366E9C3A7E1B6750", None,
        ),
        # Linux BpEL: the build id is the code id, its first 16 bytes (GUID order) the debug id.
        (
            "linux-x64_electron_node-minidump_linux.dmp", "/electron", "electron",
            "777C57F92595B17739202B842E0F27380", "f9577c77952577b139202b842e0f2738ced53c21",
        ),
        # macOS (Crashpad): LC_UUID with age 0; the code file's base name is the debug file.
        (
            "mac-x64_electron_node-minidump_mac.dmp", "/Electron Framework", "Electron Framework",
            "02DB4A28EC3E3BF8833FA54C0D5E86350", "02DB4A28EC3E3BF8833FA54C0D5E8635",
        ),
        (
            "mac-x64_rustminidump_simple-crashpad.dmp", "/crashy", "crashy",
            "EF1091E381DA369B9039EA1591D07E0B0", "EF1091E381DA369B9039EA1591D07E0B",
        ),
    ],
)  # fmt: skip
def test_module_identity(
    dump_name: str, code_file: str, debug_file: str, debug_id: str, code_id: str | None
) -> None:
    found = module(dump_name, code_file)
    assert (found.debug_file, found.debug_id, found.code_id) == (debug_file, debug_id, code_id)


def test_symbol_folders_match_the_modules_they_were_made_for() -> None:
    """Every fixture .sym is found under the (debug_file, debug_id) its dump's module names."""
    keys = set()
    for name in ("win-x86_breakpad_minidump2.dmp", "linux-x64_breakpad_linux_null_read_av.dmp"):
        keys |= {m.symbol_key for m in read_dump(DUMPS / name).modules}
    for sym in SYMBOLS.glob("*/*/*.sym"):
        assert (sym.parent.parent.name, sym.parent.name) in keys
        module_line = sym.read_text(errors="replace").splitlines()[0].split()
        assert module_line[3] == sym.parent.name


def test_module_versions_from_the_version_resource() -> None:
    dump = read_dump(DUMPS / "win-x86_breakpad_minidump2.dmp")
    versions = {m.name: m.version for m in dump.modules}
    # As Breakpad's expected output lists them.
    assert versions["kernel32.dll"] == "5.1.2600.2945"
    assert versions["msvcrt.dll"] == "7.0.2600.2180"
    assert versions["test_app.exe"] is None
    assert module("win-x64_electron_node-minidump_windows.dmp", "electron.exe").version == "1.4.3.0"


def test_modules_sorted_and_found_by_address() -> None:
    dump = read_dump(DUMPS / "win-x86_breakpad_minidump2.dmp")
    assert [m.base for m in dump.modules] == sorted(m.base for m in dump.modules)
    assert len(dump.modules) == 13
    main = dump.module_at(0x0040429E)
    assert main is not None and main.name == "test_app.exe"
    assert dump.module_at(0x0042CFFF) is main
    assert dump.module_at(0x0042D000) is None
    assert dump.module_at(0x1000) is None


def test_padded_module_list_of_crashpad_on_macos() -> None:
    """A list whose count is padded to 8 bytes still reads (names and ids intact)."""
    dump = read_dump(DUMPS / "mac-x64_symbolic_crash_macos.dmp")
    assert len(dump.modules) == 43
    assert dump.modules[0].name == "crash_macos"
    assert all(m.debug_id and m.debug_id.endswith("0") for m in dump.modules)


def test_threads_exception_and_its_context() -> None:
    dump = read_dump(DUMPS / "win-x86_breakpad_minidump2.dmp")
    assert (dump.cpu, dump.os) == ("x86", "Windows")
    assert dump.exception is not None
    assert dump.exception.code == 0xC0000005
    # The faulting instruction; an access violation's own data says what it touched.
    assert dump.exception.address == 0x0040429E
    assert dump.exception.parameters == (1, 0x45)  # a write to 0x45, Breakpad's crash address
    assert dump.crashing_thread_id == dump.exception.thread_id
    context = dump.context_of(dump.exception.thread_id)
    assert context is not None
    # The registers Breakpad prints for frame 0.
    expected = {
        "eip": 0x0040429E, "esp": 0x0012FE84, "ebp": 0x0012FE88, "ebx": 0x7C80ABC1,
        "esi": 0x00000002, "edi": 0x00000A28, "eax": 0x00000045, "ecx": 0x0012FE94,
        "edx": 0x0042BC58, "efl": 0x00010246,
    }  # fmt: skip
    assert {name: context.registers[name] for name in expected} == expected
    thread = dump.thread(dump.exception.thread_id)
    assert thread is not None and thread.stack is not None
    assert thread.stack.contains(context.stack_pointer)


def test_amd64_context_and_memory_reads() -> None:
    dump = read_dump(DUMPS / "linux-x64_breakpad_linux_null_read_av.dmp")
    assert (dump.cpu, dump.os) == ("amd64", "Linux")
    context = dump.context_of(dump.crashing_thread_id or 0)
    assert context is not None
    assert context.instruction_pointer == 0x402170
    stack = dump.thread(dump.crashing_thread_id or 0).stack  # type: ignore[union-attr]
    assert stack is not None
    raw = dump.read(context.stack_pointer, 8)
    assert raw is not None and len(raw) == 8
    # The return address into main() that the CFI of crash() finds at the CFA - 8.
    assert struct.unpack("<Q", raw)[0] == 0x401FCF
    assert dump.read(stack.end - 4, 8) is None  # straddles the end of the range
    assert dump.read(stack.end - 8, 8) is not None
    assert dump.read(0x10, 4) is None


def test_synthetic_arm64_contexts_both_layouts() -> None:
    registers = {"pc": 0x1234, "sp": 0x8000, "x29": 0x8010, "x30": 0x5678, "x0": 7}
    for old in (False, True):
        dump = parse_dump(
            SynthDump(
                "arm64",
                threads=[SynthThread(1, arm64_context(registers, old=old), 0x8000, bytes(64))],
            ).build()
        )
        context = dump.threads[0].context
        assert context is not None and context.cpu == "arm64"
        assert {k: context.registers[k] for k in registers} == registers


def test_bad_fixture_files_raise_the_one_error() -> None:
    for name in ("bad_rustminidump_invalid-range.dmp", "bad_rustminidump_invalid-record-count.dmp"):
        with pytest.raises(DumpFormatError):
            read_dump(DUMPS / name)
    with pytest.raises(DumpFormatError):
        parse_dump(b"not a minidump at all, just text")


@pytest.mark.parametrize(
    "name",
    [
        "win-x86_breakpad_minidump2.dmp",
        "linux-x64_breakpad_linux_null_read_av.dmp",
        "mac-x64_rustminidump_simple-crashpad.dmp",
    ],
)
def test_every_truncation_fails_cleanly_and_fast(name: str) -> None:
    data = (DUMPS / name).read_bytes()
    started = time.perf_counter()
    outcomes = set()
    for length in range(0, len(data), 7):
        try:
            parse_dump(data[:length])
            outcomes.add("parsed")
        except DumpFormatError:
            outcomes.add("error")
    assert "error" in outcomes
    assert time.perf_counter() - started < 5.0  # ~2,000-3,000 parses


def _patched(data: bytes, offset: int, value: int) -> bytes:
    return data[:offset] + struct.pack("<I", value) + data[offset + 4 :]


def _stream(data: bytes, kind: int) -> int:
    count, directory = struct.unpack_from("<II", data, 8)
    for i in range(count):
        stream_kind, _size, rva = struct.unpack_from("<III", data, directory + 12 * i)
        if stream_kind == kind:
            return int(rva)
    raise AssertionError(kind)


@pytest.mark.parametrize(("kind", "what"), [(3, "thread"), (4, "module"), (5, "memory")])
def test_huge_declared_counts_are_refused_at_once(kind: int, what: str) -> None:
    data = (DUMPS / "win-x86_breakpad_minidump2.dmp").read_bytes()
    for count in (0xFFFFFFFF, 5_000_000, 40):
        started = time.perf_counter()
        with pytest.raises(DumpFormatError, match=what):
            parse_dump(_patched(data, _stream(data, kind), count))
        assert time.perf_counter() - started < 0.1


def test_huge_stream_count_and_offsets_outside_the_file() -> None:
    data = (DUMPS / "win-x86_breakpad_minidump2.dmp").read_bytes()
    with pytest.raises(DumpFormatError, match="streams"):
        parse_dump(_patched(data, 8, 0xFFFFFFFF))
    with pytest.raises(DumpFormatError):
        parse_dump(_patched(data, 12, len(data) + 100))  # directory past the end
    # A module name offset pointing past the end of the file.
    modules = _stream(data, 4)
    with pytest.raises(DumpFormatError):
        parse_dump(_patched(data, modules + 4 + 20, len(data) - 2))


def test_synthetic_dump_round_trip() -> None:
    data = SynthDump(
        "amd64",
        modules=[SynthModule(0x400000, 0x1000, "/bin/app", bytes.fromhex("aabbccdd" * 5))],
        threads=[
            SynthThread(9, amd64_context({"rip": 0x400010, "rsp": 0x9000}), 0x9000, b"x" * 32)
        ],
        exception_thread=9,
    ).build()
    dump = parse_dump(data)
    assert dump.modules[0].code_id == "aabbccdd" * 5
    assert dump.modules[0].debug_id == "DDCCBBAABBAADDCCAABBCCDDAABBCCDD0"
    assert dump.read(0x9008, 4) == b"xxxx"
    assert dump.crashing_thread_id == 9


def _module_entry(base: int, stamp: int, name_rva: int, cv_size: int, cv_rva: int) -> bytes:
    fields = (base, 0x1000, 0, stamp, name_rva, *([0] * 13), cv_size, cv_rva)
    return struct.pack("<QIIII13III16x", *fields) + bytes(8)


def _hostile_modules(layout: str) -> bytes:
    """MAX_MODULES modules whose names (and CodeView records) are as long as allowed, all
    pointing at one copy of them, or (``overlapping``) each at its own offset of one stretch."""
    raw = RawDump()
    raw.stream(7, system_info("amd64", "Linux" if layout == "elf" else "Windows"))
    encoded = ("/" + "n" * (MAX_NAME_BYTES // 2 - 1)).encode("utf-16-le")
    name_rvas = [raw.place(struct.pack("<I", len(encoded)) + encoded + bytes(2))] * MAX_MODULES
    cv = b""
    if layout == "pdb":
        cv = b"RSDS" + bytes(range(1, 17)) + struct.pack("<I", 1) + b"p" * MAX_NAME_BYTES + b"\0"
    elif layout == "elf":
        cv = b"LEpB" + bytes(range(256)) * (MAX_NAME_BYTES // 256)
    elif layout == "overlapping":
        # Read at any multiple of 4, the stretch is a name length of 32-60 KiB; no two of
        # the names it holds are alike.
        words = range(MAX_MODULES + MAX_NAME_BYTES // 4)
        stretch = raw.place(b"".join(struct.pack("<I", 0x8000 + i % 0x7000) for i in words))
        name_rvas = [stretch + 4 * i for i in range(MAX_MODULES)]
    cv_rva = raw.place(cv) if cv else 0
    entries = b"".join(
        _module_entry((i + 1) << 20, i, name_rva, len(cv), cv_rva)
        for i, name_rva in enumerate(name_rvas)
    )
    raw.stream(4, struct.pack("<I", MAX_MODULES) + entries)
    return raw.build()


@pytest.mark.parametrize("layout", ["plain", "pdb", "elf", "overlapping"])
def test_modules_sharing_one_huge_name_cost_little(layout: str) -> None:
    """A 1 MB dump of 8,192 modules naming one 64 KiB string took 16 s, 3.2 GB, and pickled
    to 1.3 GB: names and ids are cut to MAX_TEXT_CHARS, and each name decoded once."""
    data = _hostile_modules(layout)
    assert len(data) < 1_200_000
    tracemalloc.start()
    started = time.perf_counter()
    try:
        dump = parse_dump(data)
        elapsed = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    shipped = len(pickle.dumps([m.as_dict() for m in dump.modules]))  # what a processor sends
    texts = [
        text
        for m in dump.modules
        for text in (m.code_file, m.debug_file, m.code_id)
        if text is not None
    ]
    assert len(dump.modules) == MAX_MODULES  # the modules are kept, their names cut
    assert all(len(text) <= MAX_TEXT_CHARS for text in texts)
    assert len(dump.modules[0].code_file) == MAX_TEXT_CHARS
    if layout != "overlapping":
        # The end of the path is kept: its file name names the module and its symbols.
        assert dump.modules[0].code_file.endswith("n")
        assert not dump.modules[0].code_file.startswith("/")
        # One string shared by all modules, not a copy each.
        assert len({id(text) for m in dump.modules for text in (m.code_file, m.debug_file)}) <= 2
    if layout == "pdb":
        assert dump.modules[0].debug_file == "p" * MAX_TEXT_CHARS
        assert dump.modules[0].debug_id == "0403020106050807090A0B0C0D0E0F101"
    if layout == "elf":
        assert dump.modules[0].code_id == (bytes(range(256)) * 2).hex()
    # Measured under tracemalloc (several times slower): 0.5-0.7 s here, 1.4-12 s before.
    assert elapsed < 5.0
    # Distinct names cost at most MAX_TEXT_CHARS each: 8,192 of them are 16 MB as UCS-2.
    assert peak < (40 if layout == "overlapping" else 8) * 1024 * 1024
    assert shipped < (20 if layout == "overlapping" else 2) * 1024 * 1024


def _memory_entries(ranges: list[tuple[int, int, int]]) -> bytes:
    return struct.pack("<I", len(ranges)) + b"".join(struct.pack("<QII", *r) for r in ranges)


def test_many_memory_ranges_over_most_of_the_file_are_not_copied() -> None:
    """Each range was sliced out of the file to check its bounds: 65,536 ranges over 2 MB
    copied 128 GB. The check compares numbers; reads copy only the bytes asked for."""
    raw = RawDump()
    raw.stream(7, system_info("amd64", "Linux"))
    filler = bytes(range(256)) * (8 * 1024)  # 2 MiB
    filler_rva = raw.place(filler)
    count = 1 << 16
    size = len(filler) - 8
    raw.stream(5, _memory_entries([((i + 1) << 32, size, filler_rva + 8) for i in range(count)]))
    data = raw.build()
    assert size > len(data) // 2
    started = time.perf_counter()
    dump = parse_dump(data)
    assert dump.read((7 << 32) + 100, 4) == filler[108:112]
    assert dump.read_range(dump.memory[9], (10 << 32) + size - 4, 4) == filler[size + 4 :]
    assert dump.read((7 << 32) + size - 2, 4) is None  # straddles the end of the range
    assert time.perf_counter() - started < 2.0
    assert len(dump.memory) == count


def test_many_streams_over_most_of_the_file_are_not_copied() -> None:
    raw = RawDump()
    raw.stream(7, system_info("amd64", "Linux"))
    raw.place(bytes(16 << 20))
    data = raw.build()
    raw.streams += [(0x10000 + i, len(data) - 64, 32) for i in range(MAX_STREAMS - 2)]
    data = raw.build()
    started = time.perf_counter()
    dump = parse_dump(data)
    assert time.perf_counter() - started < 2.0
    assert dump.cpu == "amd64"


def test_threads_whose_stacks_and_contexts_share_one_huge_range_are_not_copied() -> None:
    """MAX_THREADS threads, each declaring most of the file as its stack and its context."""
    raw = RawDump()
    raw.stream(7, system_info("amd64", "Linux"))
    stack_base = 0x7F0000000000
    context = amd64_context({"rip": 0x401000, "rsp": stack_base + 0x100, "rbp": 7})
    stretch = context + bytes(range(256)) * (16 * 1024)  # 4 MiB after the context
    rva = raw.place(stretch)
    thread = struct.pack("<IIIIQQIIII", 0, 0, 0, 0, 0, stack_base, len(stretch), rva, 0, rva)
    entries = b"".join(
        struct.pack("<I", i + 1) + thread[4:-8] + struct.pack("<II", len(stretch), rva)
        for i in range(MAX_THREADS)
    )
    raw.stream(3, struct.pack("<I", MAX_THREADS) + entries)
    data = raw.build()
    assert len(stretch) > len(data) // 2
    started = time.perf_counter()
    dump = parse_dump(data)
    assert time.perf_counter() - started < 2.0
    assert len(dump.threads) == MAX_THREADS
    last = dump.threads[-1]
    assert last.thread_id == MAX_THREADS and last.stack is not None and last.context is not None
    assert last.context.stack_pointer == stack_base + 0x100
    assert last.context.registers["rbp"] == 7
    word = dump.read_range(last.stack, stack_base + len(stretch) - 8, 8)
    assert word == stretch[-8:]
    assert dump.read_range(last.stack, stack_base + len(stretch) - 4, 8) is None


def test_a_path_longer_than_the_cap_keeps_its_file_name() -> None:
    """Linux paths run to 4,096 characters: the end is kept, so the module still matches its
    symbols (filed under the file name)."""
    long_path = "/opt/" + "deep/" * 400 + "libfoo.so"
    data = SynthDump(
        "amd64", modules=[SynthModule(0x10000, 0x1000, long_path, bytes(range(1, 21)))]
    ).build()
    (module,) = parse_dump(data).modules
    assert len(module.code_file) == MAX_TEXT_CHARS and module.code_file.endswith("/libfoo.so")
    assert (module.name, module.debug_file) == ("libfoo.so", "libfoo.so")
