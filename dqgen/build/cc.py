"""The C toolchain: gcc/clang through subprocess, producing a shared object.

The compiler's identity (resolved paths, size and mtime of every executable in ``CC``,
and its version text) and the full flag list go into every cache key, so an upgrade of
either never loads a stale binary. Fast-math is never used: it changes rounding and can
set flush-to-zero for the whole process.

The compiler runs in its own process group with a time limit (``DQGEN_COMPILE_TIMEOUT``
seconds): on a timeout or an interrupt the whole group is killed, so a hung compiler,
or a wrapper script whose children hold its output pipes, cannot hang the caller.
"""

from __future__ import annotations

import functools
import os
import shlex
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .. import env
from ..errors import CompileError, UnsupportedError
from ..isa import march_flags

BASE_FLAGS = ("-O3", "-std=c11", "-fPIC", "-shared", "-fopenmp", "-ffp-contract=off",
              "-fno-strict-aliasing", "-Wall")
COMPILE_TIMEOUT_S = 120.0  # default of DQGEN_COMPILE_TIMEOUT


@dataclass(frozen=True)
class Toolchain:
    """A resolved C compiler: the command to run and the identity that keys the cache."""

    command: tuple[str, ...]
    identity: str

    def flags(self, isa: str) -> tuple[str, ...]:
        return BASE_FLAGS + march_flags(isa)


def compile_timeout() -> float:
    """Seconds a compiler run may take: ``DQGEN_COMPILE_TIMEOUT``, read at each call."""
    return env.seconds(env.COMPILE_TIMEOUT, COMPILE_TIMEOUT_S)


def _compiler_command() -> tuple[str, ...]:
    """``CC`` if set (it may carry a launcher or arguments), else gcc, cc or clang."""
    env = os.environ.get("CC", "").strip()
    if env:
        try:
            command = tuple(shlex.split(env))
        except ValueError as exc:
            raise UnsupportedError(
                f"CC={env!r} cannot be parsed as a command line: {exc}") from None
        if not command or shutil.which(command[0]) is None:
            raise UnsupportedError(f"CC={env!r} names a compiler that is not on PATH; "
                                   "set CC to an installed C compiler (e.g. CC=gcc)")
        return command
    for name in ("gcc", "cc", "clang"):
        if shutil.which(name):
            return (name,)
    raise UnsupportedError(
        "no C compiler found on PATH (tried gcc, cc, clang): install one "
        "(e.g. `apt install gcc`) or set CC, or load prebuilt kernels with DQGEN_BUNDLE")


def _executables(command: tuple[str, ...]) -> list[str]:
    """Every word of ``command`` that names an executable file: the compiler and any
    launcher in front of it (``CC="ccache gcc"``), so upgrading either is noticed."""
    found = []
    for word in command:
        if word.startswith("-"):
            continue
        path = shutil.which(word)
        if path:
            found.append(os.path.realpath(path))
    return found


def _stat_text(path: str, *, full: bool) -> str:
    st = os.stat(path)
    text = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    return f"{text}|{st.st_dev}|{st.st_ino}|{st.st_ctime_ns}" if full else text


def _binary_fingerprint(command: tuple[str, ...], *, full: bool = False) -> str:
    """The command and path, size and mtime of each executable in it: cheap, and changes
    on upgrade. ``full`` adds device, inode and ctime, which also change when a binary
    is rewritten with the same size and mtime; it decides when the version is re-probed,
    while the cache key keeps the stabler short form."""
    return " ".join(command) + "|" + "|".join(
        _stat_text(path, full=full) for path in _executables(command))


def _signal_name(returncode: int) -> str:
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def _exit_text(returncode: int) -> str:
    if returncode < 0:
        return f"killed by {_signal_name(returncode)}"
    return f"exit status {returncode}"


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()


def run_compiler(command: list[str], timeout: float) -> tuple[int, str, bool]:
    """Run ``command`` in a new process group; return (status, stdout+stderr, timed out).

    On a timeout, or any exception here (Ctrl-C included), the whole group is killed
    before returning, so no compiler outlives the call and the pipes always close.
    """
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace",
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out or "", False
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        try:
            out, _ = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:  # a descendant left the group, holding the pipe
            proc.stdout.close()
            proc.wait()
            out = ""
        return proc.returncode, out or "", True
    except BaseException:
        _kill_group(proc)
        proc.wait()
        raise


def _version_text(command: tuple[str, ...]) -> str:
    argv = [*command, "--version"]
    timeout = compile_timeout()
    try:
        status, out, timed_out = run_compiler(argv, timeout)
    except OSError as exc:
        raise CompileError(f"could not run the C compiler {' '.join(command)!r}: {exc}",
                           command=argv) from exc
    if timed_out:
        raise CompileError(f"{' '.join(argv)} did not finish within {timeout:g} s "
                           "(DQGEN_COMPILE_TIMEOUT sets the limit)", command=argv, log=out)
    if status != 0:
        raise CompileError(f"{' '.join(argv)} failed ({_exit_text(status)})", command=argv,
                           log=out)
    lines = out.strip().splitlines()
    return lines[0] if lines else "unknown"


def toolchain(memo=None) -> Toolchain:
    """Resolve the compiler. ``memo(fingerprint, compute)`` may persist the version probe
    so that a new process with a warm cache does not run the compiler at all."""
    command = _compiler_command()
    if memo is None:
        version = _version_text(command)
    else:
        version = memo(_binary_fingerprint(command, full=True), lambda: _version_text(command))
    return _toolchain(command, f"{_binary_fingerprint(command)}|{version}")


@functools.lru_cache(maxsize=None)
def _toolchain(command: tuple[str, ...], identity: str) -> Toolchain:
    return Toolchain(command, identity)


def compile_shared(tc: Toolchain, source_path: Path, output_path: Path, isa: str) -> list[str]:
    """Compile ``source_path`` into the shared object ``output_path``; return the command.

    Raises ``CompileError`` with the command, the compiler's output and the source when
    the compiler fails, is killed, hangs past the time limit or writes no output.
    """
    command = [*tc.command, *tc.flags(isa), "-o", str(output_path), str(source_path)]
    timeout = compile_timeout()
    try:
        status, out, timed_out = run_compiler(command, timeout)
    except OSError as exc:
        raise CompileError(f"could not start the C compiler: {exc}", command=command,
                           source=source_path.read_text()) from exc
    if timed_out:
        raise CompileError(
            f"the C compiler did not finish within {timeout:g} s and was killed "
            "(DQGEN_COMPILE_TIMEOUT sets the limit)", command=command, log=out,
            source=source_path.read_text())
    if status != 0 or not output_path.is_file() or output_path.stat().st_size == 0:
        why = _exit_text(status) if status != 0 else "exit status 0 but no output file"
        raise CompileError(f"C compilation of {source_path.name} failed ({why})",
                           command=command, log=out, source=source_path.read_text())
    return command
