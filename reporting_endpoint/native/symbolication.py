"""A processor's stack analysis: modules of a dump, the crashing thread walked and symbolicated.

Runs in the processor children (``processing``), in two steps because the symbols a dump
needs are known only once its modules are read, and finding them is the parent's work (the
storage and the blob store live there):

1. with the parse, the modules (with the ids their symbols are filed under) and the crashing
   thread walked without symbols: for a dump whose modules have no symbols in the store, the
   whole result;
2. when the store (or an upstream server) has symbols for some of them, the walk again with
   those files (local paths the parent found), frames symbolicated, the signature from them.

Symbol files are immutable blobs (content addressed), so each child keeps the ones it loaded
(and their unwind tables) in a bounded cache across crashes: a crash storm of one release loads
its symbols once per child.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reporting_endpoint.native.cfi import UnwindTable
from reporting_endpoint.native.dumpfile import Dump, read_dump
from reporting_endpoint.native.records import Frame, Module, SourceLine
from reporting_endpoint.native.signature import frames_signature
from reporting_endpoint.native.stackwalk import WalkLimits, walk_crashing_thread
from reporting_endpoint.native.symbols import LoadedSymbols, SymbolLibrary

log = logging.getLogger("reporting_endpoint.native")

# What one processor child keeps loaded: Electron's own symbols are ~100-400 MB of .sym text
# and several times less once loaded; two releases' main modules fit.
LIBRARY_BYTES = 1536 * 2**20
LIBRARY_FILES = 256
# Unwind tables kept per child (one per symbol file, rebuilt from its STACK lines): few, as
# one of a Chromium-sized module holds millions of records.
TABLES = 8
# Frames stored per crash (the walker stops at its own cap; this bounds the row).
STORED_FRAMES = 128


@dataclass(frozen=True, slots=True)
class SymbolPaths:
    """Where the parent found one module's symbols: the content key (sha256) and local files."""

    key: str
    sym_path: str
    object_path: str | None = None
    object_key: str | None = None


_library: SymbolLibrary | None = None
_tables: OrderedDict[str, UnwindTable] = OrderedDict()


def _symbol_library() -> SymbolLibrary:
    global _library
    if _library is None:
        _library = SymbolLibrary(max_bytes=LIBRARY_BYTES, max_files=LIBRARY_FILES)
    return _library


class _Resolver:
    """The walker's view of the symbols found for this dump."""

    def __init__(self, symbols: Mapping[tuple[str, str], SymbolPaths]) -> None:
        self._paths = symbols
        self._loaded: dict[tuple[str, str], LoadedSymbols | None] = {}
        self._unwind: dict[tuple[str, str], UnwindTable | None] = {}
        # Symbols found but not loadable (a file the loader refuses, a cache file gone): their
        # modules are listed missing, so that a fixed upload sends the crash round again.
        self.failed: set[tuple[str, str]] = set()

    def _symbols(self, key: tuple[str, str]) -> LoadedSymbols | None:
        if key in self._loaded:
            return self._loaded[key]
        found = self._paths.get(key)
        loaded: LoadedSymbols | None = None
        if found is not None:
            # Functions and lines from the native debug file when there is one (its .sym,
            # converted on upload, holds the module and CFI records only).
            path, content = (
                (found.object_path, found.object_key)
                if found.object_path and found.object_key
                else (found.sym_path, found.key)
            )
            try:
                # The id picks the right object out of a fat Mach-O or a multi-arch archive.
                loaded = _symbol_library().get(content, Path(path), debug_id=key[1])
            except Exception as exc:
                log.warning("symbols %s/%s not loaded: %s", key[0], key[1], exc)
                self.failed.add(key)
        self._loaded[key] = loaded
        return loaded

    def unwind_table(self, module: Module) -> UnwindTable | None:
        key = module.symbol_key
        if key is None or key not in self._paths:
            return None
        if key in self._unwind:
            return self._unwind[key]
        found = self._paths[key]
        table = _tables.get(found.key)
        if table is None:
            try:
                sym = _symbol_library().get(found.key, Path(found.sym_path), debug_id=key[1])
                table = UnwindTable.from_lines(sym.stack_records())
            except Exception as exc:
                log.warning("unwind records of %s/%s not read: %s", key[0], key[1], exc)
                self.failed.add(key)
                self._unwind[key] = None
                return None
            _tables[found.key] = table
            while len(_tables) > TABLES:
                _tables.popitem(last=False)
        else:
            _tables.move_to_end(found.key)
        self._unwind[key] = table
        return table

    def lookup(self, module: Module, offset: int) -> tuple[SourceLine, ...]:
        key = module.symbol_key
        if key is None:
            return ()
        symbols = self._symbols(key)
        if symbols is None:
            return ()
        return symbols.lookup(offset)


def analyse_stack(
    dump_path: str,
    symbols: Mapping[tuple[str, str], SymbolPaths],
    fallback_signature: str,
    limits: WalkLimits | None = None,
) -> dict[str, Any]:
    """``modules`` (dicts), ``frames`` (dicts), ``missing_symbols`` ([debug_file, debug_id,
    code_file] of modules the crashing thread ran in that have no symbols) and ``signature``
    (from the frames; ``fallback_signature`` with frame 0's place when no frame could be named).

    Never raises: a dump this reader cannot read gives {} (the facts parser's result stands), a
    walk that fails gives the modules alone. Both are logged.
    """
    try:
        dump = read_dump(Path(dump_path))
    except Exception as exc:  # a dump the facts parser read may still defeat this reader
        log.info("stack of %s not read: %s", dump_path, exc)
        return {}
    modules = [module.as_dict() for module in dump.modules]
    try:
        resolver = _Resolver(symbols)
        frames = walk_crashing_thread(dump, resolver, limits or WalkLimits())[:STORED_FRAMES]
        return {
            "modules": modules,
            "frames": [frame.as_dict() for frame in frames],
            "missing_symbols": missing_symbols(
                dump, frames, set(symbols).difference(resolver.failed)
            ),
            "signature": frames_signature(frames, where_it_crashed(frames, fallback_signature)),
        }
    except Exception:
        log.exception("stack of %s not walked", dump_path)
        return {"modules": modules}


def where_it_crashed(frames: Sequence[Frame], signature: str) -> str:
    """The symbol-less signature with frame 0's module and offset as the place.

    The facts parser places a crash at the exception address, which on Linux and macOS is the
    faulting data address (0 for a null read), not the instruction: frame 0 is the instruction.
    """
    if not frames or frames[0].module is None or frames[0].module_offset is None:
        return signature
    exception = signature.split(" | ", 1)[0]
    return f"{exception} | {frames[0].module}+0x{frames[0].module_offset:x}"


def missing_symbols(
    dump: Dump, frames: Sequence[Frame], loaded: Set[tuple[str, str]]
) -> list[list[str | None]]:
    """Modules the frames ran in (found by address: two modules may share a name) whose
    symbols were not found or not loaded, once each, in frame order."""
    seen: set[tuple[str, str]] = set()
    missing: list[list[str | None]] = []
    for frame in frames:
        # A caller's return address may lie just past its module (a call that never returns
        # as the module's last instruction): its call is one byte back, as the walker looks.
        module = dump.module_at(frame.instruction - (1 if frame.index else 0))
        key = module.symbol_key if module is not None else None
        if module is None or key is None or key in loaded or key in seen:
            continue
        seen.add(key)
        missing.append([key[0], key[1], module.code_file])
    return missing
