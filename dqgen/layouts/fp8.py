"""FP8 weights with block scales (DeepSeek-V3/R1, Qwen3-FP8, compressed-tensors'
float-quantized) as a format.

``W[i, j] = F( C(fp8(w[i, j])) * C(s[i / block_rows, j / block_cols]) )``: each FP8 value
(e4m3fn or e5m2) widened exactly, multiplied once by its block's scale in f32, rounded
once to the output dtype, as ``weight.float() * scale`` then ``.to(dtype)`` computes it.
A block size of 0 spans the whole axis: ``(0, 0)`` is one scale for the tensor, ``(1, 0)``
one a row. Shapes need not be multiples of the block (the last block is partial). The
FP8 decode is a 256-entry table of f32 bit patterns the schedule computes (ml_dtypes) and
the templates print.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import ClassVar

import ml_dtypes
import numpy as np

from ..errors import InvalidProblemError, UnsupportedError
from ..ir import DType, FormatDescriptor, Layout
from ..spec import CONVERT, F16C_ISAS, Param, pointer
from .own_loop import float_helpers, own_loop_spec
from .registry import FormatKind, LinearView, RowSlice, register

#: FP8 encodings and their numpy (ml_dtypes) types.
FP8_TYPES = {"e4m3": ml_dtypes.float8_e4m3fn, "e5m2": ml_dtypes.float8_e5m2}
FORMULA = "W[i, j] = F(C(fp8(w[i, j])) * C(s[i / block_rows, j / block_cols])), C = f32"


def fp8_bits(fp8: str) -> tuple[int, ...]:
    """The f32 bit pattern of each of the 256 FP8 codes (exact: FP8 widens without
    rounding)."""
    values = np.arange(256, dtype=np.uint8).view(FP8_TYPES[fp8]).astype(np.float32)
    return tuple(int(v) for v in values.view(np.uint32))


def c_float(bits: int) -> str:
    """An f32 bit pattern as an exact C constant expression (a hex float, or a builtin for
    NaN and the infinities), so the C table is a plain float array the compiler gathers
    from."""
    value = float(np.array([bits], np.uint32).view(np.float32)[0])
    sign = "-" if bits >> 31 else ""
    if value != value:
        return f"{sign}__builtin_nanf(\"\")"
    if value in (float("inf"), float("-inf")):
        return f"{sign}__builtin_inff()"
    return f"{value.hex()}f" if value or not sign else "-0x0p+0f"


# Each FP8 code as a binary16 (sign to bit 15, the rest shifted up), which F16C widens
# exactly: e5m2 is binary16's top byte; e4m3fn's exponent has bias 7, not 15, so its
# binary16 reading is the value times 2^-8 (subnormals included) and is scaled back by
# 2^8; its NaN code (magnitude 0x7f) reads as a number and is replaced.
HALF_WIDEN = {"e4m3": dict(shift=7, rescale="0x1p+8f", nan_magnitude=0x7F),
              "e5m2": dict(shift=8, rescale="", nan_magnitude=0)}


@dataclass(frozen=True)
class Fp8Knobs:
    """What the fp8 templates print: the decode table (f32 bit patterns, and as C float
    constants), the block sizes, and (C with F16C) how eight codes widen at once as
    binary16: the magnitude's shift, a power-of-two rescale ("": none) and the NaN
    magnitude to replace (0: none)."""

    table: tuple[int, ...]
    block_rows: int
    block_cols: int
    half_shift: int = 0      # 0: no F16C path (the table, one code at a time)
    half_rescale: str = ""
    nan_magnitude: int = 0
    scale_c_type: str = ""   # the scales parameter's C type

    @property
    def c_table(self) -> tuple[str, ...]:
        return tuple(c_float(b) for b in self.table)


@dataclass(frozen=True)
class Fp8BlockDescriptor(FormatDescriptor):
    """``rows`` x ``cols`` FP8 values, a scale per ``block_rows`` x ``block_cols`` block
    (0: the whole axis), dequantized to ``float_dtype``."""

    layout: ClassVar[Layout] = Layout.FP8_BLOCK
    float_dtypes: ClassVar[tuple[DType, ...]] = (DType.F32, DType.F16, DType.BF16)
    rows: int
    cols: int
    block_rows: int = 128
    block_cols: int = 128
    fp8: str = "e4m3"
    scale_dtype: DType = DType.F32
    float_dtype: DType = DType.BF16

    def validate(self) -> None:
        self._set_int("rows")
        self._set_int("cols")
        self._set_int("block_rows", maximum=2**31 - 1)
        self._set_int("block_cols", maximum=2**31 - 1)
        if self.fp8 not in FP8_TYPES:
            raise UnsupportedError(f"fp8={self.fp8!r} is not an FP8 encoding dqgen reads; "
                                   f"expected one of: {', '.join(FP8_TYPES)}")
        if self.rows * self.cols > 2**62:
            raise InvalidProblemError(f"rows*cols={self.rows * self.cols} does not fit int64")

    @property
    def scale_shape(self) -> tuple[int, int]:
        """The scales' ``[ceil(rows / block_rows), ceil(cols / block_cols)]``."""
        return (-(-self.rows // self.block_rows) if self.block_rows else 1,
                -(-self.cols // self.block_cols) if self.block_cols else 1)

    @property
    def group_size(self) -> int:  # the sku's: values a scale covers along a row
        return self.block_cols

    @property
    def uri(self) -> str:
        return (f"dequant_fp8_{self.fp8}_b{self.block_rows}x{self.block_cols}_"
                f"{self.scale_dtype.value}_{self.float_dtype.value}")


def _half_widen(fp8: str, target: str, arch: str) -> dict:
    """The F16C widening knobs where the C ISA has F16C (else the table alone)."""
    if target != "c" or arch not in F16C_ISAS:
        return {}
    h = HALF_WIDEN[fp8]
    return dict(half_shift=h["shift"], half_rescale=h["rescale"], nan_magnitude=h["nan_magnitude"])


class Fp8Kind(FormatKind):
    descriptors = (Fp8BlockDescriptor,)
    aot_ops = ("fp8",)
    # DeepSeek-V3's: e4m3 in 128 x 128 blocks with f32 scales, to bf16
    aot_defaults = {"fp8": {"float": ("bf16", "f16"), "scale": ("f32",)}}
    aot_keys = {"fp8": ("block", "fp8", "scale")}

    def lower(self, desc, target, arch, storage):
        f = desc.float_dtype
        scales = pointer("scales", desc.scale_dtype, "in", storage)
        params = (pointer("w", DType.U8, "in", storage), scales, pointer("y", f, "out", storage),
                  Param("rows", None, "scalar", "int64_t"),
                  Param("cols", None, "scalar", "int64_t"))
        return own_loop_spec(
            desc, target, arch, storage, params, FORMULA,
            float_helpers=float_helpers(desc), template="fp8",
            layout_knobs=Fp8Knobs(fp8_bits(desc.fp8), desc.block_rows, desc.block_cols,
                                  scale_c_type=scales.c_type,
                                  **_half_widen(desc.fp8, target, arch)),
            load_float=CONVERT.get(desc.scale_dtype, ("", ""))[0])

    def linear_view(self, desc):
        br, bc = desc.block_rows, desc.block_cols
        same = dict(block_rows=br, block_cols=bc, fp8=desc.fp8, scale_dtype=desc.scale_dtype,
                    float_dtype=DType.F32)
        return LinearView(
            slices={"w": RowSlice(), "scales": RowSlice(br, 1 if bc else 0, bc or 1,
                                                        0 if bc else 1)},
            sizes={"rows": (0, 1), "cols": (1, 1)}, k_multiple=1, chunk_multiple=bc or 1,
            cuda_value="fp8",
            decode=Fp8BlockDescriptor(0, 0, **same),
            sized=lambda n, k: Fp8BlockDescriptor(n, k, **same))

    def array_shape(self, desc, param):
        return {"w": (desc.rows, desc.cols), "scales": desc.scale_shape,
                "y": (desc.rows, desc.cols)}[param.name]

    def launch_elements(self, desc) -> int:
        return desc.rows * desc.cols

    def small_problem(self, desc, remake):
        # partial last blocks along both axes, and more than one block where blocks are
        rows = 2 * desc.block_rows + 3 if 0 < desc.block_rows <= 256 else 5
        cols = 2 * desc.block_cols + 5 if 0 < desc.block_cols <= 256 else 37
        return remake(rows=rows, cols=cols)

    def oracle(self, desc, arrays):
        w = arrays["w"].view(FP8_TYPES[desc.fp8]).astype(np.float32)
        s = arrays["scales"].astype(np.float32)
        rows = np.arange(desc.rows) // desc.block_rows if desc.block_rows else np.zeros(desc.rows, int)
        cols = np.arange(desc.cols) // desc.block_cols if desc.block_cols else np.zeros(desc.cols, int)
        with np.errstate(all="ignore"):
            return (w * s[rows][:, cols]).astype(desc.float_dtype.np_dtype)

    def aot_candidates(self, op, value):
        for block, fp8, s, f in itertools.product(value("block"), value("fp8"), value("scale"),
                                                  value("float")):
            yield lambda block=block, fp8=fp8, s=s, f=f: self.aot_descriptor(
                op, None, f, 0, dict(block_rows=block[0], block_cols=block[1], fp8=fp8,
                                     scale_dtype=s))

    def aot_descriptor(self, op, int_dtype, float_dtype, group_size, knobs):
        return Fp8BlockDescriptor(0, 0, float_dtype=float_dtype, **knobs)

    def aot_request(self, desc):
        op, _, _, knobs = super().aot_request(desc)
        return op, None, 0, knobs


FP8 = register(Fp8Kind())
