"""Float zero points (torchao's FLOAT domain, tinygemm) as a format: a per-group problem
whose zero point has the float dtype, ``x = F(F(F(q - mid) * s) + z)`` (FORMATS.md)."""

from __future__ import annotations

import itertools

import numpy as np

from .. import reference
from ..ir import DequantizeFloatZeroDescriptor
from .family import PerGroupKind, stored_values
from .registry import FormatKind, register


class FloatZeroKind(PerGroupKind):
    descriptors = (DequantizeFloatZeroDescriptor,)
    aot_ops = ("floatzp",)
    aot_defaults = {"floatzp": {"int": ("u4", "u8"), "float": ("f16", "bf16")}}
    aot_keys = {"floatzp": ("int", "group_size", "q_min", "q_max")}

    def aot_candidates(self, op, value):
        for i, f, g, lo, hi in itertools.product(value("int"), value("float"),
                                                 value("group_size"), value("q_min"),
                                                 value("q_max")):
            yield lambda i=i, f=f, g=g, lo=lo, hi=hi: self.aot_descriptor(
                op, i, f, g, dict(q_min=lo, q_max=hi))

    def aot_descriptor(self, op, int_dtype, float_dtype, group_size, knobs):
        return DequantizeFloatZeroDescriptor(0, 0, max(int(group_size), 1), float_dtype,
                                             int_dtype, **knobs)

    def aot_request(self, desc):
        return FormatKind.aot_request(self, desc)

    def oracle(self, desc, arrays: dict) -> np.ndarray:
        f = desc.float_dtype.np_dtype
        c, g = reference.compute_dtype(f), desc.group_size
        s = np.repeat(arrays["scale"].astype(c), g, axis=1)
        z = np.repeat(arrays["zero_point"].astype(c), g, axis=1)
        with np.errstate(all="ignore"):  # F(F(F(q - mid) * s) + z), q - mid exact in f64
            diff = (stored_values(desc, arrays["q"]).astype(np.float64) - desc.mid).astype(f)
            prod = (diff.astype(c) * s).astype(f)
            return (prod.astype(c) + z).astype(f)


FLOAT_ZERO = register(FloatZeroKind())
