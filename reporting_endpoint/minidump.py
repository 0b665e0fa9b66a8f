"""Facts read from a minidump without symbols: OS, CPU, exception, modules, a crash signature."""

from __future__ import annotations

import logging
import ntpath
import posixpath
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("reporting_endpoint.minidump")

# MINIDUMP_SYSTEM_INFO.PlatformId, including Breakpad/Crashpad's own values.
PLATFORMS = {
    0: "Windows", 1: "Windows", 2: "Windows",
    0x8000: "Unix", 0x8101: "macOS", 0x8102: "iOS", 0x8201: "Linux", 0x8202: "Solaris",
    0x8203: "Android", 0x8204: "PS3", 0x8205: "NaCl", 0x8206: "Fuchsia",
}  # fmt: skip
CPUS = {0: "x86", 5: "arm", 6: "ia64", 9: "amd64", 12: "arm64", 0x8003: "arm64"}

# Windows NTSTATUS values a crash reporter sees.
NTSTATUS = {
    0x80000003: "EXCEPTION_BREAKPOINT",
    0x80000004: "EXCEPTION_SINGLE_STEP",
    0xC0000005: "EXCEPTION_ACCESS_VIOLATION",
    0xC0000006: "EXCEPTION_IN_PAGE_ERROR",
    0xC0000008: "EXCEPTION_INVALID_HANDLE",
    0xC000000D: "STATUS_INVALID_PARAMETER",
    0xC0000017: "STATUS_NO_MEMORY",
    0xC000001D: "EXCEPTION_ILLEGAL_INSTRUCTION",
    0xC0000025: "EXCEPTION_NONCONTINUABLE_EXCEPTION",
    0xC000008C: "EXCEPTION_ARRAY_BOUNDS_EXCEEDED",
    0xC000008E: "EXCEPTION_FLT_DIVIDE_BY_ZERO",
    0xC0000094: "EXCEPTION_INT_DIVIDE_BY_ZERO",
    0xC0000095: "EXCEPTION_INT_OVERFLOW",
    0xC0000096: "EXCEPTION_PRIV_INSTRUCTION",
    0xC00000FD: "EXCEPTION_STACK_OVERFLOW",
    0xC0000374: "STATUS_HEAP_CORRUPTION",
    0xC0000409: "STATUS_STACK_BUFFER_OVERRUN",
    0xC0000420: "STATUS_ASSERTION_FAILURE",
    0xC0000602: "STATUS_FAIL_FAST_EXCEPTION",
    0xE06D7363: "EXCEPTION_CXX",  # an uncaught C++ exception (MSVC's "msc" code)
}
# ExceptionInformation[0] of an access violation.
ACCESS_KINDS = {0: "_READ", 1: "_WRITE", 8: "_EXEC"}
# ExceptionInformation[0] of STATUS_STACK_BUFFER_OVERRUN raised by __fastfail.
FAST_FAIL = {
    2: "FAST_FAIL_STACK_COOKIE_CHECK_FAILURE", 3: "FAST_FAIL_CORRUPT_LIST_ENTRY",
    4: "FAST_FAIL_INCORRECT_STACK", 5: "FAST_FAIL_INVALID_ARG", 6: "FAST_FAIL_GS_COOKIE_INIT",
    7: "FAST_FAIL_FATAL_APP_EXIT", 10: "FAST_FAIL_INVALID_SET_OF_CONTEXT",
    13: "FAST_FAIL_GUARD_ICALL_CHECK_FAILURE", 14: "FAST_FAIL_INVALID_BUFFER_ACCESS",
}  # fmt: skip
MACH_EXCEPTIONS = {
    1: "EXC_BAD_ACCESS", 2: "EXC_BAD_INSTRUCTION", 3: "EXC_ARITHMETIC", 4: "EXC_EMULATION",
    5: "EXC_SOFTWARE", 6: "EXC_BREAKPOINT", 7: "EXC_SYSCALL", 8: "EXC_MACH_SYSCALL",
    9: "EXC_RPC_ALERT", 10: "EXC_CRASH", 11: "EXC_RESOURCE", 12: "EXC_GUARD",
    13: "EXC_CORPSE_NOTIFY",
}  # fmt: skip
# Crashpad's own codes on Apple systems ('CPsx' a signal, 'CPnx' an uncaught NSException).
CRASHPAD_APPLE = {0x43507378: "CRASHPAD_SIGNAL", 0x43506E78: "NSEXCEPTION"}
# Linux signal numbers (x86, x86-64 and ARM share them).
LINUX_SIGNALS = {
    1: "SIGHUP", 2: "SIGINT", 3: "SIGQUIT", 4: "SIGILL", 5: "SIGTRAP", 6: "SIGABRT",
    7: "SIGBUS", 8: "SIGFPE", 9: "SIGKILL", 10: "SIGUSR1", 11: "SIGSEGV", 12: "SIGUSR2",
    13: "SIGPIPE", 14: "SIGALRM", 15: "SIGTERM", 16: "SIGSTKFLT", 31: "SIGSYS",
}  # fmt: skip

MAX_STREAMS = 4096
MAX_PARSE_BYTES = 512 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class DumpFacts:
    """What a minidump says about its crash. Absent facts are None."""

    os: str | None = None
    os_version: str | None = None
    cpu: str | None = None
    exception_code: int | None = None
    exception_name: str | None = None
    crash_address: int | None = None
    crashing_thread: int | None = None
    main_module: str | None = None
    main_module_version: str | None = None
    crash_module: str | None = None
    crash_offset: int | None = None
    module_count: int = 0
    signature: str = "unknown"
    parser: str = "minidump"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class DumpParseError(Exception):
    """The dump could not be read at all."""


def exception_name(os: str | None, code: int, info: tuple[int, ...] = ()) -> str:
    """The name of an exception code on the OS that wrote the dump."""
    if os in {"Windows"}:
        name = NTSTATUS.get(code, f"0x{code:08x}")
        if code == 0xC0000005 and info:
            name += ACCESS_KINDS.get(info[0], "")
        if code == 0xC0000409 and info and info[0] in FAST_FAIL:
            name = FAST_FAIL[info[0]]
        return name
    if os in {"macOS", "iOS"}:
        return MACH_EXCEPTIONS.get(code) or CRASHPAD_APPLE.get(code) or f"0x{code:08x}"
    if os in {"Linux", "Android"}:
        return LINUX_SIGNALS.get(code, f"signal {code}")
    return f"0x{code:08x}"


def _basename(name: str | None) -> str | None:
    if not name:
        return None
    return ntpath.basename(name) if "\\" in name else posixpath.basename(name)


def _version(ms: int, ls: int) -> str:
    return f"{ms >> 16}.{ms & 0xFFFF}.{ls >> 16}.{ls & 0xFFFF}"


def signature_of(facts: DumpFacts) -> str:
    """What groups crashes: exception name plus where it happened (module + offset)."""
    if facts.exception_code is None:
        return "no exception"
    where = (
        f"{facts.crash_module}+0x{facts.crash_offset:x}"
        if facts.crash_module is not None and facts.crash_offset is not None
        else f"0x{facts.crash_address:x}"
        if facts.crash_address is not None
        else "?"
    )
    return f"{facts.exception_name} | {where}"


def parse_dump(path: Path) -> DumpFacts:
    """Read the facts; the full parser first, a header-level reader when it fails."""
    try:
        facts = _parse_with_library(path)
    except Exception as exc:  # the library raises bare Exceptions on odd dumps (ARM64 ...)
        log.info("minidump library could not read %s (%s); reading the headers only", path, exc)
        facts = _parse_headers(path)
    else:
        if facts.os is None or facts.exception_code is None:
            # The library skipped a stream it did not understand: fill in from the headers.
            try:
                fallback = _parse_headers(path)
            except DumpParseError:
                pass
            else:
                from dataclasses import replace

                facts = replace(
                    facts,
                    **{
                        name: value
                        for name, value in fallback.as_dict().items()
                        if value is not None and getattr(facts, name) is None
                    },
                )
    return _with_signature(facts)


def _with_signature(facts: DumpFacts) -> DumpFacts:
    from dataclasses import replace

    return replace(facts, signature=signature_of(facts))


def _check_header(path: Path) -> None:
    """Refuse a stream directory that does not fit the file before the library walks it (a
    random header once sent it through millions of entries)."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(_HEADER.size)
    if len(head) < _HEADER.size or head[:4] != b"MDMP":
        raise DumpParseError("not a minidump")
    _, _, count, directory, _ = _HEADER.unpack(head)
    if count > MAX_STREAMS or directory + count * _DIRECTORY.size > size:
        raise DumpParseError("stream directory out of range")


def _parse_with_library(path: Path) -> DumpFacts:
    _check_header(path)
    from minidump.constants import MINIDUMP_STREAM_TYPE
    from minidump.minidumpfile import MinidumpFile

    wanted = {
        MINIDUMP_STREAM_TYPE.SystemInfoStream,
        MINIDUMP_STREAM_TYPE.ExceptionStream,
        MINIDUMP_STREAM_TYPE.ModuleListStream,
    }
    file_size = path.stat().st_size

    class _Dump(MinidumpFile):  # type: ignore[misc]
        # The PEB is a Windows user-mode structure we do not need, and parsing it logs a
        # traceback at ERROR for most non-Windows dumps.
        def _MinidumpFile__parse_peb(self) -> None:
            return None

        # Only the streams we read, and only when they lie inside the file: a crafted handle
        # stream with a huge count kept the full parse busy for 28 s (measured).
        def _MinidumpFile__parse_directories(self) -> None:
            found: list[Any] = self.directories  # type: ignore[has-type]
            self.directories = [
                d
                for d in found
                if d.StreamType in wanted
                and d.Location.Rva + d.Location.DataSize <= file_size
                and _count_fits(self.file_handle, d)
            ]
            MinidumpFile._MinidumpFile__parse_directories(self)

    dump = _Dump()
    with open(path, "rb") as handle:
        dump.filename = str(path)
        dump.file_handle = handle
        dump._parse()
    sysinfo = dump.sysinfo
    if sysinfo is None and dump.exception is None and dump.modules is None:
        raise DumpParseError("no system info, exception or module stream")
    platform = int(sysinfo.PlatformId.value) if sysinfo is not None else None
    os = PLATFORMS.get(platform, f"0x{platform:x}") if platform is not None else None
    cpu = None
    os_version = None
    if sysinfo is not None:
        arch = int(sysinfo.ProcessorArchitecture.value)
        cpu = CPUS.get(arch, f"0x{arch:x}")
        os_version = f"{sysinfo.MajorVersion}.{sysinfo.MinorVersion}.{sysinfo.BuildNumber}"
        extra = (sysinfo.CSDVersion or "").strip()
        if extra:
            os_version += f" {extra}"
    modules = list(dump.modules.modules) if dump.modules is not None else []
    main = modules[0] if modules else None
    main_version = None
    if main is not None and getattr(main, "versioninfo", None) is not None:
        info = main.versioninfo
        if info.dwFileVersionMS or info.dwFileVersionLS:
            main_version = _version(info.dwFileVersionMS, info.dwFileVersionLS)
    code = address = thread = None
    exc_name = None
    if dump.exception is not None and dump.exception.exception_records:
        stream = dump.exception.exception_records[0]
        record = stream.ExceptionRecord
        code = int(record.ExceptionCode_raw)
        address = int(record.ExceptionAddress)
        thread = int(stream.ThreadId)
        information = tuple(int(x) for x in record.ExceptionInformation[: record.NumberParameters])
        exc_name = exception_name(os, code, information)
    crash_module = crash_offset = None
    if address is not None:
        for module in modules:
            if module.baseaddress <= address < module.baseaddress + module.size:
                crash_module = _basename(module.name)
                crash_offset = address - module.baseaddress
                break
    return DumpFacts(
        os=os,
        os_version=os_version,
        cpu=cpu,
        exception_code=code,
        exception_name=exc_name,
        crash_address=address,
        crashing_thread=thread,
        main_module=_basename(main.name) if main is not None else None,
        main_module_version=main_version,
        crash_module=crash_module,
        crash_offset=crash_offset,
        module_count=len(modules),
    )


# Size of one entry of a list stream, to check a stream's declared count against its size.
_ENTRY_SIZES = {4: 108}  # ModuleListStream: MINIDUMP_MODULE


def _count_fits(handle: Any, directory: Any) -> bool:
    entry = _ENTRY_SIZES.get(int(directory.StreamType.value))
    if entry is None:
        return True
    handle.seek(directory.Location.Rva)
    raw = handle.read(4)
    if len(raw) < 4:
        return False
    (count,) = struct.unpack("<I", raw)
    return bool(4 + count * entry <= directory.Location.DataSize)


_HEADER = struct.Struct("<4sIIII")  # signature, version, stream count, directory RVA, checksum
_DIRECTORY = struct.Struct("<III")  # stream type, size, RVA
_SYSTEM_INFO = struct.Struct(
    "<HHHBBIIII"
)  # arch, level, revision, cpus, type, major, minor, build, platform
_EXCEPTION = struct.Struct(
    "<IIIIQQII"
)  # thread, align, code, flags, record, address, nparams, align


def _parse_headers(path: Path) -> DumpFacts:
    """Just the system-info and exception streams, read with struct: enough to group by."""
    data = path.read_bytes()[:MAX_PARSE_BYTES]
    if len(data) < _HEADER.size or data[:4] != b"MDMP":
        raise DumpParseError("not a minidump")
    _, _, count, directory, _ = _HEADER.unpack_from(data)
    if count > MAX_STREAMS or directory + count * _DIRECTORY.size > len(data):
        raise DumpParseError("stream directory out of range")
    os = cpu = os_version = None
    code = address = thread = None
    name = None
    for index in range(count):
        kind, _size, rva = _DIRECTORY.unpack_from(data, directory + index * _DIRECTORY.size)
        if kind == 7 and rva + _SYSTEM_INFO.size <= len(data):
            arch, _, _, _, _, major, minor, build, platform = _SYSTEM_INFO.unpack_from(data, rva)
            os = PLATFORMS.get(platform, f"0x{platform:x}")
            cpu = CPUS.get(arch, f"0x{arch:x}")
            os_version = f"{major}.{minor}.{build}"
        elif kind == 6 and rva + _EXCEPTION.size <= len(data):
            thread, _, code, _, _, address, _, _ = _EXCEPTION.unpack_from(data, rva)
    if code is not None:
        name = exception_name(os, code)
    if os is None and code is None:
        raise DumpParseError("no system info or exception stream could be read")
    return DumpFacts(
        os=os,
        os_version=os_version,
        cpu=cpu,
        exception_code=code,
        exception_name=name,
        crash_address=address,
        crashing_thread=thread,
        parser="headers",
    )
