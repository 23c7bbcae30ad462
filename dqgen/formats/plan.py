"""Plans for the checkpoint layouts: select a kernel once, check arrays, run.

The same stages as the family's plans (``jit.get_kernel`` lowers, renders, builds or
loads from a bundle or the cache); only the argument shapes differ, and those come from
the descriptor (``argument_shapes``). On ``device="cuda"`` the plan holds the cubin for
the device's architecture and launches it on the caller's stream over CUDA arrays
(torch, CuPy, ``__cuda_array_interface__``, DLPack), as the family's CUDA plans do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..version import __version__
from ..arrays import check_no_overlap
from ..errors import InvalidProblemError, UnsupportedError
from ..ir import (AwqDequantizeDescriptor, DType, GgmlDequantizeDescriptor,
                  GptqDequantizeDescriptor, Op, PerGroupDescriptor)
from ..jit import Kernel, get_kernel
from ..plans import (KernelSku, PlanPreference, PrecisionGuarantee, cpu_isa, memoized_select,
                     parse_device, precision_of)
from ..runtime import cpu as cpu_runtime
from ..runtime import cuda as cuda_runtime


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
    if isinstance(desc, PerGroupDescriptor):
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
    groups = (rows, desc.num_groups)
    zero = f if getattr(desc, "zero_kind", "int") == "float" else DType.I32.np_dtype
    params = (Argument("scale", f, groups), Argument("zero_point", zero, groups))
    if desc.op is Op.DEQUANTIZE_BACKWARD:  # the backward ops, for ``dqgen verify``
        return ((Argument("d_output", f, (rows, cols)), params[0],
                 Argument("d_input", f, (rows, cols), True)), (rows, cols))
    if desc.op is Op.QUANTIZE_BACKWARD:
        return ((Argument("d_output", f, (rows, cols)), Argument("x", f, (rows, cols)),
                 *params, Argument("d_input", f, (rows, cols), True)),
                (rows, cols, desc.q_min, desc.q_max))
    q = (desc.int_dtype.np_dtype, desc.int_dtype.storage_shape(rows, cols))
    if desc.op is Op.DEQUANTIZE:  # HQQ's planes also take the bit offset of their fields
        shift = (desc.shift,) if getattr(desc, "field_bits", 0) else ()
        return (Argument("q", *q), *params, Argument("y", f, (rows, cols), True)), (rows, cols, *shift)
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


def launch_elements(desc) -> int:
    """Values a launch covers (one CUDA thread each, grid-striding): the unpacked problem."""
    if isinstance(desc, PerGroupDescriptor):
        return desc.outer * desc.axis
    if isinstance(desc, GgmlDequantizeDescriptor):
        return math.prod(argument_shapes(desc)[0][-1].shape)
    return desc.rows * desc.cols


def _device_group_range(obj, view, groups: int) -> None:
    """``_check_group_range`` for a CUDA ``g_idx``: torch and CuPy reduce on the device,
    other arrays are copied to the host (one synchronisation; act-order only)."""
    if view.nbytes == 0:
        return
    if cuda_runtime.is_torch_cuda(obj) or type(obj).__module__.startswith("cupy"):
        lo, hi = int(obj.min()), int(obj.max())
        if 0 <= lo and hi < groups:
            return
        host = np.asarray(obj.cpu() if hasattr(obj, "cpu") else obj.get())
    else:
        host = cuda_runtime.copy_to_host(view)
    _check_group_range(host, groups)


class FormatPlan:
    """A checkpoint-layout kernel, selected once (built or loaded) and run many times."""

    def __init__(self, desc, device: str, preference: PlanPreference, kernel: Kernel) -> None:
        self.descriptor = desc
        self.device = device
        self.preference = preference
        self._kernel = kernel
        self._threads = cpu_runtime.num_threads(preference.num_threads)
        self._ordinal = int(device[5:]) if device.startswith("cuda:") else None
        self.arguments, self._scalars = argument_shapes(desc)
        self._elements = launch_elements(desc)

    @classmethod
    def select(cls, desc, device: str = "cpu", preference: PlanPreference | None = None):
        """Validate ``desc`` and build or load its kernel: for the CPU, or for ``cuda[:N]``
        the cubin of that device's architecture (a repeated select returns the same plan,
        as the family's plans do)."""
        return memoized_select(cls, desc, device, preference)

    @classmethod
    def _build(cls, desc, device, preference):
        desc.verify()
        preference = preference or PlanPreference()
        target = parse_device(device)
        if target.startswith("cuda:"):
            # preference.isa/num_threads are CPU knobs
            kernel = get_kernel(desc, "cuda", cuda_runtime.device_arch(int(target[5:])))
        else:
            kernel = get_kernel(desc, "c", cpu_isa(preference))
        return cls(desc, target, preference, kernel)

    def _check_names(self, arrays: dict) -> None:
        if not isinstance(arrays, dict):
            raise UnsupportedError(f"{type(self).__name__} takes a dict of arrays by argument "
                                   f"name ({', '.join(a.name for a in self.arguments)}), got "
                                   f"{type(arrays).__name__}")
        missing = [a.name for a in self.arguments if a.name not in arrays]
        if missing:
            raise InvalidProblemError(f"missing arguments: {', '.join(missing)}")

    def _device_views(self, arrays: dict) -> list:
        """The checked device views of ``arrays``, in kernel order (a CUDA plan)."""
        self._check_names(arrays)
        views = []
        for arg in self.arguments:
            view = cuda_runtime.device_view(arrays[arg.name], arg.name, self._ordinal)
            cuda_runtime.check_device_array(view, arg.name, arg.dtype, arg.shape, self._ordinal,
                                            writable=arg.is_out)
            views.append(view)
        out = next(i for i, a in enumerate(self.arguments) if a.is_out)
        cuda_runtime.check_device_no_overlap(
            views[out], self.arguments[out].name,
            {a.name: v for i, (a, v) in enumerate(zip(self.arguments, views)) if i != out})
        for arg, view in zip(self.arguments, views):
            if arg.name == "g_idx":
                _device_group_range(arrays["g_idx"], view, self.descriptor.num_groups)
        return views

    def can_implement(self, arrays: dict) -> None:
        """Raise naming the first array that does not fit, or an output alias."""
        if self._ordinal is not None:
            self._device_views(arrays)
            return
        self._check_names(arrays)
        for arg in self.arguments:
            check_argument(arrays[arg.name], arg)
        if "g_idx" in arrays and any(a.name == "g_idx" for a in self.arguments):
            _check_group_range(arrays["g_idx"], self.descriptor.num_groups)
        out = next(a.name for a in self.arguments if a.is_out)
        check_no_overlap(arrays[out], out, {a.name: arrays[a.name]
                                            for a in self.arguments if not a.is_out})

    def run(self, arrays: dict, stream=None) -> None:
        """Check (as ``can_implement``) and run; the GIL is released during a CPU call.

        A CUDA plan takes CUDA arrays and launches asynchronously on ``stream`` (None:
        the legacy default stream; a torch or CuPy stream or a raw handle names another).
        """
        if self._ordinal is not None:
            ptrs = [v.ptr for v in self._device_views(arrays)]
            cuda_runtime.stream_handle(stream)  # a bad stream is refused even with no work
            self._kernel.runner.launch(ptrs + list(self._scalars), self._elements,
                                       self._ordinal, stream)
            return
        if stream is not None:
            raise UnsupportedError("stream= applies to CUDA plans; this plan runs on the CPU")
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
