"""The CUDA kernels the tests build, and how to run one under host emulation.

``DEFAULT_SET`` is the default kernel set (4 ops x s8/u8 x f32/f64/f16/bf16 x group
32/64/128); ``EXTRA_SET`` adds group sizes the vector width cannot fill (1, 3, 12), so
the narrower vectors and the scalar fallback are built and checked too.
"""

from __future__ import annotations

import concurrent.futures as futures
from pathlib import Path

import numpy as np

from dqgen.ir import (DequantizePerGroupBackwardDescriptor, DequantizePerGroupDescriptor,
                      QuantizePerGroupBackwardDescriptor, QuantizePerGroupDescriptor)
from dqgen.lower import lower
from dqgen.spec import KernelSpec
from dqgen.render import render

from . import emu

INT_NAMES = ("s8", "u8")
FLOAT_NAMES = ("f32", "f64", "f16", "bf16")
DEFAULT_GROUPS = (32, 64, 128)
ARCH = "sm_90"


def descriptor(op: str, int_name: str | None, float_name: str, group_size: int):
    """A descriptor naming one kernel (outer/axis are runtime arguments)."""
    if op == "dequant":
        return DequantizePerGroupDescriptor(0, 0, group_size, float_name, int_name)
    if op == "quant":
        return QuantizePerGroupDescriptor(0, 0, group_size, float_name, int_name)
    if op == "dequant_bwd":
        return DequantizePerGroupBackwardDescriptor(0, 0, group_size, float_name)
    return QuantizePerGroupBackwardDescriptor(0, 0, group_size, float_name, -128, 127)


def _family(groups, floats=FLOAT_NAMES, ints=INT_NAMES):
    out = []
    for g in groups:
        for f in floats:
            for q in ints:
                out += [descriptor("dequant", q, f, g), descriptor("quant", q, f, g)]
            out += [descriptor("dequant_bwd", None, f, g), descriptor("quant_bwd", None, f, g)]
    return out


DEFAULT_SET = _family(DEFAULT_GROUPS)
EXTRA_SET = (_family((1,), floats=("f32", "f16"), ints=("s8",))
             + _family((12,), floats=("f64", "bf16", "f16"), ints=("s8",))
             + _family((3,), floats=("bf16",), ints=("u8",)))
EMULATION_SET = DEFAULT_SET + EXTRA_SET


def spec_of(desc, arch: str = ARCH) -> KernelSpec:
    return lower(desc, "cuda", arch)


def decls(spec: KernelSpec) -> list[str]:
    """The kernel's parameters as C declarations, for the emulation driver."""
    return [f"{p.c_type}{p.name}" if p.c_type.endswith("*") else f"{p.c_type} {p.name}"
            for p in spec.params]


def combined_source(specs: list[KernelSpec]) -> str:
    """Several kernel texts as one translation unit, each in its own namespace (their
    helpers and constants share names), headers included once up front. NVRTC parses the
    large CUDA headers once for all of them, so checking an arch costs one compile."""
    parts = ["#include <stdint.h>", "#include <cuda_fp16.h>", "#include <cuda_bf16.h>"]
    for i, s in enumerate(specs):
        parts += [f"namespace k{i} {{", render(s).text, f"}}  // namespace k{i}"]
    return "\n".join(parts) + "\n"


def build_emulation(specs: list[KernelSpec], workdir: Path, *, sanitize: str | None = None,
                    parts: int = 2) -> list[Path]:
    """Compile ``specs`` into ``parts`` libraries in parallel (one g++ each)."""
    chunks = [specs[i::parts] for i in range(parts) if specs[i::parts]]

    def one(i: int) -> Path:
        units = {f"k{j}": (render(s).text, {s.entry: decls(s)}) for j, s in enumerate(chunks[i])}
        return emu.compile_units(units, Path(workdir) / f"part{i}", sanitize=sanitize)

    with futures.ThreadPoolExecutor(len(chunks)) as pool:
        return list(pool.map(one, range(len(chunks))))


def load_emulation(libs: list[Path], specs: list[KernelSpec]) -> dict[str, object]:
    """entry name -> the ctypes function ``emu_<entry>(grid, block, *params)``."""
    functions = {}
    for lib in libs:
        dll = emu.load_emulated(lib, {})
        for s in specs:
            if hasattr(dll, f"emu_{s.entry}"):
                fn = getattr(dll, f"emu_{s.entry}")
                fn.argtypes = [emu.ctypes.c_uint, emu.ctypes.c_uint,
                               *(emu._ctype(emu._split_decl(d)[0]) for d in decls(s))]
                fn.restype = None
                functions[s.entry] = fn
    missing = [s.entry for s in specs if s.entry not in functions]
    assert not missing, f"emulation libraries lack {missing[:3]}"
    return functions


def address(arr: np.ndarray) -> int:
    return arr.__array_interface__["data"][0]


def run_emulated(fn, spec: KernelSpec, arrays: dict[str, np.ndarray], outer: int, axis: int,
                 q_range: tuple[int, int] | None, grid: int, block: int) -> None:
    """Launch the emulated kernel over ``grid`` x ``block`` threads with ``arrays`` named
    as the kernel's pointer parameters."""
    args = []
    for p in spec.params:
        if p.role != "scalar":
            args.append(address(arrays[p.name]))
        elif p.name == "outer":
            args.append(outer)
        elif p.name == "axis":
            args.append(axis)
        else:
            args.append(q_range[0] if p.name == "q_min" else q_range[1])
    fn(grid, block, *args)
