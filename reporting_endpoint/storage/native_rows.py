"""Symbolication rows (issue 15) for every backend: facts to stored values, rows to records.

A processed crash carries its modules and the crashing thread's frames as JSON text on its
row, and the (debug_file, debug_id) keys it needed symbols for and did not have as rows of
``crash_modules``; symbol files are rows of ``symbol_files``. Both engines store and answer
exactly what these functions make of them; nothing here knows a query language.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from reporting_endpoint.native.records import MissingSymbols, SymbolFile
from reporting_endpoint.storage.rows import stored_json

# JSON facts a processed crash adds to its row, beside the scalar FACT_COLUMNS.
NATIVE_COLUMNS = ("modules", "frames")
# A value past this is refused (the crash is then marked failed with the reason), not cut:
# the producer caps its frames, so only a broken one gets here.
MAX_JSON_BYTES = 2 * 1024 * 1024
# Missing modules one crash can list: a process loads a few hundred modules at most.
MAX_MISSING = 10_000

SYMBOL_COLUMNS = (
    "debug_file", "debug_id", "name", "code_file", "code_id", "os", "arch", "sym_sha256",
    "sym_size", "object_sha256", "object_size", "source", "uploaded_at",
)  # fmt: skip

# How far back the periodic late-symbols check looks at uploads (ms, the database's clock):
# crossings it catches are between commits seconds apart, and it runs every minute.
RECENT_UPLOADS_MS = 3_600_000

Key = tuple[str, str]
# (debug_file, debug_id, code_file, the sha256 of the .sym the store had when the processor
# looked, None when it had none).
MissingRow = tuple[str, str, str | None, str | None]
_SHA256 = re.compile(r"[0-9a-f]{64}")


def clean(value: str) -> str:
    """Text as both engines store it alike: NUL as U+FFFD (PostgreSQL cannot hold it), a lone
    surrogate (a dump's unpaired UTF-16 names) as its backslash escape (UTF-8 cannot)."""
    if "\x00" in value:
        value = value.replace("\x00", "\ufffd")
    if value.isascii():
        return value
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    return value


def _cleaned(value: Any) -> Any:
    """``value`` with every string in it (keys too) cleaned, ready for orjson."""
    if isinstance(value, str):
        return clean(value)
    if isinstance(value, Mapping):
        return {clean(str(k)): _cleaned(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_cleaned(v) for v in value]
    return value


def clean_key(key: Sequence[str]) -> Key:
    return (clean(key[0]), clean(key[1]))


@dataclass(frozen=True, slots=True)
class NativeFacts:
    """What a result stores beside the scalar facts: the JSON columns and the missing rows."""

    modules: str | None
    frames: str | None
    missing: tuple[MissingRow, ...]


def _json_list(facts: Mapping[str, Any], name: str) -> str | None:
    value = facts.get(name)
    if value is None:
        return None
    if not isinstance(value, list | tuple):
        raise ValueError(f"{name} is a {type(value).__name__}, not a list")
    try:
        text = orjson.dumps(_cleaned(value)).decode()
    except orjson.JSONEncodeError as exc:
        raise ValueError(f"{name} is not JSON: {exc}") from None
    if len(text) > MAX_JSON_BYTES:
        raise ValueError(f"{name} is {len(text)} bytes of JSON, more than {MAX_JSON_BYTES}")
    return text


def native_facts(facts: Mapping[str, Any]) -> NativeFacts:
    """The modules, frames and missing symbols of a result; ``ValueError`` says why one
    cannot be stored (the caller then marks the crash failed with that reason)."""
    missing = facts.get("missing_symbols") or ()
    if not isinstance(missing, list | tuple):
        raise ValueError(f"missing_symbols is a {type(missing).__name__}, not a list")
    if len(missing) > MAX_MISSING:
        raise ValueError(f"missing_symbols has {len(missing)} modules, more than {MAX_MISSING}")
    rows: dict[Key, MissingRow] = {}
    for entry in missing:
        if (
            not isinstance(entry, list | tuple)
            or len(entry) not in (3, 4)
            or not all(isinstance(v, str) and v for v in entry[:2])
            or not (entry[2] is None or isinstance(entry[2], str))
            or not (
                len(entry) == 3
                or entry[3] is None
                or (isinstance(entry[3], str) and _SHA256.fullmatch(entry[3]))
            )
        ):
            shown = repr(entry)[:100]
            raise ValueError(
                f"missing_symbols entry {shown} is not [debug_file, debug_id, code, seen]"
            )
        key = clean_key(entry)
        seen = entry[3] if len(entry) == 4 else None
        # The same module twice (a dump listing it twice) is one row: the first one's.
        rows.setdefault(key, (*key, None if entry[2] is None else clean(entry[2]), seen))
    modules, frames = _json_list(facts, "modules"), _json_list(facts, "frames")
    return NativeFacts(modules, frames, tuple(rows.values()))


def stored_list(text: object) -> list[Any]:
    """A JSON list column as the API shows it: ``[]`` until the crash is processed (NULL), and
    for anything that is not a list (written by another tool)."""
    value = stored_json(text)
    return value if isinstance(value, list) else []


def stored_modules(text: object) -> list[dict[str, Any]]:
    return [module for module in stored_list(text) if isinstance(module, dict)]


def with_native(
    crash: dict[str, Any], modules: list[dict[str, Any]], frames: object, present: set[Key]
) -> dict[str, Any]:
    """``crash`` (as ``crash_row_to_dict`` made it) with its modules, each saying whether the
    store has its symbols, and the crashing thread's frames."""
    for module in modules:
        key = (module.get("debug_file"), module.get("debug_id"))
        module["has_symbols"] = key in present
    crash["modules"] = modules
    crash["frames"] = stored_list(frames)
    return crash


def symbol_values(symbol: SymbolFile) -> tuple[object, ...]:
    """A symbol file as a row in ``SYMBOL_COLUMNS`` order, text cleaned as both engines do."""

    def text(value: str | None) -> str | None:
        return None if value is None else clean(value)

    return (
        clean(symbol.debug_file), clean(symbol.debug_id), clean(symbol.name),
        text(symbol.code_file), text(symbol.code_id), text(symbol.os), text(symbol.arch),
        clean(symbol.sym_sha256), int(symbol.sym_size), text(symbol.object_sha256),
        None if symbol.object_size is None else int(symbol.object_size), clean(symbol.source),
        int(symbol.uploaded_at),
    )  # fmt: skip


def symbol_from_row(row: Sequence[Any]) -> SymbolFile:
    """A row in ``SYMBOL_COLUMNS`` order as the record."""
    (debug_file, debug_id, name, code_file, code_id, os, arch, sym_sha256, sym_size,
     object_sha256, object_size, source, uploaded_at) = row  # fmt: skip
    return SymbolFile(
        debug_file=str(debug_file), debug_id=str(debug_id), name=str(name),
        code_file=code_file, code_id=code_id, os=os, arch=arch, sym_sha256=str(sym_sha256),
        sym_size=int(sym_size), object_sha256=object_sha256,
        object_size=None if object_size is None else int(object_size), source=str(source),
        uploaded_at=int(uploaded_at),
    )  # fmt: skip


def missing_from_row(row: Sequence[Any]) -> MissingSymbols:
    """A row of (debug_file, debug_id, code_file, crashes, last_seen) as the record."""
    debug_file, debug_id, code_file, crashes, last_seen = row
    return MissingSymbols(str(debug_file), str(debug_id), code_file, int(crashes), int(last_seen))


def requested(keys: Sequence[Sequence[str]]) -> dict[Key, Key]:
    """Cleaned key -> the key the caller asked with (what a lookup answers under)."""
    return {clean_key(key): (key[0], key[1]) for key in keys}
