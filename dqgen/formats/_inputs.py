"""Turning checkpoint tensors (numpy arrays or CPU torch tensors) into checked arrays."""

from __future__ import annotations

import numpy as np

from .. import outputs
from ..arrays import from_numpy_like, to_numpy
from ..errors import InvalidProblemError
from ..ir import FLOAT_DTYPES, DType, parse_dtype


def array(obj, name: str, ndim: int) -> np.ndarray:
    """A C-contiguous numpy view of ``obj`` (a copy only when it is strided)."""
    arr = to_numpy(obj, name)
    if arr.ndim != ndim:
        raise InvalidProblemError(f"{name} must have {ndim} dimension{'s' * (ndim > 1)}, "
                                  f"got shape {arr.shape}")
    arr = np.ascontiguousarray(arr)
    return arr if arr.flags.aligned else arr.copy()  # e.g. a tensor mapped from a file


def words(obj, name: str) -> np.ndarray:
    """A 2-D array of 32-bit packed words as int32 (uint32 is viewed, not converted)."""
    arr = array(obj, name, 2)
    if arr.dtype == np.uint32:
        return arr.view(np.int32)
    if arr.dtype != np.int32:
        raise InvalidProblemError(f"{name} has dtype {arr.dtype}; packed words must be int32")
    return arr


def float_array(obj, name: str, ndim: int = 2) -> tuple[np.ndarray, DType]:
    arr = array(obj, name, ndim)
    return arr, parse_dtype(arr.dtype, f"{name}.dtype", FLOAT_DTYPES)


def group_index(obj, rows: int, groups: int) -> np.ndarray:
    """``g_idx`` as int32 ``[rows]`` with every value in ``[0, groups)``."""
    arr = array(obj, "g_idx", 1)
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
    if out is None:
        arr = outputs.empty(shape, dtype.np_dtype)
        return arr, (lambda: from_numpy_like(arr, like))
    arr = to_numpy(out, "out")
    expected = tuple(result_shape if result_shape is not None else shape)
    if arr.dtype != dtype.np_dtype:
        raise InvalidProblemError(f"out has dtype {arr.dtype}, expected {dtype.value}")
    if arr.shape != expected:
        raise InvalidProblemError(f"out has shape {arr.shape}, expected {expected}")
    if not arr.flags.c_contiguous:
        raise InvalidProblemError("out must be C-contiguous")
    if not arr.flags.writeable:
        raise InvalidProblemError("out is read-only")
    return arr.reshape(shape), (lambda: out)
