"""Float zero points (torchao ZeroPointDomain.FLOAT, tinygemm):
``x = F(F(F(q - mid) * s) + z)`` with ``mid = (q_max + q_min + 1) / 2`` (FORMATS.md).

The family's dequantize kernel with a float ``zero_point`` (the float dtype F). Each step
is rounded to F, as torchao computes it on F tensors: the difference (exact except for
bf16 beyond 8 significant bits), the product, then the sum; no FMA. ``mid`` is a true
division (7.5 for [0, 14]). ``q`` may be s8/u8, or packed u4/s4 (uint8 ``[..., axis / 2]``,
with ``int_dtype`` naming it). HQQ's rule differs (no ``mid``): see ``formats.hqq``.
"""

from __future__ import annotations

import numpy as np

from ..errors import InvalidProblemError
from ..ir import (INT_DTYPES, STORAGE_DTYPES, DequantizeFloatZeroDescriptor, check_int,
                  parse_dtype)
from . import _inputs
from .packed import _rows, packed_bytes
from .plan import FormatPlan


def dequantize(q, scale, zero_point, group_size: int, int_dtype=None, q_min=None, q_max=None,
               device: str = "cpu", out=None):
    """``x = F(F(F(q - mid) * scale) + zero_point)`` per group of ``group_size`` along the
    last axis, ``mid = (q_max + q_min + 1) / 2``: torchao's ``_dequantize_affine_tinygemm``
    bit for bit.

    ``int_dtype`` defaults to ``q``'s (s8 or u8); pass ``"u4"``/``"s4"`` for packed bytes.
    ``q_min``/``q_max`` (for ``mid``) default to the storage type's range. The result has
    ``scale``'s dtype; ``zero_point`` must have it too. ``out``: an array of the result's
    dtype and shape to write instead of allocating one.
    """
    if int_dtype is None:
        q2 = _rows(q, "q")
        storage = parse_dtype(q2.dtype, "q.dtype", INT_DTYPES)
    else:
        storage = parse_dtype(int_dtype, "int_dtype", STORAGE_DTYPES)
        q2 = packed_bytes(q) if storage.is_packed else _rows(q, "q")
    rows = q2.shape[0]
    axis = q2.shape[1] * (2 if storage.is_packed else 1)
    s2, float_dtype = _inputs.float_array(_rows(scale, "scale"), "scale")
    z2 = _rows(zero_point, "zero_point")
    if z2.dtype != s2.dtype:
        raise InvalidProblemError(f"zero_point has dtype {z2.dtype}; a float zero point has "
                                  f"scale's dtype ({s2.dtype})")
    group_size = check_int(group_size, "group_size", minimum=1, maximum=2**31 - 1)
    desc = DequantizeFloatZeroDescriptor(rows, axis, group_size, float_dtype, storage,
                                         q_min, q_max)
    shape = (*np.shape(q)[:-1], axis)
    y, result = _inputs.output((rows, axis), float_dtype, q, out, result_shape=shape)
    FormatPlan.select(desc, device=device).run({"q": q2, "scale": s2, "zero_point": z2, "y": y})
    return result() if out is not None else result().reshape(shape)
