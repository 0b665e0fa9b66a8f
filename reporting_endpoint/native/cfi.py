"""Breakpad's STACK CFI (and STACK WIN) records: an address index and the postfix rule evaluator."""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

# Bounds against a hostile or broken .sym: records kept, characters per line, tokens per
# expression. Real files stay far below (a Chromium .sym has ~2M CFI lines of < 200 chars).
MAX_RECORDS = 4_000_000
MAX_LINE = 4096
MAX_TOKENS = 256
# STACK WIN ranges nest (a function's range holds its prologue's); how far back to look for
# a containing one before giving up.
MAX_NESTING = 16

MASK64 = (1 << 64) - 1
MASK32 = (1 << 32) - 1

# arm64 CFI from some producers names fp and lr by their aliases.
_ALIASES = {"fp": "x29", "lr": "x30"}

ReadWord = Callable[[int], "int | None"]


class Budget:
    """Work left for one walk: every evaluated token and memory read spends one unit, so a
    hostile dump or symbol file ends the walk in bounded time instead of running on."""

    __slots__ = ("remaining",)

    def __init__(self, units: int) -> None:
        self.remaining = units

    def spend(self, units: int = 1) -> bool:
        self.remaining -= units
        return self.remaining >= 0


@dataclass(frozen=True, slots=True)
class CfiRecord:
    """A ``STACK CFI INIT`` record with the ``STACK CFI`` deltas that follow it."""

    start: int
    size: int
    rules: str
    deltas: tuple[tuple[int, str], ...]


@dataclass(frozen=True, slots=True)
class WinRecord:
    """A ``STACK WIN`` record (MSVC's FPO or FrameData unwind info); sizes as in the PDB."""

    kind: int  # 0 FPO, 4 FrameData
    start: int
    size: int
    prologue_size: int
    epilogue_size: int
    parameter_size: int
    saved_register_size: int
    local_size: int
    max_stack_size: int
    program: str | None  # the program string, when the record has one
    allocates_base_pointer: bool


def register_name(token: str) -> str:
    """How a rule names a register, reduced to the context's key (``$rsp`` -> ``rsp``)."""
    name = token.lstrip("$")
    return _ALIASES.get(name, name)


def parse_rules(text: str, into: dict[str, tuple[str, ...]]) -> None:
    """Add the ``name: expression ...`` pairs of a rule set to ``into`` (later ones win)."""
    name: str | None = None
    tokens: list[str] = []
    for token in text.split():
        if token.endswith(":") and len(token) > 1:
            if name is not None and tokens:
                into[name] = tuple(tokens)
            name, tokens = register_name(token[:-1]), []
        else:
            tokens.append(token)
    if name is not None and tokens and len(tokens) <= MAX_TOKENS:
        into[name] = tuple(tokens)


def _literal(token: str) -> int | None:
    digits = token[1:] if token.startswith("-") else token
    if not digits.isdigit() or len(digits) > 20:
        return None
    value = int(digits)
    return -value if token.startswith("-") else value


def run_postfix(
    tokens: Iterable[str],
    variables: dict[str, int],
    read_word: ReadWord,
    mask: int,
    budget: Budget,
    assigned: set[str] | None = None,
) -> list[int] | None:
    """Run a postfix program: ``+ - * / % @`` on words, ``^`` reads a word at an address,
    ``=`` assigns to the identifier below the value. Returns the values left on the stack,
    or None when an operand, identifier or memory read is missing or the budget runs out."""
    stack: list[int | str] = []

    def pop() -> int | None:
        if not stack:
            return None
        item = stack.pop()
        if isinstance(item, int):
            return item
        value = _literal(item)
        if value is not None:
            return value & mask
        return variables.get(register_name(item))

    for count, raw in enumerate(tokens, 1):
        if count > MAX_TOKENS or not budget.spend():
            return None
        # MSVC 2010 LTO writes "=" glued to the next token ("=$eip"); Breakpad splits it.
        parts = ("=", raw[1:]) if len(raw) > 1 and raw[0] == "=" else (raw,)
        for token in parts:
            if token in ("+", "-", "*", "/", "%", "@"):
                right, left = pop(), pop()
                if left is None or right is None:
                    return None
                if token == "+":
                    result = left + right
                elif token == "-":
                    result = left - right
                elif token == "*":
                    result = left * right
                elif token in ("/", "%"):
                    if right == 0:
                        return None
                    result = left // right if token == "/" else left % right
                else:
                    if right == 0:
                        return None
                    result = left & ~(right - 1)
                stack.append(result & mask)
            elif token == "^":
                address = pop()
                if address is None or not budget.spend():
                    return None
                value = read_word(address)
                if value is None:
                    return None
                stack.append(value)
            elif token == "=":
                value = pop()
                if value is None or not stack or isinstance(stack[-1], int):
                    return None
                target = stack.pop()
                assert isinstance(target, str)
                if _literal(target) is not None:
                    return None
                variables[register_name(target)] = value
                if assigned is not None:
                    assigned.add(register_name(target))
            else:
                stack.append(token)
    values: list[int] = []
    while stack:
        value = pop()
        if value is None:
            return None
        values.append(value)
    values.reverse()
    return values


def evaluate(
    tokens: tuple[str, ...],
    variables: Mapping[str, int],
    read_word: ReadWord,
    mask: int,
    budget: Budget,
) -> int | None:
    """The one value a CFI expression computes, or None."""
    values = run_postfix(tokens, dict(variables), read_word, mask, budget)
    if values is None or len(values) != 1:
        return None
    return values[0]


class UnwindTable:
    """A module's unwind records from its .sym, indexed by address (module-relative)."""

    __slots__ = ("_cfi", "_cfi_starts", "_win", "_win_starts")

    def __init__(self, cfi: list[CfiRecord], win: list[WinRecord]) -> None:
        cfi.sort(key=lambda r: r.start)
        win.sort(key=lambda r: (r.start, -r.size))
        self._cfi = cfi
        self._cfi_starts = [r.start for r in cfi]
        self._win = win
        self._win_starts = [r.start for r in win]

    @classmethod
    def from_lines(cls, lines: Iterable[str | bytes]) -> UnwindTable:
        """Index the ``STACK CFI INIT``/``STACK CFI``/``STACK WIN`` lines of a .sym; other and
        malformed lines are skipped, as are deltas outside the INIT record before them."""
        cfi: list[CfiRecord] = []
        win: list[WinRecord] = []
        current: tuple[int, int, str] | None = None
        deltas: list[tuple[int, str]] = []

        def close() -> None:
            if current is not None and len(cfi) < MAX_RECORDS:
                cfi.append(CfiRecord(current[0], current[1], current[2], tuple(deltas)))

        for raw in lines:
            if len(raw) > MAX_LINE:
                continue
            line = raw.decode("ascii", "replace") if isinstance(raw, bytes) else raw
            if line.startswith("STACK CFI INIT "):
                parts = line.split(None, 5)
                start, size = _hex(parts, 3), _hex(parts, 4)
                if start is None or size is None or len(parts) < 6:
                    continue
                close()
                current, deltas = (start, size, parts[5]), []
            elif line.startswith("STACK CFI "):
                parts = line.split(None, 3)
                address = _hex(parts, 2)
                if address is None or len(parts) < 4 or current is None:
                    continue
                if current[0] <= address < current[0] + current[1] and len(deltas) < MAX_TOKENS:
                    deltas.append((address, parts[3]))
            elif line.startswith("STACK WIN ") and len(win) < MAX_RECORDS:
                record = _win_record(line)
                if record is not None:
                    win.append(record)
        close()
        return cls(cfi, win)

    def __len__(self) -> int:
        return len(self._cfi) + len(self._win)

    def cfi_rules(self, address: int) -> dict[str, tuple[str, ...]] | None:
        """The CFI rules in effect at a module-relative address (register -> postfix tokens),
        or None when no CFI record covers it."""
        i = bisect.bisect_right(self._cfi_starts, address) - 1
        if i < 0:
            return None
        record = self._cfi[i]
        if not record.start <= address < record.start + record.size:
            return None
        rules: dict[str, tuple[str, ...]] = {}
        parse_rules(record.rules, rules)
        for delta_address, text in record.deltas:
            if delta_address > address:
                break
            parse_rules(text, rules)
        return rules

    def win_record(self, address: int, kind: int | None = None) -> WinRecord | None:
        """The innermost STACK WIN record holding a module-relative address; FrameData (4)
        before FPO (0), as Breakpad prefers, unless ``kind`` asks for one."""
        best: WinRecord | None = None
        i = bisect.bisect_right(self._win_starts, address) - 1
        for j in range(i, max(i - MAX_NESTING, -1), -1):
            record = self._win[j]
            if not record.start <= address < record.start + record.size:
                continue
            if kind is not None and record.kind != kind:
                continue
            if best is None or (record.kind == 4 and best.kind != 4):
                best = record
            if best.kind == 4:
                break
        return best

    def caller_registers(
        self,
        address: int,
        registers: Mapping[str, int],
        read_word: ReadWord,
        mask: int,
        budget: Budget,
    ) -> dict[str, int] | None:
        """Recover the caller's registers with the CFI rules at ``address``: ``.cfa`` first
        from the callee's registers, then ``.ra`` and the rest with ``.cfa`` bound (as
        Breakpad's CFIFrameInfo does). A failing register rule drops that register only; a
        failing ``.cfa`` or ``.ra`` fails the frame."""
        rules = self.cfi_rules(address)
        if rules is None or ".cfa" not in rules or ".ra" not in rules:
            return None
        cfa = evaluate(rules[".cfa"], registers, read_word, mask, budget)
        if cfa is None:
            return None
        bound = dict(registers)
        bound[".cfa"] = cfa
        ra = evaluate(rules[".ra"], bound, read_word, mask, budget)
        if ra is None:
            return None
        caller = {".cfa": cfa, ".ra": ra}
        for name, tokens in rules.items():
            if name in (".cfa", ".ra"):
                continue
            value = evaluate(tokens, bound, read_word, mask, budget)
            if value is not None:
                caller[name] = value
        return caller


def _hex(parts: list[str], index: int) -> int | None:
    if index >= len(parts) or len(parts[index]) > 16:
        return None
    try:
        return int(parts[index], 16)
    except ValueError:
        return None


def _win_record(line: str) -> WinRecord | None:
    parts = line.split(None, 12)
    if len(parts) < 13:
        return None
    numbers = [_hex(parts, i) for i in range(2, 12)]
    if any(n is None for n in numbers):
        return None
    kind, start, size, prologue, epilogue, params, saved, local, max_stack, has_program = (
        n if n is not None else 0 for n in numbers
    )
    if kind not in (0, 4):
        return None
    rest = parts[12].strip()
    program = rest if has_program else None
    allocates = not has_program and rest not in ("", "0")
    return WinRecord(
        kind, start, size, prologue, epilogue, params, saved, local, max_stack, program, allocates
    )
