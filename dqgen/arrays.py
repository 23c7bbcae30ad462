"""Turning caller arrays into checked, zero-copy views the kernels can take.

numpy arrays pass through; CPU torch tensors are viewed through ``.numpy()`` (bf16 via
an int16 view, since numpy has no bf16 of its own in torch's eyes). Checks raise
``InvalidProblemError``/``UnsupportedError`` naming the argument.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from .errors import InvalidProblemError, UnsupportedError
from .ir import DType
from .runtime import cuda as cuda_runtime


def is_torch(obj) -> bool:
    return type(obj).__module__.startswith("torch")


@functools.cache
def _torch():
    """torch, imported on the first tensor (an import statement a call costs ~0.3 us)."""
    import torch
    return torch


def to_numpy(obj, name: str) -> np.ndarray:
    """A numpy view of ``obj`` (numpy array or CPU torch tensor), never a copy."""
    if isinstance(obj, np.ndarray):
        return obj
    if is_torch(obj) and hasattr(obj, "device"):
        if not obj.is_cpu:
            raise UnsupportedError(
                f"{name} lives on {obj.device}; this plan runs on the CPU (select device='cuda' "
                "for CUDA tensors)")
        tensor = obj.detach() if obj.requires_grad else obj
        torch = _torch()
        if tensor.dtype is torch.bfloat16:
            return tensor.view(torch.int16).numpy().view(DType.BF16.np_dtype)
        return tensor.numpy()
    if hasattr(obj, "__cuda_array_interface__"):
        raise UnsupportedError(f"{name} is a CUDA array; this plan runs on the CPU")
    raise UnsupportedError(f"{name} must be a numpy array or a CPU torch tensor, "
                           f"got {type(obj).__name__}")


def from_numpy_like(result: np.ndarray, like):
    """Return ``result`` as the same kind of object as ``like`` (torch in, torch out)."""
    if not is_torch(like):
        return result
    import torch
    if result.dtype == DType.BF16.np_dtype:
        return torch.from_numpy(result.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(result)


def check_array(arr: np.ndarray, name: str, dtype: np.dtype, shape: tuple[int, int], *,
                writable: bool = False) -> None:
    """dtype, shape (or flat length), C-contiguity, alignment and, for outputs, writability."""
    if arr.dtype != dtype:
        raise InvalidProblemError(f"{name} has dtype {arr.dtype}, expected {dtype}")
    if arr.shape != shape:
        need = shape[0] * shape[1]
        if arr.ndim == 1:
            raise InvalidProblemError(f"{name} is a buffer of {arr.shape[0]} elements, "
                                      f"expected {need} (shape {shape})")
        raise InvalidProblemError(f"{name} has shape {arr.shape}, expected {shape}")
    if not arr.flags.c_contiguous:
        raise InvalidProblemError(f"{name} is not C-contiguous (strides {arr.strides}); pass "
                                  "np.ascontiguousarray(...) or use the plain functions, which copy")
    if not arr.flags.aligned:
        raise InvalidProblemError(f"{name} is not aligned to its {arr.itemsize}-byte elements")
    if writable and not arr.flags.writeable:
        raise InvalidProblemError(f"{name} is read-only; the output must be writable")


def check_no_overlap(out: np.ndarray, out_name: str, inputs: dict[str, np.ndarray]) -> None:
    """The output must not share memory with any input (the kernels are not in-place).
    numpy's bounds test: the arrays' extents overlap (cheaper than reading addresses)."""
    for name, arr in inputs.items():
        if out.nbytes and arr.nbytes and np.may_share_memory(out, arr):
            raise InvalidProblemError(f"{out_name} overlaps {name} in memory; the output must "
                                      "not alias an input")


def rows(obj, name: str):
    """``obj`` as C-contiguous ``[outer, last axis]`` rows: a numpy view (a copy only when
    strided) or, for a CUDA array, rows on its device (``runtime.cuda.rows``). The plain
    functions of the family and of the formats read their inputs through it."""
    if cuda_runtime.is_cuda_array(obj):
        return cuda_runtime.rows(obj, name)
    arr = to_numpy(obj, name)
    if arr.ndim == 0:
        raise InvalidProblemError(f"{name} must have at least one dimension")
    arr = np.ascontiguousarray(arr)
    if arr.ndim == 2:
        return arr
    return arr.reshape(math.prod(arr.shape[:-1]), arr.shape[-1])
