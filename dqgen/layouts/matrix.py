"""What GPTQ and AWQ share: a ``[K, N]`` weight of int32-packed values grouped along K,
rendered by the ``matrix`` template, and the numpy pieces of their oracles."""

from __future__ import annotations

import math

import numpy as np

from .. import reference
from ..ir import DType
from ..spec import CONVERT, Param, pointer
from .own_loop import own_loop_spec, float_helpers
from .registry import FormatKind

# C act-order GPTQ: every group's scales and zero points for every column, unpacked into
# one table a thread, let each row be written whole (rows come in any group order). A
# table larger than this (groups * cols * 8 bytes; a 4096 x 14336 layer at group 128
# needs 3.7 MB) would no longer stay in the last-level cache, and the kernel goes one
# column tile at a time with a table a tile instead.
MATRIX_TABLE_MAX_BYTES = 32 << 20


def fields_of(words: np.ndarray, bits: int) -> np.ndarray:
    """[..., W] int32 -> [..., W, 32 / bits]: field j of a word at bit bits * j."""
    shifts = np.arange(32 // bits, dtype=np.uint64) * bits
    return (words.view(np.uint32).astype(np.uint64)[..., None] >> shifts) & ((1 << bits) - 1)


def matrix_oracle(q, z, scales, groups, out) -> np.ndarray:
    """``F(C(q - z[g]) * C(scales[g]))`` for the group ``g`` of each row."""
    c = reference.compute_dtype(out)
    with np.errstate(all="ignore"):
        return ((q - z[groups]).astype(c) * scales[groups].astype(c)).astype(out)


class MatrixKind(FormatKind):
    """GPTQ (packed along K, ``along_k``) or AWQ (packed along N)."""

    along_k = True
    formula = ""

    def values_per_word(self, desc) -> int:
        return 32 // desc.bits if self.along_k else 8

    def zero_rule(self, desc) -> tuple[int, int, int]:
        """``(word_add, field_add, field_mask)`` of the stored zero points."""
        return 0, 0, 0xFFFFFFFF

    def lower(self, desc, target, arch, storage):
        params = [pointer("qweight", DType.I32, "in", storage),
                  pointer("qzeros", DType.I32, "in", storage),
                  pointer("scales", desc.scale_dtype, "in", storage)]
        act_order = getattr(desc, "act_order", False)
        if act_order:
            params.append(pointer("g_idx", DType.I32, "in", storage))
        params.append(pointer("y", desc.float_dtype, "out", storage))
        params += [Param("rows", None, "scalar", "int64_t"),
                   Param("cols", None, "scalar", "int64_t")]
        word_add, field_add, field_mask = self.zero_rule(desc)
        return own_loop_spec(
            desc, target, arch, storage, tuple(params), self.formula,
            float_helpers=float_helpers(desc), template="matrix",
            bits=getattr(desc, "bits", 4), zero_offset=field_add,
            zero_word_add=word_add, zero_mask=field_mask, act_order=act_order,
            matrix_along_k=self.along_k,
            table_max_bytes=MATRIX_TABLE_MAX_BYTES if act_order else 0,
            load_float=CONVERT.get(desc.scale_dtype, ("", ""))[0])

    def array_shape(self, desc, param):
        k, n, groups = desc.rows, desc.cols, desc.num_groups
        per = self.values_per_word(desc)
        return {"qweight": (k // per, n) if self.along_k else (k, n // per),
                "qzeros": (groups, n // per), "scales": (groups, n), "g_idx": (k,),
                "y": (k, n)}[param.name]

    def launch_elements(self, desc) -> int:
        return desc.rows * desc.cols

    def small_problem(self, desc, remake):
        if getattr(desc, "act_order", False):  # any group size: one kernel
            return remake(rows=64, cols=64, group_size=16)
        per, g = self.values_per_word(desc) if self.along_k else 1, desc.group_size
        return remake(rows=math.lcm(per, g) * (2 if g <= 1 << 14 else 1), cols=64)

    def random_input(self, desc, name, shape, rng):
        if name == "g_idx":
            return rng.integers(0, desc.num_groups, shape).astype(np.int32)
        return None
