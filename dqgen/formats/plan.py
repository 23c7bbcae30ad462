"""Plans for the checkpoint layouts: select a kernel once, check arrays, run.

The same stages as the family's plans (``jit.get_kernel`` lowers, renders, builds or
loads from the cache); only the argument shapes differ, and those come from the
descriptor (``argument_shapes``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .. import __version__
from ..arrays import check_no_overlap
from ..errors import InvalidProblemError, UnsupportedError
from ..ir import (AwqDequantizeDescriptor, DType, GgmlDequantizeDescriptor,
                  GptqDequantizeDescriptor, Op, _PerGroupDescriptor)
from ..jit import Kernel, get_kernel
from ..plans import (KernelSku, PlanPreference, PrecisionGuarantee, _parse_device, cpu_isa,
                     memoized_select, precision_of)
from ..runtime import cpu as cpu_runtime


@dataclass(frozen=True)
class Argument:
    """One array argument: name, numpy dtype, exact shape, output or not."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    is_out: bool = False


def argument_shapes(desc) -> tuple[tuple[Argument, ...], tuple[int, ...]]:
    """The arrays (in kernel order) and scalar sizes a descriptor's kernel takes."""
    i32 = DType.I32.np_dtype
    out = DType(desc.float_dtype).np_dtype
    if isinstance(desc, _PerGroupDescriptor) and desc.op in (Op.DEQUANTIZE, Op.QUANTIZE):
        return _per_group_arguments(desc)
    if isinstance(desc, GgmlDequantizeDescriptor):
        return ((Argument("data", np.dtype(np.uint8), (desc.blocks, desc.block_bytes)),
                 Argument("y", out, (desc.blocks, desc.group_size), True)), (desc.blocks,))
    k, n, groups = desc.rows, desc.cols, desc.num_groups
    if isinstance(desc, GptqDequantizeDescriptor):
        per_word = 32 // desc.bits
        args = [Argument("qweight", i32, (k // per_word, n)),
                Argument("qzeros", i32, (groups, n // per_word)),
                Argument("scales", desc.scale_dtype.np_dtype, (groups, n))]
        if desc.act_order:
            args.append(Argument("g_idx", i32, (k,)))
    elif isinstance(desc, AwqDequantizeDescriptor):
        args = [Argument("qweight", i32, (k, n // 8)), Argument("qzeros", i32, (groups, n // 8)),
                Argument("scales", desc.scale_dtype.np_dtype, (groups, n))]
    else:
        raise UnsupportedError(f"{type(desc).__name__} has no format plan")
    args.append(Argument("y", out, (k, n), True))
    return tuple(args), (k, n)


def _per_group_arguments(desc) -> tuple[tuple[Argument, ...], tuple[int, ...]]:
    """The family's dequantize/quantize with packed 4-bit storage or a float zero point:
    ``q`` is ``[outer, axis / 2]`` bytes when packed; ``zero_point`` has the float dtype
    when the descriptor's zero points are floats."""
    rows, cols, f = desc.outer, desc.axis, desc.float_dtype.np_dtype
    q = (desc.int_dtype.np_dtype, desc.int_dtype.storage_shape(rows, cols))
    groups = (rows, desc.num_groups)
    zero = f if getattr(desc, "zero_kind", "int") == "float" else DType.I32.np_dtype
    params = (Argument("scale", f, groups), Argument("zero_point", zero, groups))
    if desc.op is Op.DEQUANTIZE:
        return (Argument("q", *q), *params, Argument("y", f, (rows, cols), True)), (rows, cols)
    return ((Argument("x", f, (rows, cols)), *params, Argument("q", *q, True)),
            (rows, cols, desc.q_min, desc.q_max))


def check_argument(arr, arg: Argument) -> None:
    """dtype, shape, C-contiguity, alignment and (for the output) writability."""
    if not isinstance(arr, np.ndarray):
        raise UnsupportedError(f"{arg.name} must be a numpy array, got {type(arr).__name__}")
    if arr.dtype != arg.dtype:
        raise InvalidProblemError(f"{arg.name} has dtype {arr.dtype}, expected {arg.dtype}")
    if arr.shape != arg.shape:
        raise InvalidProblemError(f"{arg.name} has shape {arr.shape}, expected {arg.shape}")
    if not arr.flags.c_contiguous:
        raise InvalidProblemError(f"{arg.name} is not C-contiguous")
    if not arr.flags.aligned:
        raise InvalidProblemError(f"{arg.name} is not aligned to its {arr.itemsize}-byte elements")
    if arg.is_out and not arr.flags.writeable:
        raise InvalidProblemError(f"{arg.name} is read-only; the output must be writable")


def _check_group_range(g_idx: np.ndarray, groups: int) -> None:
    """The kernel indexes scales and zero points by ``g_idx``: every value must name a
    group, or it would read outside them."""
    if g_idx.size and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
        i = int(np.flatnonzero((g_idx < 0) | (g_idx >= groups))[0])
        raise InvalidProblemError(f"g_idx[{i}]={int(g_idx[i])} is out of range [0, {groups})")


class FormatPlan:
    """A checkpoint-layout kernel, selected once (built or loaded) and run many times."""

    def __init__(self, desc, device: str, preference: PlanPreference, kernel: Kernel) -> None:
        self.descriptor = desc
        self.device = device
        self.preference = preference
        self._kernel = kernel
        self._threads = cpu_runtime.num_threads(preference.num_threads)
        self.arguments, self._scalars = argument_shapes(desc)

    @classmethod
    def select(cls, desc, device: str = "cpu", preference: PlanPreference | None = None):
        """Validate ``desc`` and build or load its kernel for the CPU (a repeated select
        returns the same plan, as the family's plans do)."""
        return memoized_select(cls, desc, device, preference)

    @classmethod
    def _build(cls, desc, device, preference):
        desc.verify()
        preference = preference or PlanPreference()
        target = _parse_device(device)
        if target != "cpu":
            hint = (" (the family's plans run packed 4-bit storage on CUDA: "
                    "DequantizePerGroupPlan / dqgen.dequantize_per_group(..., int_dtype=...))"
                    if isinstance(desc, _PerGroupDescriptor) and desc.int_type is not None
                    and desc.int_type.is_packed
                    and getattr(desc, "zero_kind", "int") == "int" else "")
            raise UnsupportedError(
                f"{desc.uri} runs on the CPU only; its CUDA source renders and compiles "
                f"(dqgen emit, plan.source()) but has no launcher yet{hint}")
        return cls(desc, target, preference, get_kernel(desc, "c", cpu_isa(preference)))

    def can_implement(self, arrays: dict) -> None:
        """Raise naming the first array that does not fit, or an output alias."""
        missing = [a.name for a in self.arguments if a.name not in arrays]
        if missing:
            raise InvalidProblemError(f"missing arguments: {', '.join(missing)}")
        for arg in self.arguments:
            check_argument(arrays[arg.name], arg)
        if "g_idx" in arrays and any(a.name == "g_idx" for a in self.arguments):
            _check_group_range(arrays["g_idx"], self.descriptor.num_groups)
        out = next(a.name for a in self.arguments if a.is_out)
        check_no_overlap(arrays[out], out, {a.name: arrays[a.name]
                                            for a in self.arguments if not a.is_out})

    def run(self, arrays: dict) -> None:
        """Check (as ``can_implement``) and run; the GIL is released during the call."""
        self.can_implement(arrays)
        runner = self._kernel.runner
        if all(math.prod(a.shape) for a in self.arguments if a.is_out):
            threads = 1 if cpu_runtime.forked_child else self._threads
            runner.function(*[runner.pointer(arrays[a.name]) for a in self.arguments],
                            *self._scalars, threads)

    def workspace_size(self) -> int:
        return 0

    def precision_guarantee(self) -> PrecisionGuarantee:
        return precision_of(self._kernel)

    def sku(self) -> KernelSku:
        k, s = self._kernel, self._kernel.spec
        return KernelSku(op=f"{s.op.name.lower()}_{s.layout.value}", uri=s.uri,
                         int_dtype=s.int_dtype.value if s.int_dtype else None,
                         float_dtype=s.float_dtype.value, group_size=s.group_size,
                         target=s.target, arch=s.arch, template_hash=k.template_hash,
                         cache_key=k.key, dqgen_version=__version__)

    def source(self) -> str:
        return self._kernel.source.text

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.descriptor}, device={self.device!r})"
