"""x86 STACK WIN (MSVC FrameData/FPO) unwinding: the caller's registers from a program string."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from reporting_endpoint.native.cfi import MASK32, Budget, ReadWord, WinRecord, run_postfix
from reporting_endpoint.native.records import TRUST_CFI, TRUST_SCAN

# The program strings Breakpad substitutes for records without one: a function that keeps
# a frame pointer of its own (saved in the register area), and one that does not touch ebp.
ALLOCATES_BASE_POINTER = (
    "$eip .raSearchStart ^ = $ebp $esp .cbCalleeParams + .cbSavedRegs + 8 - ^ = "
    "$esp .raSearchStart 4 + ="
)
NO_BASE_POINTER = "$eip .raSearchStart ^ = $esp .raSearchStart 4 + ="
# Words above .raSearchStart looked at for a return address: MSVC may align esp to 8 or 16.
ALIGNMENT_WORDS = 3

# Scans the stack from an address for a word that can be a return address, over a number of
# words: returns (where it was found, the word).
Scan = Callable[[int, int], "tuple[int, int] | None"]


@dataclass(frozen=True, slots=True)
class WinFrame:
    """The callee's side of one unwind step: its registers and what the walk knows of it."""

    registers: Mapping[str, int]
    record: WinRecord
    callee_parameter_size: int  # parameter bytes of the frame this one called, if known
    is_context_frame: bool
    scan_words: int


def caller_registers(
    frame: WinFrame,
    read_word: ReadWord,
    budget: Budget,
    in_module: Callable[[int], bool],
    scan: Scan,
) -> tuple[dict[str, int], str] | None:
    """Recover eip, esp, ebp (and ebx, esi, edi when the program sets them) of the caller,
    as Breakpad's x86 walker does with a STACK WIN record; the trust is "cfi" when the
    program found the return address, "scan" when the stack had to be searched for it."""
    record, regs = frame.record, frame.registers
    esp, ebp = regs.get("esp", 0), regs.get("ebp", 0)
    variables = {
        "ebp": ebp,
        "esp": esp,
        ".cbCalleeParams": frame.callee_parameter_size,
        ".cbSavedRegs": record.saved_register_size,
        ".cbLocals": record.local_size,
        ".cbParams": record.parameter_size,
    }
    if "ebx" in regs:
        variables["ebx"] = regs["ebx"]
    search_start = (
        esp + frame.callee_parameter_size + record.local_size + record.saved_register_size
    ) & MASK32
    found = scan(search_start, ALIGNMENT_WORDS)
    if found is not None:
        original = search_start
        search_start = found[0]
        if (
            frame.is_context_frame
            and record.kind == 0
            and original == search_start
            and found[1] == regs.get("eip")
        ):
            # An FPO system call whose callee already returned: the top of the stack still
            # holds the current instruction's address, the return address is past it.
            again = scan(search_start + 4, ALIGNMENT_WORDS)
            search_start = again[0] if again is not None else search_start + 4

    recover_ebp = True
    if record.program is not None:
        program = record.program
    elif record.allocates_base_pointer:
        program = ALLOCATES_BASE_POINTER
    else:
        program = NO_BASE_POINTER + (" $ebx $ebx =" if "ebx" in regs else "")
        recover_ebp = False
    if "@" in program and "ebp" in regs:
        # esp was aligned (lossy): only ebp locates the return address of such a frame.
        search_start = (ebp + 4) & MASK32
    variables[".raSearchStart"] = search_start
    variables[".raSearch"] = search_start

    trust = TRUST_CFI
    assigned: set[str] = set()
    left = run_postfix(program.split(), variables, read_word, MASK32, budget, assigned)
    if left != [] or "eip" not in assigned or "esp" not in assigned:
        hit = scan(esp, frame.scan_words)
        if hit is None:
            return None
        variables["eip"], variables["esp"] = hit[1], hit[0] + 4
        trust = TRUST_SCAN

    if variables["eip"] != 0 or variables["ebp"] != 0:
        offset = 0
        if not in_module(variables["eip"]):
            start = (variables[".raSearchStart"] + 4) & MASK32
            hit = scan(start, frame.scan_words)
            if hit is not None:
                variables["eip"], variables["esp"] = hit[1], hit[0] + 4
                offset = hit[0] - start
                trust = TRUST_SCAN
        if recover_ebp:
            _recover_ebp(variables, frame, search_start, offset, trust, read_word)

    caller = {name: variables[name] for name in ("eip", "esp", "ebp")}
    for name in ("ebx", "esi", "edi"):
        if name in assigned:
            caller[name] = variables[name]
    return caller, trust


def _recover_ebp(
    variables: dict[str, int],
    frame: WinFrame,
    search_start: int,
    offset: int,
    trust: str,
    read_word: ReadWord,
) -> None:
    """When the caller's ebp is not a stack address (or frames were skipped), take the first
    word of the callee's saved-register area that is one, as Breakpad does."""
    ebp = variables["ebp"]
    skipped = trust != TRUST_CFI and ebp <= search_start + offset
    if not skipped and read_word(ebp) is not None:
        return
    end = frame.registers.get("esp", 0) + frame.callee_parameter_size
    location = end + frame.record.saved_register_size + offset
    while location >= end:
        candidate = read_word(location)
        if candidate is None:
            return
        if read_word(candidate) is not None:
            variables["ebp"] = candidate
            return
        location -= 4
