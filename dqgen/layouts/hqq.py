"""HQQ as a format: a per-group problem over one plane of ``BitPack`` words, the
``bits``-wide field at a run-time ``shift``, ``W = F(F(W_q - zero) * scale)`` (FORMATS.md)."""

from __future__ import annotations

import itertools

import numpy as np

from .. import reference
from ..ir import DType, HqqDequantizeDescriptor
from .family import PerGroupKind
from .registry import FormatKind, LinearView, RowSlice, cuda_block_values, register

_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


class HqqKind(PerGroupKind):
    descriptors = (HqqDequantizeDescriptor,)
    aot_ops = ("hqq",)
    # HQQLinear's defaults: groups of 64; an axis=0 layer (a column a group) runs the
    # group-size-1 kernel (--group-size 1)
    aot_defaults = {"hqq": {"float": ("f16", "bf16"), "group_size": (64,)}}
    aot_keys = {"hqq": ("group_size", "bits")}

    def aot_candidates(self, op, value):
        for b, f, g in itertools.product(value("bits"), value("float"), value("group_size")):
            yield lambda b=b, f=f, g=g: self.aot_descriptor(op, None, f, g, dict(bits=b))

    def aot_descriptor(self, op, int_dtype, float_dtype, group_size, knobs):
        return FormatKind.aot_descriptor(self, op, int_dtype, float_dtype, group_size, knobs)

    def aot_request(self, desc):
        return FormatKind.aot_request(self, desc)

    def extra_sizes(self, desc) -> dict:
        # the plane offset is a run-time argument: the top plane's
        return {"shift": 27 if desc.bits == 3 else 8 - desc.bits}

    def linear_view(self, desc):
        # a weight whose values are whole bytes (8 bits, or planes unpacked to bytes by
        # weight_readers.hqq_weight), groups along K: each step rounds to F, so the linear
        # decodes a row in F and widens it exactly
        if desc.bits != 8 or desc.float_dtype is DType.F64:
            return None
        g, f = desc.group_size, desc.float_dtype
        return LinearView(
            slices={"q": RowSlice(), "scale": RowSlice(1, 1, g), "zero_point": RowSlice(1, 1, g)},
            sizes={"outer": (0, 1), "axis": (1, 1)}, k_multiple=g, cuda_value="per_group",
            cuda_block_values=cuda_block_values(g),
            decode=HqqDequantizeDescriptor(0, 0, g, f, 8),
            sized=lambda n, k: HqqDequantizeDescriptor(n, k, g, f, 8))

    def oracle(self, desc, arrays: dict) -> np.ndarray:
        f = desc.float_dtype.np_dtype
        c, g = reference.compute_dtype(f), desc.group_size
        words = arrays["q"].view(_UINT[arrays["q"].itemsize]).astype(np.uint64)
        q = (words >> desc.shift) & ((1 << desc.bits) - 1)
        s = np.repeat(arrays["scale"].astype(c), g, axis=1)
        z = np.repeat(arrays["zero_point"].astype(c), g, axis=1)
        with np.errstate(all="ignore"):  # F(F(q - z) * s)
            diff = (q.astype(c) - z).astype(f)
            return (diff.astype(c) * s).astype(f)


HQQ = register(HqqKind())
