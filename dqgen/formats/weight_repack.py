"""GPTQ and AWQ layers as ``QuantizedWeight``s of the family, for the fused linear.

GPTQ and AWQ store the weight transposed (``[K, N]``, packed along K for GPTQ, along N
for AWQ), so their rows are not rows of ``W [N, K]``. Both are ``C(q - z) * C(s)`` in
groups along K, which is the family's dequantize (``QuantizedWeight.per_group``), so a
layer is repacked once, losslessly, with integer unpacking only: ``q [N, K]`` (u4 packed
for 4 bits, u8 for 2, 3 and 8), ``scale [N, K / g]`` (the checkpoint's scales widened to f32,
exactly) and ``zero_point [N, K / g]`` int32 (the zero point as the format's rule decodes
it: GPTQ v1/v2 and each v1 rule, ``layouts/gptq.py``; AWQ's interleaved order). The
repacked weight's f32 values are bit for bit what ``gptq.dequantize`` / ``awq.dequantize``
compute before their rounding to the output dtype.

Act-order GPTQ (``g_idx`` not in row order): K is sorted by group (stably), so each group
is a contiguous run of the stored columns, and the weight carries ``column_order``
(stored column ``j`` is W's column ``order[j]``) for ``linear`` to read x in that order.

``checkpoint_weights`` reads a GPTQ or AWQ checkpoint directory into such weights, one a
linear layer, as ``dqgen convert`` decides the format, bits, v1/v2 and v1 zero rule.
"""

from __future__ import annotations

import math
import sys

import ml_dtypes
import numpy as np

from ..errors import InvalidProblemError, UnsupportedError
from ..ir import (GPTQ_BITS, GPTQ_V1_ZEROS, DType,
                  GptqDequantizeDescriptor, check_int)
from ..layouts.awq import ORDER as AWQ_ORDER
from ..layouts.gptq import gptq_zeros
from ..layouts.matrix import run_values, unpack_along
from . import _inputs
from .gptq import infer_group_size, rows_of
from .weight import QuantizedWeight


# --- one layer ------------------------------------------------------------------------

def gptq_weight(qweight, qzeros, scales, g_idx=None, bits: int = 4,
                checkpoint_format: str = "gptq", group_size=None,
                v1_zeros: str = GPTQ_V1_ZEROS[0]) -> QuantizedWeight:
    """The GPTQ layer ``gptq.dequantize`` reads with the same arguments, as a weight
    ``[N, K]`` (its transpose) of the family: exact, act-order as ``column_order``."""
    bits = check_int(bits, "bits", minimum=0)
    if bits not in GPTQ_BITS:
        raise InvalidProblemError(f"bits={bits} is not supported for GPTQ; expected one of "
                                  f"{', '.join(map(str, GPTQ_BITS))}")
    qw = _host_words(qweight, "qweight")
    qz = _host_words(qzeros, "qzeros")
    sc, scale_dtype = _host_floats(scales)
    per = run_values(bits)                      # values in a whole number of words
    k, n = rows_of(qw.shape[0], bits), qw.shape[1]
    groups = sc.shape[0]
    _check_shape(sc, "scales", (groups, n), f"for GPTQ's qweight {qw.shape} [K * bits / 32, "
                 "N] (AWQ's qweight is [K, N / 8]: use awq_weight)")
    if n % per:
        words = "an int32 qzeros word holds" if per * bits == 32 else \
            f"{per * bits // 32} int32 qzeros words hold"
        raise InvalidProblemError(f"N={n} (qweight's columns) is not a multiple of {per}, the "
                                  f"{bits}-bit zero points {words}")
    _check_shape(qz, "qzeros", (groups, n * bits // 32), f"for {bits}-bit scales {sc.shape}")
    size = infer_group_size(k, groups, group_size, g_idx is not None)
    rows_group = (np.arange(k, dtype=np.int64) // size if g_idx is None else
                  _inputs.host(_inputs.group_index(g_idx, k, groups)).astype(np.int64))
    desc = GptqDequantizeDescriptor(k, n, size, bits, DType.F32, scale_dtype,
                                    checkpoint_format, False, v1_zeros)
    order, stored_group, step = _stored_groups(rows_group, size)
    if order is None and bits in (4, 8) and sys.byteorder == "little":
        # a word's bytes along K are the family's: 4 bits two a byte, low nibble first
        q = np.ascontiguousarray(qw.T).view(np.uint8)           # [N, K * bits / 8]
    else:
        q = _stored_values(_unpack_along_k(qw, bits), order, bits)
    zeros = gptq_zeros(desc, qz)                                # [groups, N], decoded
    return _family_weight(q, bits, zeros, sc, stored_group, step, order)


def awq_weight(qweight, qzeros, scales, group_size=None) -> QuantizedWeight:
    """The AWQ GEMM layer ``awq.dequantize`` reads with the same arguments, as a weight
    ``[N, K]`` (its transpose) of the family: exact."""
    qw = _host_words(qweight, "qweight")
    qz = _host_words(qzeros, "qzeros")
    sc, _ = _host_floats(scales)
    k, n = qw.shape[0], qw.shape[1] * 8
    groups = sc.shape[0]
    _check_shape(sc, "scales", (groups, n), f"for AWQ's qweight {qw.shape} [K, N / 8] "
                 "(GPTQ's qweight is [K * bits / 32, N]: use gptq_weight)")
    _check_shape(qz, "qzeros", (groups, n // 8), f"for scales {sc.shape}")
    size = infer_group_size(k, groups, group_size, act_order=False)
    if k % size:
        raise InvalidProblemError(f"K={k} is not a multiple of group_size={size}")
    q = _pack_u4(np.ascontiguousarray(_unpack_awq(qw).T))       # [N, K / 2]
    zeros = _unpack_awq(qz).astype(np.int64)                    # [groups, N]
    return _family_weight(q, 4, zeros, sc, np.arange(k, dtype=np.int64) // size, size, None)


def _host_words(obj, name: str) -> np.ndarray:
    """A host int32 ``[rows, words]`` array of packed words (uint32 viewed)."""
    return np.ascontiguousarray(_inputs.host(_inputs.words(obj, name)))


def _host_floats(obj):
    """The host scales ``[groups, N]`` and their dtype (f16, bf16 or f32)."""
    arr, dtype = _inputs.float_array(obj, "scales")
    return _inputs.host(arr), dtype


def _check_shape(arr: np.ndarray, name: str, want: tuple, why: str) -> None:
    if tuple(arr.shape) != tuple(want):
        raise InvalidProblemError(f"{name} has shape {tuple(arr.shape)}, expected "
                                  f"{tuple(want)} {why}")


def _unpack_along_k(qweight: np.ndarray, bits: int) -> np.ndarray:
    """GPTQ's ``[K * bits / 32, N]`` words -> ``[N, K]`` uint8 values (value ``j`` of a
    word at bit ``bits * j`` is row ``per * word + j``; 3 bits: value ``k`` at bit ``3 k``
    of each column's words read as one bit stream)."""
    if 32 % bits:
        return np.ascontiguousarray(unpack_along(qweight, bits, 0).T).astype(np.uint8)
    per, mask = 32 // bits, (1 << bits) - 1
    words = qweight.view(np.uint32).T                           # [N, K / per]
    out = np.empty((words.shape[0], words.shape[1] * per), np.uint8)
    for j in range(per):
        out[:, j::per] = (words >> np.uint32(bits * j)) & np.uint32(mask)
    return out


def _unpack_awq(words: np.ndarray) -> np.ndarray:
    """AWQ's ``[R, N / 8]`` words -> ``[R, N]`` uint8 values in column order (nibble
    ``i`` holds column ``AWQ_ORDER[i]`` of its eight)."""
    w = words.view(np.uint32)
    out = np.empty((w.shape[0], w.shape[1] * 8), np.uint8)
    for i, column in enumerate(AWQ_ORDER):
        out[:, column::8] = (w >> np.uint32(4 * i)) & np.uint32(15)
    return out


def _stored_groups(rows_group: np.ndarray, group_size: int):
    """``(order, stored_group, step)``: K sorted by group, stably (``order`` None when
    already so), each stored column's group, and the family's group size."""
    order = np.argsort(rows_group, kind="stable")
    stored_group = rows_group[order]
    step = _stored_group_size(stored_group, group_size)
    if np.array_equal(order, np.arange(order.size)):
        order = None
    return order, stored_group, step


def _stored_values(values: np.ndarray, order, bits: int) -> np.ndarray:
    """``values [N, K]`` (W's columns) in the stored column ``order``, as the family
    stores them (4 bits packed two a byte, else one a byte)."""
    if order is not None:
        values = values[:, order]
    return _pack_u4(values) if bits == 4 else values


def _family_weight(q: np.ndarray, bits: int, zeros: np.ndarray, scales: np.ndarray,
                   stored_group: np.ndarray, step: int, order) -> QuantizedWeight:
    """The family's weight of the stored values ``q``: stored group ``j`` (``step``
    columns, from ``stored_group[j * step]``) takes that group's row of the ``[groups,
    N]`` ``zeros`` and ``scales``; ``order`` becomes its ``column_order``."""
    first = stored_group[::step]
    scale = np.ascontiguousarray(scales[first].T).astype(np.float32)
    zero_point = np.ascontiguousarray(zeros[first].T).astype(np.int32)
    weight = QuantizedWeight.per_group(q, scale, zero_point, step, "u4" if bits == 4 else "u8")
    if order is None:
        return weight
    return QuantizedWeight(weight.descriptor, weight.arrays, weight.shape, column_order=order)


def _stored_group_size(stored_group: np.ndarray, group_size: int) -> int:
    """The family's group size for K sorted by group: ``group_size`` when every group has
    that many columns, or (a last group shorter, as GPTQ writes ``K`` not a multiple of
    it) the largest size dividing both; any other grouping is refused."""
    k = stored_group.size
    starts = np.flatnonzero(np.r_[True, stored_group[1:] != stored_group[:-1]])
    lengths = np.diff(np.r_[starts, k])
    uneven = np.flatnonzero(lengths[:-1] != group_size)
    if uneven.size or lengths[-1] > group_size:
        i = int(uneven[0]) if uneven.size else lengths.size - 1
        g = int(stored_group[starts[i]])
        raise UnsupportedError(
            f"g_idx puts {int(lengths[i])} columns in group {g}; the fused linear reads GPTQ "
            f"whose groups are all group_size={group_size} columns long (a shorter last "
            "group only); dequantize this layer instead")
    return math.gcd(group_size, k)


def _pack_u4(values: np.ndarray) -> np.ndarray:
    """``[N, K]`` values < 16 -> ``[N, K / 2]`` bytes, column ``2i`` in the low nibble."""
    return (values[:, 0::2] | (values[:, 1::2] << 4)).astype(np.uint8)


# --- a checkpoint directory -----------------------------------------------------------

def checkpoint_weights(path) -> dict:
    """Every quantized linear layer of the GPTQ or AWQ checkpoint ``path`` (a directory,
    an index or a ``.safetensors`` file, with its config) as ``{module name:
    (QuantizedWeight, bias or None)}``: the layer ``P.qweight, P.qzeros, P.scales
    (, P.g_idx)`` is module ``P``, its ``P.bias`` (widened to f32, exactly) the bias."""
    from .checkpoint import open_checkpoint, v1_zeros_rule
    from .convert import Tensors, find_layers, gptq_bits, gptq_version, layer_format
    ckpt = open_checkpoint(path)
    quant = ckpt.quant
    if quant.method not in (None, "gptq", "awq"):
        raise UnsupportedError(f"{path}: quant_method={quant.method!r}; quantize_model reads "
                               "GPTQ and AWQ checkpoints (and GGUF files)")
    tensors = Tensors(ckpt)
    metadata = tensors.readers[0].metadata if tensors.readers else {}
    try:
        version = gptq_version(quant, metadata)
    except InvalidProblemError as exc:
        raise InvalidProblemError(f"{path}: {exc}") from None
    v1_zeros, _ = v1_zeros_rule(quant, metadata)
    said_by = f"{quant.source}: quant_method"
    weights = {}
    for prefix, parts in find_layers(tensors, quant.method).items():
        get = tensors.array
        try:
            if layer_format(tensors, parts, quant.method, said_by) == "gptq":
                bits = gptq_bits(tensors, parts, quant.bits, "the config should say bits")
                weight = gptq_weight(
                    get(parts["qweight"]), get(parts["qzeros"]), get(parts["scales"]),
                    get(parts["g_idx"]) if "g_idx" in parts else None, bits=bits,
                    checkpoint_format=version, group_size=quant.group_size,
                    v1_zeros=v1_zeros)
            else:
                weight = awq_weight(get(parts["qweight"]), get(parts["qzeros"]),
                                    get(parts["scales"]), group_size=quant.group_size)
        except (InvalidProblemError, UnsupportedError) as exc:
            raise type(exc)(f"{path}: layer {prefix or '(top level)'}: {exc}") from None
        bias = f"{prefix}.bias"
        weights[prefix] = (weight, _bias(get(bias), bias, weight.shape[0])
                           if bias in tensors.entries else None)
    return weights


_BIAS_DTYPES = {np.dtype(np.float16), np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16)}


def _bias(arr: np.ndarray, name: str, n: int) -> np.ndarray:
    """The bias widened to f32 (exact from f16, bf16 and f32)."""
    if arr.shape != (n,) or arr.dtype not in _BIAS_DTYPES:
        raise InvalidProblemError(f"{name} is {arr.dtype} {tuple(arr.shape)}; the layer's "
                                  f"bias must be a float vector of its {n} outputs")
    return np.asarray(arr, np.float32)
