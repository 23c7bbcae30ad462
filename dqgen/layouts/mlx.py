"""MLX's affine quantization (``mlx.core.quantize``, mlx_lm checkpoints) as a format.

``w = F(F(q * scale) + bias)`` per group of ``group_size`` values along a row, ``scale``
and ``bias`` of the result's dtype F, the product and the sum each rounded to F (as
``mlx.core.dequantize`` computes them). ``q`` is uint32 words ``[rows, cols * bits /
32]``: a row's values form one bit stream, least significant bits first, value ``j`` at
bit ``bits * j`` (3-, 5- and 6-bit values straddle words). The C and CUDA loops read that
stream (``mlx`` templates); the element math is the family's float zero point with a
midpoint of 0 (``q - 0`` is exact in F for q < 256). The fused linear decodes a row in F
and widens it exactly (the weight's values are F's).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..errors import InvalidProblemError, UnsupportedError
from ..ir import DType, FormatDescriptor, Layout, Op
from ..spec import CONVERT, Param, pointer
from .own_loop import float_helpers, own_loop_spec
from .registry import FormatKind, LinearView, RowSlice, register

#: What ``mlx.core.quantize`` writes.
MLX_BITS = (2, 3, 4, 5, 6, 8)
MLX_GROUP_SIZES = (32, 64, 128)
MLX_FLOAT_DTYPES = (DType.F16, DType.BF16, DType.F32)
FORMULA = "w = F(F(q * scale) + bias), q the bits-wide field at bit bits * j of the row's stream"
# A step rounded to F and widened back (f32 needs none: it is the compute type).
_ROUND = {DType.F16: "round_f16", DType.BF16: "round_bf16"}


@dataclass(frozen=True)
class MlxDequantizeDescriptor(FormatDescriptor):
    """``rows`` x ``cols`` values of ``bits`` bits in groups of ``group_size`` along a row,
    dequantized to ``float_dtype`` (the scales' and biases' dtype)."""

    layout: ClassVar[Layout] = Layout.MLX
    float_dtypes: ClassVar[tuple[DType, ...]] = MLX_FLOAT_DTYPES
    rows: int
    cols: int
    group_size: int = 64
    bits: int = 4
    float_dtype: DType = DType.F16

    def validate(self) -> None:
        rows, cols = self._set_int("rows"), self._set_int("cols")
        group = self._set_int("group_size", minimum=1)
        bits = self._set_int("bits", minimum=1)
        if bits not in MLX_BITS:
            raise UnsupportedError(f"bits={bits} is not an MLX width; expected one of "
                                   f"{', '.join(map(str, MLX_BITS))}")
        if group not in MLX_GROUP_SIZES:
            raise UnsupportedError(f"group_size={group} is not an MLX group size; expected one "
                                   f"of {', '.join(map(str, MLX_GROUP_SIZES))}")
        if cols % group:
            raise InvalidProblemError(f"cols={cols} is not a multiple of group_size={group}")
        if rows * cols > 2**62:
            raise InvalidProblemError(f"rows*cols={rows * cols} is too large for int64 bit offsets")

    @property
    def num_groups(self) -> int:
        return self.cols // self.group_size

    @property
    def words(self) -> int:
        """uint32 words a row (cols is a multiple of 32, so a row ends on a word)."""
        return self.cols * self.bits // 32

    @property
    def uri(self) -> str:
        return f"dequant_mlx{self.bits}_{self.float_dtype.value}_g{self.group_size}"


def unpack_mlx(words: np.ndarray, bits: int, cols: int) -> np.ndarray:
    """``[rows, W]`` uint32 words -> ``[rows, cols]`` int64 values of the rows' bit streams
    (the oracle's own unpacking: bit by bit)."""
    w = words.view(np.uint32).astype(np.uint64)
    stream = (w[..., None] >> np.arange(32, dtype=np.uint64)) & 1       # [rows, W, 32]
    stream = stream.reshape(words.shape[0], -1)[:, :cols * bits]
    fields = stream.reshape(words.shape[0], cols, bits)
    return (fields << np.arange(bits, dtype=np.uint64)).sum(axis=-1).astype(np.int64)


@dataclass(frozen=True)
class MlxKnobs:
    """What the MLX C template prints beyond the spec: values a 32-bit word holds whole
    (32 / bits where bits divides 32, else 0: values straddle words), so a group's values
    are unpacked word by word into a staged array the element loop vectorizes over."""

    word_values: int


class MlxKind(FormatKind):
    descriptors = (MlxDequantizeDescriptor,)
    aot_ops = ("mlx",)
    # mlx_lm's defaults: 4 bits (the shared bits default) in groups of 64
    aot_defaults = {"mlx": {"float": ("f16", "bf16"), "group_size": (64,)}}
    aot_keys = {"mlx": ("group_size", "bits")}

    def lower(self, desc, target, arch, storage):
        f = desc.float_dtype
        params = (pointer("q", DType.I32, "in", storage), pointer("scales", f, "in", storage),
                  pointer("biases", f, "in", storage), pointer("y", f, "out", storage),
                  Param("rows", None, "scalar", "int64_t"),
                  Param("cols", None, "scalar", "int64_t"))
        load, store = CONVERT.get(f, ("", ""))
        return own_loop_spec(
            desc, target, arch, storage, params, FORMULA,
            float_helpers=float_helpers(desc, *((load,) if load else ())), template="mlx",
            bits=desc.bits, zero_kind="float", mid=0, zero_round=_ROUND.get(f, ""),
            load_float=load,
            layout_knobs=MlxKnobs(32 // desc.bits if target == "c" and 32 % desc.bits == 0
                                  else 0))

    def array_shape(self, desc, param):
        return {"q": (desc.rows, desc.words), "scales": (desc.rows, desc.num_groups),
                "biases": (desc.rows, desc.num_groups), "y": (desc.rows, desc.cols)}[param.name]

    def launch_elements(self, desc) -> int:
        return desc.rows * desc.cols

    def small_problem(self, desc, remake):
        return remake(rows=3, cols=2 * desc.group_size)

    def oracle(self, desc, arrays):
        f = desc.float_dtype.np_dtype
        q = unpack_mlx(arrays["q"], desc.bits, desc.cols).astype(np.float32)
        s = np.repeat(arrays["scales"].astype(np.float32), desc.group_size, axis=1)
        b = np.repeat(arrays["biases"].astype(np.float32), desc.group_size, axis=1)
        with np.errstate(all="ignore"):  # F(F(q * s) + b), each step in f32 then F
            return ((q * s).astype(f).astype(np.float32) + b).astype(f)

    def linear_view(self, desc):
        # a row is its own words, scales and biases; each step rounds to F, so the
        # weight's values are F's: the linear decodes a row in F and widens it exactly
        g, bits, f = desc.group_size, desc.bits, desc.float_dtype
        same = dict(group_size=g, bits=bits, float_dtype=f)
        return LinearView(
            slices={"q": RowSlice(1, bits, 32), "scales": RowSlice(1, 1, g),
                    "biases": RowSlice(1, 1, g)},
            sizes={"rows": (0, 1), "cols": (1, 1)}, k_multiple=g, cuda_value="mlx",
            decode=MlxDequantizeDescriptor(0, 0, **same),
            sized=lambda n, k: MlxDequantizeDescriptor(n, k, **same))

    def aot_candidates(self, op, value):
        for b, f, g in itertools.product(value("bits"), value("float"), value("group_size")):
            yield lambda b=b, f=f, g=g: self.aot_descriptor(op, None, f, g, dict(bits=b))


MLX = register(MlxKind())
