"""Text as PostgreSQL can hold it.

PostgreSQL refuses two things SQLite stores without a word: the NUL character (text is
NUL-terminated inside the server) and lone surrogates (not encodable as UTF-8, so asyncpg
fails the whole statement). A report URL or user agent can carry either, and one such value
would fail its whole group and then, retried alone, its request, for ever. They are cleaned
before every insert: NUL becomes U+FFFD, a lone surrogate its backslash escape (as the SQLite
backend stores a dump's unpaired UTF-16 names).
"""

from __future__ import annotations

from collections.abc import Sequence

REPLACEMENT = "\ufffd"


def clean_text(value: str) -> str:
    """``value`` with NUL and lone surrogates replaced; the same object when it had neither."""
    if value.isascii():
        # The common case costs one C-level scan each (no encode).
        return value.replace("\x00", REPLACEMENT) if "\x00" in value else value
    if "\x00" in value:
        value = value.replace("\x00", REPLACEMENT)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    return value


def clean_row(row: Sequence[object]) -> tuple[object, ...]:
    """A row with every text value cleaned (other values as they are)."""
    return tuple(clean_text(v) if isinstance(v, str) else v for v in row)
