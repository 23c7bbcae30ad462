"""GPTQ as a format: ``W[k, n] = F(C(q[k, n] - z[g, n]) * C(scales[g, n]))``, ``g =
g_idx[k]``, values packed along K, zero points along N (3 bits: 32 values in three words,
some straddling two), v1 zeros decoded by the rule of the tool that wrote them
(FORMATS.md)."""

from __future__ import annotations

import itertools

import numpy as np

from ..ir import GptqDequantizeDescriptor, gptq_v1_word_offset
from .matrix import MatrixKind, fields_of, matrix_oracle, unpack_along
from .registry import register


def gptq_zero_rule(desc) -> tuple[int, int, int]:
    """``(word_add, field_add, field_mask)``: a zero point is ``((field n of (word +
    word_add) mod 2^32) + field_add) & field_mask``. GPTQModel's v1 adds a 1 in every
    field to the whole word (the inverse of its word-wise subtraction on export, borrows
    and all); AutoGPTQ's adds 1 to the field modulo 2^bits, exllama's without the modulo;
    v2 stores the zero point itself."""
    everything = 0xFFFFFFFF
    if desc.checkpoint_format != "gptq":
        return 0, 0, everything
    if 32 % desc.bits:
        # 3 bits: fields straddle words, and every tool adds 1 field by field. GPTQModel
        # (_correct_gptq_v1_qzeros) modulo 2^bits; AutoGPTQ's torch dequant and exllama's
        # kernels without the modulo (a stored all-ones field reads 2^bits)
        return 0, 1, (1 << desc.bits) - 1 if desc.v1_zeros == "gptqmodel" else everything
    if desc.v1_zeros == "autogptq":
        return 0, 1, (1 << desc.bits) - 1
    if desc.v1_zeros == "exllama":
        return 0, 1, everything
    return gptq_v1_word_offset(desc.bits), 0, everything


def gptq_zeros(desc, qzeros: np.ndarray) -> np.ndarray:
    """z[g, n] as numpy computes the rule of ``gptq_zero_rule`` (the oracle's own code)."""
    bits, words = desc.bits, qzeros
    if 32 % bits:  # fields straddle words; v1 is field by field (gptq_zero_rule)
        z = unpack_along(words, bits, 1).astype(np.int64)
        if desc.checkpoint_format != "gptq":
            return z
        return (z + 1) % (1 << bits) if desc.v1_zeros == "gptqmodel" else z + 1
    if desc.checkpoint_format != "gptq":
        return fields_of(words, bits).reshape(words.shape[0], -1).astype(np.int64)
    if desc.v1_zeros == "gptqmodel":
        ones = sum(1 << (bits * j) for j in range(32 // bits))
        words = ((words.view(np.uint32).astype(np.uint64) + ones) % 2**32).astype(np.uint32)
        return fields_of(words.view(np.int32), bits).reshape(words.shape[0], -1).astype(np.int64)
    z = fields_of(words, bits).reshape(words.shape[0], -1).astype(np.int64) + 1
    return z % (1 << bits) if desc.v1_zeros == "autogptq" else z


class GptqKind(MatrixKind):
    descriptors = (GptqDequantizeDescriptor,)
    aot_ops = ("gptq",)
    along_k = True
    formula = "W[k, n] = F(C(q[k, n] - z[g, n]) * C(scales[g, n])), g = g_idx[k] (default k / G)"

    aot_defaults = {"gptq": {"float": ("f16", "bf16")}}
    aot_keys = {"gptq": ("group_size", "bits", "checkpoint_format", "act_order", "scale",
                         "v1_zeros")}

    def aot_candidates(self, op, value):
        # a v2 kernel takes no v1 rule: each names the same kernel
        for b, fmt, act, s, z, f, g in itertools.product(
                value("bits"), value("checkpoint_format"), value("act_order"), value("scale"),
                value("v1_zeros"), value("float"), value("group_size")):
            yield lambda b=b, fmt=fmt, act=act, s=s, z=z, f=f, g=g: self.aot_descriptor(
                op, None, f, g, dict(bits=b, checkpoint_format=fmt, act_order=act,
                                     scale_dtype=s, v1_zeros=z))

    def aot_request(self, desc):
        op, int_dtype, group, knobs = super().aot_request(desc)
        # act-order reads each row's group from g_idx: one kernel for every group size
        return op, int_dtype, 0 if desc.act_order else group, knobs

    def zero_rule(self, desc):
        return gptq_zero_rule(desc)

    def oracle(self, desc, arrays):
        q = unpack_along(arrays["qweight"], desc.bits, 0).astype(np.int64)   # [K, N]
        groups = (arrays["g_idx"].astype(np.int64) if desc.act_order
                  else np.arange(desc.rows) // desc.group_size)
        return matrix_oracle(q, gptq_zeros(desc, arrays["qzeros"]), arrays["scales"], groups,
                             desc.float_dtype.np_dtype)


GPTQ = register(GptqKind())
