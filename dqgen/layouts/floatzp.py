"""Float zero points (torchao's FLOAT domain, tinygemm) as a format: a per-group problem
whose zero point has the float dtype, ``x = F(F(F(q - mid) * s) + z)`` (FORMATS.md)."""

from __future__ import annotations

import numpy as np

from .. import reference
from ..ir import DequantizeFloatZeroDescriptor
from .family import PerGroupKind, stored_values
from .registry import register


class FloatZeroKind(PerGroupKind):
    descriptors = (DequantizeFloatZeroDescriptor,)
    aot_ops = ("floatzp",)

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
