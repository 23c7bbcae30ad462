"""The C toolchain: gcc/clang through subprocess, producing a shared object.

The compiler's identity (resolved path and version text) and the full flag list go into
every cache key, so an upgrade of either never loads a stale binary. Fast-math is never
used: it changes rounding and can set flush-to-zero for the whole process.
"""

from __future__ import annotations

import functools
import os
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..errors import CompileError, UnsupportedError
from ..isa import march_flags

BASE_FLAGS = ("-O3", "-std=c11", "-fPIC", "-shared", "-fopenmp", "-ffp-contract=off",
              "-fno-strict-aliasing", "-Wall")
COMPILE_TIMEOUT_S = float(os.environ.get("DQGEN_COMPILE_TIMEOUT", "120"))


@dataclass(frozen=True)
class Toolchain:
    """A resolved C compiler: the command to run and the identity that keys the cache."""

    command: tuple[str, ...]
    identity: str

    def flags(self, isa: str) -> tuple[str, ...]:
        return BASE_FLAGS + march_flags(isa)


def _compiler_command() -> tuple[str, ...]:
    """``CC`` if set (it may carry a launcher or arguments), else gcc, cc or clang."""
    env = os.environ.get("CC", "").strip()
    if env:
        command = tuple(shlex.split(env))
        if shutil.which(command[0]) is None:
            raise UnsupportedError(f"CC={env!r} names a compiler that is not on PATH")
        return command
    for name in ("gcc", "cc", "clang"):
        if shutil.which(name):
            return (name,)
    raise UnsupportedError(
        "no C compiler found on PATH (tried gcc, cc, clang): install one "
        "(e.g. `apt install gcc`) or set CC, or load prebuilt kernels with DQGEN_BUNDLE")


def _binary_fingerprint(command: tuple[str, ...]) -> str:
    """Path, size and mtime of the compiler binary: cheap, and changes on upgrade."""
    path = os.path.realpath(shutil.which(command[0]) or command[0])
    st = os.stat(path)
    return f"{' '.join(command)}|{path}|{st.st_size}|{st.st_mtime_ns}"


def _version_text(command: tuple[str, ...]) -> str:
    try:
        proc = subprocess.run([*command, "--version"], capture_output=True, text=True,
                              timeout=COMPILE_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CompileError(f"could not run the C compiler {' '.join(command)!r}: {exc}",
                           command=[*command, "--version"]) from exc
    if proc.returncode != 0:
        raise CompileError(f"{' '.join(command)} --version failed", command=[*command, "--version"],
                           log=proc.stdout + proc.stderr)
    return proc.stdout.strip().splitlines()[0] if proc.stdout.strip() else "unknown"


def toolchain(memo=None) -> Toolchain:
    """Resolve the compiler. ``memo(fingerprint, compute)`` may persist the version probe
    so that a new process with a warm cache does not run the compiler at all."""
    command = _compiler_command()
    fingerprint = _binary_fingerprint(command)
    if memo is None:
        version = _version_text(command)
    else:
        version = memo(fingerprint, lambda: _version_text(command))
    return _toolchain(command, f"{fingerprint}|{version}")


@functools.lru_cache(maxsize=None)
def _toolchain(command: tuple[str, ...], identity: str) -> Toolchain:
    return Toolchain(command, identity)


def compile_shared(tc: Toolchain, source_path: Path, output_path: Path, isa: str) -> list[str]:
    """Compile ``source_path`` into the shared object ``output_path``; return the command."""
    command = [*tc.command, *tc.flags(isa), "-o", str(output_path), str(source_path)]
    try:
        proc = subprocess.run(command, capture_output=True, text=True,
                              timeout=COMPILE_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as exc:
        raise CompileError(
            f"the C compiler did not finish within {COMPILE_TIMEOUT_S:.0f} s "
            "(DQGEN_COMPILE_TIMEOUT sets the limit)", command=command,
            log=(exc.stderr or b"").decode(errors="replace") if isinstance(exc.stderr, bytes)
            else (exc.stderr or ""), source=source_path.read_text()) from exc
    except OSError as exc:
        raise CompileError(f"could not start the C compiler: {exc}", command=command,
                           source=source_path.read_text()) from exc
    if proc.returncode != 0 or not output_path.is_file() or output_path.stat().st_size == 0:
        raise CompileError(
            f"C compilation of {source_path.name} failed (exit status {proc.returncode})",
            command=command, log=proc.stdout + proc.stderr, source=source_path.read_text())
    return command
