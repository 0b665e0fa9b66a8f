"""Native debug files (ELF, PDB, Mach-O): the object to use, its ids, its unwind tables."""

from __future__ import annotations

import io
import struct
from pathlib import Path
from typing import BinaryIO

from symbolic import exceptions as symbolic_errors
from symbolic.debuginfo import Object

from reporting_endpoint.native.breakpad_text import SymbolFileError


def choose_object(
    objects: list[Object], *, debug_id: str | None = None, arch: str | None = None
) -> Object:
    """The object of an archive with this Breakpad debug id, else this arch, else the only one."""
    if debug_id is not None:
        for obj in objects:
            if breakpad_debug_id(obj.debug_id) == debug_id.upper():
                return obj
    if arch is not None:
        for obj in objects:
            if obj.arch == arch:
                return obj
    if len(objects) == 1 and debug_id is None and arch is None:
        return objects[0]
    if not objects:
        raise SymbolFileError("unsupported_debug_file", "no object in the file")
    raise SymbolFileError("no_matching_object", f"none of {len(objects)} objects matches")


def cfi_text(obj: Object) -> bytes:
    """The Breakpad ``STACK CFI`` text symbolic writes from an object's unwind tables."""
    if "unwind" not in obj.features:
        return b""
    try:
        out = io.BytesIO()
        obj.make_cficache().write_to(out)
    except symbolic_errors.CfiErrorMissingDebugInfo:
        return b""
    return b"".join(line for line in out.getvalue().splitlines(True) if line.startswith(b"STACK"))


def object_has_functions(obj: Object, path: Path) -> bool:
    """Whether lookups can name functions: debug info, or a symbol table defining some."""
    if "debug" in obj.features:
        return True
    if "symtab" not in obj.features:
        return False
    if obj.file_format == "elf":
        # symbolic counts .dynsym as a symbol table, but in a stripped executable it only
        # names imports: look for a defined function.
        return elf_defines_functions(path)
    return True


def elf_defines_functions(path: Path) -> bool:
    """Whether an ELF file's .symtab or .dynsym defines at least one function."""
    with path.open("rb") as handle:
        ident = handle.read(64)
        if len(ident) < 52 or ident[:4] != b"\x7fELF" or ident[4] not in (1, 2):
            return False
        wide, order = ident[4] == 2, "<" if ident[5] == 1 else ">"
        if wide:
            shoff, shentsize, shnum = struct.unpack_from(order + "Q10xHH", ident, 40)
        else:
            shoff, shentsize, shnum = struct.unpack_from(order + "I10xHH", ident, 32)
        if shentsize < (64 if wide else 40) or shnum > 65535:
            return False
        handle.seek(shoff)
        table = handle.read(shentsize * shnum)
        for index in range(len(table) // shentsize):
            if wide:
                kind, offset, size, entsize = struct.unpack_from(
                    order + "4xI16xQQ16xQ", table, index * shentsize
                )
            else:
                kind, offset, size, entsize = struct.unpack_from(
                    order + "4xI8xII12xI", table, index * shentsize
                )
            if (
                kind in (2, 11)
                and entsize
                and _defines_function(handle, offset, min(size, 64 * 2**20), entsize, wide, order)
            ):
                return True
    return False


def _defines_function(
    handle: BinaryIO, offset: int, size: int, entsize: int, wide: bool, order: str
) -> bool:
    # An entry smaller than a symbol is a corrupt header: unpacking one would read past the
    # table (a struct.error, once a 500 on upload).
    if entsize < (24 if wide else 16):
        return False
    handle.seek(offset)
    data = handle.read(size)
    for start in range(0, len(data) - entsize + 1, entsize):
        if wide:
            info, shndx, value = struct.unpack_from(order + "4xB1xHQ", data, start)
        else:
            value, info, shndx = struct.unpack_from(order + "4xI4xB1xH", data, start)
        if info & 0xF == 2 and shndx != 0 and value != 0:  # STT_FUNC, defined here
            return True
    return False


def breakpad_debug_id(debug_id: str) -> str:
    """symbolic's ``guid-age`` form as Breakpad writes it: uppercase hex, the age appended."""
    parts = debug_id.split("-")
    guid = "".join(parts[:5])
    age = parts[5] if len(parts) > 5 else "0"
    return (guid + age.lstrip("0") if age.strip("0") else guid + "0").upper()
