"""Float zero points (torchao ZeroPointDomain.FLOAT, tinygemm):
``x = F(F(F(q - mid) * s) + z)`` with ``mid = (q_max + q_min + 1) / 2`` (FORMATS.md).

The family's dequantize kernel with a float ``zero_point`` (the float dtype F). Each step
is rounded to F, as torchao computes it on F tensors: the difference (exact except for
bf16 beyond 8 significant bits), the product, then the sum; no FMA. ``mid`` is a true
division (7.5 for [0, 14]). ``q`` may be s8/u8, packed u4/s4 (uint8 ``[..., axis / 2]``,
with ``int_dtype`` naming it), or what torchao's tinygemm path hands over: 4-bit values
one an element (uint8 or int32, ``[..., axis]``) with ``int_dtype="u4"``. HQQ's rule
differs (no ``mid``): see ``formats.hqq``.

``quantize`` is torchao's ``_quantize_affine_tinygemm``:
``q = clamp(rint(F(F(x - F(z - F(s * mid))) / s)), q_min, q_max)``: the float arithmetic
is torch's own (torch tensors) or numpy's rounded the same way, then the family's
quantize kernel rounds, clamps and stores (packs u4/s4). ``choose_qparams_per_group(...,
zero_point_domain="float")`` gives its ``scale`` and ``zero_point``.
"""

from __future__ import annotations

import numpy as np

from .. import api, arrays
from ..errors import InvalidProblemError
from ..ir import (FLOAT_DTYPES, INT_DTYPES, STORAGE_DTYPES, DequantizeFloatZeroDescriptor, DType,
                  byte_storage_for, check_int, parse_dtype, resolve_q_range)
from ..runtime import cuda as cuda_runtime
from . import _inputs
from .plan import FormatPlan

#: The one-value-a-byte storage an unpacked 4-bit ``q`` is read as.
_BYTE_STORAGE = {DType.U4: DType.U8, DType.S4: DType.S8}


def _value_range(q) -> tuple[int, int]:
    """``(min, max)`` of a non-empty integer array on the host or a torch/CuPy device."""
    if isinstance(q, np.ndarray) or cuda_runtime.is_torch_cuda(q) or \
            type(q).__module__.startswith("cupy"):
        return int(q.min()), int(q.max())
    host = _inputs.host(q)
    return int(host.min()), int(host.max())


def _as_bytes(q, storage: DType):
    """``q`` (any integer dtype) converted to ``storage``'s one-byte dtype, values kept."""
    target = storage.np_dtype
    if _inputs.dtype_of(q) == target:
        return q
    if isinstance(q, np.ndarray):
        return q.astype(target)
    if cuda_runtime.is_torch_cuda(q):
        import torch
        return q.to(torch.uint8 if target == np.uint8 else torch.int8)
    if type(q).__module__.startswith("cupy"):
        return q.astype(target)
    raise InvalidProblemError(f"q has dtype {_inputs.dtype_of(q)}; pass it as {target} "
                              "(a CUDA array that is neither torch nor CuPy is not converted)")


def _unpacked_4bit(q2, storage: DType):
    """An unpacked 4-bit ``q`` (one value an element, as torchao's tinygemm quantize
    returns it: uint8 or int32) as one-byte storage, its values checked to be 4-bit."""
    lo, hi = storage.int_range
    if _inputs.dtype_of(q2).kind not in "iu":
        raise InvalidProblemError(f"q has dtype {_inputs.dtype_of(q2)}, expected an integer "
                                  "dtype")
    if q2.shape[0] * q2.shape[1]:
        q_lo, q_hi = _value_range(q2)
        if q_lo < lo or q_hi > hi:
            raise InvalidProblemError(
                f"q holds values in [{q_lo}, {q_hi}], outside {storage.value}'s [{lo}, {hi}] "
                f"(int_dtype={storage.value!r}, one value an element)")
    return _as_bytes(q2, _BYTE_STORAGE[storage])


def _storage_and_q(q2, storage: DType | None, scale_groups: int, group_size: int):
    """The descriptor's storage and the kernel's ``q`` for what the caller handed over."""
    if storage is None:
        return parse_dtype(_inputs.dtype_of(q2), "q.dtype", INT_DTYPES), q2
    if not storage.is_packed:
        return storage, q2
    stored = _inputs.dtype_of(q2)
    if q2.shape[1] == scale_groups * group_size and q2.shape[1]:  # one value an element
        return _BYTE_STORAGE[storage], _unpacked_4bit(q2, storage)
    if stored.itemsize != 1 or stored.kind not in "iu":
        raise InvalidProblemError(
            f"q has dtype {stored} and shape {tuple(q2.shape)}: packed {storage.value} values "
            f"are uint8 bytes (two a byte, [..., {scale_groups * group_size // 2}]); one value "
            f"an element needs [..., {scale_groups * group_size}] for scale's "
            f"{scale_groups} groups of {group_size}")
    return storage, _inputs.view_as(q2, np.dtype(np.uint8), "q")


def dequantize(q, scale, zero_point, group_size: int, int_dtype=None, q_min=None, q_max=None,
               device=None, out=None):
    """``x = F(F(F(q - mid) * scale) + zero_point)`` per group of ``group_size`` along the
    last axis, ``mid = (q_max + q_min + 1) / 2``: torchao's ``_dequantize_affine_tinygemm``
    bit for bit.

    ``int_dtype`` defaults to ``q``'s (s8 or u8). With ``"u4"``/``"s4"``, ``q`` is packed
    bytes (uint8 ``[..., axis / 2]``) or, as torchao's tinygemm quantize returns it, one
    value an element (uint8 or int32 ``[..., axis]``, values in the 4-bit range): which
    one, ``scale``'s groups say. ``q_min``/``q_max`` (for ``mid``) default to the
    ``int_dtype``'s range. The result has
    ``scale``'s dtype; ``zero_point`` must have it too. ``out``: an array of the result's
    dtype and shape to write instead of allocating one. CUDA arrays run on their device and
    the current stream (``device``: where, when the arrays do not say it; default: where
    they live).
    """
    q2, int_dtype = arrays.q_rows(q, "q", int_dtype)  # ml_dtypes int4/uint4: s4/u4 values
    s2, float_dtype = _inputs.float_array(arrays.rows(scale, "scale"), "scale")
    group_size = check_int(group_size, "group_size", minimum=1, maximum=2**31 - 1)
    declared = None if int_dtype is None else parse_dtype(int_dtype, "int_dtype", STORAGE_DTYPES)
    storage, q2 = _storage_and_q(q2, declared, s2.shape[1], group_size)
    if declared is not None and storage is not declared:  # 4-bit values one a byte
        q_min, q_max = resolve_q_range(q_min, q_max, *declared.int_range, declared.value)
    rows = q2.shape[0]
    axis = q2.shape[1] * (2 if storage.is_packed else 1)
    z2 = arrays.rows(zero_point, "zero_point")
    if _inputs.dtype_of(z2) != _inputs.dtype_of(s2):
        raise InvalidProblemError(f"zero_point has dtype {_inputs.dtype_of(z2)}; a float zero "
                                  f"point has scale's dtype ({_inputs.dtype_of(s2)})")
    desc = DequantizeFloatZeroDescriptor(rows, axis, group_size, float_dtype, storage,
                                         q_min, q_max)
    shape = (*_inputs.shape_of(q)[:-1], axis)
    y, result = _inputs.output((rows, axis), float_dtype, q, out, result_shape=shape)
    _inputs.run(FormatPlan, desc, {"q": q2, "scale": s2, "zero_point": z2, "y": y}, q, device,
                caller={"q": ("q", q), "scale": ("scale", scale),
                        "zero_point": ("zero_point", zero_point)})
    return result() if out is not None else result().reshape(shape)


# --------------------------------------------------------------------------- quantize

def _described(obj, name: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and numpy dtype of a host array, CPU tensor or CUDA array."""
    if cuda_runtime.is_cuda_array(obj):
        view = cuda_runtime.device_pointer(obj)
        return tuple(view.shape), view.dtype
    arr = arrays.to_numpy(obj, name)
    return arr.shape, arr.dtype


def check_params(x, scale, zero_point, group_size: int) -> None:
    """``scale`` and ``zero_point`` of ``quantize``/``fake_quantize``: x's float dtype, one
    value a group of x's last axis (CUDA and fake tensors are read by shape and dtype)."""
    shape, x_dtype = _described(x, "x")
    parse_dtype(x_dtype, "x.dtype", FLOAT_DTYPES)
    if not shape or shape[-1] % group_size:
        raise InvalidProblemError(f"x's last axis ({shape[-1] if shape else 0}) is not a "
                                  f"multiple of group_size={group_size}")
    want = (*shape[:-1], shape[-1] // group_size)
    for name, arr in (("scale", scale), ("zero_point", zero_point)):
        got_shape, dtype = _described(arr, name)
        if dtype != x_dtype:
            raise InvalidProblemError(f"{name} has dtype {dtype}; float zero points work in "
                                      f"x's dtype ({x_dtype}): convert it")
        if got_shape != want:
            raise InvalidProblemError(f"{name} has shape {got_shape}, expected {want}: one "
                                      f"value a group of {group_size}")


def _torch_quotient(x, scale, zero_point, group_size: int, mid: float):
    """torchao's own expression on torch tensors: ``(x - (z - s * mid)) / s``."""
    groups = scale.shape[-1]
    s = scale.reshape(-1, groups, 1)
    min_val = zero_point.reshape(-1, groups, 1) - s * mid
    return ((x.reshape(-1, groups, group_size) - min_val) / s).reshape(x.shape)


def _numpy_quotient(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray,
                    group_size: int, mid: float) -> np.ndarray:
    """The same on numpy arrays, each step in f32 (f64 for f64) rounded to F, as torch."""
    f = x.dtype
    c = np.dtype(np.float64) if f == np.float64 else np.dtype(np.float32)
    groups = scale.shape[-1]

    def rounded(value):
        return value.astype(f).astype(c)

    s = scale.reshape(-1, groups, 1).astype(c)
    with np.errstate(all="ignore"):
        min_val = rounded(zero_point.reshape(-1, groups, 1).astype(c) - rounded(s * c.type(mid)))
        diff = rounded(x.reshape(-1, groups, group_size).astype(c) - min_val)
        return (diff / s).astype(f).reshape(x.shape)


def quotient(x, scale, zero_point, group_size: int, q_min: int, q_max: int):
    """``F(F(x - F(z - F(s * mid))) / s)``, the value torchao rounds and clamps; same kind
    as ``x`` (torch tensors through torch itself)."""
    mid = (q_max + q_min + 1) / 2
    if arrays.is_torch(x):
        return _torch_quotient(x.detach(), scale.detach(), zero_point.detach(), group_size, mid)
    return _numpy_quotient(arrays.to_numpy(x, "x"), arrays.to_numpy(scale, "scale"),
                           arrays.to_numpy(zero_point, "zero_point"), group_size, mid)


def _unit_params(scale):
    """Scales of 1 and integer zero points of 0, shaped and placed as ``scale``: the
    family's quantize kernel then only rounds, clamps and stores."""
    if arrays.is_torch(scale):
        import torch
        return torch.ones_like(scale), torch.zeros(scale.shape, dtype=torch.int32,
                                                   device=scale.device)
    scale = arrays.to_numpy(scale, "scale")
    return np.ones_like(scale), np.zeros(scale.shape, np.int32)


def quantize(x, scale, zero_point, group_size: int, int_dtype="u4", q_min=None, q_max=None,
             out=None, device=None):
    """``q = clamp(rint(F(F(x - F(z - F(s * mid))) / s)), q_min, q_max)`` per group:
    torchao's ``_quantize_affine_tinygemm`` bit for bit, stored as ``int_dtype`` (u4
    default: packed, two values a byte, the ``q`` ``dequantize(..., int_dtype="u4")``
    takes; u8/s8/s4 too). ``scale`` and ``zero_point`` have ``x``'s float dtype. A NaN
    quotient (NaN in ``x``, or 0 / 0) stores ``clamp(0, q_min, q_max)``.
    """
    storage = parse_dtype(int_dtype, "int_dtype", STORAGE_DTYPES)
    q_min, q_max = resolve_q_range(q_min, q_max, *storage.int_range, storage.value)
    group_size = check_int(group_size, "group_size", minimum=1, maximum=2**31 - 1)
    check_params(x, scale, zero_point, group_size)
    t = quotient(x, scale, zero_point, group_size, q_min, q_max)
    ones, zeros = _unit_params(scale)
    return api.quantize_per_group(t, ones, zeros, group_size, int_dtype=storage.value,
                                  q_min=q_min, q_max=q_max, out=out, device=device)


def _nan_where(t, y):
    """``y`` with ``t``'s NaNs, which torchao carries through its round and clamp."""
    if arrays.is_torch(t):
        import torch
        return torch.where(torch.isnan(t), t.to(y.dtype), y)
    t = arrays.to_numpy(t, "x")
    return arrays.from_numpy_like(np.where(np.isnan(t), t, arrays.to_numpy(y, "y")), y)


def fake_quantize(x, scale, zero_point, group_size: int, q_min: int, q_max: int):
    """``dequantize(quantize(x))`` in ``x``'s dtype, without the integer storage's limits:
    torchao's ``_fake_quantize_affine(..., zero_point_domain=ZeroPointDomain.FLOAT)`` bit
    for bit (NaN where the quotient is NaN, as torchao's). ``[q_min, q_max]`` lies inside
    s8 or u8 (the values pass through that storage); ``mid`` is computed from it.

    Three steps: torchao's float quotient (``quotient``), the family's quantize kernel
    (round and clamp, unit scales) and the float-zero dequantize kernel.
    """
    storage = byte_storage_for(q_min, q_max)
    group_size = check_int(group_size, "group_size", minimum=1, maximum=2**31 - 1)
    check_params(x, scale, zero_point, group_size)
    t = quotient(x, scale, zero_point, group_size, q_min, q_max)
    ones, zeros = _unit_params(scale)
    q = api.quantize_per_group(t, ones, zeros, group_size, int_dtype=storage, q_min=q_min,
                               q_max=q_max)
    y = dequantize(q, scale, zero_point, group_size, int_dtype=storage, q_min=q_min,
                   q_max=q_max)
    return _nan_where(t, y)


