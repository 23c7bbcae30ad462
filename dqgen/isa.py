"""Which SIMD level the CPU runs: detected once, overridable with ``DQGEN_ISA``.

The ISA is part of every CPU cache key and picks the ``-march`` level, so a kernel built
for AVX-512 is never loaded on a machine without it. Levels form one chain, each holding
everything of the ones below it: ``avx512`` is AVX-512 F/BW/VL/DQ (x86-64-v4),
``avx512_bf16`` adds the AVX512_BF16 conversions (Cooper Lake, Zen 4), ``avx512_fp16``
adds AVX512-FP16 arithmetic on top (Sapphire Rapids and later).
"""

from __future__ import annotations

import functools
import platform

from . import env
from .errors import UnsupportedError

# Ordered from the most to the least capable; each entry's required /proc/cpuinfo flags.
ISA_LEVELS = ("avx512_fp16", "avx512_bf16", "avx512", "avx2", "generic")
_AVX512 = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma", "f16c"}
_REQUIRED_FLAGS = {
    "avx512_fp16": _AVX512 | {"avx512_bf16", "avx512_fp16"},
    "avx512_bf16": _AVX512 | {"avx512_bf16"},
    "avx512": _AVX512,
    "avx2": {"avx2", "fma", "f16c"},
    "generic": set(),
}
# What the schedule may use at each level (dqgen.lower picks its intrinsics from these).
_FEATURES = {
    "avx512_fp16": frozenset({"f16c", "avx2", "avx512", "avx512_bf16", "avx512_fp16"}),
    "avx512_bf16": frozenset({"f16c", "avx2", "avx512", "avx512_bf16"}),
    "avx512": frozenset({"f16c", "avx2", "avx512"}),
    "avx2": frozenset({"f16c", "avx2"}),
    "generic": frozenset(),
}
_MARCH = {
    "avx512_fp16": ("-march=x86-64-v4", "-mf16c", "-mavx512bf16", "-mavx512fp16"),
    "avx512_bf16": ("-march=x86-64-v4", "-mf16c", "-mavx512bf16"),
    "avx512": ("-march=x86-64-v4", "-mf16c"),
    "avx2": ("-march=x86-64-v3",),
    "generic": ("-march=x86-64",),
}


def _is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def cpu_flags() -> set[str]:
    """The CPU feature flags the kernel reports (empty where /proc/cpuinfo is absent)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@functools.lru_cache(maxsize=None)
def supported_isas() -> tuple[str, ...]:
    """Every ISA level this machine can execute, best first."""
    if not _is_x86():
        return ("generic",)
    flags = cpu_flags()
    return tuple(level for level in ISA_LEVELS if _REQUIRED_FLAGS[level] <= flags)


def check_isa(name: str) -> str:
    """Validate an ISA name (for building: any known level on x86, generic elsewhere)."""
    known = ISA_LEVELS if _is_x86() else ("generic",)
    if isinstance(name, str):
        name = name.strip().lower()
    if name not in known:
        raise UnsupportedError(f"ISA {name!r} is not known here; expected one of: {', '.join(known)}")
    return name


def host_isa() -> str:
    """The ISA kernels are built for: ``DQGEN_ISA`` if set and runnable, else the best."""
    requested = env.text(env.ISA).lower()
    if not requested:
        return supported_isas()[0]
    check_isa(requested)
    if requested not in supported_isas():
        raise UnsupportedError(
            f"DQGEN_ISA={requested} cannot run on this CPU (it supports: "
            f"{', '.join(supported_isas())})")
    return requested


def isa_features(isa: str) -> frozenset[str]:
    """The instruction-set features a kernel built for ``isa`` may use."""
    return _FEATURES[check_isa(isa)] if _is_x86() else frozenset()


def march_flags(isa: str) -> tuple[str, ...]:
    """The compiler flags that select ``isa``'s instruction set."""
    if not _is_x86():
        return ()
    return _MARCH[check_isa(isa)]
