"""The arrays and scalars a kernel takes: its spec's parameter list, sized by the problem.

Every plan (the family's and the formats', on the CPU and on CUDA) and ``dqgen verify``
check and pass arguments in the order of ``spec.params``, with each array's dtype from
its parameter; only an array's shape depends on the layout, which the format's kind
(``layouts``) gives. Scalars are the descriptor's fields of the parameters' names
(``outer``, ``axis``, ``q_min``, ``rows``, ``blocks``, ``shift``, ...).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .layouts import kind_of
from .spec import KernelSpec, Param


@dataclass(frozen=True)
class Argument:
    """One array argument: name, numpy dtype, exact shape, output or not."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    is_out: bool = False


def array_shape(desc, param: Param) -> tuple[int, ...]:
    """The exact shape of ``param``'s array for the problem ``desc`` describes (its
    format's answer)."""
    return kind_of(desc).array_shape(desc, param)


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
    return kind_of(desc).launch_elements(desc)
