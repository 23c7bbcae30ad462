"""Every ``DQGEN_*`` setting, read and checked in one place.

Settings are read at each use, not at import, so a process (or a test) that changes its
environment gets the new value; a malformed value raises ``InvalidProblemError`` naming
the variable. The README's Environment table lists the same names.
"""

from __future__ import annotations

import math
import os

from .errors import InvalidProblemError

CACHE_DIR = "DQGEN_CACHE_DIR"              # where built kernels are cached
BUNDLE = "DQGEN_BUNDLE"                    # bundle directories searched first
DISABLE_JIT = "DQGEN_DISABLE_JIT"          # never compile
ISA = "DQGEN_ISA"                          # force a CPU ISA level
NUM_THREADS = "DQGEN_NUM_THREADS"          # OpenMP threads per call
OUTPUT_CACHE_BYTES = "DQGEN_OUTPUT_CACHE_BYTES"  # dropped results kept for reuse
COMPILE_TIMEOUT = "DQGEN_COMPILE_TIMEOUT"  # seconds a compiler run may take
LOCK_TIMEOUT = "DQGEN_LOCK_TIMEOUT"        # seconds to wait for another process's build
CUDA_INCLUDE = "DQGEN_CUDA_INCLUDE"        # CUDA headers for NVRTC

_FALSE = ("", "0", "false", "no", "off")


def text(name: str) -> str:
    """The variable's value, stripped; empty when unset."""
    return os.environ.get(name, "").strip()


def flag(name: str) -> bool:
    """True unless unset or one of 0/false/no/off (any case)."""
    return text(name).lower() not in _FALSE


def paths(name: str) -> list[str]:
    """An ``os.pathsep``-separated list, empty entries dropped."""
    return [p for p in os.environ.get(name, "").split(os.pathsep) if p.strip()]


def integer(name: str, default: int | None, *, minimum: int, unit: str = "") -> int | None:
    """A whole number >= ``minimum``; ``default`` when unset."""
    value = text(name)
    if not value:
        return default
    try:
        number = int(value)
    except ValueError:
        raise InvalidProblemError(f"{name}={value!r} is not an integer{unit}") from None
    if number < minimum:
        raise InvalidProblemError(f"{name}={number} must be >= {minimum}{unit}")
    return number


def seconds(name: str, default: float) -> float:
    """A positive, finite number of seconds; ``default`` when unset."""
    value = text(name)
    if not value:
        return default
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not 0 < number < math.inf:
        raise InvalidProblemError(f"{name}={value!r} must be a positive, finite number of seconds")
    return number
