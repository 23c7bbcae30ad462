"""AWQ (AutoAWQ GEMM) as a format: ``W[k, n] = F(C(q[k, n] - z[k / G, n]) * C(scales[k /
G, n]))``, values and zero points packed along N in the interleaved order (FORMATS.md)."""

from __future__ import annotations

import itertools

import numpy as np

from ..ir import AwqDequantizeDescriptor
from .matrix import MatrixKind, fields_of, matrix_oracle
from .registry import register

ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i holds column ORDER[i] of its eight


def unpack_awq(words: np.ndarray) -> np.ndarray:
    """[R, W] int32 -> [R, 8 W] values in column order."""
    cols = np.empty((*words.shape, 8), np.int64)
    cols[..., list(ORDER)] = fields_of(words, 4)
    return cols.reshape(words.shape[0], -1)


class AwqKind(MatrixKind):
    descriptors = (AwqDequantizeDescriptor,)
    aot_ops = ("awq",)
    along_k = False
    formula = "W[k, n] = F(C(q[k, n] - z[k / G, n]) * C(scales[k / G, n]))"

    aot_defaults = {"awq": {"float": ("f16", "bf16")}}
    aot_keys = {"awq": ("group_size", "scale")}

    def aot_candidates(self, op, value):
        for s, f, g in itertools.product(value("scale"), value("float"), value("group_size")):
            yield lambda s=s, f=f, g=g: self.aot_descriptor(op, None, f, g, dict(scale_dtype=s))

    def oracle(self, desc, arrays):
        groups = np.arange(desc.rows) // desc.group_size
        return matrix_oracle(unpack_awq(arrays["qweight"]), unpack_awq(arrays["qzeros"]),
                             arrays["scales"], groups, desc.float_dtype.np_dtype)


AWQ = register(AwqKind())
