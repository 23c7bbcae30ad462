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

from .. import arrays
from ..errors import InvalidProblemError
from ..ir import (INT_DTYPES, STORAGE_DTYPES, DequantizeFloatZeroDescriptor, check_int,
                  parse_dtype)
from . import _inputs
from .plan import FormatPlan


def dequantize(q, scale, zero_point, group_size: int, int_dtype=None, q_min=None, q_max=None,
               device=None, out=None):
    """``x = F(F(F(q - mid) * scale) + zero_point)`` per group of ``group_size`` along the
    last axis, ``mid = (q_max + q_min + 1) / 2``: torchao's ``_dequantize_affine_tinygemm``
    bit for bit.

    ``int_dtype`` defaults to ``q``'s (s8 or u8); pass ``"u4"``/``"s4"`` for packed bytes.
    ``q_min``/``q_max`` (for ``mid``) default to the storage type's range. The result has
    ``scale``'s dtype; ``zero_point`` must have it too. ``out``: an array of the result's
    dtype and shape to write instead of allocating one. CUDA arrays run on their device and
    the current stream (``device``: where, when the arrays do not say it; default: where
    they live).
    """
    q2 = arrays.rows(q, "q")
    if int_dtype is None:
        storage = parse_dtype(_inputs.dtype_of(q2), "q.dtype", INT_DTYPES)
    else:
        storage = parse_dtype(int_dtype, "int_dtype", STORAGE_DTYPES)
    if storage.is_packed:
        stored = _inputs.dtype_of(q2)
        if stored.itemsize != 1 or stored.kind not in "iu":
            raise InvalidProblemError(f"q has dtype {stored}; packed 4-bit values are stored "
                                      "in uint8 bytes")
        q2 = _inputs.view_as(q2, np.dtype(np.uint8), "q")
    rows = q2.shape[0]
    axis = q2.shape[1] * (2 if storage.is_packed else 1)
    s2, float_dtype = _inputs.float_array(arrays.rows(scale, "scale"), "scale")
    z2 = arrays.rows(zero_point, "zero_point")
    if _inputs.dtype_of(z2) != _inputs.dtype_of(s2):
        raise InvalidProblemError(f"zero_point has dtype {_inputs.dtype_of(z2)}; a float zero "
                                  f"point has scale's dtype ({_inputs.dtype_of(s2)})")
    group_size = check_int(group_size, "group_size", minimum=1, maximum=2**31 - 1)
    desc = DequantizeFloatZeroDescriptor(rows, axis, group_size, float_dtype, storage,
                                         q_min, q_max)
    shape = (*_inputs.shape_of(q)[:-1], axis)
    y, result = _inputs.output((rows, axis), float_dtype, q, out, result_shape=shape)
    _inputs.run(FormatPlan, desc, {"q": q2, "scale": s2, "zero_point": z2, "y": y}, q, device)
    return result() if out is not None else result().reshape(shape)
