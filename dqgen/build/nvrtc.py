"""NVRTC compiler driver: CUDA C++ text -> PTX, plus a cubin for a real ``sm_XX`` arch.

Uses ``cuda.bindings.nvrtc`` (pip ``cuda-bindings``) and the NVRTC library from the
``nvidia-cuda-nvrtc`` wheel; both are imported lazily so dqgen imports without them.
Every binding call returns a tuple whose first item is an ``nvrtcResult``; ``_call``
checks each one.

Headers: kernels include ``<cuda_fp16.h>``, ``<cuda_bf16.h>`` and ``<stdint.h>``. NVRTC
13.3+ bundles the toolkit headers; they are extracted once into the user cache and used
with ``--use-bundled-headers=<dir>``. Older NVRTC falls back to a header directory found
by ``cuda.pathfinder`` (wheel or toolkit), or ``DQGEN_CUDA_INCLUDE``. NVRTC has no libc,
so ``<stdint.h>`` is served from memory (``STDINT_H``).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import platform
import re
from pathlib import Path

from .. import env
from ..errors import CompileError, UnsupportedError

INSTALL_HINT = ("install dqgen[cuda] (pip install 'cuda-bindings>=13' "
                "'nvidia-cuda-nvrtc>=13')")

_ARCH_RE = re.compile(r"^(sm|compute)_(\d{2,3})([af]?)$")

#: The ``<stdint.h>`` NVRTC sees. libcu++ supplies the fixed-width types where the
#: bundled headers are on the include path; the typedefs are the fallback.
STDINT_H = """\
#pragma once
#if defined(__has_include) && __has_include(<cuda/std/cstdint>)
#include <cuda/std/cstdint>
#else
typedef signed char int8_t;
typedef unsigned char uint8_t;
typedef short int16_t;
typedef unsigned short uint16_t;
typedef int int32_t;
typedef unsigned int uint32_t;
typedef long long int64_t;
typedef unsigned long long uint64_t;
typedef long long intptr_t;
typedef unsigned long long uintptr_t;
#endif
"""


@dataclasses.dataclass(frozen=True)
class CudaArtifact:
    """What one NVRTC compile produced, with everything needed to audit or re-key it."""

    arch: str
    ptx: bytes
    cubin: bytes | None
    log: str
    options: tuple[str, ...]
    nvrtc_version: str


def _nvrtc():
    """Import the bindings late, turning absence into an error that names the fix."""
    try:
        from cuda.bindings import nvrtc
    except ImportError as exc:
        raise UnsupportedError(f"CUDA compilation needs NVRTC: {INSTALL_HINT}") from exc
    return nvrtc


def _call(fn, *args, what: str = ""):
    """Call an NVRTC binding and check its result code; return the remaining outputs."""
    nvrtc = _nvrtc()
    try:
        result = fn(*args)
    except RuntimeError as exc:  # cuda.pathfinder: libnvrtc.so could not be loaded
        raise UnsupportedError(f"libnvrtc could not be loaded ({exc}); {INSTALL_HINT}") from exc
    err, rest = result[0], result[1:]
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        _, msg = nvrtc.nvrtcGetErrorString(err)
        raise CompileError(f"NVRTC {what or fn.__name__} failed: "
                           f"{msg.decode(errors='replace') if msg else err}")
    return rest[0] if len(rest) == 1 else rest


def nvrtc_available() -> bool:
    """True when the bindings import and libnvrtc loads; never raises."""
    try:
        _nvrtc()
        nvrtc_version()
    except Exception:  # noqa: BLE001 - any failure means "not usable here"
        return False
    return True


@functools.cache
def nvrtc_version() -> str:
    """NVRTC's own ``major.minor`` (part of cache keys: codegen changes with it)."""
    nvrtc = _nvrtc()
    major, minor = _call(nvrtc.nvrtcVersion, what="nvrtcVersion")
    return f"{major}.{minor}"


@functools.cache
def supported_archs() -> tuple[int, ...]:
    """The compute capabilities (``90`` for sm_90) this NVRTC can target."""
    nvrtc = _nvrtc()
    return tuple(_call(nvrtc.nvrtcGetSupportedArchs, what="nvrtcGetSupportedArchs"))


def _check_arch(arch: str) -> int:
    """Reject a malformed or unsupported arch before NVRTC gives a vaguer message."""
    m = _ARCH_RE.match(arch)
    if not m:
        raise UnsupportedError(f"arch={arch!r}: expected 'sm_XX' or 'compute_XX' (e.g. 'sm_90')")
    cc = int(m.group(2))
    if cc not in supported_archs():
        raise UnsupportedError(f"arch={arch!r} is not supported by NVRTC {nvrtc_version()} "
                               f"(supports {', '.join(map(str, supported_archs()))})")
    return cc


def default_options(arch: str) -> tuple[str, ...]:
    """The code-generating flags, fixed and ordered so they can go into cache keys.

    ``--fmad=false`` forbids FMA contraction (SPEC §3: multiply once, round once); IEEE
    division and square root and kept subnormals are NVRTC's defaults, spelled out so the
    bit-exactness promise does not rest on them. Include flags are separate
    (``header_options``) since they hold a local path.
    """
    return ("--std=c++17", "--fmad=false", "--ftz=false", "--prec-div=true",
            "--prec-sqrt=true", f"-arch={arch}")


def _headers_root() -> Path:
    """Where bundled headers are extracted: beside the kernels, in the private cache
    (they are compiled into every kernel, so they get the same protection)."""
    from .. import cache
    return cache.private_subdir("nvrtc-headers") / nvrtc_version()


def _install_bundled_headers() -> Path | None:
    """Extract NVRTC's bundled headers once (NVRTC 13.3+); None when it has none."""
    nvrtc = _nvrtc()
    if not hasattr(nvrtc, "nvrtcInstallBundledHeaders"):
        return None
    try:
        # Returns (result, info, error_log).
        info = _call(nvrtc.nvrtcGetBundledHeadersInfo, what="nvrtcGetBundledHeadersInfo")[0]
    except (CompileError, TypeError):
        # TypeError: a cuda-bindings release whose wrapper takes the info struct as an
        # argument; the headers then come from a wheel or toolkit directory instead
        return None
    if not info.available:
        return None
    path = _headers_root()
    # Returns (result, error_log); _call keeps only the log, which is None on success.
    _call(nvrtc.nvrtcInstallBundledHeaders, str(path).encode(),
          nvrtc.NVRTC_INSTALL_HEADERS_SKIP_IF_EXISTS, what="nvrtcInstallBundledHeaders")
    return path


def _header_dir_fallback() -> str | None:
    """A directory holding cuda_fp16.h from a CUDA wheel or toolkit, when NVRTC has none."""
    try:
        from cuda.pathfinder import find_nvidia_header_directory
        found = find_nvidia_header_directory("cudart")
    except Exception:  # noqa: BLE001 - pathfinder missing or too old
        found = None
    for cand in (found, os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
                 "/usr/local/cuda"):
        if not cand:
            continue
        for inc in (Path(cand), Path(cand) / "include",
                    Path(cand) / "targets" / f"{platform.machine()}-linux" / "include"):
            if (inc / "cuda_fp16.h").is_file():
                return str(inc)
    return None


@functools.cache
def header_options() -> tuple[str, ...]:
    """Include flags that make ``cuda_fp16.h`` / ``cuda_bf16.h`` resolvable."""
    override = env.text(env.CUDA_INCLUDE) or None
    if override:
        return (f"-I{override}",)
    bundled = _install_bundled_headers()
    if bundled is not None:
        return (f"--use-bundled-headers={bundled}",)
    found = _header_dir_fallback()
    return (f"-I{found}",) if found else ()


def header_identity() -> str:
    """Which headers kernels see, for cache keys (no local paths in it)."""
    opts = header_options()
    if not opts:
        return "none"
    if opts[0].startswith("--use-bundled-headers"):
        return f"bundled-{nvrtc_version()}"
    inc = Path(opts[0][2:])
    marker = inc / "cuda_fp16.h"
    return f"dir-{marker.stat().st_size if marker.is_file() else 0}"


def _log(prog) -> str:
    """The NVRTC program log as text (empty when NVRTC had nothing to say)."""
    nvrtc = _nvrtc()
    size = _call(nvrtc.nvrtcGetProgramLogSize, prog, what="nvrtcGetProgramLogSize")
    buf = bytearray(size)  # NVRTC writes into it: never an (immutable, shared) bytes object
    _call(nvrtc.nvrtcGetProgramLog, prog, buf, what="nvrtcGetProgramLog")
    return bytes(buf).rstrip(b"\0").decode(errors="replace").strip()


def _output(prog, size_fn, get_fn) -> bytes:
    """Fetch one NVRTC output blob (PTX or cubin) with its size call."""
    size = _call(size_fn, prog, what=size_fn.__name__)
    buf = bytearray(size)  # see _log: b" " * 1 is the interpreter's shared b" "
    _call(get_fn, prog, buf, what=get_fn.__name__)
    return bytes(buf)


def compile_cuda(source: str, *, name: str, arch: str,
                 options: tuple[str, ...] = ()) -> CudaArtifact:
    """Compile ``source`` for ``arch``: PTX always, a cubin too for ``sm_XX``."""
    nvrtc = _nvrtc()
    _check_arch(arch)
    opts = (*default_options(arch), *options, *header_options())
    prog = _call(nvrtc.nvrtcCreateProgram, source.encode(), f"{name}.cu".encode(),
                 1, [STDINT_H.encode()], [b"stdint.h"], what="nvrtcCreateProgram")
    try:
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), [o.encode() for o in opts])
        log = _log(prog)
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            hint = "" if header_options() else " (no CUDA headers found: " + INSTALL_HINT + ")"
            raise CompileError(f"NVRTC {nvrtc_version()} failed to compile {name} for "
                               f"{arch}{hint}", command=["nvrtc", *opts], log=log,
                               source=source)
        ptx = _output(prog, nvrtc.nvrtcGetPTXSize, nvrtc.nvrtcGetPTX).rstrip(b"\0")
        cubin = None
        if arch.startswith("sm_"):
            cubin = _output(prog, nvrtc.nvrtcGetCUBINSize, nvrtc.nvrtcGetCUBIN)
            if not cubin:
                raise CompileError(f"NVRTC produced an empty cubin for {name} ({arch})",
                                   command=["nvrtc", *opts], log=log, source=source)
    finally:
        nvrtc.nvrtcDestroyProgram(prog)  # result ignored: must not mask the real error
    return CudaArtifact(arch=arch, ptx=ptx, cubin=cubin, log=log, options=opts,
                        nvrtc_version=nvrtc_version())
