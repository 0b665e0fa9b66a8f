"""Symbol files load for lookups: Breakpad .sym text, gcc-built ELF files, an LRU, hostile input."""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import time
import tracemalloc
from pathlib import Path

import pytest

from reporting_endpoint.native import breakpad_text as symbols_text
from reporting_endpoint.native import symbols
from reporting_endpoint.native.symbols import SymbolFileError, SymbolLibrary, load_symbols

DUMPS = Path(__file__).parent / "fixtures" / "minidumps"
SYMBOLS = DUMPS / "symbols"
NULL_READ_AV = SYMBOLS / "null_read_av" / "7B7D1968FF0D47AE4366E9C3A7E1B6750" / "null_read_av.sym"
TEST_APP = SYMBOLS / "test_app.pdb" / "5A9832E5287241C1838ED98914E9B7FF1" / "test_app.sym"
KERNEL32 = SYMBOLS / "kernel32.pdb" / "BCE8785C57B44245A669896B6A19B9542" / "kernel32.sym"
MODULE = b"MODULE Linux x86_64 7B7D1968FF0D47AE4366E9C3A7E1B6750 evil\n"


def amd64_crash_offset(dump: Path) -> tuple[str, int]:
    """(module, offset) of the crashing instruction of an amd64 dump.

    ``parse_dump(...).crash_offset`` is None for this dump: on Linux the exception address is
    the faulting data address (0 here), so the instruction pointer is read from the crashing
    thread's context (CONTEXT_AMD64.Rip at 0xF8).
    """
    data = dump.read_bytes()
    count, directory = struct.unpack_from("<II", data, 8)
    streams = {}
    for index in range(count):
        kind, size, rva = struct.unpack_from("<III", data, directory + 12 * index)
        streams[kind] = rva
    exception = streams[6]  # ExceptionStream: thread id, MINIDUMP_EXCEPTION (152), context
    _, context = struct.unpack_from("<II", data, exception + 8 + 152)
    (rip,) = struct.unpack_from("<Q", data, context + 0xF8)
    modules = streams[4]
    (number,) = struct.unpack_from("<I", data, modules)
    for index in range(number):
        entry = modules + 4 + 108 * index
        base, size = struct.unpack_from("<QI", data, entry)
        (name_rva,) = struct.unpack_from("<I", data, entry + 20)
        (length,) = struct.unpack_from("<I", data, name_rva)
        name = data[name_rva + 4 : name_rva + 4 + length].decode("utf-16-le")
        if base <= rip < base + size:
            return name.rsplit("/", 1)[-1], rip - base
    raise AssertionError("crash address outside every module")


def test_null_read_av_crash_resolves_to_the_crashing_function_and_line() -> None:
    module, offset = amd64_crash_offset(DUMPS / "linux-x64_breakpad_linux_null_read_av.dmp")
    assert module == "null_read_av"
    loaded = load_symbols(NULL_READ_AV)
    (line,) = loaded.lookup(offset)
    assert line.function == "crash()"
    assert line.file is not None and line.file.endswith("/null_read_av.cc")
    assert line.line == 18
    assert loaded.debug_id == "7B7D1968FF0D47AE4366E9C3A7E1B6750"
    assert loaded.arch == "x86_64"
    assert loaded.has_functions


def expected_minidump2_frames() -> list[tuple[int, str, str, int]]:
    """(module offset to look up, function, file, line) of test_app.exe's frames, as
    Breakpad's own stackwalk output prints them."""
    text = (DUMPS / "win-x86_breakpad_minidump2.stackwalk.expected.txt").read_text()
    base = int(re.search(r"^(0x[0-9a-f]+) - 0x[0-9a-f]+  test_app\.exe", text, re.M)[1], 16)  # type: ignore[index]
    frames = re.findall(
        r"^ (\d+)  test_app\.exe!(.+?) \[(\S+) : (\d+) \+ 0x[0-9a-f]+\]\n\s+eip = (0x[0-9a-f]+)",
        text,
        re.M,
    )
    out = []
    for index, function, file, line, eip in frames:
        # Frames past the first hold return addresses; the call is the instruction before.
        offset = int(eip, 16) - base - (int(index) > 0)
        out.append((offset, function, file, int(line)))
    return out


def test_test_app_lookups_match_breakpads_stackwalk() -> None:
    frames = expected_minidump2_frames()
    assert [f[1] for f in frames[:2]] == ["`anonymous namespace'::CrashFunction", "main"]
    loaded = load_symbols(TEST_APP)
    for offset, function, file, line in frames:
        found = loaded.lookup(offset)
        assert found, hex(offset)
        assert found[-1].function == function
        assert found[-1].file is not None and found[-1].file.endswith(file)
        assert found[-1].line == line
    assert frames[0][3] == 58 and frames[1][3] == 65


def test_public_only_symbols_name_the_function_without_a_line() -> None:
    (line,) = load_symbols(KERNEL32).lookup(0x7C816FD7 - 0x7C800000 - 1)
    assert line.function == "BaseProcessStart"
    assert line.line is None and line.file is None
    assert line.function_offset == 0x22


def test_unknown_offsets_give_nothing() -> None:
    loaded = load_symbols(NULL_READ_AV)
    assert loaded.lookup(0x7FFF_FFFF_0000) == ()
    assert loaded.lookup(-1) == ()
    assert loaded.lookup(2**70) == ()


def test_stack_records_are_the_files_stack_lines_in_order() -> None:
    lines = NULL_READ_AV.read_text().splitlines()
    expected = tuple(line for line in lines if line.startswith("STACK "))
    assert len(expected) == 1096
    assert load_symbols(NULL_READ_AV).stack_records() == expected
    win = load_symbols(TEST_APP).stack_records()
    assert win and all(line.startswith("STACK WIN ") for line in win)


def test_functions_are_found_when_stack_records_come_first(tmp_path: Path) -> None:
    # symbolic alone stops reading FUNC records at the first STACK record.
    path = tmp_path / "x.sym"
    path.write_bytes(
        MODULE + b"STACK CFI INIT 1000 10 .cfa: $rsp 8 +\nFILE 0 a.c\nFUNC 1000 10 0 f()\n"
        b"1000 10 7 0\nSTACK CFI 1004 .cfa: $rsp 16 +\n"
    )
    loaded = load_symbols(path)
    assert [(x.function, x.line) for x in loaded.lookup(0x1004)] == [("f()", 7)]
    assert loaded.stack_records() == (
        "STACK CFI INIT 1000 10 .cfa: $rsp 8 +",
        "STACK CFI 1004 .cfa: $rsp 16 +",
    )


C_PROGRAM = """\
#include <stdlib.h>
static inline __attribute__((always_inline)) int helper(int *p) {
  return *p + 1;
}
__attribute__((noinline)) int crash(int *p) {
  return helper(p) * 2;
}
int main(int argc, char **argv) {
  return crash(argc > 5 ? &argc : NULL);
}
"""

CXX_PROGRAM = """\
#include <vector>
namespace ns {
template <typename T> struct Box {
  __attribute__((noinline)) int get(std::vector<T>& v, int i) { return v[i] + 1; }
};
}
namespace {
__attribute__((noinline)) int anon(int x) { return x * 3; }
}
int main(int argc, char**) {
  std::vector<int> v(3); ns::Box<int> b; return b.get(v, argc) + anon(argc);
}
"""


def compile_program(tmp_path: Path, compiler: str, source: str, suffix: str, *flags: str) -> Path:
    if shutil.which(compiler) is None or shutil.which("nm") is None:
        reason = f"{compiler} (and nm) not installed: cannot build a native debug file"
        print(reason)
        pytest.skip(reason)
    src = tmp_path / f"prog{suffix}"
    src.write_text(source)
    out = tmp_path / f"prog-{compiler}{'-'.join(flags)}"
    subprocess.run([compiler, *flags, str(src), "-o", str(out)], check=True)
    return out


def function_symbols(binary: Path) -> dict[str, tuple[int, int]]:
    """Symbol name -> (address, size) from nm."""
    lines = subprocess.run(
        ["nm", "-S", str(binary)], check=True, capture_output=True, text=True
    ).stdout.splitlines()
    found = {}
    for line in lines:
        parts = line.split()
        if len(parts) == 4 and parts[2] in "tTwW":
            found[parts[3]] = (int(parts[0], 16), int(parts[1], 16))
    return found


def test_gcc_elf_loads_directly_with_functions_and_lines(tmp_path: Path) -> None:
    binary = compile_program(tmp_path, "gcc", C_PROGRAM, ".c", "-g", "-O0")
    names = function_symbols(binary)
    loaded = load_symbols(binary)
    assert loaded.has_functions and loaded.arch == "x86_64"
    (crash,) = loaded.lookup(names["crash"][0])
    assert (crash.function, crash.line, crash.function_offset) == ("crash", 5, 0)
    assert crash.file is not None and crash.file.endswith("prog.c")
    body = loaded.lookup(names["main"][0] + names["main"][1] - 1)
    assert body[-1].function == "main" and body[-1].line in (9, 10)
    # Its id is Breakpad's: the build id folded into a GUID, age 0.
    assert re.fullmatch(r"[0-9A-F]{32}0", loaded.debug_id)


def test_inlined_functions_come_innermost_first(tmp_path: Path) -> None:
    binary = compile_program(tmp_path, "gcc", C_PROGRAM, ".c", "-g", "-O2")
    start, size = function_symbols(binary)["crash"]
    loaded = load_symbols(binary)
    chains = [[x.function for x in loaded.lookup(start + i)] for i in range(size)]
    assert ["helper", "crash"] in chains
    inlined = next(loaded.lookup(start + i) for i in range(size) if len(chains[i]) == 2)
    assert inlined[0].line == 3 and inlined[0].function_offset is None
    assert inlined[1].line == 6


def test_inline_depth_is_capped(tmp_path: Path) -> None:
    path = tmp_path / "deep.sym"
    origins = b"".join(b"INLINE_ORIGIN %d g%d\n" % (i, i) for i in range(40))
    inlines = b"".join(b"INLINE %d 1 0 %d 1000 100\n" % (i, i) for i in range(40))
    path.write_bytes(MODULE + b"FILE 0 a.c\n" + origins + b"FUNC 1000 100 0 f\n" + inlines)
    found = load_symbols(path).lookup(0x1004)
    assert len(found) == symbols_text.MAX_INLINE_DEPTH
    assert found[-1].function == "f"


def test_cxx_names_are_demangled(tmp_path: Path) -> None:
    binary = compile_program(tmp_path, "g++", CXX_PROGRAM, ".cc", "-g", "-O0")
    names = function_symbols(binary)
    loaded = load_symbols(binary)
    get = loaded.lookup(names["_ZN2ns3BoxIiE3getERSt6vectorIiSaIiEEi"][0] + 1)
    assert get[-1].function == "ns::Box<int>::get(std::vector<int, std::allocator<int> >&, int)"
    anon = loaded.lookup(names["_ZN12_GLOBAL__N_14anonEi"][0] + 1)
    assert anon[-1].function == "(anonymous namespace)::anon(int)"


def test_elf_gives_stack_cfi_records(tmp_path: Path) -> None:
    binary = compile_program(tmp_path, "gcc", C_PROGRAM, ".c", "-g", "-O0")
    start, _ = function_symbols(binary)["crash"]
    records = load_symbols(binary).stack_records()
    assert records and all(line.startswith("STACK CFI ") for line in records)
    assert any(line.startswith(f"STACK CFI INIT {start:x} ") for line in records)


def test_stripped_elf_has_no_functions_and_debug_stripped_keeps_names(tmp_path: Path) -> None:
    binary = compile_program(tmp_path, "gcc", C_PROGRAM, ".c", "-g", "-O0")
    if shutil.which("strip") is None:
        pytest.skip("strip not installed")
    start, _ = function_symbols(binary)["crash"]
    bare, names_only = tmp_path / "bare", tmp_path / "names"
    subprocess.run(["strip", "-o", str(bare), str(binary)], check=True)
    subprocess.run(["strip", "--strip-debug", "-o", str(names_only), str(binary)], check=True)
    assert not load_symbols(bare).has_functions
    assert load_symbols(bare).lookup(start) == ()
    kept = load_symbols(names_only)
    assert kept.has_functions
    assert [(x.function, x.line) for x in kept.lookup(start + 1)] == [("crash", None)]


def test_library_caches_and_evicts_by_bytes(tmp_path: Path) -> None:
    sizes = {p: load_symbols(p).size_bytes for p in (NULL_READ_AV, TEST_APP, KERNEL32)}
    copy = tmp_path / "copy.sym"
    shutil.copy(NULL_READ_AV, copy)
    library = SymbolLibrary(max_bytes=sizes[NULL_READ_AV] + sizes[TEST_APP], max_files=10)
    first = library.get("a", copy)
    copy.unlink()  # a hit never reads the file again
    assert library.get("a", copy) is first
    library.get("b", TEST_APP)
    assert "a" in library and "b" in library
    library.get("a", NULL_READ_AV)  # now the most recent: b goes first
    library.get("c", KERNEL32)
    assert "b" not in library and "c" in library
    assert library.bytes_held <= library.max_bytes
    assert (
        library.bytes_held == sum(s for p, s in sizes.items() if p in (NULL_READ_AV, KERNEL32))
        or "a" not in library
    )


def test_library_evicts_by_count_and_skips_what_cannot_fit() -> None:
    library = SymbolLibrary(max_bytes=2**40, max_files=1)
    library.get("a", NULL_READ_AV)
    library.get("b", TEST_APP)
    assert len(library) == 1 and "b" in library
    tiny = SymbolLibrary(max_bytes=100, max_files=5)
    assert tiny.get("a", NULL_READ_AV).lookup(0x2170)
    assert len(tiny) == 0


def hostile_files(tmp: Path) -> dict[str, Path]:
    def write(name: str, *parts: bytes) -> Path:
        path = tmp / name
        with path.open("wb") as handle:
            handle.write(MODULE)
            for part in parts:
                handle.write(part)
        return path

    valid = b"FILE 0 a.c\nFUNC 1000 10 0 ok\n1000 10 7 0\n"
    return {
        "huge addresses and sizes": write(
            "addr.sym",
            valid,
            b"FUNC ffffffffffffff00 ffffffffffffffff 0 top\nffffffffffffff00 ff 1 0\n",
            b"FUNC 2000 ffffffffffffffff 0 wide\n",
        ),
        "huge line numbers and file ids": write(
            "lines.sym", valid, b"1000 10 99999999999999 0\n1000 4 2147483648 4294967295\n"
        ),
        "a million FILE records": write(
            "files.sym", b"".join(b"FILE %d f%d.c\n" % (i, i) for i in range(10**6)), valid
        ),
        "overlapping functions": write(
            "overlap.sym",
            b"FILE 0 a.c\n",
            b"".join(b"FUNC 0 ffffffff 0 f%d\n0 ffffffff %d 0\n" % (i, i) for i in range(10**5)),
            valid,
        ),
        "binary junk": write("junk.sym", os.urandom(8 * 2**20), b"\n", valid),
        "a few junk lines": write("fewjunk.sym", valid, b"this is junk\n\xff\xfe\x00\nFUNC zz\n"),
        "a line past the bound": write(
            "long.sym", b"FUNC 3000 10 0 ", b"x" * (4 * symbols_text.MAX_LINE_BYTES), b"\n", valid
        ),
    }


@pytest.mark.slow
def test_hostile_symbol_files_load_without_the_junk_or_are_refused_in_bounded_time(
    tmp_path: Path,
) -> None:
    for label, path in hostile_files(tmp_path).items():
        tracemalloc.start()
        started = time.monotonic()
        try:
            loaded = load_symbols(path)
        except SymbolFileError as exc:
            outcome = exc.code
        else:
            outcome = "loaded"
            found = loaded.lookup(0x1004)
            assert found and found[-1].function == "ok", label
            assert found[-1].line == 7, label
        elapsed = time.monotonic() - started
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert outcome in ("loaded", "junk_symbol_file"), (label, outcome)
        assert elapsed < 20, (label, elapsed)
        # Python-side memory stays near the chunk size whatever the file holds: a long line is
        # never held whole, and the records symbolic reads go through a file, not memory.
        assert peak < 8 * symbols_text.MAX_LINE_BYTES, (label, peak)
    assert load_symbols(tmp_path / "fewjunk.sym").stats.skipped == 3
    mostly_junk = tmp_path / "mostly_junk.sym"
    mostly_junk.write_bytes(
        MODULE + b"FUNC 1 1 0 f\n" + b"junk\n" * (symbols_text.MAX_SKIPPED_LINES + 1)
    )
    with pytest.raises(SymbolFileError) as refused:
        load_symbols(mostly_junk)
    assert refused.value.code == "junk_symbol_file"


def test_files_that_are_not_symbols_are_refused_with_a_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cases = {
        "random.bin": (os.urandom(4096), "unsupported_debug_file"),
        "badid.sym": (b"MODULE Linux x86_64 XYZ evil\n", "bad_module_line"),
        "short.sym": (b"MODULE Linux x86_64\n", "bad_module_line"),
        "empty.sym": (b"", "unsupported_debug_file"),
    }
    for name, (content, code) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(SymbolFileError) as refused:
            load_symbols(path)
        assert refused.value.code == code, name
    with pytest.raises(SymbolFileError) as missing:
        load_symbols(tmp_path / "absent.sym")
    assert missing.value.code == "unreadable"
    monkeypatch.setattr(symbols, "MAX_FILE_BYTES", 1000)
    with pytest.raises(SymbolFileError) as large:
        load_symbols(NULL_READ_AV)
    assert large.value.code == "too_large"
