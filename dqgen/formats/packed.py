"""Packed 4-bit storage (``u4``/``s4``): two values a byte along the quantization axis,
element ``2k`` in the low nibble of byte ``k`` (FORMATS.md).

The family's own kernels with a packed layout: same group/scale/zero math, a nibble
read or written per element. ``axis`` (the last dimension of the unpacked problem)
must be even; ``q`` arrays are uint8 ``[..., axis / 2]``, or ml_dtypes ``int4``/``uint4``
``[..., axis]`` (one value a byte: the unpacked reading), packed here (a copy).
"""

from __future__ import annotations

import numpy as np

from ..arrays import four_bit_storage, pack_four_bit, readable, to_numpy
from ..errors import InvalidProblemError
from ..ir import (PACKED_DTYPES, DequantizePerGroupDescriptor, DType,
                  QuantizePerGroupDescriptor, check_int, parse_dtype)
from . import _inputs
from .plan import FormatPlan


def _rows(obj, name: str) -> np.ndarray:
    """``obj`` (on the host) as C-contiguous, aligned, native ``[outer, last axis]`` rows."""
    arr = to_numpy(obj, name)
    if arr.ndim == 0:
        raise InvalidProblemError(f"{name} must have at least one dimension")
    arr = readable(arr)
    return arr.reshape(-1, arr.shape[-1])


def _caller(**objects) -> dict:
    """The plan's arguments as this module's caller passed them (``run``'s ``caller``)."""
    return {name: (name, obj) for name, obj in objects.items()}


def zero_points(obj) -> np.ndarray:
    """Integer zero points as int32 (values must fit)."""
    zp = _rows(obj, "zero_point")
    if zp.dtype.kind not in "iu":
        raise InvalidProblemError(f"zero_point has dtype {zp.dtype}, expected an integer dtype")
    if zp.size and (zp.min() < -2**31 or zp.max() > 2**31 - 1):
        raise InvalidProblemError("zero_point has values outside int32")
    return zp.astype(np.int32, copy=False)


def packed_bytes(q, name: str = "q", dtype=None) -> tuple[np.ndarray, DType]:
    """``(q as uint8 rows of packed bytes, its storage)``: int8/uint8 bytes are viewed as
    uint8 and are ``dtype`` (u4 when None); an ml_dtypes int4/uint4 array (s4/u4 values,
    one a byte) is packed, and ``dtype``, when given, must name its storage."""
    arr = _rows(q, name)
    unpacked = four_bit_storage(arr.dtype)
    storage = parse_dtype(dtype if dtype is not None else (unpacked or DType.U4), "dtype",
                          PACKED_DTYPES)
    if unpacked is not None:
        if storage is not unpacked:
            raise InvalidProblemError(f"{name} is an ml_dtypes {arr.dtype} array "
                                      f"({unpacked.value} values), but dtype={dtype!r}; pass "
                                      f"dtype={unpacked.value!r} or leave it out")
        return pack_four_bit(arr, name), storage
    if arr.dtype.itemsize != 1 or arr.dtype.kind not in "iu":
        raise InvalidProblemError(f"{name} has dtype {arr.dtype}; packed 4-bit values are "
                                  "stored in uint8 bytes (or ml_dtypes int4/uint4 values)")
    return arr.view(np.uint8), storage


def dequantize(q, scale, zero_point, group_size: int, dtype=None, device: str = "cpu"):
    """``y = scale * (q - zero_point)`` for packed ``q`` (uint8 ``[..., axis / 2]``, or an
    ml_dtypes int4/uint4 ``[..., axis]`` array of the values).

    ``dtype``: ``"u4"`` or ``"s4"``; None means the array's (int4: s4, uint4: u4), and u4
    for bytes. The result has ``scale``'s dtype and shape ``[..., axis]``.
    """
    q2, storage = packed_bytes(q, "q", dtype)
    s2, float_dtype = _inputs.float_array(_rows(scale, "scale"), "scale")
    rows, axis = q2.shape[0], q2.shape[1] * 2
    group_size = check_int(group_size, "group_size", minimum=1, maximum=2**31 - 1)
    desc = DequantizePerGroupDescriptor(rows, axis, group_size, float_dtype, storage)
    y, result = _inputs.output((rows, axis), float_dtype, q)
    _inputs.run(FormatPlan, desc,
                {"q": q2, "scale": s2, "zero_point": zero_points(zero_point), "y": y}, q, device,
                _caller(q=q, scale=scale, zero_point=zero_point))
    return result().reshape(*_inputs.shape_of(q)[:-1], axis)


def quantize(x, scale, zero_point, group_size: int, dtype="u4", q_min=None, q_max=None,
             device: str = "cpu"):
    """``q = clamp(rint(x / scale) + zero_point, q_min, q_max)`` written packed: uint8
    ``[..., axis / 2]`` (``axis`` even). The range defaults to the 4-bit type's."""
    storage = parse_dtype(dtype, "dtype", PACKED_DTYPES)
    x2, float_dtype = _inputs.float_array(_rows(x, "x"), "x")
    s2 = _rows(scale, "scale")
    rows, axis = x2.shape
    group_size = check_int(group_size, "group_size", minimum=1, maximum=2**31 - 1)
    desc = QuantizePerGroupDescriptor(rows, axis, group_size, float_dtype, storage, q_min, q_max)
    q, result = _inputs.output((rows, axis // 2), DType.U8, x)
    _inputs.run(FormatPlan, desc,
                {"x": x2, "scale": s2, "zero_point": zero_points(zero_point), "q": q}, x, device,
                _caller(x=x, scale=scale, zero_point=zero_point))
    return result().reshape(*_inputs.shape_of(x)[:-1], axis // 2)
