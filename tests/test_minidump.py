"""Public minidumps parse, without symbols, to what Breakpad's stackwalker reads from them."""

from __future__ import annotations

from pathlib import Path

import pytest

from reporting_endpoint.minidump import DumpParseError, exception_name, parse_dump

DUMPS = Path(__file__).parent / "fixtures" / "minidumps"

# file -> (os, cpu, exception name, crash module): from fixtures/minidumps/SOURCES.md
EXPECTED = {
    "ios-x64_breakpad_minidump_crashpad_annotation.dmp": ("iOS", "amd64", "NSEXCEPTION", None),
    "linux-x64_breakpad_linux_divide_by_zero.dmp": ("Linux", "amd64", "SIGFPE", "driver"),
    "linux-x64_breakpad_linux_null_dereference.dmp": ("Linux", "amd64", "SIGSEGV", None),
    "linux-x64_breakpad_linux_null_read_av.dmp": ("Linux", "amd64", "SIGSEGV", None),
    "linux-x64_breakpad_linux_raise_sigabrt.dmp": ("Linux", "amd64", "SIGABRT", None),
    "linux-x64_electron_node-minidump_linux.dmp": ("Linux", "amd64", "SIGILL", "electron"),
    "linux-x64_rustminidump_linux-mini.dmp": ("Linux", "amd64", "SIGSEGV", None),
    "linux-x64_symbolic_crash_linux.dmp": ("Linux", "amd64", "SIGSEGV", None),
    "mac-x64_electron_node-minidump_mac.dmp": (
        "macOS", "amd64", "EXC_BAD_INSTRUCTION", "Electron Framework",
    ),
    "mac-x64_rustminidump_pipeline-inlines-macos-segv.dmp": (
        "macOS", "amd64", "EXC_BAD_ACCESS", None,
    ),
    "mac-x64_symbolic_crash_macos.dmp": ("macOS", "amd64", "EXC_BAD_ACCESS", None),
    "win-x64_breakpad_tiny-exe-fastfail.dmp": (
        "Windows", "amd64", "FAST_FAIL_FATAL_APP_EXIT", "tiny.exe",
    ),
    "win-x64_breakpad_write_av_non_canonical.dmp": (
        "Windows", "amd64", "EXCEPTION_ACCESS_VIOLATION_READ", "crash.exe",
    ),
    "win-x64_electron_node-minidump_windows.dmp": (
        "Windows", "amd64", "EXCEPTION_ACCESS_VIOLATION_WRITE", "electron.exe",
    ),
    "win-x64_rustminidump_invalid-parameter.dmp": (
        "Windows", "amd64", "STATUS_INVALID_PARAMETER", None,
    ),
    "win-x86_breakpad_minidump2.dmp": (
        "Windows", "x86", "EXCEPTION_ACCESS_VIOLATION_WRITE", "test_app.exe",
    ),
    "win-x86_breakpad_null_read_av.dmp": (
        "Windows", "x86", "EXCEPTION_ACCESS_VIOLATION_READ", "crashme.exe",
    ),
    "win-x86_breakpad_thread_name_list.dmp": (
        "Windows", "x86", "EXCEPTION_ACCESS_VIOLATION_READ", "allocer32.exe",
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_public_dump_parses_to_its_listed_crash(name: str) -> None:
    os, cpu, exception, module = EXPECTED[name]
    facts = parse_dump(DUMPS / name)
    assert (facts.os, facts.cpu, facts.exception_name) == (os, cpu, exception)
    if module is not None:
        assert facts.crash_module == module
        assert facts.signature.startswith(f"{exception} | {module}+0x")
    else:
        assert facts.signature.startswith(f"{exception} | ")
    assert facts.module_count > 0
    assert facts.main_module


def test_electron_windows_dump_has_main_module_version() -> None:
    facts = parse_dump(DUMPS / "win-x64_electron_node-minidump_windows.dmp")
    assert (facts.main_module, facts.main_module_version) == ("electron.exe", "1.4.3.0")
    assert facts.os_version == "10.0.14393"
    assert facts.signature == "EXCEPTION_ACCESS_VIOLATION_WRITE | electron.exe+0xe8da4"


def test_dump_without_an_exception() -> None:
    facts = parse_dump(DUMPS / "win-x64_breakpad_tiny-exe-with-cet-xsave_nocrash.dmp")
    assert facts.exception_code is None
    assert facts.signature == "no exception"


@pytest.mark.parametrize(
    "name", ["bad_rustminidump_invalid-range.dmp", "bad_rustminidump_invalid-record-count.dmp"]
)
def test_broken_dumps_raise_a_parse_error(name: str) -> None:
    with pytest.raises(DumpParseError):
        parse_dump(DUMPS / name)


def test_header_reader_covers_what_the_library_cannot(tmp_path: Path) -> None:
    """An ARM64 dump the library rejects still yields OS, CPU and exception from the headers."""
    import struct

    header = struct.pack("<4sIIII", b"MDMP", 0xA793, 2, 32, 0).ljust(32, b"\0")
    directory = struct.pack("<III", 7, 56, 56) + struct.pack("<III", 6, 168, 112)
    sysinfo = struct.pack("<HHHBBIIII", 12, 0, 0, 8, 0, 14, 0, 23000, 0x8101).ljust(56, b"\0")
    exception = struct.pack("<IIIIQQII", 259, 0, 1, 0, 0, 0x1000, 0, 0).ljust(168, b"\0")
    path = tmp_path / "arm64.dmp"
    path.write_bytes(header + directory + sysinfo + exception)
    facts = parse_dump(path)
    assert (facts.os, facts.cpu, facts.exception_name) == ("macOS", "arm64", "EXC_BAD_ACCESS")
    assert facts.signature == "EXC_BAD_ACCESS | 0x1000"


@pytest.mark.parametrize(
    ("os", "code", "info", "name"),
    [
        ("Windows", 0xC0000005, (8,), "EXCEPTION_ACCESS_VIOLATION_EXEC"),
        ("Windows", 0xC00000FD, (), "EXCEPTION_STACK_OVERFLOW"),
        ("Windows", 0x12345678, (), "0x12345678"),
        ("Linux", 6, (), "SIGABRT"),
        ("Android", 7, (), "SIGBUS"),
        ("macOS", 10, (), "EXC_CRASH"),
    ],
)
def test_exception_names_per_os(os: str, code: int, info: tuple[int, ...], name: str) -> None:
    assert exception_name(os, code, info) == name
