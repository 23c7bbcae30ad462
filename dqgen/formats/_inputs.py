"""Turning checkpoint tensors (numpy arrays, CPU torch tensors, or CUDA arrays: torch,
CuPy, ``__cuda_array_interface__``) into checked arrays, and running their plan where
the tensors live (CUDA arrays stay on their device and the caller's current stream)."""

from __future__ import annotations

import numpy as np

from .. import output_pool
from ..arrays import (check_array, check_no_overlap, from_numpy_like, readable, shape_of,
                      to_numpy)
from ..errors import InvalidProblemError
from ..ir import FLOAT_DTYPES, DType, parse_dtype
from ..runtime import cuda as cuda_runtime


def dtype_of(arr) -> np.dtype:
    """The numpy dtype of a numpy array or of a CUDA array (bfloat16 through ml_dtypes)."""
    return arr.dtype if isinstance(arr, np.ndarray) else cuda_runtime.device_pointer(arr).dtype


def _device_array(obj, name: str, ndim: int):
    """A C-contiguous CUDA array of ``ndim`` dimensions: torch and CuPy arrays are made
    contiguous on their device; others must be contiguous already."""
    view = cuda_runtime.device_pointer(obj)
    if len(view.shape) != ndim:
        raise InvalidProblemError(f"{name} must have {ndim} dimension{'s' * (ndim > 1)}, "
                                  f"got shape {view.shape}")
    if cuda_runtime.is_torch_cuda(obj):
        return obj.detach().contiguous()
    if type(obj).__module__.startswith("cupy"):
        import cupy
        return cupy.ascontiguousarray(obj)
    return cuda_runtime.rows(obj, name) if ndim == 2 else obj


def device_cast(arr, dtype: np.dtype, name: str, convert: bool):
    """``arr`` (a CUDA array) as ``dtype``: reinterpreted (``convert=False``, same size) or
    converted on its device; an array neither torch nor CuPy must have it already."""
    if dtype_of(arr) == dtype:
        return arr
    if cuda_runtime.is_torch_cuda(arr):
        import torch
        target = {"int32": torch.int32, "uint8": torch.uint8}[dtype.name]
        return arr.to(target) if convert else arr.view(target)
    if type(arr).__module__.startswith("cupy"):
        return arr.astype(dtype) if convert else arr.view(dtype)
    raise InvalidProblemError(f"{name} has dtype {dtype_of(arr)}; pass it as {dtype}")


def host(arr) -> np.ndarray:
    """A host copy of a (small) CUDA array, or the numpy array itself."""
    if isinstance(arr, np.ndarray):
        return arr
    if cuda_runtime.is_torch_cuda(arr):
        return to_numpy(arr.cpu(), "array")
    if type(arr).__module__.startswith("cupy"):
        return arr.get()
    return cuda_runtime.copy_to_host(cuda_runtime.device_pointer(arr))


def run(plan_type, desc, arrays: dict, like, device, caller: dict | None = None):
    """Select ``desc``'s plan where ``like`` lives (``device``, when given, decides), run
    it there (on a CUDA device, on the caller's current stream) and return it.

    ``caller``: ``{kernel argument: (the caller's name, the object the caller passed or
    None)}`` for arguments the caller knows by another name or shape (the kernel's ``y`` is
    always the caller's ``out``): a refusal then names them as the caller did."""
    if device is None:
        device = (f"cuda:{cuda_runtime.device_pointer(like).device}"
                  if cuda_runtime.is_cuda_array(like) else "cpu")
    plan = plan_type.select(desc, device=device)
    try:
        if plan.device == "cpu":
            plan.run(arrays)
        else:
            plan.run(arrays, stream=cuda_runtime.current_stream(like))
    except InvalidProblemError:
        if isinstance(arrays, dict):
            check_in_callers_terms(plan, arrays, {"y": ("out", None), **(caller or {})})
        raise
    return plan


def check_in_callers_terms(plan, arrays: dict, caller: dict) -> None:
    """Check ``arrays`` against ``plan``'s arguments as ``plan.can_implement`` does, naming
    each as ``caller`` says (its shape too, where the caller's object is given); returns
    when they fit (the plan's own refusal was about something else: a g_idx range)."""
    first = caller.get(plan.arguments[0].name, (None, None))[1]
    lead = shape_of(first)[:-1] if first is not None else None
    names, views = {}, {}
    for arg in plan.arguments:
        name, obj = caller.get(arg.name, (arg.name, None))
        names[arg.name] = name
        arr = arrays.get(arg.name)
        if arr is None:
            return
        if plan.device == "cpu":
            if not isinstance(arr, np.ndarray):
                return
            shown = None if obj is None else (shape_of(obj), lead)
            check_array(arr, name, arg.dtype, arg.shape, writable=arg.is_out, caller=shown)
        else:
            ordinal = int(plan.device[5:])
            views[arg.name] = cuda_runtime.device_view(arr, name, ordinal)
            cuda_runtime.check_device_array(views[arg.name], name, arg.dtype, arg.shape,
                                            ordinal, writable=arg.is_out)
    out = next(a.name for a in plan.arguments if a.is_out)
    inputs = {a.name for a in plan.arguments if not a.is_out}
    if plan.device == "cpu":
        check_no_overlap(arrays[out], names[out], {names[k]: arrays[k] for k in inputs})
    else:
        cuda_runtime.check_device_no_overlap(views[out], names[out],
                                             {names[k]: views[k] for k in inputs})


def reshaped(arr, shape: tuple[int, ...]):
    """A C-contiguous array of the same elements in ``shape`` (a view where possible), on
    the host or on its CUDA device."""
    if isinstance(arr, np.ndarray):
        return np.ascontiguousarray(arr).reshape(shape)
    if cuda_runtime.is_torch_cuda(arr) or type(arr).__module__.startswith("cupy"):
        return arr.reshape(shape)
    view = cuda_runtime.device_pointer(arr)
    strides, step = [], view.dtype.itemsize
    for n in reversed(shape):
        strides.insert(0, step)
        step *= max(n, 1)
    return cuda_runtime.DeviceArray(view._replace(shape=tuple(shape), strides=tuple(strides)),
                                    arr)


def array(obj, name: str, ndim: int) -> np.ndarray:
    """A C-contiguous, aligned, native-order numpy view of ``obj`` (a copy only when it is
    not: ``arrays.readable``); a CUDA array stays on its device (``_device_array``)."""
    if cuda_runtime.is_cuda_array(obj):
        return _device_array(obj, name, ndim)
    arr = to_numpy(obj, name)
    if arr.ndim != ndim:
        raise InvalidProblemError(f"{name} must have {ndim} dimension{'s' * (ndim > 1)}, "
                                  f"got shape {arr.shape}")
    return readable(arr)  # e.g. a tensor mapped from a file at an odd offset


def words(obj, name: str) -> np.ndarray:
    """A 2-D array of 32-bit packed words as int32 (uint32 is viewed, not converted)."""
    arr = array(obj, name, 2)
    dtype = dtype_of(arr)
    if dtype == np.uint32:
        return arr.view(np.int32) if isinstance(arr, np.ndarray) else \
            device_cast(arr, np.dtype(np.int32), name, convert=False)
    if dtype != np.int32:
        raise InvalidProblemError(f"{name} has dtype {dtype}; packed words must be int32")
    return arr


def float_array(obj, name: str, ndim: int = 2) -> tuple[np.ndarray, DType]:
    arr = array(obj, name, ndim)
    return arr, parse_dtype(dtype_of(arr), f"{name}.dtype", FLOAT_DTYPES)


def group_index(obj, rows: int, groups: int) -> np.ndarray:
    """``g_idx`` as int32 ``[rows]`` with every value in ``[0, groups)`` (a CUDA
    ``g_idx`` is checked from a host copy and converted on its device)."""
    arr = array(obj, "g_idx", 1)
    if not isinstance(arr, np.ndarray):
        group_index(host(arr), rows, groups)
        return device_cast(arr, np.dtype(np.int32), "g_idx", convert=True)
    if arr.dtype.kind not in "iu":
        raise InvalidProblemError(f"g_idx has dtype {arr.dtype}, expected an integer dtype")
    if arr.shape != (rows,):
        raise InvalidProblemError(f"g_idx has shape {arr.shape}, expected ({rows},), one "
                                  "group index per row (input feature)")
    if rows:
        bad = np.flatnonzero((arr < 0) | (arr >= groups))
        if bad.size:
            i = int(bad[0])
            raise InvalidProblemError(f"g_idx[{i}]={int(arr[i])} is out of range [0, {groups}) "
                                      f"({groups} groups, from scales.shape[0])")
    return arr.astype(np.int32, copy=False)


def output(shape: tuple[int, ...], dtype: DType, like, out=None,
           result_shape: tuple[int, ...] | None = None):
    """The array the kernel writes (viewed as ``shape``) and how to return the result.

    Without ``out``: a new array, returned as the same kind as ``like`` (torch in, torch
    out). With ``out`` (a numpy array or CPU tensor of the result's dtype and shape,
    ``result_shape`` where it differs from ``shape``): written in place and returned, so a
    caller can reuse one buffer layer after layer (the plan checks it is writable and
    overlaps no input).
    """
    if cuda_runtime.is_cuda_array(out if out is not None else like):
        arr, user_out = cuda_runtime.output_like(
            out, shape, dtype.np_dtype, result_shape if result_shape is not None else shape,
            like)
        arr = reshaped(arr, shape)  # the kernel's view ([blocks, values] for GGML)
        return arr, (lambda: arr if user_out is None else user_out)
    if out is None:
        arr = output_pool.empty(shape, dtype.np_dtype)
        return arr, (lambda: from_numpy_like(arr, like))
    arr = to_numpy(out, "out")
    expected = tuple(result_shape if result_shape is not None else shape)
    if arr.dtype != dtype.np_dtype:
        raise InvalidProblemError(f"out has dtype {arr.dtype}, expected {dtype.value}")
    if arr.shape != expected:
        raise InvalidProblemError(f"out has shape {arr.shape}, expected {expected}")
    if not arr.flags.c_contiguous:
        raise InvalidProblemError("out must be C-contiguous")
    if not arr.flags.aligned:
        raise InvalidProblemError(f"out is not aligned to its {arr.itemsize}-byte elements")
    if not arr.flags.writeable:
        raise InvalidProblemError("out is read-only")
    return arr.reshape(shape), (lambda: out)



def view_as(arr, dtype: np.dtype, name: str):
    """``arr`` reinterpreted as ``dtype`` (the last axis scaled), on the host or its device."""
    return arr.view(dtype) if isinstance(arr, np.ndarray) else \
        device_cast(arr, np.dtype(dtype), name, convert=False)


def row_range(arr, start: int, stop: int):
    """Rows ``[start, stop)`` of a C-contiguous 2-D array, a view on the host or on its
    device (a CUDA array known only by its interface is offset, not copied)."""
    if not isinstance(arr, cuda_runtime.DeviceArray):
        return arr[start:stop]
    v = arr.view
    shape = (max(stop - start, 0), *v.shape[1:])
    return cuda_runtime.DeviceArray(v._replace(ptr=v.ptr + start * v.strides[0], shape=shape,
                                               nbytes=shape[0] * v.strides[0]), arr)
