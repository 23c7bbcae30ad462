"""GPTQ, AWQ, packed 4-bit and float-zero-point dequantization, straight from FORMATS.md.

Deliberately naive (Python loops over words and nibbles where that reads closest to
the text) and sharing no code with dqgen. Math: f32 (f64 for f64 output), the product
(and the float zero point's sum) rounded once each, then rounded to the output dtype.
"""

from __future__ import annotations

import numpy as np

AWQ_NIBBLE_TO_COLUMN = [0, 2, 4, 6, 1, 3, 5, 7]


def _compute(out_dtype):
    return np.float64 if np.dtype(out_dtype) == np.float64 else np.float32


def unpack_gptq_qweight(qweight: np.ndarray, bits: int) -> np.ndarray:
    """[K*bits/32, N] int32 -> [K, N]: value j of a word at bit offset bits*j, along K."""
    words = qweight.view(np.uint32)
    per = 32 // bits
    out = np.zeros((words.shape[0] * per, words.shape[1]), dtype=np.int64)
    for r in range(words.shape[0]):
        for j in range(per):
            out[r * per + j] = (words[r].astype(np.int64) >> (bits * j)) & ((1 << bits) - 1)
    return out


def unpack_gptq_qzeros(qzeros: np.ndarray, bits: int, word_add: int = 0) -> np.ndarray:
    """[G, N*bits/32] int32 -> [G, N]: packed along N, same bit order; ``word_add`` is
    added to each whole word first, modulo 2**32 (GPTQModel's v1)."""
    words = (qzeros.view(np.uint32).astype(np.int64) + word_add) % 2**32
    per = 32 // bits
    out = np.zeros((words.shape[0], words.shape[1] * per), dtype=np.int64)
    for c in range(words.shape[1]):
        for j in range(per):
            out[:, c * per + j] = (words[:, c] >> (bits * j)) & ((1 << bits) - 1)
    return out


def gptq_v1_word_add(bits: int) -> int:
    """A 1 in every bits-wide field of a 32-bit word: 0x11111111 for 4 bits."""
    return int("".join(["0" * (bits - 1) + "1"] * (32 // bits)), 2)


def gptq_dequantize(qweight, qzeros, scales, g_idx, bits, checkpoint_format, out_dtype,
                    group_size=None, v1_zeros="gptqmodel"):
    """W[k, n] = scales[g, n] * (q[k, n] - z[g, n]), g = g_idx[k]. v1: "gptqmodel" adds
    a 1 in every field to the whole word before unpacking; "exllama": z = stored + 1;
    "autogptq": z = (stored + 1) mod 2**bits."""
    q = unpack_gptq_qweight(qweight, bits)
    word_wise = checkpoint_format == "gptq" and v1_zeros == "gptqmodel"
    z = unpack_gptq_qzeros(qzeros, bits, gptq_v1_word_add(bits) if word_wise else 0)
    if checkpoint_format == "gptq" and v1_zeros in ("autogptq", "exllama"):
        z = z + 1
        if v1_zeros == "autogptq":
            z = z % 2**bits
    k = q.shape[0]
    if g_idx is None:
        g_idx = np.array([i // group_size for i in range(k)])
    g = np.asarray(g_idx, dtype=np.int64)
    c = _compute(out_dtype)
    with np.errstate(all="ignore"):
        w = (q - z[g]).astype(c) * scales[g].astype(c)
        return w.astype(out_dtype)


def gptq_dequantize_torch(qweight, qzeros, scales, g_idx, bits, checkpoint_format,
                          v1_zeros="gptqmodel"):
    """GPTQModel/AutoGPTQ's torch formula (f16 scales -> f16 weight), for a second opinion;
    GPTQModel's v1 adds the word constant to the int32 words (wrapping) before unpacking."""
    import torch

    qw = torch.from_numpy(qweight.copy())
    qz = torch.from_numpy(qzeros.copy())
    if checkpoint_format == "gptq" and v1_zeros == "gptqmodel":
        qz = torch.from_numpy((qzeros.view(np.uint32) + np.uint32(gptq_v1_word_add(bits)))
                              .view(np.int32))
    per = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    zeros = torch.bitwise_right_shift(qz.unsqueeze(2).expand(-1, -1, per), shifts.view(1, 1, -1))
    zeros = torch.bitwise_and(zeros, (1 << bits) - 1).reshape(qz.shape[0], -1)
    if checkpoint_format == "gptq" and v1_zeros in ("autogptq", "exllama"):
        zeros = zeros + 1
        if v1_zeros == "autogptq":
            zeros = torch.bitwise_and(zeros, (1 << bits) - 1)
    weight = torch.bitwise_right_shift(qw.unsqueeze(1).expand(-1, per, -1), shifts.view(1, -1, 1))
    weight = torch.bitwise_and(weight, (1 << bits) - 1).reshape(-1, qw.shape[1])
    sc = torch.from_numpy(scales.copy())
    gi = torch.from_numpy(np.asarray(g_idx).astype(np.int64))
    return (sc[gi] * (weight - zeros[gi]).to(sc.dtype)).numpy()


def awq_dequantize(qweight, qzeros, scales, group_size, out_dtype):
    """W[k, n] = (q[k, n] - z[k // G, n]) * scales[k // G, n]; nibble i -> column order[i]."""
    def unpack(words):
        words = words.view(np.uint32).astype(np.int64)
        out = np.zeros((words.shape[0], words.shape[1] * 8), dtype=np.int64)
        for w in range(words.shape[1]):
            for i in range(8):
                out[:, w * 8 + AWQ_NIBBLE_TO_COLUMN[i]] = (words[:, w] >> (4 * i)) & 15
        return out
    q, z = unpack(qweight), unpack(qzeros)
    g = np.arange(q.shape[0]) // group_size
    c = _compute(out_dtype)
    with np.errstate(all="ignore"):
        w = (q - z[g]).astype(c) * scales[g].astype(c)
        return w.astype(out_dtype)


def unpack_int4(packed: np.ndarray, signed: bool) -> np.ndarray:
    """[..., n/2] bytes -> [..., n]: element 2k in the low nibble of byte k, 2k+1 high."""
    b = packed.astype(np.int64)
    lo, hi = b & 15, (b >> 4) & 15
    out = np.stack([lo, hi], axis=-1).reshape(*packed.shape[:-1], -1)
    if signed:
        out = np.where(out >= 8, out - 16, out)
    return out


def pack_int4(values: np.ndarray) -> np.ndarray:
    """The inverse of ``unpack_int4`` (values taken modulo 16)."""
    v = np.asarray(values).astype(np.int64) & 15
    return (v[..., 0::2] | (v[..., 1::2] << 4)).astype(np.uint8)


def float_zero_dequantize(q, scale, zero, group_size, q_min, q_max, out_dtype):
    """x = F(F(F(q - mid) * s) + z), mid = (q_max + q_min + 1) / 2 (a true division):
    the exact difference, the product and the sum each rounded to F."""
    mid = (q_max + q_min + 1) / 2
    c, f = _compute(out_dtype), out_dtype
    s = np.repeat(scale.astype(c), group_size, axis=1)
    z = np.repeat(zero.astype(c), group_size, axis=1)
    with np.errstate(all="ignore"):
        diff = (q.astype(np.float64) - mid).astype(f).astype(c)   # q - mid is exact in f64
        prod = (diff * s).astype(f).astype(c)
        return (prod + z).astype(f)


def unpack_hqq(words: np.ndarray, bits: int, rows: int) -> np.ndarray:
    """HQQ's BitPack words [step, gs] -> values [rows, gs]: plane j (rows j*step...) in the
    field at bit bits * (8 / bits - 1 - j) of a byte; 3 bits: ten planes of an int32 word,
    plane j at bit 27 - 3 j (rows padded to ten planes, cut to `rows`)."""
    w = words.view(np.uint32 if bits == 3 else np.uint8).astype(np.int64)
    planes = 10 if bits == 3 else 8 // bits
    top = 27 if bits == 3 else 8 - bits
    out = [(w >> (top - bits * j)) & ((1 << bits) - 1) for j in range(planes)]
    return np.concatenate(out, axis=0)[:rows]


def hqq_dequantize(values, scale, zero, out_dtype):
    """W = F(F(W_q - zero) * scale) per row (a group): each step rounded to F."""
    c, f = _compute(out_dtype), out_dtype
    with np.errstate(all="ignore"):
        diff = (values.astype(c) - zero.astype(c)).astype(f)
        return (diff.astype(c) * scale.astype(c)).astype(f)
