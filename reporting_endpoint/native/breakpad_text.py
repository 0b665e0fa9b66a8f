"""Breakpad .sym text read as a stream: records checked one by one, STACK records apart."""

from __future__ import annotations

import re
import shutil
import tempfile
from dataclasses import dataclass
from typing import BinaryIO

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
