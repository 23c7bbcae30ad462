"""Plain functions for everyday use: infer the descriptor from the arrays, reuse plans.

They take numpy arrays or CPU torch tensors of rank >= 1 (leading dims are flattened,
the quantization axis is the last), copy non-contiguous inputs to contiguous ones, and
return the same kind of object they were given. CUDA arrays (torch CUDA tensors, CuPy)
run on the device they live on, on the caller's current stream, and come back as the same
kind of CUDA array.
"""

from __future__ import annotations

import functools

import ml_dtypes
import numpy as np

from . import call_memo, output_pool, plans
from .arrays import from_numpy_like, q_rows, rows, shape_of, to_numpy
from .errors import DqgenError, InvalidProblemError, UnsupportedError
from .ir import (DequantizePerGroupBackwardDescriptor, DequantizePerGroupDescriptor, DType,
                 FLOAT_DTYPES, INT_DTYPES, STORAGE_DTYPES, QuantizePerGroupBackwardDescriptor,
                 QuantizePerGroupDescriptor, check_int, parse_dtype, resolve_q_range)
from .runtime import cuda as cuda_runtime

__all__ = ["dequantize_per_group", "quantize_per_group", "dequantize_per_group_backward",
           "quantize_per_group_backward", "choose_qparams_per_group"]

#: The zero-point rules ``choose_qparams_per_group`` knows, named as torchao's
#: ``ZeroPointDomain``: an integer added to the quantized value, or a float subtracted
#: from the unquantized one (tinygemm, ``formats.floatzp``).
ZERO_POINT_DOMAINS = ("int", "float")


def _storage_argument(int_dtype, dtype, default):
    """``(value, the name the caller used)`` of the stored integer type.

    ``int_dtype`` is its name everywhere (the descriptors', ``dequantize_per_group``'s,
    ``formats.floatzp``'s); ``dtype`` is kept as an alias, which ``quantize_per_group``
    and ``choose_qparams_per_group`` took first.
    """
    if dtype is None:
        return (default, "int_dtype") if int_dtype is None else (int_dtype, "int_dtype")
    if int_dtype is not None and int_dtype != dtype:
        raise InvalidProblemError(f"int_dtype={int_dtype!r} and dtype={dtype!r} disagree; "
                                  "dtype is an alias of int_dtype: pass one of them")
    return dtype, "dtype"


def _zero_point(obj) -> np.ndarray:
    """zero_point as int32; other integer dtypes are accepted when every value fits."""
    zp = rows(obj, "zero_point")
    if not isinstance(zp, np.ndarray):
        return cuda_runtime.int32_zero_point(zp)
    if zp.dtype != np.int32:
        if zp.dtype.kind not in "iu":
            raise InvalidProblemError(f"zero_point has dtype {zp.dtype}, expected an integer dtype")
        info = np.iinfo(np.int32)
        if zp.size and (zp.min() < info.min or zp.max() > info.max):
            raise InvalidProblemError("zero_point has values outside int32")
        zp = zp.astype(np.int32)
    return zp


def _float_dtype(dtype, name: str) -> DType:
    return parse_dtype(dtype, f"{name}.dtype", FLOAT_DTYPES)


# The descriptors the plain functions build, remembered by what they are built from (the
# rows, the dtypes and the scalar arguments, each of its own type: 128 and 128.0 are
# validated apart), so a repeated call skips their validation, about 9 us. An argument
# that cannot be a key (unhashable) takes the full path, which names what is wrong.
_remembered = functools.lru_cache(maxsize=1024, typed=True)


def _descriptor(make, *key):
    try:
        return make(*key)
    except TypeError as exc:
        if "unhashable" not in str(exc):
            raise
        return make.__wrapped__(*key)


@_remembered
def _dequantize_descriptor(outer, stored_axis, group_size, scale_dtype, q_dtype, int_dtype,
                           int_dtype_name="int_dtype"):
    group_size = check_int(group_size, "group_size", minimum=1, maximum=2**31 - 1)
    storage = (parse_dtype(q_dtype, "q.dtype", INT_DTYPES) if int_dtype is None
               else parse_dtype(int_dtype, int_dtype_name, STORAGE_DTYPES))
    if storage.is_packed and str(q_dtype).removeprefix("torch.") != "uint8":  # numpy/torch/CuPy
        raise InvalidProblemError(f"packed {storage.value} q must be a uint8 array, got {q_dtype}")
    axis = 2 * stored_axis if storage.is_packed else stored_axis
    return DequantizePerGroupDescriptor(outer, axis, group_size, _float_dtype(scale_dtype, "scale"),
                                        storage)


@_remembered
def _quantize_descriptor(outer, axis, group_size, x_dtype, int_dtype, q_min, q_max,
                         int_dtype_name="int_dtype"):
    group_size = check_int(group_size, "group_size", minimum=1, maximum=2**31 - 1)
    storage = parse_dtype(int_dtype, int_dtype_name, STORAGE_DTYPES)
    return QuantizePerGroupDescriptor(outer, axis, group_size, _float_dtype(x_dtype, "x"),
                                      storage, q_min, q_max)


@_remembered
def _dequantize_backward_descriptor(outer, axis, group_size, dy_dtype):
    group_size = check_int(group_size, "group_size", minimum=1, maximum=2**31 - 1)
    return DequantizePerGroupBackwardDescriptor(outer, axis, group_size, _float_dtype(dy_dtype, "dy"))


@_remembered
def _quantize_backward_descriptor(outer, axis, group_size, dy_dtype, q_min, q_max):
    group_size = check_int(group_size, "group_size", minimum=1, maximum=2**31 - 1)
    return QuantizePerGroupBackwardDescriptor(outer, axis, group_size, _float_dtype(dy_dtype, "dy"),
                                              q_min, q_max)


def _where(data, device) -> str:
    """``device`` if given, else where ``data`` lives (``cpu`` or ``cuda:N``)."""
    if device is not None:
        return device
    if cuda_runtime.is_cuda_array(data):
        return f"cuda:{cuda_runtime.device_pointer(data).device}"
    return "cpu"


def _stream(plan, data):
    """The caller's current stream for a CUDA plan (torch/CuPy), else None."""
    return None if plan.device == "cpu" else cuda_runtime.current_stream(data)


def _output(out, shape, dtype: np.dtype, like_shape, like=None) -> tuple[np.ndarray, object]:
    if cuda_runtime.is_cuda_array(out if out is not None else like):
        return cuda_runtime.output_like(out, shape, dtype, like_shape, like)
    if out is None:
        arr = output_pool.empty(shape, dtype)
        return arr, arr
    arr = to_numpy(out, "out")
    if arr.dtype != dtype:
        raise InvalidProblemError(f"out has dtype {arr.dtype}, expected {dtype}")
    if arr.size != shape[0] * shape[1] or arr.shape[-1:] != like_shape[-1:]:
        raise InvalidProblemError(f"out has shape {arr.shape}, expected {tuple(like_shape)}")
    if not arr.flags.c_contiguous:
        raise InvalidProblemError("out must be C-contiguous")
    return arr.reshape(shape), out


def _finish(result, user_out, like, shape):
    if user_out is not None:
        return user_out
    if not isinstance(result, np.ndarray):  # a CUDA array, already of the caller's kind
        return result.reshape(tuple(shape))
    return from_numpy_like(result.reshape(shape), like)


def _reading(storage) -> str:
    return (f"read as packed {storage.value} (two values a byte)" if storage.is_packed
            else f"read as {storage.value} (one value a byte)")


def _scale_shape_error(q_shape, s_shape, group_size, storage) -> InvalidProblemError | None:
    """The error for a ``scale`` whose shape does not fit ``q`` read as ``storage``, with a
    hint when it fits the other reading of q's bytes (packed 4-bit or one value a byte).

    Checked before the plan's own shape check, which would say only "scale has shape
    (64, 8), expected (64, 4)" for packed bytes given without ``int_dtype="u4"``.
    """
    rows, stored = q_shape
    axis = 2 * stored if storage.is_packed else stored
    if axis % group_size or tuple(s_shape) == (rows, axis // group_size):
        return None  # the descriptor names a bad group size; the shape fits
    other = 2 * stored if not storage.is_packed else stored
    if tuple(s_shape) != (rows, other // group_size) or other % group_size:
        return None  # no other reading fits: the plan's check names the shapes
    hint = ("did you mean int_dtype='u4' (or 's4'): two values a byte?" if not storage.is_packed
            else "q holds one value a byte? leave int_dtype out (q's own s8/u8)")
    return InvalidProblemError(
        f"scale has shape {tuple(s_shape)}, expected {(rows, axis // group_size)} for q of "
        f"shape {tuple(q_shape)} {_reading(storage)} in groups of {group_size}; {hint}")


_DEQUANTIZE_CALLS = call_memo.CallMemo()


def dequantize_per_group(q, scale, zero_point, group_size: int, out=None, device=None,
                         int_dtype=None, *, dtype=None):
    """``y = scale * (q - zero_point)`` per group of ``group_size`` along the last axis.

    The result has ``scale``'s dtype (f32, f64, f16 or bf16). ``q`` is s8/u8, or packed
    4-bit when ``int_dtype`` is ``"u4"``/``"s4"``: a uint8 array holding two values a
    byte (element 2k in the low nibble of byte k), so its last axis is half the output's.
    ``dtype`` is an alias of ``int_dtype`` (the name ``quantize_per_group`` took first).
    """
    key = call_memo.signature((q, scale, zero_point, out), (group_size, device, int_dtype, dtype))
    known = _DEQUANTIZE_CALLS.get(key)
    if known is not None:
        plan, shape, out_dtype = known
        y = out if out is not None else output_pool.empty(shape, out_dtype)
        try:
            plan.run(plans.DequantizePerGroupArgs(q, scale, zero_point, y))
            return y
        except DqgenError:
            pass  # not as remembered (strides, alignment, overlap): the full path says why
    if dtype is not None:
        int_dtype, name = _storage_argument(int_dtype, dtype, None)
    else:
        name = "int_dtype"
    given_int_dtype = int_dtype
    (q2, int_dtype), s2 = q_rows(q, "q", int_dtype), rows(scale, "scale")
    desc = _descriptor(_dequantize_descriptor, q2.shape[0], q2.shape[1], group_size, s2.dtype,
                       q2.dtype, int_dtype, name)
    outer, axis = desc.outer, desc.axis
    if s2.shape != (outer, desc.num_groups):
        error = _scale_shape_error(q2.shape, s2.shape, desc.group_size, desc.int_dtype)
        if error is not None and (desc.int_dtype.is_packed
                                  or str(q2.dtype).removeprefix("torch.") == "uint8"):
            raise error
    plan = plans.DequantizePerGroupPlan.select(desc, device=_where(q2, device))
    shape = (*shape_of(q)[:-1], axis)
    y, user_out = _output(out, (outer, axis), desc.float_dtype.np_dtype, shape, like=q2)
    zp2 = _zero_point(zero_point)
    plan.run(plans.DequantizePerGroupArgs(q2, s2, zp2, y),
             stream=_stream(plan, q2),
             caller={"input": ("q", q), "scale": ("scale", scale),
                     "zero_point": ("zero_point", zero_point), "output": ("out", out)})
    if (plan.device == "cpu" and q2 is q and s2 is scale and zp2 is zero_point
            and given_int_dtype == int_dtype and (out is None or out.shape == y.shape)):
        _DEQUANTIZE_CALLS.remember(key, (plan, (outer, axis), y.dtype))  # nothing converted
    return _finish(y, out, q, shape)


def quantize_per_group(x, scale, zero_point, group_size: int, int_dtype=None, q_min=None,
                       q_max=None, out=None, device=None, *, dtype=None):
    """``q = clamp(rint(x / scale) + zero_point, q_min, q_max)`` stored as ``int_dtype``.

    ``int_dtype`` is s8 (the default), u8, or packed ``u4``/``s4`` (a uint8 array of two
    values a byte, its last axis half of ``x``'s); ``dtype`` is its alias.
    """
    if dtype is None and int_dtype is None:
        int_dtype, name = "s8", "int_dtype"
    else:
        int_dtype, name = _storage_argument(int_dtype, dtype, "s8")
    x2, s2 = rows(x, "x"), rows(scale, "scale")
    outer, axis = x2.shape
    desc = _descriptor(_quantize_descriptor, outer, axis, group_size, x2.dtype, int_dtype, q_min,
                       q_max, name)
    plan = plans.QuantizePerGroupPlan.select(desc, device=_where(x2, device))
    storage_shape = desc.int_dtype.storage_shape(outer, axis)
    shape = (*shape_of(x)[:-1], storage_shape[1])
    q, _ = _output(out, storage_shape, desc.int_dtype.np_dtype, shape, like=x2)
    plan.run(plans.QuantizePerGroupArgs(x2, s2, _zero_point(zero_point), q),
             stream=_stream(plan, x2),
             caller={"input": ("x", x), "scale": ("scale", scale),
                     "zero_point": ("zero_point", zero_point), "output": ("out", out)})
    return _finish(q, out, x, shape)


def dequantize_per_group_backward(dy, scale, group_size: int, out=None, device=None):
    """Gradient of dequantize w.r.t. its input: ``dq = dy * scale`` per group."""
    dy2, s2 = rows(dy, "dy"), rows(scale, "scale")
    outer, axis = dy2.shape
    desc = _descriptor(_dequantize_backward_descriptor, outer, axis, group_size, dy2.dtype)
    plan = plans.DequantizePerGroupBackwardPlan.select(desc, device=_where(dy2, device))
    dq, _ = _output(out, (outer, axis), desc.float_dtype.np_dtype, shape_of(dy), like=dy2)
    plan.run(plans.DequantizePerGroupBackwardArgs(dy2, s2, dq), stream=_stream(plan, dy2),
             caller={"d_output": ("dy", dy), "scale": ("scale", scale), "d_input": ("out", out)})
    return _finish(dq, out, dy, shape_of(dy))


def quantize_per_group_backward(dy, x, scale, zero_point, group_size: int, q_min: int,
                                q_max: int, out=None, device=None):
    """Straight-through gradient of quantize: ``dy / scale`` where the value was in range."""
    dy2, x2, s2 = rows(dy, "dy"), rows(x, "x"), rows(scale, "scale")
    outer, axis = dy2.shape
    desc = _descriptor(_quantize_backward_descriptor, outer, axis, group_size, dy2.dtype, q_min,
                       q_max)
    plan = plans.QuantizePerGroupBackwardPlan.select(desc, device=_where(dy2, device))
    dx, _ = _output(out, (outer, axis), desc.float_dtype.np_dtype, shape_of(dy), like=dy2)
    plan.run(plans.QuantizePerGroupBackwardArgs(dy2, x2, s2, _zero_point(zero_point), dx),
             stream=_stream(plan, dy2),
             caller={"d_output": ("dy", dy), "input": ("x", x), "scale": ("scale", scale),
                     "zero_point": ("zero_point", zero_point), "d_input": ("out", out)})
    return _finish(dx, out, dy, shape_of(dy))


def _smallest_normal(float_dtype: DType) -> float:
    """torchao's floor for scales; ml_dtypes' finfo knows bf16 where numpy's may not."""
    return float(ml_dtypes.finfo(float_dtype.np_dtype).smallest_normal)


def _round_up(value: np.ndarray, float_dtype: DType) -> np.ndarray:
    """The smallest ``float_dtype`` value >= each positive ``value``.

    Rounding a scale down (to nearest, in a narrow dtype) would shrink the range it covers
    and saturate the group's extremes; one step up never does.
    """
    rounded = np.ascontiguousarray(value.astype(float_dtype.np_dtype))
    short = rounded.astype(value.dtype) < value
    bits = rounded.view(np.dtype(f"u{rounded.itemsize}"))
    bits[short] += 1  # positive floats: the next bit pattern is the next value up
    return rounded


def _zero_point_domain(value) -> str:
    """``"int"`` or ``"float"``; torchao's ``ZeroPointDomain.INT``/``.FLOAT`` by name."""
    name = str(getattr(value, "name", value)).lower()
    if name not in ZERO_POINT_DOMAINS:
        raise UnsupportedError(f"zero_point_domain={value!r} is not supported; expected one of: "
                               f"{', '.join(ZERO_POINT_DOMAINS)}")
    return name


def choose_qparams_per_group(x, group_size: int, int_dtype=None, symmetric: bool = False,
                             q_min=None, q_max=None, *, zero_point_domain="int", dtype=None):
    """Per-group ``(scale, zero_point)`` from min/max, as GPTQ and torchao compute them.

    ``int_dtype`` (alias ``dtype``): the storage the values are chosen for, s8 (default),
    u8, or packed u4/s4, whose range ``[q_min, q_max]`` defaults to.

    Asymmetric: the range ``[min(x, 0), max(x, 0)]`` maps onto ``[q_min, q_max]`` and the
    zero point, ``q_min - rint(min / scale)``, is clamped into ``[q_min, q_max]``.
    Symmetric: ``scale = max|x| / ((q_max - q_min) / 2)`` and the zero point is the
    range's middle. NaN and infinite values are ignored (quantize saturates infinities).
    Returns ``scale`` in ``x``'s dtype and ``zero_point`` as int32, both shaped
    ``[..., axis // group_size]``.

    ``scale`` is at least the smallest normal number of ``x``'s dtype, as torchao's floor:
    a constant group still quantizes, weights far below 1 keep their own steps (a floor
    of f32's epsilon would clamp every group under ~3e-5 and lose their values), and
    ``1 / scale`` stays finite for code that multiplies by it. (For f16 that floor is
    6.1e-5, so f16 groups narrower than ``6.1e-5 * (q_max - q_min)`` share it.)

    The quotient is computed in f32 (f64 for f64) and rounded *up* to ``x``'s dtype, where
    torchao rounds to nearest: a scale below the exact ``range / (q_max - q_min)`` covers
    less than the group, and its extreme value saturates, off by up to
    ``(q_max - q_min) * 2**-p`` steps more (``p`` significand bits: for bf16 and 8 bits
    almost a whole step, not half). Rounded up, every finite value of a group comes back
    within half a step. f32 and f64 scales need no rounding and equal torchao's.

    ``zero_point_domain="float"`` (torchao's ``ZeroPointDomain.FLOAT``, tinygemm; for
    ``formats.floatzp``): asymmetric only, and torchao's ``_choose_qparams_affine_tinygemm``
    bit for bit: in ``x``'s dtype F, ``scale = max(F(F(max - min) / (q_max - q_min)),
    smallest normal)`` over ``[min, max]`` of the group (0 need not be in it) and the float
    zero point ``F(min + F(scale * mid))``, ``mid = (q_max + q_min + 1) / 2``, both in F.
    Non-finite values are ignored here too (torchao's would be NaN).
    """
    arr = to_numpy(x, "x")
    float_dtype = _float_dtype(arr.dtype, "x")
    value, name = _storage_argument(int_dtype, dtype, "s8")
    storage = parse_dtype(value, name, STORAGE_DTYPES)
    lo, hi = resolve_q_range(q_min, q_max, *storage.int_range, storage.value)
    group_size = check_int(group_size, "group_size", minimum=1)
    domain = _zero_point_domain(zero_point_domain)
    if arr.ndim == 0 or arr.shape[-1] % group_size:
        raise InvalidProblemError(f"the last axis ({arr.shape[-1] if arr.ndim else 0}) is not a "
                                  f"multiple of group_size={group_size}")
    if domain == "float":
        if symmetric:
            raise UnsupportedError("zero_point_domain='float' is asymmetric (torchao's tinygemm "
                                   "rule); symmetric=True needs integer zero points")
        scale, zero = _float_zero_qparams(arr, group_size, float_dtype, lo, hi)
        return from_numpy_like(scale, x), from_numpy_like(zero, x)
    compute = np.float64 if float_dtype is DType.F64 else np.float32
    groups = arr.astype(compute).reshape(*arr.shape[:-1], arr.shape[-1] // group_size, group_size)
    finite = np.where(np.isfinite(groups), groups, 0)
    min_val = np.minimum(finite.min(axis=-1, initial=0), 0).astype(compute)
    max_val = np.maximum(finite.max(axis=-1, initial=0), 0).astype(compute)
    eps = compute(_smallest_normal(float_dtype))
    with np.errstate(all="ignore"):
        if symmetric:
            amax = np.maximum(-min_val, max_val)
            scale = _round_up(np.maximum(amax / compute((hi - lo) / 2), eps), float_dtype)
            zero = np.full(scale.shape, (hi + lo + 1) // 2, dtype=np.int64)
        else:
            scale = _round_up(np.maximum((max_val - min_val) / compute(hi - lo), eps), float_dtype)
            zero = lo - np.rint(min_val / scale.astype(compute))
            zero = np.clip(np.nan_to_num(zero, nan=lo), lo, hi).astype(np.int64)
    return (from_numpy_like(np.ascontiguousarray(scale), x),
            from_numpy_like(zero.astype(np.int32), x))


def _float_zero_qparams(arr: np.ndarray, group_size: int, float_dtype: DType, lo: int,
                        hi: int) -> tuple[np.ndarray, np.ndarray]:
    """torchao's tinygemm qparams, each operation rounded to F as torch computes it on F
    tensors: in f32 (f64 for f64) from F operands and Python scalars, then rounded."""
    f = float_dtype.np_dtype
    c = np.dtype(np.float64) if float_dtype is DType.F64 else np.dtype(np.float32)
    groups = arr.reshape(*arr.shape[:-1], arr.shape[-1] // group_size, group_size)
    finite = np.isfinite(groups)
    min_val = np.where(finite, groups, np.inf).min(axis=-1, initial=np.inf)
    max_val = np.where(finite, groups, -np.inf).max(axis=-1, initial=-np.inf)
    empty = ~finite.any(axis=-1)
    min_val = np.where(empty, 0, min_val).astype(f).astype(c)
    max_val = np.where(empty, 0, max_val).astype(f).astype(c)

    def rounded(value):
        return value.astype(f).astype(c)

    with np.errstate(all="ignore"):
        scale = rounded(rounded(max_val - min_val) / c.type(hi - lo))
        scale = np.maximum(scale, c.type(_smallest_normal(float_dtype)))
        zero = min_val + rounded(scale * c.type((hi + lo + 1) / 2))
    return np.ascontiguousarray(scale.astype(f)), np.ascontiguousarray(zero.astype(f))
