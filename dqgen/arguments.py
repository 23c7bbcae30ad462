"""The arrays and scalars a kernel takes: its spec's parameter list, sized by the problem.

Every plan (the family's and the formats', on the CPU and on CUDA) and ``dqgen verify``
check and pass arguments in the order of ``spec.params``, with each array's dtype from
its parameter; only an array's shape depends on the layout, and ``array_shape`` is the
one table of those. Scalars are the descriptor's fields of the parameters' names
(``outer``, ``axis``, ``q_min``, ``rows``, ``blocks``, ``shift``, ...).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import UnsupportedError
from .ir import (AwqDequantizeDescriptor, GgmlDequantizeDescriptor, GptqDequantizeDescriptor,
                 PerGroupDescriptor)
from .spec import KernelSpec, Param


@dataclass(frozen=True)
class Argument:
    """One array argument: name, numpy dtype, exact shape, output or not."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    is_out: bool = False


def array_shape(desc, param: Param) -> tuple[int, ...]:
    """The exact shape of ``param``'s array for the problem ``desc`` describes."""
    name = param.name
    if isinstance(desc, PerGroupDescriptor):
        if name in ("scale", "zero_point"):
            return (desc.outer, desc.num_groups)
        return param.dtype.storage_shape(desc.outer, desc.axis)  # packed q: axis / 2 bytes
    if isinstance(desc, GgmlDequantizeDescriptor):
        return {"data": (desc.blocks, desc.block_bytes), "y": (desc.blocks, desc.group_size)}[name]
    if isinstance(desc, (GptqDequantizeDescriptor, AwqDequantizeDescriptor)):
        k, n, groups = desc.rows, desc.cols, desc.num_groups
        gptq = isinstance(desc, GptqDequantizeDescriptor)
        per_word = 32 // desc.bits if gptq else 8  # GPTQ packs along K, AWQ along N
        return {"qweight": (k // per_word, n) if gptq else (k, n // per_word),
                "qzeros": (groups, n // per_word), "scales": (groups, n), "g_idx": (k,),
                "y": (k, n)}[name]
    raise UnsupportedError(f"{type(desc).__name__} has no argument shapes")


def arguments(desc, spec: KernelSpec) -> tuple[tuple[Argument, ...], tuple[int, ...]]:
    """The arrays (in kernel order) and the scalar values ``spec``'s kernel takes for
    ``desc``."""
    arrays = tuple(Argument(p.name, np.dtype(p.dtype.np_dtype), array_shape(desc, p),
                            p.role == "out")
                   for p in spec.params if p.role != "scalar")
    scalars = tuple(getattr(desc, p.name) for p in spec.params if p.role == "scalar")
    return arrays, scalars


def launch_elements(desc) -> int:
    """Values a CUDA launch covers (one thread each, grid-striding): the unpacked problem."""
    if isinstance(desc, PerGroupDescriptor):
        return desc.outer * desc.axis
    if isinstance(desc, GgmlDequantizeDescriptor):
        return desc.blocks * desc.group_size
    return desc.rows * desc.cols
