"""A C program built by gcc that crashes in three nested calls under a real Crashpad handler."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

# The crash is in level3, called from level2, called from level1. ``{extra}`` lets a test
# build a second version whose code moved (different offsets and build id, same functions).
SOURCE = r"""
#define _GNU_SOURCE
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

/* Crashpad's ExceptionInformation, read by the handler from this process with ptrace. */
struct exception_information {
    uint64_t siginfo_address;
    uint64_t context_address;
    int32_t thread_id;
};

static struct exception_information info;
static char trace_argument[64];
static char *handler_argv[32];

static void on_crash(int signal_number, siginfo_t *siginfo, void *context) {
    (void)signal_number;
    info.siginfo_address = (uint64_t)(uintptr_t)siginfo;
    info.context_address = (uint64_t)(uintptr_t)context;
    info.thread_id = (int32_t)syscall(SYS_gettid);
    pid_t child = fork();
    if (child == 0) {
        execv(handler_argv[0], handler_argv);
        _exit(127);
    }
    prctl(PR_SET_PTRACER, child, 0, 0, 0);
    int status = 0;
    waitpid(child, &status, 0);
    _exit(3);
}

{extra}

__attribute__((noinline)) int level3(volatile int *pointer) {
    return *pointer + 1;
}

__attribute__((noinline)) int level2(volatile int *pointer) {
    return level3(pointer) * 2;
}

__attribute__((noinline)) int level1(volatile int *pointer) {
    return level2(pointer) + 7;
}

int main(int argc, char **argv) {
    /* argv: handler database url [annotation...] */
    if (argc < 4 || argc > 24) return 2;
    snprintf(trace_argument, sizeof trace_argument, "--trace-parent-with-exception=%llu",
             (unsigned long long)(uintptr_t)&info);
    static char database[4096], url[4096];
    snprintf(database, sizeof database, "--database=%s", argv[2]);
    snprintf(url, sizeof url, "--url=%s", argv[3]);
    int n = 0;
    handler_argv[n++] = argv[1];
    handler_argv[n++] = database;
    handler_argv[n++] = url;
    handler_argv[n++] = "--no-rate-limit";
    handler_argv[n++] = trace_argument;
    for (int i = 4; i < argc; i++) handler_argv[n++] = argv[i];
    handler_argv[n] = NULL;
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_sigaction = on_crash;
    action.sa_flags = SA_SIGINFO;
    sigaction(SIGSEGV, &action, NULL);
    return level1((volatile int *)(uintptr_t)(argc - 4) == 0 ? NULL : NULL);
}
"""


# Lines of the three calls in SOURCE once formatted (1-based), computed rather than written.
def line_of(source: str, text: str) -> int:
    for number, line in enumerate(source.splitlines(), 1):
        if text in line:
            return number
    raise ValueError(text)


def build(folder: Path, name: str = "crasher", extra: str = "") -> tuple[Path, str]:
    """Compile the program with ``gcc -g -O0``; returns the binary and its source text."""
    gcc = shutil.which("gcc")
    if gcc is None:
        raise FileNotFoundError("gcc")
    source = SOURCE.replace("{extra}", extra)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.c").write_text(source)
    binary = folder / name
    subprocess.run(
        [gcc, "-g", "-O0", "-fno-omit-frame-pointer", "-Wl,--build-id", "-o", str(binary),
         str(folder / f"{name}.c")],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return binary, source


def crash_and_upload(
    binary: Path,
    handler: str,
    database: Path,
    url: str,
    annotations: dict[str, str],
    timeout: float = 30,
) -> str:
    """Run the program: it crashes, the handler dumps and uploads it. Returns the upload id."""
    from tests.crashpad_client import make_database, recorded_upload_id

    make_database(database)
    command = [str(binary), handler, str(database), url]
    command += [f"--annotation={key}={value}" for key, value in annotations.items()]
    result = subprocess.run(command, capture_output=True, timeout=timeout)
    return recorded_upload_id(database, result, timeout)
