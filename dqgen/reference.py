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
    "fma_f32",
    "linear",
    "linear_int8",
    "quantize_per_group",
    "quantize_per_group_backward",
    "quantize_x_int8",
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


def fma_f32(a, b, c) -> np.ndarray:
    """``fma(a, b, c)`` in binary32, rounded once, as the hardware instruction: the product
    of two f32 values is exact in f64, the sum is rounded to odd in f64 (its rounding error
    recovered exactly by TwoSum, then the last bit forced odd where the sum was inexact),
    and rounding that to f32 is then correct (53 >= 24 + 2 bits)."""
    a = np.asarray(a, np.float32).astype(np.float64)
    b = np.asarray(b, np.float32).astype(np.float64)
    c = np.asarray(c, np.float32).astype(np.float64)
    with np.errstate(all="ignore"):
        p = a * b
        s = p + c
        bb = s - p
        err = (p - (s - bb)) + (c - bb)
        even = (s.view(np.uint64) & 1) == 0
        fix = (err != 0) & even & np.isfinite(s)
        s = np.where(fix, np.nextafter(s, np.where(err > 0, np.inf, -np.inf)), s)
        return s.astype(np.float32)


def linear(x, w, bias, y_dtype, lanes: int = 16) -> np.ndarray:
    """``y[m, n] = F(sum_k x[m, k] * w[n, k] + bias[n])`` in the fused linear kernel's order
    (SPEC.md §8): ``x`` and ``w`` widened to f32 exactly; ``k`` padded with zeros to a
    multiple of ``lanes``; lane ``j`` accumulates ``k = j (mod lanes)`` in ascending ``k``
    with one fma each, from +0; the lanes are added pairwise, halving (``j`` with
    ``j + lanes / 2`` ... down to one); then the bias in f32; one rounding to ``y_dtype``."""
    x = np.asarray(x).astype(np.float32)
    w = np.asarray(w).astype(np.float32)
    m, k = x.shape
    n = w.shape[0]
    kp = -(-k // lanes) * lanes
    xp = np.zeros((m, kp), np.float32)
    wp = np.zeros((n, kp), np.float32)
    xp[:, :k], wp[:, :k] = x, w
    acc = np.zeros((m, n, lanes), np.float32)
    for k0 in range(0, kp, lanes):
        acc = fma_f32(xp[:, None, k0:k0 + lanes], wp[None, :, k0:k0 + lanes], acc)
    return _lanes_to_y(acc, bias, y_dtype)


def _tree(acc) -> np.ndarray:
    """Lane sums ``[..., lanes]`` added pairwise, halving (``j`` with ``j + lanes / 2`` ...
    down to one)."""
    while acc.shape[-1] > 1:
        half = acc.shape[-1] // 2
        acc = acc[..., :half] + acc[..., half:]
    return acc[..., 0]


def _lanes_to_y(acc, bias, y_dtype, more=None) -> np.ndarray:
    """The lane sums' ``_tree`` (plus ``more``'s, where given), then the bias in f32, then
    one rounding to ``y_dtype``."""
    with np.errstate(all="ignore"):
        y = _tree(acc)
        if more is not None:
            y = y + _tree(more)
        if bias is not None:
            y = y + np.asarray(bias).astype(np.float32)[None, :]
        return y.astype(y_dtype)


X_BLOCK = 32      # values of x sharing one int8 scale (SPEC.md §9)
QUAD = 4          # values whose integer products one lane's term sums
INT8_LANES = 64   # the int8 linear's lane sums
BLOCK_LANES = 8    # the lane sums of the block order


def quantize_x_int8(x, block: int = X_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """x ``[M, K]`` (K a multiple of ``block``) to int8 in blocks of ``block`` (32, or the
    weight's block in the block order) along K (SPEC.md §9):
    ``d = amax / 127`` in f32, ``q = clamp(rint(f32(x * (1 / d))), -127, 127)`` with ties to
    even; ``1 / d`` is taken as 0 where ``d`` is below the smallest normal f32 (the block's
    codes are then 0), and a block holding Inf or NaN has ``d`` NaN and codes 0. Returns
    the codes [M, K] int8 and each block's d [M, K / block] f32."""
    x = np.asarray(x).astype(np.float32)
    m, k = x.shape
    blocks = x.reshape(m, k // block, block)
    with np.errstate(all="ignore"):
        amax = np.max(np.abs(blocks), axis=-1)
        finite = np.isfinite(amax)
        d = np.where(finite, amax / np.float32(127), np.float32(np.nan)).astype(np.float32)
        normal = finite & (d >= np.finfo(np.float32).tiny)
        inv = np.where(normal, np.float32(1) / np.where(normal, d, np.float32(1)),
                       np.float32(0)).astype(np.float32)
        q = np.rint(blocks * inv[..., None])
        q = np.where(finite[..., None], np.clip(q, -127, 127), 0)
    return q.astype(np.int8).reshape(m, k), d


def linear_int8(x, codes, scales, mins, sub: int, bias, y_dtype,
                lanes: int = INT8_LANES) -> np.ndarray:
    """The int8 linear (SPEC.md §9): ``x [M, K]`` quantized by ``quantize_x_int8``; the
    weight as integers ``codes [N, K]`` (int8) with a scale ``scales [N, K / sub]`` and,
    where not None, a min ``mins`` (same shape) for each run of ``sub`` values.
    Quad ``t`` (values ``4t .. 4t + 3``) makes the exact integer ``P = sum codes * qx``;
    lane ``t mod 64`` takes ``fma(f32(d_w * d_x), P, acc)`` in ascending ``t`` from +0.
    With mins, segment ``g`` (``min(sub, 32)`` values) makes ``S = sum qx`` and lane
    ``g mod L`` of L = 256 / segment lanes takes ``fma(f32(m_w * d_x), S, acc)``. Each set
    of lanes is added pairwise, halving; the two sums are added, then the bias; one
    rounding to ``y_dtype``."""
    qx, dx = quantize_x_int8(x)
    m, k = qx.shape
    n = codes.shape[0]
    quads = k // QUAD
    p = np.einsum("mtj,ntj->mnt", qx.reshape(m, quads, QUAD).astype(np.int64),
                  np.asarray(codes, np.int8).reshape(n, quads, QUAD).astype(np.int64))
    acc = _run_lane_sums(np.repeat(np.asarray(scales, np.float32), sub // QUAD, axis=1),
                         np.repeat(dx, X_BLOCK // QUAD, axis=1), p, lanes)
    if mins is None:
        return _lanes_to_y(acc, bias, y_dtype)
    seg = min(sub, X_BLOCK)
    s = qx.reshape(m, k // seg, seg).astype(np.int64).sum(axis=-1)[:, None, :]
    macc = _run_lane_sums(np.repeat(np.asarray(mins, np.float32), sub // seg, axis=1),
                          np.repeat(dx, X_BLOCK // seg, axis=1), s, lanes * QUAD // seg)
    return _lanes_to_y(acc, bias, y_dtype, macc)


def linear_int8_blocks(x, codes, sub_scales, d, mins, dmin, bias, y_dtype) -> np.ndarray:
    """The int8 linear's block order (SPEC.md §9): the weight in blocks of ``block = K /
    d.shape[1]`` values (a multiple of 64), and ``x [M, K]`` quantized in blocks as long;
    the weight as integers ``codes [N, K]`` (int8), integer sub-block scales ``sub_scales
    [N, K / sub]``, each block's ``d [N, K / block]`` (f32) and, where not None, integer
    mins ``mins [N, K / sub]`` with the block's min factor ``dmin [N, K / block]``.
    Block ``b`` makes 8 exact integers, lane ``l`` the sum of ``C(sc) * C(q) * q_x`` over
    its quads ``t = l (mod 8)``, and lane ``l`` takes ``fma(f32(d * d_x), S, acc)`` in
    ascending ``b`` from +0; with mins, sub-block ``j`` of block ``b`` makes
    ``C(min) * sum q_x`` and lane ``j`` of its own takes ``fma(f32(dmin * d_x), S, acc)``.
    Each set of lanes is added pairwise, halving; the two sums are added, then the bias;
    one rounding to ``y_dtype``."""
    m, k = np.shape(x)
    blocks = np.asarray(d).shape[1]
    block, sub = k // blocks, k // np.asarray(sub_scales).shape[1]
    qx, dx = quantize_x_int8(x, block)
    n = codes.shape[0]
    ws = np.asarray(codes, np.int8).astype(np.int64) * np.repeat(
        np.asarray(sub_scales, np.int64), sub, axis=1)
    shape = (blocks, block // (QUAD * BLOCK_LANES), BLOCK_LANES, QUAD)
    s = np.einsum("mbcle,nbcle->mnbl", qx.astype(np.int64).reshape(m, *shape),
                  ws.reshape(n, *shape))
    acc = np.zeros((m, n, BLOCK_LANES), np.float32)
    with np.errstate(all="ignore"):
        coef = (np.asarray(d, np.float32)[None] * dx[:, None]).astype(np.float32)
        for b in range(blocks):
            acc = fma_f32(coef[..., b, None], s[..., b, :], acc)
    if mins is None:
        return _lanes_to_y(acc, bias, y_dtype)
    subs = block // sub
    bs = qx.astype(np.int64).reshape(m, blocks, subs, sub).sum(axis=-1)
    t = np.asarray(mins, np.int64).reshape(n, blocks, subs)[None] * bs[:, None]
    macc = np.zeros((m, n, subs), np.float32)
    with np.errstate(all="ignore"):
        mcoef = (np.asarray(dmin, np.float32)[None] * dx[:, None]).astype(np.float32)
        for b in range(blocks):
            macc = fma_f32(mcoef[..., b, None], t[..., b, :], macc)
    return _lanes_to_y(acc, bias, y_dtype, macc)


def _run_lane_sums(w, xd, values, lanes: int) -> np.ndarray:
    """``[M, N, lanes]``: lane ``r mod lanes`` takes, for runs ``r`` in ascending order
    from +0 (padded with zeros to whole steps), ``fma(f32(w[n, r] * xd[m, r]), values[m,
    n, r], acc)``; ``values`` exact integers (broadcast over N where its N is 1)."""
    m, n, runs = xd.shape[0], w.shape[0], w.shape[1]
    rp = -(-runs // lanes) * lanes

    def padded(a):
        out = np.zeros(a.shape[:-1] + (rp,), np.float32)
        out[..., :runs] = a
        return out

    w, xd, values = padded(w)[None], padded(xd)[:, None], padded(values)
    acc = np.zeros((m, n, lanes), np.float32)
    with np.errstate(all="ignore"):
        for r in range(0, rp, lanes):
            at = slice(r, r + lanes)
            acc = fma_f32((w[..., at] * xd[..., at]).astype(np.float32),
                          np.broadcast_to(values[..., at], acc.shape), acc)
    return acc
