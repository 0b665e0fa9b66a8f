"""Frozen records of native crash analysis: modules, symbol files, source lines and frames.

They cross from the dump and symbol parsers (``native.dumpfile``, ``native.symbols``) to the
stack walker, the processors and the storage; as plain dicts (``as_dict``) they cross process
boundaries and are stored as JSON on the crash row.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

# How a frame was found, as Breakpad and rust-minidump name it.
TRUST_CONTEXT = "context"
TRUST_CFI = "cfi"
TRUST_FRAME_POINTER = "frame_pointer"
TRUST_SCAN = "scan"


@dataclass(frozen=True, slots=True)
class Module:
    """A module of a dump: where it was loaded and the ids its symbols are filed under.

    ``debug_file`` and ``debug_id`` are Breakpad's (the PDB name and GUID+age on Windows, the
    code file's name and the build id folded into a GUID elsewhere); ``code_id`` is the
    timestamp+size on Windows, the full build id on Linux. Absent ids are None.
    """

    base: int
    size: int
    code_file: str
    code_id: str | None = None
    debug_file: str | None = None
    debug_id: str | None = None
    version: str | None = None

    @property
    def name(self) -> str:
        """The code file's base name (what signatures and frames show)."""
        tail = self.code_file.replace("\\", "/").rsplit("/", 1)[-1]
        return tail or self.code_file

    @property
    def symbol_key(self) -> tuple[str, str] | None:
        """(debug_file, debug_id) under which its symbols are filed, if the dump has them."""
        if self.debug_file and self.debug_id:
            return (self.debug_file, self.debug_id)
        return None

    def as_dict(self) -> dict[str, Any]:
        # By hand: dataclasses.asdict deep-copies, and was half of a processor's walk.
        return {
            "base": self.base,
            "size": self.size,
            "code_file": self.code_file,
            "code_id": self.code_id,
            "debug_file": self.debug_file,
            "debug_id": self.debug_id,
            "version": self.version,
        }


@dataclass(frozen=True, slots=True)
class SourceLine:
    """What symbols say about one address: function, source file and line (any may be None)."""

    function: str | None
    file: str | None = None
    line: int | None = None
    # Offset of the address from the function's start, when the symbols know the start.
    function_offset: int | None = None


@dataclass(frozen=True, slots=True)
class Frame:
    """One frame of a walked stack.

    ``instruction`` is the frame's instruction pointer (for frames past 0 the return address);
    ``module``/``module_offset`` locate it in a module (None outside any). ``function``,
    ``file`` and ``line`` come from symbols (None without them); ``inlined`` lists the
    functions inlined at this address, innermost first, which all sit above ``function``.
    """

    index: int
    trust: str
    instruction: int
    module: str | None = None
    module_offset: int | None = None
    function: str | None = None
    function_offset: int | None = None
    file: str | None = None
    line: int | None = None
    inlined: tuple[SourceLine, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "trust": self.trust,
            "instruction": self.instruction,
            "module": self.module,
            "module_offset": self.module_offset,
            "function": self.function,
            "function_offset": self.function_offset,
            "file": self.file,
            "line": self.line,
            "inlined": [
                {
                    "function": inline.function,
                    "file": inline.file,
                    "line": inline.line,
                    "function_offset": inline.function_offset,
                }
                for inline in self.inlined
            ],
        }


@dataclass(frozen=True, slots=True)
class SymbolFile:
    """A symbol file in the store, filed Breakpad's way: ``<debug_file>/<debug_id>/<name>``.

    ``sym_sha256`` is the blob of the Breakpad text (``.sym``); ``object_sha256`` the native
    debug file it was converted from (ELF, PDB, Mach-O), kept because symbolication reads
    functions and lines from it (a converted ``.sym`` carries the module and CFI records only).
    """

    debug_file: str
    debug_id: str
    name: str
    code_file: str | None
    code_id: str | None
    os: str | None
    arch: str | None
    sym_sha256: str
    sym_size: int
    object_sha256: str | None = None
    object_size: int | None = None
    source: str = "upload"  # upload | upstream
    uploaded_at: int = 0  # ms since the Unix epoch

    @property
    def path(self) -> str:
        """Its place in the Breakpad layout."""
        return f"{self.debug_file}/{self.debug_id}/{self.name}"


@dataclass(frozen=True, slots=True)
class MissingSymbols:
    """A module that crashes needed symbols for and that the store does not have."""

    debug_file: str
    debug_id: str
    code_file: str | None
    crashes: int
    last_seen: int  # ms since the Unix epoch of the newest such crash


def symbol_keys(modules: Iterable[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """The (debug_file, debug_id) of each module dict (``Module.as_dict``, as processors send
    and the storage keeps them) that has both, once each, in order."""
    keys: dict[tuple[str, str], None] = {}
    for module in modules:
        debug_file, debug_id = module.get("debug_file"), module.get("debug_id")
        if isinstance(debug_file, str) and isinstance(debug_id, str) and debug_file and debug_id:
            keys[(debug_file, debug_id)] = None
    return list(keys)
