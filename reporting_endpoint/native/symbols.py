"""Symbol files loaded for address lookups: Breakpad .sym text or native debug files."""

from __future__ import annotations

import io
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path

import cxxfilt  # type: ignore[import-untyped]  # the package ships no type information
from symbolic import exceptions as symbolic_errors
from symbolic.debuginfo import Archive
from symbolic.symcache import SourceLocation, SymCache

from reporting_endpoint.native.breakpad_text import (
    ADDRESS_LIMIT,
    MAX_INLINE_DEPTH,
    READ_BUFFER,
    LoadStats,
    SymbolFileError,
    parse_module_line,
    split_breakpad,
)
from reporting_endpoint.native.debug_objects import (
    breakpad_debug_id,
    cfi_text,
    choose_object,
    elf_defines_functions,
    object_has_functions,
)
from reporting_endpoint.native.records import SourceLine

__all__ = [
    "LoadStats",
    "LoadedSymbols",
    "SymbolFileError",
    "SymbolLibrary",
    "breakpad_debug_id",
    "cfi_text",
    "choose_object",
    "demangle",
    "elf_defines_functions",
    "load_symbols",
    "object_has_functions",
    "parse_module_line",
    "split_breakpad",
]

# Bounds on what one symbol file may cost to load, independent of settings: the largest real
# .sym files (Chromium, Electron) are a few hundred MB, so 2 GiB leaves room and still bounds
# the time of one streaming pass (about a minute at the measured rate).
MAX_FILE_BYTES = 2 * 2**30
# symbolic marks an unknown function start (inlined entries) with the all-ones u32.
_UNKNOWN_START = 0xFFFFFFFF


class LoadedSymbols:
    """One module's symbols in memory: a symcache for lookups plus its raw unwind records."""

    __slots__ = (
        "_cache",
        "_lock",
        "_stack",
        "arch",
        "debug_id",
        "has_functions",
        "size_bytes",
        "stats",
    )

    def __init__(
        self,
        *,
        symcache: SymCache,
        stack: bytes,
        debug_id: str,
        arch: str | None,
        has_functions: bool,
        stats: LoadStats | None = None,
    ) -> None:
        self._cache = symcache
        # symbolic's objects are not documented as thread-safe; lookups are microseconds.
        self._lock = threading.Lock()
        self._stack = stack
        self.debug_id = debug_id
        self.arch = arch
        self.has_functions = has_functions
        self.stats = stats if stats is not None else LoadStats()
        # The symcache bytes and the STACK text dominate; Python overhead is noise next to them.
        self.size_bytes = _symcache_size(symcache) + len(stack) + 1024

    def lookup(self, offset: int) -> tuple[SourceLine, ...]:
        """What the symbols say about a module offset: inlined functions innermost first, the
        containing function last; ``()`` when no function covers it."""
        if not 0 <= offset < ADDRESS_LIMIT:
            return ()
        with self._lock:
            found: list[SourceLocation] = self._cache.lookup(offset)  # type: ignore[no-untyped-call]
        if len(found) > MAX_INLINE_DEPTH:
            found = [*found[: MAX_INLINE_DEPTH - 1], found[-1]]
        return tuple(_source_line(entry) for entry in found)

    def stack_records(self) -> tuple[str, ...]:
        """The raw ``STACK CFI INIT`` / ``STACK CFI`` / ``STACK WIN`` lines, in file order.

        Split on each call (a large module has millions): callers keep their parsed form.
        """
        if not self._stack:
            return ()
        return tuple(self._stack.decode("ascii").splitlines())


def _source_line(entry: SourceLocation) -> SourceLine:
    start = entry.sym_addr
    known = start not in (_UNKNOWN_START, 2**64 - 1) and start <= entry.instr_addr
    return SourceLine(
        function=demangle(entry.symbol) if entry.symbol else None,
        file=entry.full_path or None,
        line=entry.line or None,
        function_offset=entry.instr_addr - start if known else None,
    )


def demangle(name: str) -> str:
    """A C++ name as people read it; names that are not Itanium-mangled come back unchanged."""
    # Mach-O symbols carry one more leading underscore than ELF ones.
    mangled = name[1:] if name.startswith("__Z") else name
    if not mangled.startswith("_Z"):
        return name
    try:
        return str(cxxfilt.demangle(mangled))
    except (cxxfilt.Error, UnicodeError):
        return name


def load_symbols(
    path: Path, *, debug_id: str | None = None, arch: str | None = None
) -> LoadedSymbols:
    """Load a Breakpad .sym or a native debug file (ELF, PDB, Mach-O, PE).

    When the file holds several objects (a fat Mach-O), the one with ``debug_id`` (Breakpad
    form) is chosen, else the one of ``arch``. Raises ``SymbolFileError``.
    """
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise SymbolFileError("unreadable", str(exc)) from exc
    if size > MAX_FILE_BYTES:
        raise SymbolFileError("too_large", f"{size} bytes, more than {MAX_FILE_BYTES}")
    with path.open("rb") as handle:
        head = handle.read(7)
    if head == b"MODULE ":
        return _load_breakpad(path)
    return _load_native(path, debug_id=debug_id, arch=arch)


def _load_breakpad(path: Path) -> LoadedSymbols:
    try:
        return _load_breakpad_pass(path, strict=False)
    except _SymbolicRefused:
        # A malformed line makes symbolic refuse the whole file: sift it line by line and
        # try once more without the junk.
        pass
    try:
        return _load_breakpad_pass(path, strict=True)
    except _SymbolicRefused as exc:
        raise SymbolFileError("bad_symbol_file", f"symbolic refused it: {exc}") from exc


class _SymbolicRefused(Exception):
    pass


def _load_breakpad_pass(path: Path, *, strict: bool) -> LoadedSymbols:
    stack = io.BytesIO()
    with tempfile.TemporaryDirectory(prefix="sym-") as tmp:
        feed_path = Path(tmp) / "feed.sym"
        with path.open("rb", buffering=READ_BUFFER) as source, feed_path.open("wb") as feed:
            module, stats, functions = split_breakpad(source, feed, stack, strict=strict)
        # symbolic stops reading FUNC records at the first STACK record, so it is fed the
        # text without them; it maps the file rather than copying it.
        try:
            obj = next(Archive.open(str(feed_path)).iter_objects())
            symcache = obj.make_symcache()
        except (symbolic_errors.SymbolicError, StopIteration) as exc:
            raise _SymbolicRefused(str(exc)) from exc
    return LoadedSymbols(
        symcache=symcache,
        stack=stack.getvalue(),
        debug_id=module[2],
        arch=module[1],
        has_functions=functions > 0,
        stats=stats,
    )


class _Counter:
    def __init__(self) -> None:
        self.count = 0

    def write(self, data: bytes) -> int:
        size = len(data)
        self.count += size
        return size


def _symcache_size(cache: SymCache) -> int:
    # Streamed through a counter: the symcache's own buffer is what a load keeps in memory.
    counter = _Counter()
    cache.dump_into(counter)  # type: ignore[no-untyped-call]
    return counter.count


def _load_native(path: Path, *, debug_id: str | None, arch: str | None) -> LoadedSymbols:
    try:
        archive = Archive.open(str(path))
        objects = list(archive.iter_objects())
    except symbolic_errors.SymbolicError as exc:
        raise SymbolFileError("unsupported_debug_file", f"not a debug file: {exc}") from exc
    obj = choose_object(objects, debug_id=debug_id, arch=arch)
    try:
        symcache = obj.make_symcache()
        stack = cfi_text(obj)
    except symbolic_errors.SymbolicError as exc:
        raise SymbolFileError("bad_debug_file", f"symbolic refused it: {exc}") from exc
    return LoadedSymbols(
        symcache=symcache,
        stack=stack,
        debug_id=breakpad_debug_id(obj.debug_id),
        arch=obj.arch,
        has_functions=object_has_functions(obj, path),
    )


class SymbolLibrary:
    """A process-wide LRU of loaded symbols, keyed by the blob's content hash.

    Symbol blobs are immutable, so a key never goes stale. Bounded by count and by the
    estimated bytes of what it holds; one file larger than the byte bound is loaded and
    handed out but not kept.
    """

    def __init__(self, max_bytes: int, max_files: int) -> None:
        self.max_bytes = max_bytes
        self.max_files = max_files
        self._entries: OrderedDict[str, LoadedSymbols] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(
        self, key: str, path: Path, *, debug_id: str | None = None, arch: str | None = None
    ) -> LoadedSymbols:
        """The symbols of ``path`` (loaded on a miss). Raises ``SymbolFileError``."""
        slot = f"{key}:{debug_id or ''}:{arch or ''}"
        with self._lock:
            found = self._entries.get(slot)
            if found is not None:
                self._entries.move_to_end(slot)
                return found
        # Two threads may load the same file at once; the second result simply replaces.
        loaded = load_symbols(path, debug_id=debug_id, arch=arch)
        with self._lock:
            if loaded.size_bytes > self.max_bytes or self.max_files < 1:
                return loaded
            old = self._entries.pop(slot, None)
            if old is not None:
                self._bytes -= old.size_bytes
            self._entries[slot] = loaded
            self._bytes += loaded.size_bytes
            while self._bytes > self.max_bytes or len(self._entries) > self.max_files:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.size_bytes
        return loaded

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return any(slot.split(":", 1)[0] == key for slot in self._entries)

    @property
    def bytes_held(self) -> int:
        with self._lock:
            return self._bytes

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
