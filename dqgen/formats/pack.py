"""Writing the checkpoint layouts: pack integer values into GPTQ/AWQ int32 words, and
quantize a float weight into a layer of either format with dqgen's own quantizer.

Packing is plain numpy bit arithmetic (it runs once per checkpoint); quantization uses
the family's kernels (``choose_qparams_per_group`` + ``quantize_per_group``).
"""

from __future__ import annotations

import numpy as np

from ..api import choose_qparams_per_group, quantize_per_group
from ..errors import InvalidProblemError
from ..ir import GPTQ_BITS, GPTQ_CHECKPOINT_FORMATS, GPTQ_V1_ZEROS, gptq_v1_word_offset
from .awq import INVERSE


def _check_values(arr: np.ndarray, name: str, bits: int) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.ndim != 2 or arr.dtype.kind not in "iu":
        raise InvalidProblemError(f"{name} must be a 2-D integer array, got {arr.dtype} {arr.shape}")
    if arr.size and (arr.min() < 0 or arr.max() >= 1 << bits):
        raise InvalidProblemError(f"{name} has values outside [0, {(1 << bits) - 1}]")
    return arr.astype(np.uint32)


def _pack_words(values: np.ndarray, bits: int, axis: int, slots) -> np.ndarray:
    """Pack ``values`` (uint32) along ``axis`` into int32 words, value j of a word's run
    going to slot ``slots[j]`` (bit offset ``bits * slots[j]``)."""
    per = 32 // bits
    if values.shape[axis] % per:
        raise InvalidProblemError(f"axis {axis} has {values.shape[axis]} values, not a multiple "
                                  f"of {per} (the values an int32 word holds)")
    moved = np.moveaxis(values, axis, -1)
    runs = moved.reshape(*moved.shape[:-1], -1, per)
    words = np.zeros(runs.shape[:-1], dtype=np.uint32)
    for j in range(per):
        words |= runs[..., j] << np.uint32(bits * slots[j])
    return np.moveaxis(words, -1, axis).view(np.int32).copy()


def _pack_runs(values: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """Pack ``values`` (uint32) along ``axis`` as one little-endian bit stream a run of
    ``bits`` int32 words: value ``i`` at bit ``bits * i``, straddling two words where it
    must (GPTQ's 3 bits: 32 values in three words)."""
    if values.shape[axis] % 32:
        raise InvalidProblemError(f"axis {axis} has {values.shape[axis]} values, not a "
                                  f"multiple of 32 (the {bits}-bit values {bits} int32 words "
                                  "hold)")
    moved = np.moveaxis(values, axis, -1).astype(np.uint64)
    words = np.zeros((*moved.shape[:-1], moved.shape[-1] * bits // 32), np.uint64)
    for i in range(moved.shape[-1]):
        first = bits * i
        words[..., first // 32] |= (moved[..., i] << np.uint64(first % 32)) & np.uint64(0xFFFFFFFF)
        if first % 32 + bits > 32:
            words[..., first // 32 + 1] |= moved[..., i] >> np.uint64(32 - first % 32)
    return np.moveaxis(words.astype(np.uint32), -1, axis).view(np.int32).copy()


def pack_gptq(q, zeros, bits: int = 4, checkpoint_format: str = "gptq",
              v1_zeros: str = GPTQ_V1_ZEROS[0]):
    """``(qweight, qzeros)`` for values ``q`` [K, N] and true zero points [groups, N].

    v1 (``"gptq"``) stores ``zero - 1`` as ``v1_zeros`` says: ``"gptqmodel"`` (default)
    packs the zero points and subtracts ``gptq_v1_word_offset(bits)`` from each whole word
    (borrows crossing fields), as GPTQModel exports v1, so every zero point is stored;
    ``"autogptq"`` and ``"exllama"`` subtract 1 from each field, as AutoGPTQ packs (for
    its own and the exllama kernels), and cannot hold a zero point of 0.
    """
    if bits not in GPTQ_BITS or checkpoint_format not in GPTQ_CHECKPOINT_FORMATS:
        raise InvalidProblemError(f"bits={bits}, checkpoint_format={checkpoint_format!r} "
                                  "is not a GPTQ layout")
    if v1_zeros not in GPTQ_V1_ZEROS:
        raise InvalidProblemError(f"v1_zeros={v1_zeros!r} is not one of "
                                  f"{', '.join(GPTQ_V1_ZEROS)}")
    q = _check_values(q, "q", bits)
    if 32 % bits:  # 3 bits: every tool's v1 is field by field; GPTQModel's modulo 2^bits
        v1 = checkpoint_format == "gptq"
        z = np.asarray(zeros).astype(np.int64) - v1
        if v1 and v1_zeros == "gptqmodel":
            z %= 1 << bits
        elif v1 and z.size and z.min() < 0:
            raise InvalidProblemError(f"v1_zeros={v1_zeros!r} stores zero - 1 in each field "
                                      "and cannot hold a zero point of 0; use "
                                      "v1_zeros='gptqmodel' or checkpoint_format='gptq_v2'")
        return (_pack_runs(q, bits, 0),
                _pack_runs(_check_values(z, "zeros - 1" if v1 else "zeros", bits), bits, 1))
    order = range(32 // bits)
    field_wise = checkpoint_format == "gptq" and v1_zeros != "gptqmodel"
    z = np.asarray(zeros).astype(np.int64) - field_wise
    if field_wise and z.size and z.min() < 0:
        raise InvalidProblemError(f"v1_zeros={v1_zeros!r} stores zero - 1 in each field and "
                                  "cannot hold a zero point of 0; use v1_zeros='gptqmodel' or "
                                  "checkpoint_format='gptq_v2'")
    qzeros = _pack_words(_check_values(z, "zeros - 1" if field_wise else "zeros", bits),
                         bits, 1, order)
    if checkpoint_format == "gptq" and not field_wise:
        qzeros = (qzeros.view(np.uint32) - np.uint32(gptq_v1_word_offset(bits))).view(np.int32)
    return _pack_words(q, bits, 0, order), qzeros


def pack_awq(q, zeros):
    """``(qweight, qzeros)`` for 4-bit values ``q`` [K, N] and zero points [groups, N]."""
    return (_pack_words(_check_values(q, "q", 4), 4, 1, INVERSE),
            _pack_words(_check_values(zeros, "zeros", 4), 4, 1, INVERSE))


def _quantize_rows(weight_t: np.ndarray, group_size: int, bits: int, scale_dtype, min_zero: int):
    """Quantize ``weight_t`` [N, K] in groups along K: (q, scales, zeros), all [.., N]-first."""
    hi = (1 << bits) - 1
    scale, zero = choose_qparams_per_group(weight_t, group_size, dtype="u8", q_min=0, q_max=hi)
    scale = scale.astype(scale_dtype)
    zero = np.maximum(zero, min_zero).astype(np.int32)
    q = quantize_per_group(weight_t.astype(np.float32), scale.astype(np.float32), zero,
                           group_size, dtype="u8", q_min=0, q_max=hi)
    return q, scale, zero


def quantize_gptq(weight, group_size: int, bits: int = 4, perm=None,
                  checkpoint_format: str = "gptq", scale_dtype=np.float16,
                  v1_zeros: str = GPTQ_V1_ZEROS[0]):
    """Quantize a float ``weight`` [K, N] into a GPTQ layer (min/max, asymmetric).

    ``perm`` (a permutation of K) gives act-order: rows ``perm[i * G:(i + 1) * G]`` form
    group ``i``. ``v1_zeros`` as in ``pack_gptq`` (the field-wise rules clamp zero points
    to at least 1). Returns ``dict(qweight, qzeros, scales, g_idx)``.
    """
    w = np.asarray(weight, dtype=np.float32)
    rows, cols = w.shape
    order = np.arange(rows) if perm is None else np.asarray(perm)
    if sorted(order.tolist()) != list(range(rows)):
        raise InvalidProblemError("perm must be a permutation of range(K)")
    if rows % group_size:
        raise InvalidProblemError(f"K={rows} is not a multiple of group_size={group_size}")
    min_zero = 1 if checkpoint_format == "gptq" and v1_zeros != "gptqmodel" else 0
    q_perm, scale, zero = _quantize_rows(np.ascontiguousarray(w[order].T), group_size, bits,
                                         scale_dtype, min_zero)
    q = np.empty((rows, cols), dtype=np.uint8)
    q[order] = q_perm.T
    g_idx = np.empty(rows, dtype=np.int32)
    g_idx[order] = np.arange(rows) // group_size
    qweight, qzeros = pack_gptq(q, zero.T, bits, checkpoint_format, v1_zeros)
    return {"qweight": qweight, "qzeros": qzeros,
            "scales": np.ascontiguousarray(scale.T), "g_idx": g_idx}


def quantize_awq(weight, group_size: int, scale_dtype=np.float16):
    """Quantize a float ``weight`` [K, N] into an AWQ layer: ``dict(qweight, qzeros, scales)``."""
    w = np.asarray(weight, dtype=np.float32)
    if w.shape[0] % group_size:
        raise InvalidProblemError(f"K={w.shape[0]} is not a multiple of group_size={group_size}")
    q, scale, zero = _quantize_rows(np.ascontiguousarray(w.T), group_size, 4, scale_dtype, 0)
    qweight, qzeros = pack_awq(q.T, zero.T)
    return {"qweight": qweight, "qzeros": qzeros, "scales": np.ascontiguousarray(scale.T)}
