"""What GPTQ and AWQ share: a ``[K, N]`` weight of int32-packed values grouped along K,
rendered by the ``matrix`` template, and the numpy pieces of their oracles."""

from __future__ import annotations

import math

import numpy as np

from .. import reference
from ..errors import InvalidProblemError
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


def run_values(bits: int) -> int:
    """Values of a whole number of int32 words: 32 / bits, or 32 in ``bits`` words where
    a value may straddle two words (3 bits: three words hold 32 values)."""
    return 32 // math.gcd(32, bits)


def unpack_along(words: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """int32 words packed along ``axis`` -> their ``32 / bits`` values a word along it
    (uint64): value ``i`` at bit ``bits * i`` of the words along ``axis`` read as one
    little-endian bit stream, so a value that straddles two words takes the low bits of
    the first and the high bits of the second (GPTQ's 3 bits)."""
    w = np.moveaxis(words.view(np.uint32), axis, -1).astype(np.uint64)
    count = w.shape[-1] * 32 // bits
    first = np.arange(count, dtype=np.int64) * bits
    lo, hi = first // 32, (first + bits - 1) // 32     # the words of a value's low, high bit
    pair = w[..., lo] | (w[..., hi] << np.uint64(32))
    values = (pair >> (first % 32).astype(np.uint64)) & np.uint64((1 << bits) - 1)
    return np.moveaxis(values, -1, axis)


def matrix_oracle(q, z, scales, groups, out) -> np.ndarray:
    """``F(C(q - z[g]) * C(scales[g]))`` for the group ``g`` of each row."""
    c = reference.compute_dtype(out)
    with np.errstate(all="ignore"):
        return ((q - z[groups]).astype(c) * scales[groups].astype(c)).astype(out)


def _check_whole_runs(desc) -> None:
    """K and N in whole runs of words, where values straddle words (3 bits: 32 values in
    three words); otherwise the descriptor's own check of ``32 / bits`` covers it."""
    run = run_values(desc.bits)
    for name, size in (("rows (K)", desc.rows), ("cols (N)", desc.cols)):
        if size % run:
            raise InvalidProblemError(
                f"{name}={size} is not a multiple of {run}: {desc.bits}-bit values straddle "
                f"int32 words, and {desc.bits} words hold {run} of them")


class MatrixKind(FormatKind):
    """GPTQ (packed along K, ``along_k``) or AWQ (packed along N)."""

    along_k = True
    formula = ""

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
        if self.along_k:  # bits / 32 words a value, in whole runs of words
            _check_whole_runs(desc)
            words = {"qweight": (k * desc.bits // 32, n),
                     "qzeros": (groups, n * desc.bits // 32)}
        else:
            words = {"qweight": (k, n // 8), "qzeros": (groups, n // 8)}
        return {**words, "scales": (groups, n), "g_idx": (k,), "y": (k, n)}[param.name]

    def launch_elements(self, desc) -> int:
        return desc.rows * desc.cols

    def small_problem(self, desc, remake):
        # whole runs of words along K and N (the descriptor checks 32 // bits too)
        bits = getattr(desc, "bits", 4)
        per = math.lcm(run_values(bits), 32 // bits) if self.along_k else 1
        cols = per * -(-64 // per)          # 64, or the least multiple of per above it
        if getattr(desc, "act_order", False):  # any group size: one kernel
            return remake(rows=cols, cols=cols, group_size=16)
        g = desc.group_size
        return remake(rows=math.lcm(per, g) * (2 if g <= 1 << 14 else 1), cols=cols)

    def random_input(self, desc, name, shape, rng):
        if name == "g_idx":
            return rng.integers(0, desc.num_groups, shape).astype(np.int32)
        return None
