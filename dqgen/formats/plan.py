"""Plans for the checkpoint layouts: select a kernel once, check arrays, run.

A ``FormatPlan`` is a ``plans.Plan``: the same select (``jit.get_kernel`` lowers,
renders, builds or loads from a bundle or the cache), the same arguments in the order of
the kernel's parameters (``arguments.arguments``), on the CPU or, with
``device="cuda"``, the cubin for the device's architecture launched on the caller's
stream over CUDA arrays (torch, CuPy, ``__cuda_array_interface__``, DLPack). What
differs is only how arrays come in (a dict by name) and the GPTQ ``g_idx`` range check.
"""

from __future__ import annotations

import operator

import numpy as np

from ..arguments import Argument
from ..arrays import check_no_overlap, to_numpy
from ..errors import InvalidProblemError, UnsupportedError
from ..plans import Plan
from ..runtime import cuda as cuda_runtime


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


class FormatPlan(Plan):
    """A checkpoint-layout kernel, selected once (built or loaded) and run many times,
    its arrays passed as a dict by argument name."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._checks_g_idx = any(a.name == "g_idx" for a in self.arguments)

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

    def _host_arrays(self, arrays: dict) -> dict:
        """numpy views of a CPU plan's arrays (CPU torch tensors and buffers too, as every
        plan takes them; never a copy)."""
        self._check_names(arrays)
        return {a.name: to_numpy(arrays[a.name], a.name) for a in self.arguments}

    def can_implement(self, arrays: dict, caller=None) -> None:
        """Raise naming the first array that does not fit, or an output alias."""
        if self._ordinal is not None:
            self._device_views(arrays)
            return
        arrays = self._host_arrays(arrays)
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
        if type(arrays) is not dict or len(arrays) != len(self._layout):
            self.can_implement(arrays)  # names what is missing or what is not a dict
        if self._checks_g_idx:  # the kernel indexes by its values: checked every call
            _check_group_range(to_numpy(arrays["g_idx"], "g_idx"), self.descriptor.num_groups)
        self._launch_cpu(operator.getitem, arrays)

    def _sku_op(self) -> str:
        s = self._kernel.spec
        return f"{s.op.name.lower()}_{s.layout.value}"
