"""Symbol uploads unpacked: Breakpad .sym files, zips of them, and native debug files converted."""

from __future__ import annotations

import re
import shutil
import stat
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from symbolic import exceptions as symbolic_errors
from symbolic.debuginfo import Archive, Object

from reporting_endpoint.native.symbols import (
    SymbolFileError,
    breakpad_debug_id,
    cfi_text,
    load_symbols,
    object_has_functions,
    parse_module_line,
)

COPY_CHUNK = 1024 * 1024
# The MODULE line and the INFO lines after it; a header line past this is not a .sym.
MAX_HEADER_LINE = 64 * 1024
MAX_INFO_LINES = 16
# Below this a member's compression ratio proves nothing (a small run of zeros).
RATIO_FLOOR_BYTES = 1024 * 1024
# One central directory entry is 46 bytes plus its name, extra field and comment.
MAX_DIRECTORY_ENTRY = 46 + 3 * 1024

# First bytes of the native debug files symbolic reads.
_NATIVE_MAGIC = (
    b"\x7fELF",
    b"\xfe\xed\xfa\xce",  # Mach-O 32-bit, both byte orders
    b"\xce\xfa\xed\xfe",
    b"\xfe\xed\xfa\xcf",  # Mach-O 64-bit
    b"\xcf\xfa\xed\xfe",
    b"\xca\xfe\xba\xbe",  # fat Mach-O (also Java class files, which symbolic refuses)
    b"Microsoft C/C++ MSF 7.00",  # PDB
)
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
# Breakpad's MODULE os names for what a native file is.
_OS_OF_FORMAT = {"elf": "Linux", "macho": "mac", "pdb": "windows"}
_DRIVE = re.compile(r"^[A-Za-z]:")


class SymbolUploadError(Exception):
    """An upload refused as a whole; ``code`` is a stable reason code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    def __reduce__(self) -> tuple[type[SymbolUploadError], tuple[str, str]]:
        # Raised in the unpacking process and re-raised here: pickled with both fields.
        return (SymbolUploadError, (self.code, self.message))


@dataclass(frozen=True, slots=True)
class UploadLimits:
    """Bounds on one upload.

    ``max_member_bytes`` matches what ``native.symbols`` loads at all (2 GiB); the largest real
    symbol archives (Electron's, a few hundred MB zipped) unpack to a few GB, well inside
    ``max_unpacked_bytes``. Text .sym files compress about 5-10x and debug info 3-5x, so a
    member past ``max_ratio`` is a zip bomb.
    """

    max_files: int = 10_000
    max_unpacked_bytes: int = 8 * 2**30
    max_ratio: float = 200.0
    max_member_bytes: int = 2 * 2**30


@dataclass(frozen=True, slots=True)
class UnpackedSymbols:
    """One module's symbols from an upload, ready to be filed as a ``SymbolFile``."""

    debug_file: str
    debug_id: str
    name: str  # the .sym's name in the Breakpad layout
    code_file: str | None
    code_id: str | None
    os: str | None
    arch: str | None
    sym_path: Path  # Breakpad text in workdir
    object_path: Path | None  # the native debug file, when converted from one

    @property
    def path(self) -> str:
        return f"{self.debug_file}/{self.debug_id}/{self.name}"


def sym_name(debug_file: str) -> str:
    """The .sym's name in the layout, as Breakpad's symbol suppliers and symupload spell it:
    ``.pdb`` (any case) replaced by ``.sym``, else ``.sym`` appended."""
    if len(debug_file) > 4 and debug_file[-4:].lower() == ".pdb":
        return debug_file[:-4] + ".sym"
    return debug_file + ".sym"


def check_file_name(name: str) -> str:
    """A debug or code file name that is safe in a Breakpad layout path, or ``bad_file_name``."""
    bad = (
        not name
        or len(name.encode("utf-8", "replace")) > 255
        or name in (".", "..")
        or "/" in name
        or "\\" in name
        or not name.isprintable()
    )
    if bad:
        raise SymbolUploadError("bad_file_name", f"not a plain file name: {name!r}")
    return name


def unpack_symbols(
    path: Path, filename: str, workdir: Path, limits: UploadLimits = UploadLimits()
) -> list[UnpackedSymbols]:
    """Unpack one upload into ``workdir`` (blocking; run it off the event loop).

    Nothing named by the upload becomes a path: files are written as ``workdir/<n>.sym`` and
    ``workdir/<n>.obj``. On refusal, what this call wrote is removed and ``SymbolUploadError``
    carries the reason.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    job = _Job(workdir, limits)
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            head = handle.read(32)
        if head.startswith(_ZIP_MAGIC):
            job.unzip(path)
        else:
            if size > limits.max_member_bytes:
                raise SymbolUploadError("file_too_large", f"{size} bytes")
            job.add(path, _base_name(filename), staged=False)
        if not job.found:
            raise SymbolUploadError("not_a_symbol_file", "no symbol file in the upload")
    except SymbolUploadError:
        job.discard()
        raise
    except SymbolFileError as exc:
        job.discard()
        raise SymbolUploadError(exc.code, exc.message) from exc
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        job.discard()
        raise SymbolUploadError("bad_zip", f"{type(exc).__name__}: {exc}"[:300]) from exc
    except (OSError, MemoryError):
        # The server's trouble (a full disk, no memory), not the file's: not a 4xx.
        job.discard()
        raise
    except Exception as exc:
        # A debug file that defeats a parser below (symbolic, the ELF reader) is bad input,
        # not a server error: refused with a code, never a 500.
        job.discard()
        raise SymbolUploadError("bad_debug_file", f"{type(exc).__name__}: {exc}"[:300]) from exc
    except BaseException:
        job.discard()
        raise
    return job.found


def _base_name(filename: str) -> str:
    return filename.replace("\\", "/").rsplit("/", 1)[-1]


class _Job:
    def __init__(self, workdir: Path, limits: UploadLimits) -> None:
        self.workdir = workdir
        self.limits = limits
        self.found: list[UnpackedSymbols] = []
        self.written: list[Path] = []
        self.seen: set[tuple[str, str]] = set()

    def new_file(self, suffix: str) -> Path:
        target = self.workdir / f"upload-{len(self.written):05d}{suffix}"
        self.written.append(target)
        return target

    def discard(self) -> None:
        for target in self.written:
            target.unlink(missing_ok=True)

    def keep(self, unpacked: UnpackedSymbols) -> None:
        key = (unpacked.debug_file, unpacked.debug_id)
        if key in self.seen:  # the same module twice in one upload: the first one counts
            unpacked.sym_path.unlink(missing_ok=True)
            return
        self.seen.add(key)
        self.found.append(unpacked)

    def add(self, path: Path, filename: str, *, staged: bool) -> None:
        """One file: a .sym (copied), a native debug file (converted) or anything else (an
        error for an upload of one file, skipped inside a zip: licences, READMEs)."""
        with path.open("rb") as source:
            head = source.read(32)
            source.seek(0)
            if head.startswith(b"MODULE "):
                self.keep(self.copy_sym(source))
                return
        if head.startswith(_NATIVE_MAGIC):
            if staged:
                kept = self.new_file(".obj")
                path.rename(kept)
                path = kept
            for unpacked in self.convert(path, filename):
                self.keep(unpacked)
        elif head.startswith(b"MZ"):
            raise SymbolUploadError(
                "unsupported_debug_file", "a PE file: upload its PDB, or dump_syms' .sym"
            )
        elif not staged:
            raise SymbolUploadError("not_a_symbol_file", "neither a .sym nor a debug file")

    def copy_sym(self, source: BinaryIO) -> UnpackedSymbols:
        first = source.readline(MAX_HEADER_LINE)
        try:
            os_, arch, debug_id, debug_file = parse_module_line(first)
        except SymbolFileError as exc:
            raise SymbolUploadError("bad_module_line", exc.message) from exc
        check_file_name(debug_file)
        code_id = code_file = None
        target = self.new_file(".sym")
        with target.open("wb") as out:
            out.write(f"MODULE {os_} {arch} {debug_id} {debug_file}\n".encode())
            for _ in range(MAX_INFO_LINES):
                line = source.readline(MAX_HEADER_LINE)
                out.write(line)
                if not line.startswith(b"INFO "):
                    break
                fields = line.rstrip(b"\r\n").split(b" ", 3)
                if fields[1] == b"CODE_ID" and len(fields) >= 3:
                    code_id = fields[2].decode("ascii", "replace").upper()
                    if len(fields) == 4:
                        code_file = _base_name(fields[3].decode("utf-8", "replace")) or None
            shutil.copyfileobj(source, out, COPY_CHUNK)
        # Loaded as the processors will load it (this runs in a process of its own, see
        # symbol_import): a file they would refuse is refused now, with its reason, not found
        # broken when a crash needs it.
        try:
            load_symbols(target)
        except SymbolFileError as exc:
            raise SymbolUploadError(exc.code, exc.message) from exc
        return UnpackedSymbols(
            debug_file=debug_file,
            debug_id=debug_id,
            name=sym_name(debug_file),
            code_file=code_file,
            code_id=code_id if code_id and re.fullmatch(r"[0-9A-F]{1,80}", code_id) else None,
            os=os_,
            arch=arch,
            sym_path=target,
            object_path=None,
        )

    def convert(self, path: Path, filename: str) -> list[UnpackedSymbols]:
        debug_file = check_file_name(filename)
        try:
            objects = list(Archive.open(str(path)).iter_objects())
        except symbolic_errors.SymbolicError as exc:
            raise SymbolUploadError("unsupported_debug_file", f"unreadable: {exc}") from exc
        usable = [obj for obj in objects if object_has_functions(obj, path)]
        if not objects:
            raise SymbolUploadError("unsupported_debug_file", "no object in the file")
        if not usable:
            raise SymbolUploadError("no_debug_info", "neither debug info nor a symbol table")
        return [self.convert_object(obj, path, debug_file) for obj in usable]

    def convert_object(self, obj: Object, path: Path, debug_file: str) -> UnpackedSymbols:
        if obj.file_format not in _OS_OF_FORMAT:
            raise SymbolUploadError("unsupported_debug_file", f"{obj.file_format} files")
        if obj.file_format == "elf" and debug_file.endswith(".debug") and len(debug_file) > 6:
            # `objcopy --only-keep-debug libfoo.so libfoo.so.debug`: a dump names the module
            # by the mapped file, libfoo.so, and that is what its symbols are filed under.
            debug_file = debug_file[: -len(".debug")]
        debug_id = breakpad_debug_id(obj.debug_id)
        if not debug_id.strip("0"):
            raise SymbolUploadError("no_debug_id", "the file carries no identifier")
        os_ = _OS_OF_FORMAT[obj.file_format]
        code_id = obj.code_id.replace("-", "").upper() if obj.code_id else None
        # The code file of a PDB is the PE, which the PDB does not name.
        code_file = debug_file if obj.file_format != "pdb" else None
        try:
            cfi = cfi_text(obj)
        except symbolic_errors.SymbolicError as exc:
            raise SymbolUploadError("bad_debug_file", f"unwind tables: {exc}") from exc
        target = self.new_file(".sym")
        with target.open("wb") as out:
            out.write(f"MODULE {os_} {obj.arch} {debug_id} {debug_file}\n".encode())
            if code_id:
                out.write(f"INFO CODE_ID {code_id} {code_file or ''}".rstrip().encode() + b"\n")
            out.write(cfi)
        return UnpackedSymbols(
            debug_file=debug_file,
            debug_id=debug_id,
            name=sym_name(debug_file),
            code_file=code_file,
            code_id=code_id,
            os=os_,
            arch=obj.arch,
            sym_path=target,
            object_path=path,
        )

    def unzip(self, path: Path) -> None:
        entries = _declared_entries(path)
        if entries > self.limits.max_files:
            raise SymbolUploadError("too_many_files", f"{entries} members")
        try:
            archive = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError, ValueError) as exc:
            raise SymbolUploadError("bad_zip", str(exc)) from exc
        with archive:
            members = archive.infolist()
            if len(members) > self.limits.max_files:
                raise SymbolUploadError("too_many_files", f"{len(members)} members")
            for member in members:
                _check_member(member, self.limits)
            declared = sum(member.file_size for member in members)
            if declared > self.limits.max_unpacked_bytes:
                raise SymbolUploadError("zip_too_large", f"{declared} bytes unpacked")
            unpacked = 0
            for member in members:
                if member.is_dir():
                    continue
                staged = self.new_file(".part")
                try:
                    unpacked += self.extract(archive, member, staged, unpacked)
                    self.add(staged, _base_name(member.filename), staged=True)
                finally:
                    staged.unlink(missing_ok=True)

    def extract(
        self, archive: zipfile.ZipFile, member: zipfile.ZipInfo, target: Path, before: int
    ) -> int:
        """Copy one member out, counting the bytes it really holds against the limits."""
        limit = min(member.file_size, self.limits.max_member_bytes)
        room = self.limits.max_unpacked_bytes - before
        ratio_cap = max(RATIO_FLOOR_BYTES, self.limits.max_ratio * member.compress_size)
        count = 0
        try:
            with archive.open(member) as source, target.open("wb") as out:
                while chunk := source.read(COPY_CHUNK):
                    count += len(chunk)
                    if count > limit:
                        raise SymbolUploadError("zip_size_mismatch", f"{member.filename!r}")
                    if count > room:
                        raise SymbolUploadError("zip_too_large", "unpacked past the limit")
                    if count > ratio_cap:
                        raise SymbolUploadError("zip_bomb", f"{member.filename!r}")
                    out.write(chunk)
        except (zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
            # zipfile checks the CRC and the declared size at the member's end.
            code = "zip_size_mismatch" if "CRC" in str(exc) else "bad_zip"
            raise SymbolUploadError(code, f"{member.filename!r}: {exc}") from exc
        except RuntimeError as exc:  # an encrypted member
            raise SymbolUploadError("zip_encrypted", f"{member.filename!r}") from exc
        if count != member.file_size:
            raise SymbolUploadError("zip_size_mismatch", f"{member.filename!r}")
        return count


def _check_member(member: zipfile.ZipInfo, limits: UploadLimits) -> None:
    name = member.filename
    parts = PurePosixPath(name.replace("\\", "/")).parts
    escapes = (
        not name
        or "\x00" in name
        or name.startswith(("/", "\\"))
        or _DRIVE.match(name) is not None
        or ".." in parts
    )
    if escapes:
        raise SymbolUploadError("zip_path_escapes", f"member {name!r}")
    mode = member.external_attr >> 16
    if member.create_system == 3 and stat.S_ISLNK(mode):
        raise SymbolUploadError("zip_path_escapes", f"symbolic link {name!r}")
    if member.flag_bits & 0x1:
        raise SymbolUploadError("zip_encrypted", f"member {name!r}")
    if member.file_size > limits.max_member_bytes:
        raise SymbolUploadError("zip_too_large", f"member {name!r}: {member.file_size} bytes")
    if member.file_size > max(RATIO_FLOOR_BYTES, limits.max_ratio * member.compress_size):
        raise SymbolUploadError("zip_bomb", f"member {name!r} expands past the ratio")


def _declared_entries(path: Path) -> int:
    """The entry count of the end-of-central-directory record, read before zipfile parses
    the directory (its memory grows with the count)."""
    with path.open("rb") as handle:
        handle.seek(0, 2)
        size = handle.tell()
        tail_start = max(0, size - (22 + 65535 + 20))
        handle.seek(tail_start)
        tail = handle.read()
        at = tail.rfind(b"PK\x05\x06")
        if at < 0 or len(tail) < at + 22:
            raise SymbolUploadError("bad_zip", "no end of central directory")
        entries, directory_size = struct.unpack_from("<HI", tail, at + 10)
        if entries == 0xFFFF or directory_size == 0xFFFFFFFF:
            locator = tail.rfind(b"PK\x06\x07", 0, at)
            if locator < 0:
                raise SymbolUploadError("bad_zip", "zip64 without its locator")
            (offset,) = struct.unpack_from("<Q", tail, locator + 8)
            handle.seek(offset)
            record = handle.read(56)
            if len(record) < 56 or not record.startswith(b"PK\x06\x06"):
                raise SymbolUploadError("bad_zip", "bad zip64 end of central directory")
            entries, directory_size = struct.unpack_from("<QQ", record, 32)
    # A directory far larger than its count needs hides entries (or huge names).
    return max(int(entries), int(directory_size) // MAX_DIRECTORY_ENTRY)
