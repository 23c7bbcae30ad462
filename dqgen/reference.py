"""The numpy oracle: SPEC.md written as plainly as possible.

Nothing here is shared with the code generator, so a kernel that equals this module bit
for bit is correct by the spec's definition. Inputs are rank-2 ``[outer, axis]`` arrays;
``scale``/``zero_point`` are ``[outer, axis // group_size]``.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "compute_dtype",
    "dequantize_per_group",
    "dequantize_per_group_backward",
    "quantize_per_group",
    "quantize_per_group_backward",
]


def compute_dtype(float_dtype) -> np.dtype:
    """f64 math for f64 data, f32 math for everything narrower (SPEC.md §2)."""
    return np.dtype(np.float64) if np.dtype(float_dtype) == np.float64 else np.dtype(np.float32)


def _per_element(params: np.ndarray, group_size: int) -> np.ndarray:
    """Broadcast a per-group ``[outer, num_groups]`` array over its groups."""
    return np.repeat(params, group_size, axis=1)


def dequantize_per_group(q, scale, zero_point, group_size: int) -> np.ndarray:
    """``y = F(C(q - zp) * C(scale))`` with the subtraction exact in int64."""
    f = np.asarray(scale).dtype
    c = compute_dtype(f)
    diff = q.astype(np.int64) - _per_element(zero_point.astype(np.int64), group_size)
    with np.errstate(all="ignore"):
        y = diff.astype(c) * _per_element(scale.astype(c), group_size)
        return y.astype(f)


def dequantize_per_group_backward(dy, scale, group_size: int) -> np.ndarray:
    """``dq = F(C(dy) * C(scale))``."""
    f = np.asarray(scale).dtype
    c = compute_dtype(f)
    with np.errstate(all="ignore"):
        return (dy.astype(c) * _per_element(scale.astype(c), group_size)).astype(f)


def _rounded_quotient(x, scale, group_size):
    """``r = rint(C(x) / C(scale))``, with ``t = 0`` where the scale is zero."""
    c = compute_dtype(np.asarray(scale).dtype)
    s = _per_element(scale.astype(c), group_size)
    with np.errstate(all="ignore"):
        t = np.where(s == 0, c.type(0), x.astype(c) / np.where(s == 0, c.type(1), s))
    return np.rint(t), s


def quantize_per_group(x, scale, zero_point, group_size: int, int_dtype,
                       q_min: int, q_max: int) -> np.ndarray:
    """``q = clamp(rint(x / scale) + zp, q_min, q_max)``; NaN gives ``clamp(zp)``."""
    r, _ = _rounded_quotient(x, scale, group_size)
    zp = _per_element(zero_point.astype(np.float64), group_size)
    with np.errstate(all="ignore"):
        shifted = np.where(np.isnan(r), zp, r.astype(np.float64) + zp)
    return np.clip(shifted, q_min, q_max).astype(int_dtype)


def quantize_per_group_backward(dy, x, scale, zero_point, group_size: int,
                                q_min: int, q_max: int) -> np.ndarray:
    """Straight-through estimator: ``dx = F(C(dy) / C(scale))`` inside the range, else 0."""
    f = np.asarray(scale).dtype
    c = compute_dtype(f)
    r, s = _rounded_quotient(x, scale, group_size)
    zp = _per_element(zero_point.astype(np.float64), group_size)
    with np.errstate(all="ignore"):
        shifted = r.astype(np.float64) + zp
        inside = (shifted >= q_min) & (shifted <= q_max) & (s != 0)
        dx = np.where(inside, dy.astype(c) / np.where(s == 0, c.type(1), s), c.type(0))
        return dx.astype(f)
