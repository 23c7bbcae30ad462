"""compressed-tensors checkpoints (llm-compressor, vLLM's default), integer formats:
``pack-quantized`` (1- to 8-bit values offset by 2^(bits-1), a dense bit stream of int32
words a row, zero points packed along N, act-order ``weight_g_idx``) and
``int-quantized``/``naive-quantized`` (int8), and the FP4 formats ``nvfp4-pack-quantized``
and ``mxfp4-pack-quantized``.

``W = F(F(F(q) - F(z)) * s)`` in the scale's dtype ``F``, as the library's own dequantize
computes it; for integers of up to 8 bits the difference is exact, so this is the family's
``F(C(q - z) * C(s))`` (SPEC.md §3) and runs its kernels: a 4-bit row of words (K even) is
packed u4 bytes (value 2k in the low nibble of byte k), an 8-bit one u8 bytes, and the
stored offset goes into the zero point; other widths (and odd K at 4 bits) are unpacked on
the host into u8 values (integer shifts only, so exact). Act-order layers are read with
K sorted by group (stably), as the library's dequantize sorts them, and the output put
back in column order. Group, channel (``[N, 1]``) and tensor scales.

The FP4 formats (``dequantize_nvfp4``, ``dequantize_mxfp4``) run the FP4 kernels
(``layouts/fp4.py``): uint8 pairs of e2m1 values, an E4M3 scale a block of 16 divided by
the global scale, or an E8M0 scale a block of 32.
"""

from __future__ import annotations

import numpy as np

from .. import api
from ..arrays import from_numpy_like, is_torch, to_numpy
from ..errors import InvalidProblemError, UnsupportedError
from ..ir import check_int
from . import _inputs, fp4
from .weight import QuantizedWeight

PACKED_BITS = (1, 2, 3, 4, 5, 6, 7, 8)


def _shape(weight_shape) -> tuple[int, int]:
    if is_torch(weight_shape) or isinstance(weight_shape, np.ndarray):
        weight_shape = [int(v) for v in to_numpy(weight_shape.cpu() if is_torch(weight_shape)
                                                 else weight_shape, "weight_shape").reshape(-1)]
    try:
        n, k = (check_int(v, "weight_shape") for v in weight_shape)
    except (TypeError, ValueError):
        raise InvalidProblemError(f"weight_shape={weight_shape!r} is not [N, K]") from None
    return n, k


def _grouped(obj, name: str, n: int, k: int):
    """A per-group array (``weight_scale``, an unpacked ``weight_zero_point``) as ``[N,
    groups]`` (a tensor's one value, or a channel's [N, 1] / [N], repeated as needed) and
    the group size it implies."""
    given = tuple(_inputs.shape_of(obj))
    count = int(np.prod(given))
    if count == 1:
        arr = _inputs.reshaped(_inputs.array(obj, name, len(given)), (1, 1))
        return (np.repeat(arr, n, axis=0) if isinstance(arr, np.ndarray)
                else arr.expand(n, 1).contiguous()), k
    if given in ((n,), (n, 1)):
        return _inputs.reshaped(_inputs.array(obj, name, len(given)), (n, 1)), k
    if len(given) == 2 and given[0] == n and k % given[1] == 0:
        return _inputs.array(obj, name, 2), k // given[1]
    raise InvalidProblemError(f"{name} has shape {given}: expected one value, [{n}, 1] or "
                              f"[{n}, groups] with the groups dividing K={k}")


def dense_words(count: int, bits: int) -> int:
    """int32 words a row of ``count`` values takes in the dense stream."""
    return -(-count * bits // 32)


def padded_words(count: int, bits: int) -> int:
    """int32 words the layout before compressed-tensors 0.18 took: ``32 // bits`` values a
    word, the top ``32 % bits`` bits unused (the same as the dense stream for 1, 2, 4 and
    8 bits)."""
    return -(-count // (32 // bits))


def _check_words(words, name: str, bits: int, rows: int, count: int, packed_dim: str,
                 shape: tuple[int, int]) -> None:
    """``words`` is int32 ``shape``; the older padded layout is named, not misread."""
    got_dtype, got = _inputs.dtype_of(words), tuple(_inputs.shape_of(words))
    if got_dtype == np.int32 and got == shape:
        return
    older = (shape[0], padded_words(count, bits)) if packed_dim == "K" else \
        (padded_words(count, bits), shape[1])
    if got_dtype == np.int32 and got == older:
        raise UnsupportedError(
            f"{name} has shape {got}: {bits}-bit values {32 // bits} to a word, the layout "
            "compressed-tensors wrote before 0.18; dqgen reads the dense bit stream (0.18 "
            f"and later), {list(shape)} words here")
    raise InvalidProblemError(f"{name} has dtype {got_dtype} and shape {got}; expected "
                              f"int32 {list(shape)} ({rows} rows of {count} {bits}-bit values "
                              f"packed along {packed_dim})")


def unpack_rows(words: np.ndarray, bits: int, count: int) -> np.ndarray:
    """The first ``count`` stored (offset) values of each row of int32 ``words``, a dense
    stream least significant bits first, as uint8 ``[rows, count]``: every 8 values fill
    ``bits`` bytes exactly, so value ``j`` of a run is byte ``j * bits // 8`` shifted right
    by ``j * bits % 8``, with the next byte's low bits where it straddles."""
    rows = words.shape[0]
    runs = -(-count // 8)
    data = np.ascontiguousarray(words, dtype="<i4").view(np.uint8).reshape(rows, -1)
    need = runs * bits
    if data.shape[1] < need:  # the last run's missing bytes are the stream's zero padding
        data = np.pad(data, ((0, 0), (0, need - data.shape[1])))
    data = data[:, :need].reshape(rows, runs, bits)
    out = np.empty((rows, runs, 8), np.uint8)
    mask = np.uint8((1 << bits) - 1)
    for j in range(8):
        byte, shift = divmod(j * bits, 8)
        value = data[:, :, byte] >> np.uint8(shift)
        if shift + bits > 8:
            value |= data[:, :, byte + 1] << np.uint8(8 - shift)
        out[:, :, j] = value & mask
    out = out.reshape(rows, runs * 8)
    return out if runs * 8 == count else np.ascontiguousarray(out[:, :count])


def _zero_points(zero_point, bits: int, n: int, groups: int, group: int, k: int):
    """The zero points as the kernel subtracts them (offset by ``2^(bits-1)``, as the
    values are), int32 ``[N, groups]``: packed int32 words along N (group and channel
    strategies), an int8 tensor's one value as stored (tensor strategy), or the offset
    itself for a symmetric layer."""
    offset = 1 << (bits - 1)
    if zero_point is None:
        return np.full((n, groups), offset, np.int32)
    if str(getattr(zero_point, "dtype", "")).removeprefix("torch.") == "int8":  # unpacked
        zp, zp_group = _grouped(zero_point, "weight_zero_point", n, k)
        if zp_group != group:
            raise InvalidProblemError(f"weight_zero_point's groups ({k // zp_group}) are not "
                                      f"weight_scale's ({groups})")
        return _inputs.host(zp).astype(np.int32) + offset
    words = _inputs.array(zero_point, "weight_zero_point", 2)
    _check_words(words, "weight_zero_point", bits, groups, n, "N",
                 (dense_words(n, bits), groups))
    return unpack_rows(_inputs.host(words).T, bits, n).T.astype(np.int32)


def _act_order(g_idx, k: int, groups: int, group: int):
    """The stable sort of K by group that makes an act-order layer's groups contiguous, or
    None (no ``g_idx``, or one the library reads as column order: holding a -1, never
    filled in). The library reshapes the sorted columns into groups of ``K / groups``, so
    each group must hold that many columns for ``g_idx[k]`` to be column k's group."""
    if g_idx is None:
        return None
    idx = _inputs.host(_inputs.array(g_idx, "weight_g_idx", 1))
    if idx.dtype.kind not in "iu" or idx.shape != (k,):
        raise InvalidProblemError(f"weight_g_idx has dtype {idx.dtype} and shape {idx.shape}; "
                                  f"expected an integer [{k}], one group a column")
    if (idx == -1).any():
        return None
    bad = np.flatnonzero((idx < 0) | (idx >= groups))
    if bad.size:
        raise InvalidProblemError(f"weight_g_idx[{int(bad[0])}]={int(idx[bad[0]])} is out of "
                                  f"range [0, {groups}) ({groups} groups in weight_scale)")
    sizes = np.bincount(idx, minlength=groups)
    uneven = np.flatnonzero(sizes != group)
    if uneven.size:
        g = int(uneven[0])
        raise InvalidProblemError(f"weight_g_idx puts {int(sizes[g])} columns in group {g}; "
                                  f"every group holds K / groups = {group}")
    return np.argsort(idx, kind="stable")


def dequantize_packed(weight_packed, weight_scale, weight_shape, weight_zero_point=None,
                      num_bits: int = 4, device=None, out=None, weight_g_idx=None):
    """``pack-quantized``: ``weight_packed`` int32 ``[N, ceil(K * bits / 32)]`` to a ``[N,
    K]`` weight of ``weight_scale``'s dtype, bit for bit what the library's
    ``PackedQuantizationCompressor.decompress`` gives, for 1 to 8 bits.
    ``weight_zero_point`` (packed along N) for asymmetric schemes; without it the values
    are symmetric. ``weight_g_idx`` (act-order, written up to compressed-tensors 0.18):
    column k's group is ``weight_g_idx[k]``."""
    q, int_dtype, scale, zp, group, order = _family_arrays(
        weight_packed, weight_scale, weight_shape, weight_zero_point, num_bits, weight_g_idx)
    if not isinstance(scale, np.ndarray):  # a CUDA scale: the integers go to its device
        import torch
        zp = torch.from_numpy(zp).to(scale.device)
        if isinstance(q, np.ndarray):
            q = torch.from_numpy(q).to(scale.device)
    if order is None:
        return _like(api.dequantize_per_group(q, scale, zp, group, out=out, device=device,
                                              int_dtype=int_dtype), weight_packed, out)
    sorted_w = api.dequantize_per_group(q, scale, zp, group, out=out, device=device,
                                        int_dtype="u8")
    return _like(_to_column_order(sorted_w, order), weight_packed, out)


def packed_weight(weight_packed, weight_scale, weight_shape, weight_zero_point=None,
                  num_bits: int = 4, weight_g_idx=None) -> QuantizedWeight:
    """The ``pack-quantized`` layer ``dequantize_packed`` reads, as a ``QuantizedWeight``
    for the fused linear: the family's ``C(q - zero_point) * C(scale)`` (its values
    before the rounding to the scale's dtype), act-order as a column order."""
    q, int_dtype, scale, zp, group, order = _family_arrays(
        weight_packed, weight_scale, weight_shape, weight_zero_point, num_bits, weight_g_idx)
    if not isinstance(scale, np.ndarray):
        raise UnsupportedError("weight_scale is a CUDA array; the fused linear's readers take "
                               "host arrays (tensor.cpu())")
    weight = QuantizedWeight.per_group(_inputs.host(q), scale, zp, group, int_dtype)
    return weight if order is None else QuantizedWeight(weight.descriptor, weight.arrays,
                                                        weight.shape, order)


def _family_arrays(weight_packed, weight_scale, weight_shape, weight_zero_point, num_bits,
                   weight_g_idx):
    """The family's arrays of a pack-quantized layer: q (packed u4 or u8, read in place
    where the words are those bytes, else unpacked; sorted by group for act-order), its
    storage dtype, the scale and int32 zero points ``[N, K / G]``, G, and the column
    order (None: columns in order)."""
    bits = check_int(num_bits, "num_bits", minimum=1)
    if bits not in PACKED_BITS:
        raise UnsupportedError(f"num_bits={bits}: pack-quantized values are 1 to 8 bits")
    n, k = _shape(weight_shape)
    words = _inputs.array(weight_packed, "weight_packed", 2)
    _check_words(words, "weight_packed", bits, n, k, "K", (n, dense_words(k, bits)))
    scale, group = _grouped(weight_scale, "weight_scale", n, k)
    groups = k // group
    order = _act_order(weight_g_idx, k, groups, group)
    zp = _zero_points(weight_zero_point, bits, n, groups, group, k)
    if order is None and (bits == 8 or (bits == 4 and k % 2 == 0)):
        q = _inputs.view_as(words, np.dtype(np.uint8), "weight_packed")[:, :k * bits // 8]
        return q, ("u4" if bits == 4 else "u8"), scale, zp, group, None
    q = unpack_rows(_inputs.host(words), bits, k)
    if order is not None:
        q = np.take(q, order, axis=1)
    return q, "u8", scale, zp, group, order


def _to_column_order(w, order: np.ndarray):
    """``w`` (columns sorted by group, as the kernel wrote them) put back in column order,
    in place: column ``order[i]`` is sorted column ``i``."""
    back = np.argsort(order)
    if isinstance(w, np.ndarray):
        np.take(w.copy(), back, axis=1, out=w)
        return w
    import torch
    w.copy_(w.index_select(1, torch.from_numpy(back).to(w.device)))
    return w


def dequantize_int8(weight, weight_scale, weight_zero_point=None, device=None, out=None):
    """``int-quantized`` / ``naive-quantized``: int8 ``weight`` ``[N, K]`` (values as they
    are), its scale and optional int8 zero point, to ``weight_scale``'s dtype."""
    w, scale, zp, group = _int8_arrays(weight, weight_scale, weight_zero_point)
    return _like(api.dequantize_per_group(w, scale, zp, group, out=out, device=device,
                                          int_dtype="s8"), weight, out)


def int8_weight(weight, weight_scale, weight_zero_point=None) -> QuantizedWeight:
    """The ``int-quantized`` layer ``dequantize_int8`` reads, as a ``QuantizedWeight`` for
    the fused linear (the family's s8 values)."""
    w, scale, zp, group = _int8_arrays(weight, weight_scale, weight_zero_point)
    if not isinstance(scale, np.ndarray):
        raise UnsupportedError("weight_scale is a CUDA array; the fused linear's readers take "
                               "host arrays (tensor.cpu())")
    return QuantizedWeight.per_group(_inputs.host(w), scale, _inputs.host(zp).astype(np.int32),
                                     group, "s8")


def _int8_arrays(weight, weight_scale, weight_zero_point):
    """The family's arrays of an int-quantized layer: int8 values, scale, zero points, G."""
    w = _inputs.array(weight, "weight", 2)
    if _inputs.dtype_of(w) != np.int8:
        raise InvalidProblemError(f"weight has dtype {_inputs.dtype_of(w)}; int-quantized "
                                  "weights are int8")
    n, k = tuple(_inputs.shape_of(w))
    scale, group = _grouped(weight_scale, "weight_scale", n, k)
    if weight_zero_point is None:
        zp = np.zeros((n, k // group), np.int32)
        if not isinstance(scale, np.ndarray):
            import torch
            zp = torch.from_numpy(zp).to(scale.device)
    else:
        zp, zp_group = _grouped(weight_zero_point, "weight_zero_point", n, k)
        if zp_group != group:
            raise InvalidProblemError(f"weight_zero_point's groups ({k // zp_group}) are not "
                                      f"weight_scale's ({k // group})")
    return w, scale, zp, group


def dequantize_nvfp4(weight_packed, weight_scale, weight_global_scale, dtype="bf16",
                     device=None, out=None):
    """``nvfp4-pack-quantized``: ``weight_packed`` uint8 ``[N, K / 2]`` (two e2m1 values a
    byte, value ``2k`` in the low nibble of byte ``k``), ``weight_scale`` float8_e4m3fn
    ``[N, K / 16]``, ``weight_global_scale`` f32 (one value) to ``[N, K]`` of ``dtype``:
    ``F(e2m1 * (scale / global_scale))`` in f32, the global scale dividing; bit for bit
    what ``NVFP4PackedCompressor.decompress`` gives (bf16, the default)."""
    return fp4.dequantize_fp4_rows(weight_packed, weight_scale, weight_global_scale, "nvfp4",
                                   "compressed-tensors", dtype, device, out,
                                   names=("weight_packed", "weight_scale",
                                          "weight_global_scale"))


def dequantize_mxfp4(weight_packed, weight_scale, dtype="bf16", device=None, out=None):
    """``mxfp4-pack-quantized``: ``weight_packed`` uint8 ``[N, K / 2]``, ``weight_scale``
    uint8 ``[N, K / 32]`` (E8M0: ``2.0 ** (s - 127)``, code 255 an infinity) to ``[N, K]``
    of ``dtype``; bit for bit what ``MXFP4PackedCompressor.decompress`` gives (bf16, the
    default)."""
    return fp4.dequantize_fp4_rows(weight_packed, weight_scale, None, "mxfp4",
                                   "compressed-tensors", dtype, device, out,
                                   names=("weight_packed", "weight_scale", "weight_global_scale"))


def _like(result, given, out):
    """The result as the kind of array the caller passed (torch in, torch out)."""
    if out is not None or not isinstance(result, np.ndarray):
        return out if out is not None else result
    return from_numpy_like(result, given)
