"""Build a CUDA kernel text for the CPU with ``cuda_emu.h`` and load it with ctypes.

Each kernel gets an ``extern "C" void emu_<name>(unsigned grid, unsigned block, ...)``
entry that runs the blocks one after the other and a block's threads each on a host
thread (``blockIdx`` / ``threadIdx`` / ``blockDim`` / ``gridDim`` set first), so the
kernel's own bounds checks, indexing and warp shuffles are exercised exactly as written. The parameters are given as C declarations
(the kernel's own), because the emulator must not guess the templates' signatures.
"""

from __future__ import annotations

import ctypes
import os
import re
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
HEADER = HERE / "cuda_emu.h"
INCLUDE_DIR = HERE / "include"

BASE_FLAGS = ("-O1", "-std=c++17", "-ffp-contract=off", "-fno-strict-aliasing",
              "-shared", "-fPIC", "-pthread")
SANITIZE_FLAGS = {
    # ASan needs its runtime first in the process: see asan_runtime().
    "address": ("-fsanitize=address,undefined", "-fno-omit-frame-pointer",
                "-fno-sanitize-recover=undefined"),
    "undefined": ("-fsanitize=undefined", "-fno-sanitize-recover=undefined"),
}

_SCALARS = {
    "char": ctypes.c_char, "signed char": ctypes.c_byte, "unsigned char": ctypes.c_ubyte,
    "int8_t": ctypes.c_int8, "uint8_t": ctypes.c_uint8,
    "short": ctypes.c_short, "unsigned short": ctypes.c_ushort,
    "int16_t": ctypes.c_int16, "uint16_t": ctypes.c_uint16,
    "int": ctypes.c_int, "unsigned": ctypes.c_uint, "unsigned int": ctypes.c_uint,
    "int32_t": ctypes.c_int32, "uint32_t": ctypes.c_uint32,
    "long": ctypes.c_long, "unsigned long": ctypes.c_ulong,
    "long long": ctypes.c_longlong, "unsigned long long": ctypes.c_ulonglong,
    "int64_t": ctypes.c_int64, "uint64_t": ctypes.c_uint64, "size_t": ctypes.c_size_t,
    "float": ctypes.c_float, "double": ctypes.c_double,
}
_DECL_RE = re.compile(r"^(?P<type>.*?[\s*&])(?P<name>[A-Za-z_]\w*)$")


def _split_decl(decl: str) -> tuple[str, str]:
    """``"const int8_t* __restrict__ q"`` -> (type text, ``"q"``)."""
    m = _DECL_RE.match(" ".join(decl.split()))
    if not m:
        raise ValueError(f"cannot read a parameter name from {decl!r}")
    return m.group("type").strip(), m.group("name")


def _ctype(type_text: str):
    """The ctypes type for a declared parameter type (pointers are addresses)."""
    if "*" in type_text:
        return ctypes.c_void_p
    words = [w for w in type_text.split() if w not in ("const", "volatile", "__restrict__")]
    key = " ".join(words)
    if key not in _SCALARS:
        raise ValueError(f"no ctypes mapping for parameter type {type_text!r}")
    return _SCALARS[key]


def driver_source(kernels: Mapping[str, Sequence[str]], namespace: str | None = None) -> str:
    """The C++ entry points that run each kernel over its whole grid (``__emu_run_grid``).

    With
    ``namespace``, the kernels are called as ``namespace::name`` (see ``compile_units``).
    """
    prefix = f"{namespace}::" if namespace else ""
    out = []
    for name, decls in kernels.items():
        names = [_split_decl(d)[1] for d in decls]
        params = "".join(f", {d}" for d in decls)
        out.append(
            f'extern "C" void emu_{name}(unsigned int grid, unsigned int block{params}) {{\n'
            f"  __emu_run_grid(grid, block, [&]() {{ {prefix}{name}({', '.join(names)}); }});\n"
            f"}}\n")
    return "\n".join(out)


def asan_runtime() -> str:
    """Path of g++'s libasan, which must be LD_PRELOADed before loading an ASan build."""
    out = subprocess.run(["g++", "-print-file-name=libasan.so"], capture_output=True,
                         text=True, check=True).stdout.strip()
    return os.path.realpath(out)


def _asan_loaded() -> bool:
    """Whether this process started with the ASan runtime (it cannot be loaded later)."""
    try:
        return "libasan" in Path("/proc/self/maps").read_text()
    except OSError:
        return False


def compile_emulated(cu_source: str, kernels: Mapping[str, Sequence[str]], workdir,
                     *, sanitize: str | None = None, extra_flags: Sequence[str] = ()
                     ) -> Path:
    """Compile ``cu_source`` plus entry points for ``kernels``; return the ``.so`` path.

    ``sanitize`` is None, ``"undefined"`` or ``"address"``. Use a fresh ``workdir`` per
    build: the dynamic loader hands back an already loaded library for a known path.
    """
    if sanitize and sanitize not in SANITIZE_FLAGS:
        raise ValueError(f"sanitize={sanitize!r}: expected one of {sorted(SANITIZE_FLAGS)}")
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    (work / "kernel.cu").write_text(cu_source)
    (work / "emu_driver.cpp").write_text(
        '#include "kernel.cu"\n\n' + driver_source(kernels))
    lib = work / f"libemu{'_' + sanitize if sanitize else ''}.so"
    cmd = ["g++", *BASE_FLAGS, *SANITIZE_FLAGS.get(sanitize or "", ()), *extra_flags,
           "-include", str(HEADER), "-I", str(INCLUDE_DIR), "-o", str(lib),
           str(work / "emu_driver.cpp")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"emulation build failed:\n{' '.join(cmd)}\n{proc.stderr}")
    return lib


def compile_units(units: Mapping[str, tuple[str, Mapping[str, Sequence[str]]]], workdir,
                  *, sanitize: str | None = None, extra_flags: Sequence[str] = ()) -> Path:
    """Compile several kernel texts into one library, each inside its own C++ namespace
    (``units`` maps a namespace name to ``(cu_source, kernels)``), so helpers and constants
    that each text defines under the same names do not collide. Kernel names must differ
    across units; each gets its ``emu_<name>`` entry as with ``compile_emulated``.

    The CUDA headers are included once, at file scope, before any unit: a unit's own
    ``#include`` lines then expand to nothing inside its namespace.
    """
    if sanitize and sanitize not in SANITIZE_FLAGS:
        raise ValueError(f"sanitize={sanitize!r}: expected one of {sorted(SANITIZE_FLAGS)}")
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    parts = ["#include <stdint.h>", "#include <cuda_fp16.h>", "#include <cuda_bf16.h>", ""]
    drivers = []
    for ns, (cu_source, kernels) in units.items():
        (work / f"{ns}.cu").write_text(cu_source)
        parts += [f"namespace {ns} {{", f'#include "{ns}.cu"', f"}}  // namespace {ns}", ""]
        drivers.append(driver_source(kernels, namespace=ns))
    (work / "emu_driver.cpp").write_text("\n".join(parts) + "\n" + "\n".join(drivers))
    lib = work / f"libemu{'_' + sanitize if sanitize else ''}.so"
    cmd = ["g++", *BASE_FLAGS, *SANITIZE_FLAGS.get(sanitize or "", ()), *extra_flags,
           "-include", str(HEADER), "-I", str(INCLUDE_DIR), "-o", str(lib),
           str(work / "emu_driver.cpp")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"emulation build failed:\n{' '.join(cmd)}\n{proc.stderr}")
    return lib


def load_emulated(lib_path, kernels: Mapping[str, Sequence[str]]) -> ctypes.CDLL:
    """Load a built library and set each ``emu_<name>``'s argtypes from the declarations."""
    dll = ctypes.CDLL(str(lib_path))
    for name, decls in kernels.items():
        fn = getattr(dll, f"emu_{name}")
        fn.argtypes = [ctypes.c_uint, ctypes.c_uint,
                       *(_ctype(_split_decl(d)[0]) for d in decls)]
        fn.restype = None
    return dll


def build_emulated(cu_source: str, kernels: Mapping[str, Sequence[str]], workdir,
                   *, sanitize: str | None = None, extra_flags: Sequence[str] = ()
                   ) -> ctypes.CDLL:
    """Compile and load: ``emu_<name>(grid, block, *params)`` with pointers as ints.

    ``kernels`` maps each ``extern "C"`` kernel name to its parameter declarations, e.g.
    ``{"dq": ["const int8_t* q", "float* out", "long long n"]}``. An ASan build only loads
    in a process started with ``LD_PRELOAD=asan_runtime()`` (loading it elsewhere would
    abort the interpreter), so that case raises instead; use ``compile_emulated`` and a
    subprocess.
    """
    if sanitize == "address" and not _asan_loaded():
        raise RuntimeError("an ASan build needs LD_PRELOAD=" + asan_runtime() +
                           " in the loading process; use compile_emulated in a subprocess")
    lib = compile_emulated(cu_source, kernels, workdir, sanitize=sanitize,
                           extra_flags=extra_flags)
    return load_emulated(lib, kernels)
