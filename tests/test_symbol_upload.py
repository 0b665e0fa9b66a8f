"""Symbol uploads: .sym files, zips in Electron's and dump_syms' layouts, ELF, hostile zips."""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import time
import zipfile
from pathlib import Path

import pytest

from reporting_endpoint.native.symbol_upload import (
    SymbolUploadError,
    UnpackedSymbols,
    UploadLimits,
    sym_name,
    unpack_symbols,
)
from reporting_endpoint.native.symbols import load_symbols

SYMBOLS = Path(__file__).parent / "fixtures" / "minidumps" / "symbols"
FIXTURES = sorted(SYMBOLS.glob("*/*/*.sym"))
TEST_APP = SYMBOLS / "test_app.pdb" / "5A9832E5287241C1838ED98914E9B7FF1" / "test_app.sym"


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_sym_names_follow_breakpads_layout() -> None:
    assert sym_name("test_app.pdb") == "test_app.sym"
    assert sym_name("KERNEL32.PDB") == "KERNEL32.sym"
    assert sym_name("libfoo.so") == "libfoo.so.sym"
    assert sym_name("Electron Framework") == "Electron Framework.sym"
    assert sym_name(".pdb") == ".pdb.sym"


def test_a_sym_upload_is_copied_with_its_module_fields(tmp_path: Path) -> None:
    work = tmp_path / "work"
    (found,) = unpack_symbols(TEST_APP, "whatever.sym", work)
    assert (found.debug_file, found.debug_id, found.name) == (
        "test_app.pdb",
        "5A9832E5287241C1838ED98914E9B7FF1",
        "test_app.sym",
    )
    assert (found.os, found.arch, found.object_path) == ("windows", "x86", None)
    assert found.path == "test_app.pdb/5A9832E5287241C1838ED98914E9B7FF1/test_app.sym"
    assert found.sym_path.parent == work
    assert found.sym_path.read_bytes() == TEST_APP.read_bytes()


def test_module_id_is_uppercased_and_code_id_read(tmp_path: Path) -> None:
    upload = tmp_path / "libfoo.so.sym"
    upload.write_bytes(
        b"MODULE Linux x86_64 d13d2d272eeb03cf790af0c2efc955620 libfoo.so\n"
        b"INFO CODE_ID 272d3dd1eb2ecf03790af0c2efc955627cc88458 libfoo.so\n"
        b"FILE 0 a.c\nFUNC 1000 10 0 f\n1000 10 1 0\n"
    )
    (found,) = unpack_symbols(upload, "libfoo.so.sym", tmp_path / "work")
    assert found.debug_id == "D13D2D272EEB03CF790AF0C2EFC955620"
    assert found.code_id == "272D3DD1EB2ECF03790AF0C2EFC955627CC88458"
    assert (found.code_file, found.name) == ("libfoo.so", "libfoo.so.sym")
    text = found.sym_path.read_text()
    assert text.startswith("MODULE Linux x86_64 D13D2D272EEB03CF790AF0C2EFC955620 libfoo.so\n")
    assert load_symbols(found.sym_path).lookup(0x1004)[0].function == "f"


def layout_paths(found: list[UnpackedSymbols]) -> set[str]:
    return {f.path for f in found}


def fixture_layout() -> set[str]:
    return {str(p.relative_to(SYMBOLS)) for p in FIXTURES}


def test_electron_symbols_zip(tmp_path: Path) -> None:
    upload = tmp_path / "electron-v30.0.0-linux-x64-symbols.zip"
    with zipfile.ZipFile(upload, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("LICENSE", "MIT\n")
        archive.writestr("LICENSES.chromium.html", "<html></html>")
        for sym in FIXTURES:
            archive.write(sym, f"breakpad_symbols/{sym.relative_to(SYMBOLS)}")
    found = unpack_symbols(upload, upload.name, tmp_path / "work")
    assert layout_paths(found) == fixture_layout()
    for item in found:
        original = SYMBOLS / item.path
        assert item.sym_path.read_bytes() == original.read_bytes()
    assert tree(tmp_path / "work") == {f.sym_path.name for f in found}


def test_dump_syms_store_tree_zip(tmp_path: Path) -> None:
    upload = tmp_path / "symbols.zip"
    with zipfile.ZipFile(upload, "w", zipfile.ZIP_DEFLATED) as archive:
        for sym in FIXTURES:
            relative = sym.relative_to(SYMBOLS)
            archive.writestr(f"{relative.parts[0]}/", "")
            archive.writestr(f"{relative.parent}/", "")
            archive.write(sym, str(relative))
    found = unpack_symbols(upload, upload.name, tmp_path / "work")
    assert layout_paths(found) == fixture_layout()


C_PROGRAM = """\
int crash(int *p) { return *p; }
int main(int argc, char **argv) { return crash(argc > 5 ? &argc : 0); }
"""


def build(tmp_path: Path, *flags: str) -> Path:
    for tool in ("gcc", "readelf"):
        if shutil.which(tool) is None:
            reason = f"{tool} not installed: cannot build an ELF debug file"
            print(reason)
            pytest.skip(reason)
    src = tmp_path / "prog.c"
    src.write_text(C_PROGRAM)
    out = tmp_path / "prog"
    subprocess.run(["gcc", *flags, str(src), "-o", str(out)], check=True)
    return out


def minidump_debug_id(binary: Path) -> tuple[str, str]:
    """(Breakpad debug id, code id) a minidump of this ELF carries: the GNU build id, its first
    16 bytes read as a little-endian GUID, then age 0."""
    notes = subprocess.run(
        ["readelf", "-n", str(binary)], check=True, capture_output=True, text=True
    ).stdout
    match = re.search(r"Build ID: ([0-9a-f]+)", notes)
    if match is None:
        pytest.skip("this gcc adds no build id")
    raw = bytes.fromhex(match[1])[:16].ljust(16, b"\0")
    guid = raw[3::-1] + raw[5:3:-1] + raw[7:5:-1] + raw[8:16]
    return guid.hex().upper() + "0", match[1].upper()


def test_gcc_elf_is_converted_to_module_code_id_and_cfi(tmp_path: Path) -> None:
    binary = build(tmp_path, "-g", "-O0")
    debug_id, code_id = minidump_debug_id(binary)
    (found,) = unpack_symbols(binary, "prog", tmp_path / "work")
    assert (found.debug_file, found.debug_id, found.name) == ("prog", debug_id, "prog.sym")
    assert (found.code_file, found.code_id, found.os, found.arch) == (
        "prog",
        code_id,
        "Linux",
        "x86_64",
    )
    assert found.object_path == binary
    lines = found.sym_path.read_text().splitlines()
    assert lines[0] == f"MODULE Linux x86_64 {debug_id} prog"
    assert lines[1] == f"INFO CODE_ID {code_id} prog"
    assert lines[2].startswith("STACK CFI INIT ")
    assert all(line.startswith("STACK CFI ") for line in lines[2:])
    converted = load_symbols(found.sym_path)
    assert converted.debug_id == debug_id and not converted.has_functions
    assert len(converted.stack_records()) == len(lines) - 2
    native = load_symbols(found.object_path)
    assert native.debug_id == debug_id and native.has_functions


def test_stripped_elf_is_refused_and_a_symbol_table_is_enough(tmp_path: Path) -> None:
    binary = build(tmp_path, "-g", "-O0")
    if shutil.which("strip") is None:
        pytest.skip("strip not installed")
    bare, names = tmp_path / "bare", tmp_path / "names"
    subprocess.run(["strip", "-o", str(bare), str(binary)], check=True)
    subprocess.run(["strip", "--strip-debug", "-o", str(names), str(binary)], check=True)
    work = tmp_path / "work"
    with pytest.raises(SymbolUploadError) as refused:
        unpack_symbols(bare, "prog", work)
    assert refused.value.code == "no_debug_info"
    assert tree(work) == set()
    (found,) = unpack_symbols(names, "prog", work)
    assert found.debug_id == minidump_debug_id(binary)[0]


def test_a_sym_the_processors_would_refuse_is_refused_at_upload(tmp_path: Path) -> None:
    """A valid MODULE line over records the loader drops as junk: refused now with the
    loader's code, not stored and found broken when a crash needs it."""
    upload = tmp_path / "junk.sym"
    junk = b"FUNC zz not a record\n" * 150_000
    upload.write_bytes(b"MODULE Linux x86_64 0123456789ABCDEF0123456789ABCDEF0 junk\n" + junk)
    work = tmp_path / "work"
    with pytest.raises(SymbolUploadError) as refused:
        unpack_symbols(upload, upload.name, work)
    assert refused.value.code == "junk_symbol_file"
    assert tree(work) == set()


def test_a_separate_debug_file_is_filed_under_the_module_it_describes(tmp_path: Path) -> None:
    """`objcopy --only-keep-debug prog prog.debug`: dumps name the module `prog`."""
    binary = build(tmp_path, "-g", "-O0")
    if shutil.which("objcopy") is None:
        pytest.skip("objcopy not installed")
    debug = tmp_path / "prog.debug"
    subprocess.run(["objcopy", "--only-keep-debug", str(binary), str(debug)], check=True)
    (found,) = unpack_symbols(debug, debug.name, tmp_path / "work")
    assert (found.debug_file, found.name) == ("prog", "prog.sym")
    assert found.debug_id == minidump_debug_id(binary)[0]


def test_an_elf_with_corrupt_symbol_tables_is_refused_not_an_error(tmp_path: Path) -> None:
    """Symbol tables whose entry size is below a symbol's: refused with a code (this raised
    struct.error, a 500 on upload)."""
    binary = build(tmp_path, "-g", "-O0")
    if shutil.which("strip") is None:
        pytest.skip("strip not installed")
    bare = tmp_path / "bare"
    subprocess.run(["strip", "-o", str(bare), str(binary)], check=True)
    data = bytearray(bare.read_bytes())
    shoff, shentsize, shnum = struct.unpack_from("<Q10xHH", data, 40)
    corrupted = 0
    for index in range(shnum):
        header = shoff + index * shentsize
        kind = struct.unpack_from("<I", data, header + 4)[0]
        if kind in (2, 11):  # SHT_SYMTAB, SHT_DYNSYM
            offset, size = struct.unpack_from("<QQ", data, header + 24)
            data[offset : offset + size] = bytes(size)
            struct.pack_into("<Q", data, header + 56, 8)  # sh_entsize
            corrupted += 1
    assert corrupted
    bad = tmp_path / "bad"
    bad.write_bytes(bytes(data))
    work = tmp_path / "work"
    with pytest.raises(SymbolUploadError) as refused:
        unpack_symbols(bad, "prog", work)
    assert refused.value.code == "no_debug_info"
    assert tree(work) == set()


def test_elf_inside_a_zip_is_kept_in_workdir(tmp_path: Path) -> None:
    binary = build(tmp_path, "-g", "-O0")
    upload = tmp_path / "up.zip"
    with zipfile.ZipFile(upload, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.write(binary, "lib/prog")
        archive.write(TEST_APP, "test_app.sym")
    work = tmp_path / "work"
    found = {f.debug_file: f for f in unpack_symbols(upload, "up.zip", work)}
    assert set(found) == {"prog", "test_app.pdb"}
    kept = found["prog"].object_path
    assert kept is not None and kept.parent == work
    assert kept.read_bytes() == binary.read_bytes()
    assert tree(work) == {
        kept.name,
        found["prog"].sym_path.name,
        found["test_app.pdb"].sym_path.name,
    }


def patch_sizes(path: Path, name: str, size: int) -> None:
    """Make a member declare ``size`` uncompressed bytes in both of its headers."""
    data = bytearray(path.read_bytes())
    encoded = name.encode()
    local = data.find(b"PK\x03\x04")
    central = data.find(b"PK\x01\x02")
    assert data[local + 30 : local + 30 + len(encoded)] == encoded
    data[local + 22 : local + 26] = size.to_bytes(4, "little")
    data[central + 24 : central + 28] = size.to_bytes(4, "little")
    path.write_bytes(bytes(data))


def hostile_uploads(tmp_path: Path) -> list[tuple[str, Path, str, UploadLimits]]:
    src = tmp_path / "src"
    src.mkdir()
    default = UploadLimits()
    cases = []

    bomb = src / "bomb.zip"
    with (
        zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive,
        archive.open("breakpad_symbols/big.sym", "w", force_zip64=True) as member,
    ):
        for _ in range(512):
            member.write(b"\0" * 2**20)
    cases.append(("zip bomb", bomb, "zip_bomb", default))

    liar = src / "liar.zip"
    with zipfile.ZipFile(liar, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("x.sym", TEST_APP.read_bytes())
    patch_sizes(liar, "x.sym", 100)
    cases.append(("member lying about its size", liar, "zip_size_mismatch", default))

    for label, name in [
        ("parent path", "../evil.sym"),
        ("nested parent path", "breakpad_symbols/../../evil.sym"),
        ("absolute path", "/tmp/evil.sym"),
        ("drive letter", "C:\\evil.sym"),
        ("backslash parent", "a\\..\\..\\evil.sym"),
    ]:
        escape = src / f"escape{len(cases)}.zip"
        with zipfile.ZipFile(escape, "w") as archive:
            archive.write(TEST_APP, "ok/test_app.sym")
            archive.writestr(name, TEST_APP.read_bytes())
        cases.append((label, escape, "zip_path_escapes", default))

    link = src / "link.zip"
    with zipfile.ZipFile(link, "w") as archive:
        info = zipfile.ZipInfo("test_app.sym")
        info.create_system = 3
        info.external_attr = 0o120777 << 16
        archive.writestr(info, "/etc/passwd")
    cases.append(("symlink member", link, "zip_path_escapes", default))

    many = src / "many.zip"
    with zipfile.ZipFile(many, "w") as archive:
        for index in range(30):
            archive.writestr(f"f{index}.txt", "x")
    cases.append(("too many members", many, "too_many_files", UploadLimits(max_files=20)))

    large = src / "large.zip"
    with zipfile.ZipFile(large, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.write(TEST_APP, "a.sym")
    cases.append(("unpacked size", large, "zip_too_large", UploadLimits(max_unpacked_bytes=1000)))

    bad_module = src / "bad.sym"
    bad_module.write_bytes(b"MODULE Linux x86_64 NOTHEX evil\nFUNC 1 1 0 f\n")
    cases.append(("bad MODULE line", bad_module, "bad_module_line", default))
    for label, line in [
        ("slash in debug file", b"MODULE Linux x86 " + b"A" * 33 + b" ../../etc/passwd\n"),
        ("short MODULE line", b"MODULE Linux x86\n"),
    ]:
        path = src / f"bad{len(cases)}.sym"
        path.write_bytes(line)
        code = "bad_file_name" if b"passwd" in line else "bad_module_line"
        cases.append((label, path, code, default))

    junk = src / "junk.bin"
    junk.write_bytes(os.urandom(1 << 20))
    cases.append(("random bytes", junk, "not_a_symbol_file", default))
    empty_zip = src / "empty.zip"
    with zipfile.ZipFile(empty_zip, "w") as archive:
        archive.writestr("README", "nothing here")
    cases.append(("zip without symbols", empty_zip, "not_a_symbol_file", default))
    truncated = src / "truncated.zip"
    truncated.write_bytes(bomb.read_bytes()[:5000])
    cases.append(("truncated zip", truncated, "bad_zip", default))
    return cases


def test_hostile_uploads_are_refused_with_a_reason_and_write_nothing_outside(
    tmp_path: Path,
) -> None:
    for label, upload, code, limits in hostile_uploads(tmp_path):
        before = tree(tmp_path)
        work = tmp_path / "work"
        started = time.monotonic()
        with pytest.raises(SymbolUploadError) as refused:
            unpack_symbols(upload, upload.name, work, limits)
        assert refused.value.code == code, (label, refused.value)
        assert time.monotonic() - started < 10, label
        assert tree(work) == set(), label  # what it wrote is gone
        assert tree(tmp_path) - {"work"} == before - {"work"}, label
        assert not Path("/tmp/evil.sym").exists()
