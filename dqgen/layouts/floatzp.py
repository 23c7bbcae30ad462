"""Float zero points (torchao's FLOAT domain, tinygemm) as a format: a per-group problem
whose zero point has the float dtype, ``x = F(F(F(q - mid) * s) + z)`` (FORMATS.md)."""

from __future__ import annotations

import itertools

import numpy as np

from .. import reference
from ..ir import DequantizeFloatZeroDescriptor, DType
from ..spec import CONVERT
from .family import PerGroupKind, int8_group_view, stored_values
from .family_int8 import int8_knobs
from .registry import FormatKind, LinearView, RowSlice, cuda_block_values, register


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

    def linear_view(self, desc):
        # each step rounds to F, so the weight's values are F's: decoded in F, widened
        g, i, f = desc.group_size, desc.int_dtype, desc.float_dtype
        if f is DType.F64:
            return None
        packed = 2 if i.is_packed else 1
        same = dict(float_dtype=f, int_dtype=i, q_min=desc.q_min, q_max=desc.q_max)
        return LinearView(
            slices={"q": RowSlice(1, 1, packed), "scale": RowSlice(1, 1, g),
                    "zero_point": RowSlice(1, 1, g)},
            sizes={"outer": (0, 1), "axis": (1, 1)}, cuda_value="per_group",
            cuda_block_values=cuda_block_values(g), k_multiple=g * packed // int(np.gcd(g, packed)),
            decode=DequantizeFloatZeroDescriptor(0, 0, g, **same),
            sized=lambda n, k: DequantizeFloatZeroDescriptor(n, k, g, **same))

    def int8_view(self, desc):
        # codes q - mid: an integer mid, and q - mid within int8
        i, f, mid = desc.int_dtype, desc.float_dtype, desc.mid
        lo, hi = {DType.U4: (0, 15), DType.S4: (-8, 7), DType.U8: (0, 255),
                  DType.S8: (-128, 127)}[i]
        if f is DType.F64 or mid != int(mid) or lo - mid < -128 or hi - mid > 127:
            return None
        load = CONVERT.get(f, ("", ""))[0]
        return int8_group_view(desc, int8_knobs(i, -int(mid), True, load),
                               f"a {f.value} scale and zero point")

    def int8_names(self) -> tuple[str, ...]:
        return ("float zero points (torchao's, tinygemm's) with an integer mid, groups of 16 "
                "to 2048 values, a power of two",)

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
