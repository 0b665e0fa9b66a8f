"""Crash signatures from symbolicated frames: irrelevant and prefix lists, fallback, caps."""

from __future__ import annotations

from pathlib import Path

import pytest

from reporting_endpoint.native import signature
from reporting_endpoint.native.records import TRUST_CFI, TRUST_CONTEXT, Frame, SourceLine
from reporting_endpoint.native.signature import (
    SignatureListError,
    frames_signature,
    load_signature_lists,
)

FALLBACK = "SIGABRT | libc.so.6+0x3ef8b"


def stack(*functions: str | None, module: str = "app") -> list[Frame]:
    return [
        Frame(
            index=i,
            trust=TRUST_CONTEXT if i == 0 else TRUST_CFI,
            instruction=0x1000 + i,
            module=module,
            module_offset=0x100 * (i + 1),
            function=function,
        )
        for i, function in enumerate(functions)
    ]


def test_abort_inside_libc_is_skipped_down_to_the_app_function() -> None:
    frames = stack(
        "__pthread_kill_implementation",
        "__GI_raise",
        "__GI_abort",
        "__assert_fail_base",
        "__assert_fail",
        "Widget::Resize(int, int)",
        "main",
    )
    assert frames_signature(frames, FALLBACK) == "Widget::Resize"


def test_windows_exception_dispatch_is_skipped() -> None:
    frames = stack("KiUserExceptionDispatcher", "RaiseException", "_CxxThrowException", "Load()")
    assert frames_signature(frames, FALLBACK) == "Load"


def test_a_crash_in_malloc_names_its_caller() -> None:
    assert frames_signature(stack("malloc", "Parser::Grow(unsigned long)", "main"), FALLBACK) == (
        "malloc | Parser::Grow"
    )
    frames = stack("_int_free", "free", "operator delete(void*)", "Doc::~Doc()", "main")
    assert frames_signature(frames, FALLBACK) == "_int_free | free | operator delete | Doc::~Doc"
    frames = stack("__memmove_avx_unaligned_erms", "Buffer::Append(char const*)")
    assert frames_signature(frames, FALLBACK) == "__memmove_avx_unaligned_erms | Buffer::Append"


def test_without_any_function_name_the_fallback_stands() -> None:
    assert frames_signature(stack(None, None, None), FALLBACK) == FALLBACK
    assert frames_signature([], FALLBACK) == FALLBACK
    # Only irrelevant frames: nothing to name either.
    assert frames_signature(stack("abort", "raise"), FALLBACK) == FALLBACK


def test_a_frame_without_a_function_shows_module_and_offset() -> None:
    frames = stack("memcpy", None, "main")
    assert frames_signature(frames, FALLBACK) == "memcpy | app@0x200"
    outside = Frame(index=1, trust=TRUST_CFI, instruction=0xDEAD0, function=None)
    frames = [stack("strlen")[0], outside, *stack("Run()")]
    # An address outside every module says nothing: skipped.
    assert frames_signature(frames, FALLBACK) == "strlen | Run"


def test_inlined_functions_come_before_their_containing_function() -> None:
    frame = Frame(
        index=0,
        trust=TRUST_CONTEXT,
        instruction=0x1000,
        module="app",
        module_offset=0x10,
        function="Outer::Run()",
        inlined=(SourceLine("memset"), SourceLine("Inner::Clear(int)")),
    )
    assert frames_signature([frame], FALLBACK) == "memset | Inner::Clear"
    only_outer = Frame(**{**frame.as_dict(), "inlined": (SourceLine("abort"),)})
    assert frames_signature([only_outer], FALLBACK) == "Outer::Run"


def test_names_are_normalised() -> None:
    frames = stack(
        "operator new(unsigned long)",
        "std::vector<int, std::allocator<int> >::_M_realloc_insert(int const&)  const",
        module="libstdc++.so.6",
    )
    assert frames_signature(frames, FALLBACK) == "operator new | std::vector<T>::_M_realloc_insert"
    frames = stack("(anonymous namespace)::Crash(int)", "`anonymous namespace'::CrashFunction")
    assert frames_signature(frames, FALLBACK) == "(anonymous namespace)::Crash"
    assert frames_signature(stack("`anonymous namespace'::CrashFunction"), FALLBACK) == (
        "`anonymous namespace'::CrashFunction"
    )
    assert frames_signature(stack("std::rt::lang_start::h0123456789abcdef"), FALLBACK) == (
        "std::rt::lang_start"
    )


def test_length_and_frame_caps() -> None:
    long_name = "ns::" + "x" * 400 + "(int)"
    result = frames_signature(stack("malloc", long_name), FALLBACK)
    assert len(result) == signature.MAX_SIGNATURE_CHARS and result.endswith("...")
    assert result.startswith("malloc | ns::xxx")
    many = frames_signature(stack(*(["malloc"] * 50), "main"), FALLBACK)
    assert many == " | ".join(["malloc"] * signature.MAX_PARTS)
    deep = frames_signature(stack(*(["abort"] * 100), "main"), FALLBACK)
    assert deep == FALLBACK  # main is past the frames looked at


def test_lists_load_from_the_packaged_data_file() -> None:
    lists = load_signature_lists()
    assert lists.is_irrelevant("__GI_raise") and lists.is_irrelevant("KiUserExceptionDispatcher")
    assert lists.is_prefix("malloc") and lists.is_prefix("RtlpAllocateHeapInternal")
    assert not lists.is_prefix("main") and not lists.is_irrelevant("main")


def test_custom_lists_change_the_signature(tmp_path: Path) -> None:
    path = tmp_path / "lists.toml"
    path.write_text("irrelevant = ['Log.*']\nprefix = ['Check']\n")
    lists = load_signature_lists(path)
    frames = stack("LogFatal()", "Check()", "Run()", "malloc")
    assert frames_signature(frames, FALLBACK, lists) == "Check | Run"


@pytest.mark.parametrize(
    ("content", "code"),
    [
        ("irrelevant = ['(unclosed']\nprefix = []\n", "bad_signature_lists"),
        ("irrelevant = 'abort'\nprefix = []\n", "bad_signature_lists"),
        ("irrelevant = []\n", "bad_signature_lists"),
        ("irrelevant = []\nprefix = []\nskip = []\n", "bad_signature_lists"),
        ("irrelevant = [\n", "bad_signature_lists"),
    ],
)
def test_a_bad_list_file_is_a_clear_error(tmp_path: Path, content: str, code: str) -> None:
    path = tmp_path / "lists.toml"
    path.write_text(content)
    with pytest.raises(SignatureListError) as failed:
        load_signature_lists(path)
    assert failed.value.code == code
    assert str(path) in failed.value.message


def test_a_missing_list_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SignatureListError) as failed:
        load_signature_lists(tmp_path / "absent.toml")
    assert failed.value.code == "unreadable_signature_lists"
