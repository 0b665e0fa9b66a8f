"""Symbol files loaded for address lookups: Breakpad .sym text or native debug files."""

from __future__ import annotations

import io
import re
import shutil
import struct
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import cxxfilt  # type: ignore[import-untyped]  # the package ships no type information
from symbolic import exceptions as symbolic_errors
from symbolic.debuginfo import Archive, Object
from symbolic.symcache import SourceLocation, SymCache

from reporting_endpoint.native.records import SourceLine

# Bounds on what one symbol file may cost to load, independent of settings: the largest real
# .sym files (Chromium, Electron) are a few hundred MB, so 2 GiB leaves room and still bounds
# the time of one streaming pass (about a minute at the measured rate).
MAX_FILE_BYTES = 2 * 2**30
# Demangled C++ template names reach tens of KB; a line longer than this is junk and skipped
# without ever being held in memory whole (it is also the size of the chunks read).
MAX_LINE_BYTES = 4 * 2**20
# Inlining is rarely deeper than ~20 levels; deeper INLINE records and lookups are cut here.
MAX_INLINE_DEPTH = 32
# Larger FILE / INLINE_ORIGIN ids are junk (a symcache indexes them densely).
MAX_RECORD_ID = 2**24
# Breakpad stores line numbers as signed 32-bit ints; one function over 4 GiB is junk.
MAX_LINE_NUMBER = 2**31 - 1
MAX_FUNCTION_SIZE = 2**32
ADDRESS_LIMIT = 2**64
READ_BUFFER = 1024 * 1024
CHUNK_BYTES = MAX_LINE_BYTES
# dump_syms writes no junk at all; past this many malformed lines the file is refused rather
# than sifted further (the line-by-line pass costs ~3 us a line).
MAX_SKIPPED_LINES = 100_000
# symbolic marks an unknown function start (inlined entries) with the all-ones u32.
_UNKNOWN_START = 0xFFFFFFFF

_HEX = rb"[0-9a-fA-F]{1,16}"
_LINE_RECORD = re.compile(rb"(" + _HEX + rb") (" + _HEX + rb") (-?\d{1,10}) (\d{1,10})\r?\n?")
_FUNC = re.compile(rb"FUNC (?:m )?(" + _HEX + rb") (" + _HEX + rb") " + _HEX + rb" [^\x00]*\n?")
_PUBLIC_RECORD = re.compile(rb"PUBLIC (?:m )?(" + _HEX + rb") " + _HEX + rb" [^\x00]*\n?")
_FILE = re.compile(rb"(?:FILE|INLINE_ORIGIN) (\d{1,10}) [^\x00]*\n?")
_INLINE = re.compile(
    rb"INLINE (\d{1,4}) \d{1,10} \d{1,10} (\d{1,10})((?: " + _HEX + rb"){2,})\r?\n?"
)
_STACK = re.compile(rb"STACK (?:CFI|WIN) [\x20-\x7e]*\r?\n?")
_INFO = re.compile(rb"INFO [\x20-\x7e]*\r?\n?")


class SymbolFileError(Exception):
    """A symbol file that cannot be loaded; ``code`` is a stable reason code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class LoadStats:
    """What a load kept and skipped (skipped lines are junk: malformed or out of bounds)."""

    records: int = 0
    skipped: int = 0
    stack_records: int = 0


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
        stats: LoadStats = LoadStats(),
    ) -> None:
        self._cache = symcache
        # symbolic's objects are not documented as thread-safe; lookups are microseconds.
        self._lock = threading.Lock()
        self._stack = stack
        self.debug_id = debug_id
        self.arch = arch
        self.has_functions = has_functions
        self.stats = stats
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


def breakpad_debug_id(debug_id: str) -> str:
    """symbolic's ``guid-age`` form as Breakpad writes it: uppercase hex, the age appended."""
    parts = debug_id.split("-")
    guid = "".join(parts[:5])
    age = parts[5] if len(parts) > 5 else "0"
    return (guid + age.lstrip("0") if age.strip("0") else guid + "0").upper()


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


def parse_module_line(line: bytes) -> tuple[str, str, str, str]:
    """(os, arch, debug_id, debug_file) of a ``MODULE`` line; the debug id uppercased."""
    fields = line.rstrip(b"\r\n").split(b" ", 4)
    if len(fields) != 5 or fields[0] != b"MODULE":
        raise SymbolFileError("bad_module_line", "expected MODULE <os> <arch> <id> <name>")
    try:
        os_, arch, debug_id, name = (field.decode("utf-8") for field in fields[1:])
    except UnicodeDecodeError as exc:
        raise SymbolFileError("bad_module_line", "MODULE line is not UTF-8") from exc
    if not re.fullmatch(r"[0-9A-Fa-f]{33,40}", debug_id):
        raise SymbolFileError("bad_module_line", "debug id is not 33 to 40 hex digits")
    if not os_.isprintable() or not arch.isprintable() or not name.isprintable():
        raise SymbolFileError("bad_module_line", "control characters in the MODULE line")
    return os_, arch, debug_id.upper(), name


def split_breakpad(
    source: BinaryIO, feed: BinaryIO, stack: BinaryIO, *, strict: bool = False
) -> tuple[tuple[str, str, str, str], LoadStats, int]:
    """Stream a .sym: valid symbol records to ``feed``, STACK records to ``stack``, junk away.

    Returns the MODULE fields, the counts and the number of FUNC/PUBLIC records kept.
    """
    first = source.readline(MAX_LINE_BYTES)
    if not first.startswith(b"MODULE "):
        raise SymbolFileError("not_a_symbol_file", "a .sym starts with a MODULE line")
    module = parse_module_line(first)
    feed.write(first if first.endswith(b"\n") else first + b"\n")
    with tempfile.TemporaryFile() as functions, tempfile.TemporaryFile() as publics:
        router = _Router(feed, stack, functions, publics, strict=strict)
        carry, skipping = b"", False
        while block := source.read(CHUNK_BYTES):
            if skipping:
                newline = block.find(b"\n")
                if newline < 0:
                    continue
                block, skipping = block[newline + 1 :], False
            data = carry + block
            cut = data.rfind(b"\n") + 1
            carry = data[cut:]
            if len(carry) > MAX_LINE_BYTES:
                router.skip(1)
                carry, skipping = b"", True
            if cut:
                router.route(data[:cut])
        if carry and not skipping:
            router.route(carry + b"\n")
        # Strict mode writes dump_syms' order, the only one symbolic parses: FILE and
        # INLINE_ORIGIN records, then FUNC blocks, then PUBLIC records.
        for part in (functions, publics):
            part.seek(0)
            shutil.copyfileobj(part, feed, READ_BUFFER)
    stats = LoadStats(records=router.records, skipped=router.skipped, stack_records=router.stacks)
    return module, stats, router.functions


class _Router:
    """Routes whole chunks with C-speed checks where they hold one kind of record (the common
    case: dump_syms writes the STACK records last); line by line only where they mix.

    Lenient mode checks only what symbolic cannot cope with (STACK records first, non-UTF-8
    text, lines past the bound) and leaves the records' syntax to symbolic's parser; strict
    mode checks every line and drops the malformed ones (used when symbolic refused a file).
    """

    def __init__(
        self,
        feed: BinaryIO,
        stack: BinaryIO,
        functions: BinaryIO,
        publics: BinaryIO,
        *,
        strict: bool,
    ) -> None:
        self.feed, self.stack, self.strict = feed, stack, strict
        self.function_blocks, self.publics = functions, publics
        self.records = self.skipped = self.stacks = self.functions = 0
        # Strict mode: whether line and INLINE records have a FUNC to belong to.
        self.in_function = False

    def skip(self, count: int) -> None:
        self.skipped += count
        if self.skipped > MAX_SKIPPED_LINES:
            raise SymbolFileError(
                "junk_symbol_file", f"more than {MAX_SKIPPED_LINES} malformed lines"
            )

    def route(self, chunk: bytes) -> None:
        if not self.strict and _utf8(chunk):
            if not chunk.startswith(b"STACK "):
                boundary = chunk.find(b"\nSTACK ") + 1
                head = chunk[:boundary] if boundary else chunk
                self.feed.write(head)
                self.records += head.count(b"\n")
                self.functions += (
                    head.startswith((b"FUNC ", b"PUBLIC "))
                    + head.count(b"\nFUNC ")
                    + head.count(b"\nPUBLIC ")
                )
                if boundary:
                    self.route(chunk[boundary:])
                return
            lines = chunk.count(b"\n")
            if chunk.count(b"\nSTACK ") + 1 == lines and chunk.isascii():
                self.stack.write(chunk)
                self.stacks += lines
                return
        for line in chunk.splitlines(keepends=True):
            if not line.endswith(b"\n"):
                line += b"\n"
            kind = self._strict_kind(line) if self.strict else _kind(line)
            if kind == _JUNK:
                self.skip(1)
                continue
            if kind == _STACK_RECORD:
                self.stack.write(line)
                self.stacks += 1
                continue
            self.records += 1
            self.functions += kind in (_FUNCTION, _PUBLIC)
            if not self.strict or kind == _HEADER:
                self.feed.write(line)
            elif kind == _PUBLIC:
                self.publics.write(line)
            else:
                self.function_blocks.write(line)

    def _strict_kind(self, line: bytes) -> int:
        kind = _keep(line)
        if kind == _FUNCTION:
            self.in_function = True
        elif kind == _PUBLIC:
            self.in_function = False
        elif kind == _BODY and not self.in_function:
            return _JUNK
        return kind


_JUNK, _HEADER, _BODY, _STACK_RECORD, _FUNCTION, _PUBLIC = range(6)


def _kind(line: bytes) -> int:
    if line.startswith(b"STACK "):
        return _STACK_RECORD if line.isascii() else _JUNK
    if not _utf8(line):
        return _JUNK
    if line.startswith(b"FUNC "):
        return _FUNCTION
    return _PUBLIC if line.startswith(b"PUBLIC ") else _BODY


def _keep(line: bytes) -> int:
    """The kind of a line, checked field by field; ``_JUNK`` when malformed or out of bounds."""
    head = line[:1]
    if len(line) > MAX_LINE_BYTES or b"\x00" in line:
        return _JUNK
    if head and head in b"0123456789abcdef":
        match = _LINE_RECORD.fullmatch(line)
        if match is None:
            return _JUNK
        address, size = int(match[1], 16), int(match[2], 16)
        number, file_id = int(match[3]), int(match[4])
        good = (
            address + size <= ADDRESS_LIMIT
            and size <= MAX_FUNCTION_SIZE
            and 0 <= number <= MAX_LINE_NUMBER
            and file_id <= MAX_RECORD_ID
        )
        return _BODY if good else _JUNK
    if head == b"S":
        return _STACK_RECORD if _STACK.fullmatch(line) else _JUNK
    if head == b"F":
        if line.startswith(b"FILE "):
            match = _FILE.fullmatch(line)
            good = bool(match and int(match[1]) <= MAX_RECORD_ID and _utf8(line))
            return _HEADER if good else _JUNK
        match = _FUNC.fullmatch(line)
        if match is None:
            return _JUNK
        address, size = int(match[1], 16), int(match[2], 16)
        good = address + size <= ADDRESS_LIMIT and size <= MAX_FUNCTION_SIZE and _utf8(line)
        return _FUNCTION if good else _JUNK
    if head == b"P":
        return _PUBLIC if _PUBLIC_RECORD.fullmatch(line) and _utf8(line) else _JUNK
    if head == b"I":
        if line.startswith(b"INLINE_ORIGIN "):
            match = _FILE.fullmatch(line)
            good = bool(match and int(match[1]) <= MAX_RECORD_ID and _utf8(line))
            return _HEADER if good else _JUNK
        if line.startswith(b"INLINE "):
            return _BODY if _inline_ok(line) else _JUNK
        return _HEADER if _INFO.fullmatch(line) else _JUNK
    return _JUNK


def _utf8(data: bytes) -> bool:
    if data.isascii():
        return True
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _inline_ok(line: bytes) -> bool:
    match = _INLINE.fullmatch(line)
    if match is None or int(match[1]) >= MAX_INLINE_DEPTH or int(match[2]) > MAX_RECORD_ID:
        return False
    numbers = [int(value, 16) for value in match[3].split()]
    if len(numbers) % 2:
        return False
    pairs = zip(numbers[::2], numbers[1::2], strict=True)
    return all(a + s <= ADDRESS_LIMIT and s <= MAX_FUNCTION_SIZE for a, s in pairs)


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
