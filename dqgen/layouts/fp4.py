"""FP4 (e2m1) weights with block scales as a format: gpt-oss MXFP4 (transformers'
``convert_moe_packed_tensors``), ModelOpt NVFP4, and compressed-tensors'
``mxfp4-pack-quantized`` and ``nvfp4-pack-quantized``.

``W[r, j] = F( e2m1(w[r, j]) * S[r, j / block] )`` in f32: two e2m1 codes a byte (value
``2k`` in the low nibble of byte ``k``), each decoded exactly by a 16-entry table, times
its block's f32 scale ``S``, rounded once to F. ``S`` is the scale code decoded by a
256-entry table (MXFP4: E8M0, ``2^(s - 127)``; NVFP4: E4M3), then for NVFP4 multiplied by
ModelOpt's ``weight_scale_2`` or divided by compressed-tensors' ``weight_global_scale``
(one f32 rounding). The checkpoint format fixes those choices, the sign of the zero code
8 (ModelOpt's table holds +0, the others -0), what E8M0 code 255 means, and the output
layout. compressed-tensors' scale ``2.0 ** (s - 127)`` is +inf for code 255 (so a zero
value gives NaN); transformers' ``torch.ldexp(value, s - 127)`` scales exactly (a zero
stays zero, 0.5 becomes 2^127): its tables hold twice each value and half each scale,
both exact, so one f32 product is that ldexp. gpt-oss experts ``[E, N, K / 32, 16]``
come out ``[E, K, N]``, as the library transposes them; ``stored_rows`` writes them as
stored instead, ``[E * N, K]``, the row view the fused linear decodes (an expert's
``x @ W_e`` is ``x @ rows.T``). The tables are computed here from the codes' bit fields
and printed into the kernel.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import ClassVar

import ml_dtypes
import numpy as np

from ..errors import InvalidProblemError, UnsupportedError
from ..ir import DType, FormatDescriptor, Layout
from ..spec import Param, pointer
from .fp8 import c_float, fp8_bits
from .own_loop import float_helpers, own_loop_spec
from .registry import FormatKind, Int8View, LinearView, RowSlice, register

FORMULA = "W[r, j] = F(e2m1(w[r, j]) * S[r, j / block]), S = C(scale) [* or / global], C = f32"
# Rows of one expert a C work unit writes as one tile of the transposed output.
TRANSPOSE_TILE = 32
# C: values decoded a step in explicit vectors (GCC vector extensions), by ISA: one
# AVX-512 permute of the 16-entry table, or two AVX2 ones of its halves; none (a plain
# loop) where a permute would be emulated lane by lane.
VECTOR_LANES = {"avx512_fp16": 16, "avx512_bf16": 16, "avx512": 16, "avx2": 8}
# The unsigned type of the VECTOR_LANES / 2 code bytes of a step.
_STEP_TYPES = {16: "uint64_t", 8: "uint32_t"}


@dataclass(frozen=True)
class Fp4Producer:
    """What one tool's checkpoints fix: the scale code, the block, how the global scale
    enters, the zero code's sign and the output layout."""

    short: str                 # the URI's name of it
    scale: str                 # "e8m0" or "e4m3"
    block: int                 # values a scale covers along a row
    global_scale: str          # "", "multiply" or "divide"
    negative_zero: bool        # code 8 decodes to -0.0 (else +0.0)
    transposed: bool           # the output is [experts, cols, rows]
    ldexp: bool = False        # E8M0 scales by ldexp (no infinite scale for code 255)


#: The FP4 schemes and, for each, the checkpoint formats dqgen reads.
PRODUCERS = {
    "mxfp4": {"gpt-oss": Fp4Producer("gptoss", "e8m0", 32, "", True, True, ldexp=True),
              "compressed-tensors": Fp4Producer("ct", "e8m0", 32, "", True, False)},
    "nvfp4": {"modelopt": Fp4Producer("modelopt", "e4m3", 16, "multiply", False, False),
              "compressed-tensors": Fp4Producer("ct", "e4m3", 16, "divide", True, False)},
}


def e2m1_bits(negative_zero: bool, factor: int = 1) -> tuple[int, ...]:
    """The f32 bit pattern of ``factor`` times each e2m1 code's value, from its fields
    (sign, 2 exponent bits with bias 1, 1 mantissa bit; exponent 0 is subnormal: 0 or
    0.5); exact for a power-of-two factor."""
    out = []
    for code in range(16):
        sign, exponent, mantissa = code >> 3, (code >> 1) & 3, code & 1
        magnitude = factor * (mantissa * 0.5 if exponent == 0
                              else 2.0 ** (exponent - 1) * (1 + mantissa / 2))
        negative = sign and (magnitude != 0 or negative_zero)
        value = np.float32(-magnitude if negative else magnitude)
        if negative and magnitude == 0:
            value = np.float32(-0.0)
        out.append(int(np.array([value], np.float32).view(np.uint32)[0]))
    return tuple(out)


def e8m0_bits(bias: int = 127) -> tuple[int, ...]:
    """The f32 bit pattern of ``2^(s - bias)`` for each E8M0 code (exact, subnormals
    included; with bias 127, 2^128 overflows to +inf, as torch's ``2.0 ** (s - 127)``
    gives)."""
    with np.errstate(over="ignore"):
        values = np.ldexp(np.float64(1.0), np.arange(256) - bias).astype(np.float32)
    return tuple(int(v) for v in values.view(np.uint32))


def scale_bits(producer: Fp4Producer) -> tuple[int, ...]:
    """The scale table of ``producer``'s checkpoints (halved where its values are
    doubled: an ldexp by ``s - 127`` as one exact f32 product)."""
    if producer.scale == "e4m3":
        return fp8_bits("e4m3")
    return e8m0_bits(128 if producer.ldexp else 127)


@dataclass(frozen=True)
class Fp4Knobs:
    """What the fp4 templates print: both decode tables (f32 bit patterns, and as C float
    constants), the block, how the global scale enters, the output layout."""

    values: tuple[int, ...]
    scales: tuple[int, ...]
    block: int
    global_multiplies: bool
    global_divides: bool
    transposed: bool
    tile: int
    lanes: int = 0             # C: VECTOR_LANES of the explicit vectors (0: a plain loop)

    @property
    def c_values(self) -> tuple[str, ...]:
        return tuple(c_float(b) for b in self.values)

    @property
    def c_lane_tables(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The two operands of the vector lookup ``__builtin_shuffle(a, b, index)``: the
        table's first and second ``lanes`` entries (16 lanes: the table, twice)."""
        values = self.c_values
        if self.lanes >= 16:
            return values[:self.lanes], values[:self.lanes]
        return values[:self.lanes], values[self.lanes:2 * self.lanes]

    @property
    def step_type(self) -> str:
        """The unsigned C type of one vector step's code bytes."""
        return _STEP_TYPES.get(self.lanes, "")

    @property
    def c_scales(self) -> tuple[str, ...]:
        return tuple(c_float(b) for b in self.scales)

    @property
    def has_global(self) -> bool:
        return self.global_multiplies or self.global_divides


@dataclass(frozen=True)
class Fp4DequantizeDescriptor(FormatDescriptor):
    """``experts`` matrices of ``rows`` x ``cols`` e2m1 values with a scale a block of
    their format along a row, dequantized to ``float_dtype``."""

    layout: ClassVar[Layout] = Layout.FP4
    float_dtypes: ClassVar[tuple[DType, ...]] = (DType.F32, DType.F16, DType.BF16)
    rows: int
    cols: int
    experts: int = 1
    fp4: str = "mxfp4"
    checkpoint_format: str = "gpt-oss"
    float_dtype: DType = DType.BF16
    stored_rows: bool = False      # a transposed format's experts as stored, [E * N, K]

    def validate(self) -> None:
        rows, cols = self._set_int("rows"), self._set_int("cols")
        experts = self._set_int("experts")
        if self.fp4 not in PRODUCERS:
            raise UnsupportedError(f"fp4={self.fp4!r} is not an FP4 scheme dqgen reads; "
                                   f"expected one of: {', '.join(PRODUCERS)}")
        formats = PRODUCERS[self.fp4]
        if self.checkpoint_format not in formats:
            raise UnsupportedError(f"checkpoint_format={self.checkpoint_format!r} is not a "
                                   f"{self.fp4} format dqgen reads; expected one of: "
                                   f"{', '.join(formats)}")
        if cols % self.group_size:
            raise InvalidProblemError(f"cols={cols} is not a multiple of {self.group_size}, the "
                                      f"values a {self.fp4} scale covers")
        if self.stored_rows is not False and (self.stored_rows is not True
                                              or not formats[self.checkpoint_format].transposed):
            raise InvalidProblemError(f"stored_rows={self.stored_rows!r}: only a format that "
                                      "writes its experts transposed has stored rows")
        if experts != 1 and not self.producer.transposed:
            raise InvalidProblemError(f"experts={experts}: {self.checkpoint_format} {self.fp4} "
                                      "weights are one matrix (fold experts into rows)")
        if experts * rows * cols > 2**62:
            raise InvalidProblemError(f"experts*rows*cols={experts * rows * cols} does not fit "
                                      "int64")

    @property
    def producer(self) -> Fp4Producer:
        p = PRODUCERS[self.fp4][self.checkpoint_format]
        if self.stored_rows:
            return dataclasses.replace(p, short=f"{p.short}rows", transposed=False)
        return p

    @property
    def group_size(self) -> int:  # the sku's: values a scale covers along a row
        return self.producer.block

    @property
    def uri(self) -> str:
        return f"dequant_{self.fp4}_{self.producer.short}_{self.float_dtype.value}"

    def knobs(self, lanes: int = 0) -> Fp4Knobs:
        p = self.producer
        return Fp4Knobs(e2m1_bits(p.negative_zero, 2 if p.ldexp else 1), scale_bits(p), p.block,
                        p.global_scale == "multiply", p.global_scale == "divide",
                        p.transposed, TRANSPOSE_TILE, lanes)


@dataclass(frozen=True)
class Fp4Int8Knobs:
    """What ``int8_fp4.j2`` prints: each e2m1 code's integer C(q) = 2 * e2m1 (a byte, mod
    256) and each E8M0 code's d_w = 2^(s - 128) (f32 bit patterns; code 255 +inf where the
    format's scale is, compressed-tensors')."""

    codes: tuple[int, ...]
    half_scales: tuple[int, ...]
    inf_255: bool

    @property
    def c_half_scales(self) -> tuple[str, ...]:
        return tuple(c_float(b) for b in self.half_scales)


def int8_knobs(producer: Fp4Producer) -> Fp4Int8Knobs:
    """An MXFP4 producer's int8 decode: C(q) * d_w is e2m1 * 2^(s - 127) exactly (ldexp's
    2^127 for gpt-oss's code 255, compressed-tensors' +inf)."""
    doubled = np.array(e2m1_bits(True, 2), np.uint32).view(np.float32)
    codes = tuple(int(v) % 256 for v in doubled.astype(np.int64))
    half = list(e8m0_bits(128))
    if not producer.ldexp:
        half[255] = 0x7F800000
    return Fp4Int8Knobs(codes, tuple(half), not producer.ldexp)


def int8_parts(knobs: Fp4Int8Knobs, arrays: dict, n: int, k: int):
    """The codes ``[n, k]`` (int8) and each block's d_w ``[n, k / 32]`` as the kernel
    decodes them (no mins)."""
    w = np.asarray(arrays["w"]).reshape(n, k // 2)
    table = np.array(knobs.codes, np.uint8).view(np.int8)
    codes = np.empty((n, k), np.int8)
    codes[:, 0::2], codes[:, 1::2] = table[w & 15], table[w >> 4]
    half = np.array(knobs.half_scales, np.uint32).view(np.float32)
    return codes, half[np.asarray(arrays["scales"]).reshape(n, k // 32)], None


def _header_descriptor(desc: Fp4DequantizeDescriptor) -> str:
    """The header comment's descriptor: the kernel's fields, no run-time size."""
    rows = ", stored_rows=True" if desc.stored_rows else ""
    return (f"{type(desc).__name__}(fp4={desc.fp4}, checkpoint_format="
            f"{desc.checkpoint_format}, float_dtype={desc.float_dtype.value}{rows})")


def _laid_out(desc, y: np.ndarray) -> np.ndarray:
    """``[experts * rows, cols]`` values in the kernel's output layout."""
    if not desc.producer.transposed:
        return y
    return np.ascontiguousarray(y.reshape(desc.experts, desc.rows, desc.cols).transpose(0, 2, 1))


class Fp4Kind(FormatKind):
    descriptors = (Fp4DequantizeDescriptor,)
    aot_ops = ("mxfp4", "nvfp4")
    # what the tools write, to the dtypes models run in
    aot_defaults = {"mxfp4": {"float": ("bf16", "f16"),
                              "checkpoint_format": ("gpt-oss", "compressed-tensors")},
                    "nvfp4": {"float": ("bf16", "f16"),
                              "checkpoint_format": ("modelopt", "compressed-tensors")}}
    aot_keys = {"mxfp4": ("checkpoint_format",), "nvfp4": ("checkpoint_format",)}

    def lower(self, desc, target, arch, storage):
        knobs = desc.knobs(VECTOR_LANES.get(arch, 0) if target == "c" else 0)
        f = desc.float_dtype
        params = (pointer("w", DType.U8, "in", storage),
                  pointer("scales", DType.U8, "in", storage),
                  *((pointer("global_scale", DType.F32, "in", storage),) if knobs.has_global
                    else ()),
                  pointer("y", f, "out", storage),
                  Param("experts", None, "scalar", "int64_t"),
                  Param("rows", None, "scalar", "int64_t"),
                  Param("cols", None, "scalar", "int64_t"))
        spec = own_loop_spec(desc, target, arch, storage, params, FORMULA,
                             float_helpers=float_helpers(desc), template="fp4",
                             layout_knobs=knobs, load_float="")
        return dataclasses.replace(spec, descriptor=_header_descriptor(desc))

    def array_shape(self, desc, param):
        n = desc.experts * desc.rows
        y = ((desc.experts, desc.cols, desc.rows) if desc.producer.transposed
             else (n, desc.cols))
        return {"w": (n, desc.cols // 2), "scales": (n, desc.cols // desc.group_size),
                "global_scale": (1,), "y": y}[param.name]

    def launch_elements(self, desc) -> int:
        return desc.experts * desc.rows * desc.cols // 2  # one thread a byte

    def small_problem(self, desc, remake):
        if desc.producer.transposed:  # a partial tile, more than one expert and block
            return remake(experts=2, rows=TRANSPOSE_TILE + 5, cols=3 * desc.group_size)
        return remake(experts=1, rows=5, cols=3 * desc.group_size)

    def oracle(self, desc, arrays):
        p = desc.producer
        w = arrays["w"]
        codes = np.stack([w & 15, w >> 4], axis=-1).reshape(w.shape[0], 2 * w.shape[1])
        values = codes.view(ml_dtypes.float4_e2m1fn).astype(np.float32)
        if not p.negative_zero:
            values[codes == 8] = 0.0
        s = arrays["scales"]
        with np.errstate(all="ignore"):
            if p.ldexp:  # exact in f64, rounded once to F
                y = np.ldexp(values.astype(np.float64).reshape(*s.shape, desc.group_size),
                             s.astype(np.int64)[..., None] - 127)
                return _laid_out(desc, y.reshape(values.shape).astype(desc.float_dtype.np_dtype))
            if p.scale == "e8m0":
                scale = np.ldexp(np.float64(1.0), s.astype(np.int64) - 127).astype(np.float32)
            else:
                scale = s.view(ml_dtypes.float8_e4m3fn).astype(np.float32)
            if p.global_scale == "multiply":
                scale = scale * arrays["global_scale"].astype(np.float32)[0]
            elif p.global_scale == "divide":
                scale = scale / arrays["global_scale"].astype(np.float32)[0]
            y = (values * np.repeat(scale, desc.group_size, axis=1)).astype(
                desc.float_dtype.np_dtype)
        return _laid_out(desc, y)

    def linear_view(self, desc):
        # A row of W [N, K] is K / 2 code bytes and K / block scales, the per-tensor scale
        # shared. gpt-oss's experts are read as stored (an expert's rows are its N
        # outputs), not transposed as its dequantize writes them.
        p = PRODUCERS[desc.fp4][desc.checkpoint_format]
        slices = {"w": RowSlice(1, 1, 2), "scales": RowSlice(1, 1, p.block)}
        if p.global_scale:
            slices["global_scale"] = RowSlice(0, 0)
        same = dict(experts=1, fp4=desc.fp4, checkpoint_format=desc.checkpoint_format,
                    float_dtype=DType.F32, stored_rows=p.transposed)
        return LinearView(slices=slices, sizes={"experts": (0, 1), "rows": (0, 1), "cols": (1, 1)},
                          k_multiple=p.block, cuda_value="fp4",
                          decode=Fp4DequantizeDescriptor(0, 0, **same),
                          sized=lambda n, k: Fp4DequantizeDescriptor(n, k, **same))

    def int8_view(self, desc):
        # MXFP4: twice each e2m1 value is an integer (0, 1, 2, 3, 4, 6, 8, 12 and their
        # negatives), and half each E8M0 scale a power of two, so their product is exact.
        # NVFP4's half scale is not exact where its scale is subnormal: not read.
        p = PRODUCERS[desc.fp4][desc.checkpoint_format]
        if p.scale != "e8m0":
            return None
        knobs = int8_knobs(p)
        return Int8View("c/int8_fp4.j2", knobs, p.block, False, p.block,
                        lambda arrays, n, k: int8_parts(knobs, arrays, n, k),
                        f"{desc.checkpoint_format} MXFP4: e2m1 values with an E8M0 scale a "
                        f"block of {p.block} along k")

    def int8_names(self) -> tuple[str, ...]:
        return ("MXFP4 rows (gpt-oss's experts, compressed-tensors mxfp4-pack-quantized)",)

    def format_name(self, desc) -> str:
        return f"{desc.checkpoint_format} {desc.fp4}"

    def aot_candidates(self, op, value):
        for fmt, f in itertools.product(value("checkpoint_format"), value("float")):
            yield lambda fmt=fmt, f=f: self.aot_descriptor(
                op, None, f, 0, {"checkpoint_format": fmt})

    def aot_descriptor(self, op, int_dtype, float_dtype, group_size, knobs):
        return Fp4DequantizeDescriptor(0, 0, 1, op, knobs["checkpoint_format"], float_dtype)

    def aot_request(self, desc):
        return desc.fp4, None, 0, {"checkpoint_format": desc.checkpoint_format}


FP4 = register(Fp4Kind())
