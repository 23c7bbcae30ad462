"""compressed-tensors checkpoints (llm-compressor, vLLM's default), integer formats:
``pack-quantized`` (4- or 8-bit values offset by 2^(bits-1), a dense bit stream of int32
words a row, zero points packed along N) and ``int-quantized``/``naive-quantized`` (int8),
and the FP4 formats ``nvfp4-pack-quantized`` and ``mxfp4-pack-quantized``.

``W = F(F(F(q) - F(z)) * s)`` in the scale's dtype ``F``, as the library's own dequantize
computes it; for 4- and 8-bit integers the difference is exact, so this is the family's
``F(C(q - z) * C(s))`` (SPEC.md §3) and runs its kernels: a 4-bit row of words is packed
u4 bytes (value 2k in the low nibble of byte k), an 8-bit one u8 bytes, and the stored
offset goes into the zero point. Group, channel (``[N, 1]``) and tensor scales.

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

PACKED_BITS = (4, 8)


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


def _unpack_zero_points(packed, bits: int, n: int, groups: int) -> np.ndarray:
    """The stored (offset) zero points: int32 words packed along N, a dense bit stream a
    column, least significant bits first."""
    words = to_numpy(packed.cpu() if is_torch(packed) else packed, "weight_zero_point")
    if words.dtype != np.int32 or words.ndim != 2 or words.shape[1] != groups:
        raise InvalidProblemError(f"weight_zero_point has dtype {words.dtype} and shape "
                                  f"{words.shape}; expected int32 [ceil(N * {bits} / 32), "
                                  f"{groups}]")
    stream = (words.view(np.uint32).astype(np.uint64)[:, None, :] >>
              np.arange(32, dtype=np.uint64)[None, :, None]) & 1        # [W, 32, groups]
    stream = stream.reshape(-1, groups)
    if stream.shape[0] < n * bits:
        raise InvalidProblemError(f"weight_zero_point holds {stream.shape[0] // bits} zero "
                                  f"points a group, fewer than N={n}")
    fields = stream[:n * bits].reshape(n, bits, groups)
    return (fields << np.arange(bits, dtype=np.uint64)[None, :, None]).sum(axis=1).astype(np.int32)


def dequantize_packed(weight_packed, weight_scale, weight_shape, weight_zero_point=None,
                      num_bits: int = 4, device=None, out=None):
    """``pack-quantized``: ``weight_packed`` int32 ``[N, ceil(K * bits / 32)]`` to a ``[N,
    K]`` weight of ``weight_scale``'s dtype, bit for bit what the library's
    ``PackedQuantizationCompressor.decompress`` gives. ``weight_zero_point`` (packed along
    N) for asymmetric schemes; without it the values are symmetric."""
    bits = check_int(num_bits, "num_bits", minimum=1)
    if bits not in PACKED_BITS:
        raise UnsupportedError(f"num_bits={bits}: dqgen reads 4- and 8-bit pack-quantized "
                               "weights")
    n, k = _shape(weight_shape)
    words = _inputs.array(weight_packed, "weight_packed", 2)
    if _inputs.dtype_of(words) != np.int32 or tuple(_inputs.shape_of(words)) != (n, -(-k * bits // 32)):
        raise InvalidProblemError(f"weight_packed has dtype {_inputs.dtype_of(words)} and shape "
                                  f"{tuple(_inputs.shape_of(words))}; expected int32 "
                                  f"[{n}, {-(-k * bits // 32)}] for weight_shape [{n}, {k}]")
    if bits == 4 and k % 2:
        raise UnsupportedError(f"K={k} is odd: a 4-bit row would end mid-byte")
    q = _inputs.view_as(words, np.dtype(np.uint8), "weight_packed")[:, :k * bits // 8]
    scale, group = _grouped(weight_scale, "weight_scale", n, k)
    offset = 1 << (bits - 1)
    groups = k // group
    zp = (np.full((n, groups), offset, np.int32) if weight_zero_point is None
          else _unpack_zero_points(weight_zero_point, bits, n, groups))
    if not isinstance(scale, np.ndarray):  # a CUDA scale: the zero points go to its device
        import torch
        zp = torch.from_numpy(zp).to(scale.device)
    return _like(api.dequantize_per_group(q, scale, zp, group, out=out, device=device,
                                          int_dtype="u4" if bits == 4 else "u8"),
                 weight_packed, out)


def dequantize_int8(weight, weight_scale, weight_zero_point=None, device=None, out=None):
    """``int-quantized`` / ``naive-quantized``: int8 ``weight`` ``[N, K]`` (values as they
    are), its scale and optional int8 zero point, to ``weight_scale``'s dtype."""
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
    return _like(api.dequantize_per_group(w, scale, zp, group, out=out, device=device,
                                          int_dtype="s8"), weight, out)


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
