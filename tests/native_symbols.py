"""A test resolver over a Breakpad symbol folder: its STACK records and, via symbolic, names."""

from __future__ import annotations

from pathlib import Path

import symbolic

from reporting_endpoint.native.cfi import UnwindTable
from reporting_endpoint.native.records import Module, SourceLine

SYMBOLS = Path(__file__).parent / "fixtures" / "minidumps" / "symbols"


class SymFolderResolver:
    """Symbols filed as ``<debug_file>/<debug_id>/<name>.sym``, loaded on first use."""

    def __init__(self, root: Path = SYMBOLS) -> None:
        self.root = root
        self.tables: dict[tuple[str, str], UnwindTable | None] = {}
        self.caches: dict[tuple[str, str], object | None] = {}
        self.lookups = 0

    def _sym(self, module: Module) -> bytes | None:
        key = module.symbol_key
        if key is None:
            return None
        folder = self.root / key[0] / key[1]
        files = sorted(folder.glob("*.sym")) if folder.is_dir() else []
        return files[0].read_bytes() if files else None

    def _load(self, module: Module) -> None:
        key = module.symbol_key
        assert key is not None
        text = self._sym(module)
        if text is None:
            self.tables[key] = None
            self.caches[key] = None
            return
        lines = text.splitlines()
        self.tables[key] = UnwindTable.from_lines(
            line for line in lines if line.startswith(b"STACK")
        )
        # symbolic stops reading FUNC records at the first STACK record: give it none.
        rest = b"\n".join(line for line in lines if not line.startswith(b"STACK")) + b"\n"
        obj = next(iter(symbolic.Archive.from_bytes(rest).iter_objects()))
        self.caches[key] = obj.make_symcache()

    def unwind_table(self, module: Module) -> UnwindTable | None:
        key = module.symbol_key
        if key is None:
            return None
        if key not in self.tables:
            self._load(module)
        return self.tables[key]

    def lookup(self, module: Module, offset: int) -> tuple[SourceLine, ...]:
        key = module.symbol_key
        if key is None:
            return ()
        if key not in self.caches:
            self._load(module)
        cache = self.caches[key]
        if cache is None:
            return ()
        self.lookups += 1
        found = cache.lookup(offset)  # type: ignore[attr-defined]
        return tuple(
            SourceLine(
                function=loc.symbol,
                file=loc.full_path or None,
                line=loc.line or None,
                function_offset=offset - loc.sym_addr,
            )
            for loc in found
        )


class NoSymbols:
    """A resolver without any symbols: the walk uses frame pointers and scanning only."""

    def unwind_table(self, module: Module) -> UnwindTable | None:
        return None

    def lookup(self, module: Module, offset: int) -> tuple[SourceLine, ...]:
        return ()
