"""Crash signatures from the crashing thread's symbolicated frames, as Crash Stats builds them."""

from __future__ import annotations

import functools
import re
import tomllib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from reporting_endpoint.native.records import Frame

MAX_SIGNATURE_CHARS = 255
# Frames looked at (inlined ones count) and parts kept: a signature names the culprit and what
# leads to it, not the whole stack; a stack of 1,000 irrelevant frames costs nothing.
MAX_WALKED_FRAMES = 40
MAX_PARTS = 8
SEPARATOR = " | "
LISTS_FILE = "signature_lists.toml"

_OPERATOR = re.compile(
    r"operator(?:\(\)|\[\]|<<=?|>>=?|<=>|->\*?|[-+*/%^&|~!=<>,]=?|\s+new(?:\[\])?|\s+delete(?:\[\])?)"
)
_RUST_HASH = re.compile(r"::h[0-9a-f]{16}$")
_QUALIFIERS = re.compile(r"(?:\s*(?:const|volatile|&&|&|noexcept))+$")
_ANONYMOUS = "(anonymous namespace)"


class SignatureListError(Exception):
    """The signature lists file is unusable; ``code`` is a stable reason code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class SignatureLists:
    """Frames skipped (``irrelevant``) and frames the walk goes past (``prefix``)."""

    irrelevant: tuple[re.Pattern[str], ...]
    prefix: tuple[re.Pattern[str], ...]

    def is_irrelevant(self, name: str) -> bool:
        return any(pattern.fullmatch(name) for pattern in self.irrelevant)

    def is_prefix(self, name: str) -> bool:
        return any(pattern.fullmatch(name) for pattern in self.prefix)


def load_signature_lists(path: Path | None = None) -> SignatureLists:
    """The lists from a TOML file (``irrelevant`` and ``prefix``: arrays of regexes); the
    packaged ``signature_lists.toml`` when no path is given."""
    try:
        if path is None:
            text = resources.files(__package__).joinpath(LISTS_FILE).read_text("utf-8")
            where = LISTS_FILE
        else:
            text, where = path.read_text("utf-8"), str(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise SignatureListError("unreadable_signature_lists", str(exc)) from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SignatureListError("bad_signature_lists", f"{where}: {exc}") from exc
    unknown = set(data) - {"irrelevant", "prefix"}
    if unknown:
        raise SignatureListError("bad_signature_lists", f"{where}: unknown keys {sorted(unknown)}")
    return SignatureLists(
        irrelevant=_patterns(data, "irrelevant", where), prefix=_patterns(data, "prefix", where)
    )


def _patterns(data: dict[str, object], key: str, where: str) -> tuple[re.Pattern[str], ...]:
    entries = data.get(key)
    if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
        raise SignatureListError("bad_signature_lists", f"{where}: {key} is not a list of strings")
    compiled = []
    for entry in entries:
        try:
            compiled.append(re.compile(entry))
        except re.error as exc:
            raise SignatureListError(
                "bad_signature_lists", f"{where}: {key} entry {entry!r}: {exc}"
            ) from exc
    return tuple(compiled)


@functools.cache
def default_lists() -> SignatureLists:
    return load_signature_lists()


def normalize_function(name: str) -> str:
    """A function name as signatures show it: parameter lists dropped, template arguments
    collapsed to ``<T>``, trailing qualifiers and Rust hashes dropped, whitespace collapsed.
    ``(anonymous namespace)`` and operator names are kept."""
    name = " ".join(name.split())
    out: list[str] = []
    angle = 0
    index = 0
    while index < len(name):
        operator = _OPERATOR.match(name, index) if name.startswith("operator", index) else None
        if operator is not None and (
            index == 0 or not (name[index - 1].isalnum() or name[index - 1] == "_")
        ):
            if angle == 0:
                out.append(operator.group(0))
            index = operator.end()
            continue
        char = name[index]
        if name.startswith(_ANONYMOUS, index):
            if angle == 0:
                out.append(_ANONYMOUS)
            index += len(_ANONYMOUS)
        elif char == "(":
            index = _skip_group(name, index, "(", ")")
        elif char == "<":
            if angle == 0:
                out.append("<T>")
            angle += 1
            index += 1
        elif char == ">" and angle:
            angle -= 1
            index += 1
        else:
            if angle == 0:
                out.append(char)
            index += 1
    result = _QUALIFIERS.sub("", "".join(out)).strip()
    result = _RUST_HASH.sub("", result)
    return " ".join(result.split()) or name


def _skip_group(text: str, start: int, opening: str, closing: str) -> int:
    depth = 0
    for index in range(start, len(text)):
        if text[index] == opening:
            depth += 1
        elif text[index] == closing:
            depth -= 1
            if depth == 0:
                return index + 1
    return len(text)


def _entries(frames: Sequence[Frame]) -> Iterator[tuple[str | None, Frame]]:
    for frame in frames:
        for inlined in frame.inlined:
            yield inlined.function, frame
        yield frame.function, frame


def _label(function: str | None, frame: Frame) -> str:
    if function:
        return normalize_function(function)
    if frame.module is not None and frame.module_offset is not None:
        return f"{frame.module}@0x{frame.module_offset:x}"
    return f"@0x{frame.instruction:x}"


def frames_signature(
    frames: Sequence[Frame], fallback: str, lists: SignatureLists | None = None
) -> str:
    """The signature of the crashing thread's frames (top of the stack first).

    Irrelevant frames are skipped; prefix frames are kept and the walk goes on; the first
    other frame ends it. Without any function name on the stack, ``fallback`` is returned.
    """
    lists = lists or default_lists()
    walked = list(_entries(frames))[:MAX_WALKED_FRAMES]
    if not any(function for function, _ in walked):
        return fallback
    parts: list[str] = []
    for function, frame in walked:
        label = _label(function, frame)
        if lists.is_irrelevant(label):
            continue
        parts.append(label)
        if not lists.is_prefix(label) or len(parts) >= MAX_PARTS:
            break
    if not parts:
        return fallback
    signature = SEPARATOR.join(parts)
    if len(signature) > MAX_SIGNATURE_CHARS:
        signature = signature[: MAX_SIGNATURE_CHARS - 3] + "..."
    return signature
