"""The descriptor IR: what a kernel computes, validated, with stable identities.

A descriptor is a frozen dataclass. Construction normalises dtypes to ``DType`` members
and runs ``validate()``, so an invalid descriptor cannot exist and nothing unvalidated can
reach a template. ``uri`` names the kernel (only the fields it is specialised on);
``key()`` hashes the whole descriptor.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import ml_dtypes
import numpy as np

from .errors import InvalidProblemError, UnsupportedError

INT64_MAX = 2**63 - 1


class DType(enum.Enum):
    """Element types. Each knows its numpy dtype, byte size and value range."""

    S8 = "s8"
    U8 = "u8"
    S4 = "s4"  # packed: two values a byte, low nibble first (FORMATS.md)
    U4 = "u4"
    I32 = "i32"
    F16 = "f16"
    BF16 = "bf16"
    F32 = "f32"
    F64 = "f64"

    @property
    def np_dtype(self) -> np.dtype:
        return _NP[self]

    @property
    def itemsize(self) -> int:
        return self.np_dtype.itemsize

    @property
    def is_float(self) -> bool:
        return self in FLOAT_DTYPES

    @property
    def bits(self) -> int:
        """Bits of one value (4 for the packed types, whose storage unit is a byte)."""
        return 4 if self in PACKED_DTYPES else 8 * self.itemsize

    @property
    def is_packed(self) -> bool:
        return self in PACKED_DTYPES

    def storage_shape(self, rows: int, cols: int) -> tuple[int, int]:
        """Shape of the array holding an ``[rows, cols]`` problem in this type."""
        return (rows, cols // 2) if self in PACKED_DTYPES else (rows, cols)

    @property
    def int_range(self) -> tuple[int, int]:
        if self in PACKED_DTYPES:
            return (-8, 7) if self is DType.S4 else (0, 15)
        info = np.iinfo(self.np_dtype)
        return int(info.min), int(info.max)


_NP = {
    DType.S8: np.dtype(np.int8), DType.U8: np.dtype(np.uint8), DType.I32: np.dtype(np.int32),
    DType.F16: np.dtype(np.float16), DType.BF16: np.dtype(ml_dtypes.bfloat16),
    DType.F32: np.dtype(np.float32), DType.F64: np.dtype(np.float64),
    # Packed 4-bit values live in bytes; listed last so uint8 arrays map to u8.
    DType.S4: np.dtype(np.uint8), DType.U4: np.dtype(np.uint8),
}
PACKED_DTYPES = (DType.S4, DType.U4)
INT_DTYPES = (DType.S8, DType.U8)
# What a descriptor's int_dtype may be: the byte types and the packed 4-bit ones.
STORAGE_DTYPES = INT_DTYPES + PACKED_DTYPES
FLOAT_DTYPES = (DType.F32, DType.F64, DType.F16, DType.BF16)
_ALIASES = {
    "int8": DType.S8, "uint8": DType.U8, "float16": DType.F16, "half": DType.F16,
    "bfloat16": DType.BF16, "float32": DType.F32, "float": DType.F32,
    "float64": DType.F64, "double": DType.F64,
}


def _show(value: Any) -> str:
    """``repr(value)`` for an error message: shortened, and never raising itself."""
    try:
        text = repr(value)
    except Exception:
        text = f"<{type(value).__name__} object>"
    return text if len(text) <= 80 else text[:77] + "..."


def dtype_from_any(value: Any) -> DType | None:
    """Map a DType, short name, numpy dtype, ml_dtypes type or torch dtype to a DType.

    Anything else, including objects whose conversion raises, gives None.
    """
    try:
        return _dtype_from_any(value)
    except Exception:
        return None


def _dtype_from_any(value: Any) -> DType | None:
    if isinstance(value, DType):
        return value
    if value is None:  # np.dtype(None) is float64: a missing dtype must not become f64
        return None
    if isinstance(value, str):
        text = value.strip().lower()
        for member in DType:
            if member.value == text:
                return member
        return _ALIASES.get(text)
    torch_name = getattr(value, "__module__", None) == "torch" and str(value)
    if torch_name and torch_name.startswith("torch."):
        return _ALIASES.get(torch_name[len("torch."):])
    try:
        npd = np.dtype(value)
    except (TypeError, ValueError):
        return None
    for member, candidate in _NP.items():
        if candidate == npd and member is not DType.I32 and member not in PACKED_DTYPES:
            return member
    return None


def parse_dtype(value: Any, field: str, allowed: tuple[DType, ...]) -> DType:
    """Normalise ``value`` for ``field``, raising ``UnsupportedError`` naming both."""
    member = dtype_from_any(value)
    if member is None or member not in allowed:
        names = ", ".join(d.value for d in allowed)
        raise UnsupportedError(
            f"{field}={_show(value)} is not supported; expected one of: {names}")
    return member


def check_int(value: Any, field: str, *, minimum: int = 0, maximum: int = INT64_MAX) -> int:
    """A plain integer in ``[minimum, maximum]`` (bools and floats are refused)."""
    kind = type(value)  # not isinstance: an object can claim any class via __class__
    ok = kind is not bool and issubclass(kind, (int, np.integer))
    try:
        value = int(value) if ok else value
    except Exception:
        ok = False
    if not ok or type(value) is not int:
        raise InvalidProblemError(
            f"{field} must be an integer, got {kind.__name__} {_show(value)}")
    if not minimum <= value <= maximum:
        raise InvalidProblemError(f"{field}={value} is out of range [{minimum}, {maximum}]")
    return value


class Op(enum.Enum):
    """The four ops of the per-group family, and the fused linear over any layout; the
    value is the URI stem."""

    DEQUANTIZE = "dequant_pg"
    QUANTIZE = "quant_pg"
    DEQUANTIZE_BACKWARD = "dequant_pg_bwd"
    QUANTIZE_BACKWARD = "quant_pg_bwd"
    LINEAR = "linear"


@dataclass(frozen=True)
class PerGroupDescriptor:
    """Fields and checks shared by the family: an ``[outer, axis]`` problem in groups."""

    op: ClassVar[Op]
    outer: int
    axis: int
    group_size: int

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``InvalidProblemError`` naming the first field the spec forbids.

        Every field is normalised again, so a descriptor whose fields were forced past
        the frozen dataclass (``object.__setattr__``) is caught here too.
        """
        for f in dataclasses.fields(self):
            if f.name.endswith("dtype"):
                allowed = STORAGE_DTYPES if f.name == "int_dtype" else FLOAT_DTYPES
                object.__setattr__(self, f.name, parse_dtype(getattr(self, f.name), f.name, allowed))
        outer = check_int(self.outer, "outer")
        axis = check_int(self.axis, "axis")
        group_size = check_int(self.group_size, "group_size", minimum=1, maximum=2**31 - 1)
        object.__setattr__(self, "outer", outer)
        object.__setattr__(self, "axis", axis)
        object.__setattr__(self, "group_size", group_size)
        if axis % group_size:
            raise InvalidProblemError(
                f"axis={axis} is not a multiple of group_size={group_size}")
        if outer * axis > INT64_MAX:
            raise InvalidProblemError(f"outer*axis={outer * axis} does not fit in int64")
        if self.int_type is not None and self.int_type.is_packed and axis % 2:
            raise InvalidProblemError(
                f"axis={axis} is odd; packed {self.int_type.value} stores two values a byte "
                "along the axis, so it must be even")

    @property
    def num_groups(self) -> int:
        return self.axis // self.group_size

    @property
    def int_type(self) -> DType | None:
        return getattr(self, "int_dtype", None)

    @property
    def uri(self) -> str:
        """Readable kernel name: op, dtypes and group size (not the runtime sizes)."""
        parts = [self.op.value]
        if self.int_type is not None:
            parts.append(self.int_type.value)
        parts += [self.float_dtype.value, f"g{self.group_size}"]
        return "_".join(parts)

    def to_json(self) -> dict:
        out = {"op": self.op.name.lower()}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.value if isinstance(value, DType) else value
        return out

    def key(self) -> str:
        """sha256 of the canonical JSON of every field."""
        text = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


def resolve_q_range(q_min: Any, q_max: Any, lo: int, hi: int, storage: str) -> tuple[int, int]:
    """Default ``q_min``/``q_max`` to ``[lo, hi]`` and check they lie inside it, in order."""
    q_min = lo if q_min is None else check_int(q_min, "q_min", minimum=-2**63)
    q_max = hi if q_max is None else check_int(q_max, "q_max", minimum=-2**63)
    for name, value in (("q_min", q_min), ("q_max", q_max)):
        if not lo <= value <= hi:
            raise InvalidProblemError(
                f"{name}={value} is outside the {storage} storage range [{lo}, {hi}]")
    if q_max < q_min:
        raise InvalidProblemError(f"q_max={q_max} is less than q_min={q_min}")
    return q_min, q_max


def byte_storage_for(q_min: Any, q_max: Any) -> str:
    """The one-byte storage (s8, else u8) that holds ``[q_min, q_max]``: what a fake
    quantize over that range stores its values in."""
    q_min = check_int(q_min, "q_min", minimum=-2**63)
    q_max = check_int(q_max, "q_max", minimum=-2**63)
    for storage in INT_DTYPES:
        lo, hi = storage.int_range
        if lo <= q_min and q_max <= hi:
            resolve_q_range(q_min, q_max, lo, hi, storage.value)  # q_min <= q_max
            return storage.value
    raise InvalidProblemError(f"q_min={q_min}, q_max={q_max}: the range must lie inside s8 "
                              "[-128, 127] or u8 [0, 255]")


@dataclass(frozen=True)
class _RangedDescriptor(PerGroupDescriptor):
    """A per-group problem with a storage range: ``q_min``/``q_max`` default to the int
    dtype's range and are checked against it."""

    float_dtype: DType
    int_dtype: DType
    q_min: int | None = None
    q_max: int | None = None

    def validate(self) -> None:
        super().validate()
        lo, hi = self.int_dtype.int_range
        q_range = resolve_q_range(self.q_min, self.q_max, lo, hi, self.int_dtype.value)
        object.__setattr__(self, "q_min", q_range[0])
        object.__setattr__(self, "q_max", q_range[1])


@dataclass(frozen=True)
class DequantizePerGroupDescriptor(PerGroupDescriptor):
    """``y = F(C(q - zp) * C(scale))`` (SPEC.md §3)."""

    op: ClassVar[Op] = Op.DEQUANTIZE
    float_dtype: DType
    int_dtype: DType


@dataclass(frozen=True)
class QuantizePerGroupDescriptor(_RangedDescriptor):
    """``q = clamp(rint(x / scale) + zp, q_min, q_max)`` (SPEC.md §4).

    ``q_min``/``q_max`` default to the storage dtype's full range.
    """

    op: ClassVar[Op] = Op.QUANTIZE


@dataclass(frozen=True)
class DequantizePerGroupBackwardDescriptor(PerGroupDescriptor):
    """``dq = F(C(dy) * C(scale))``."""

    op: ClassVar[Op] = Op.DEQUANTIZE_BACKWARD
    float_dtype: DType


# The backward of quantize names no storage dtype; its range is checked against the
# union of the family's storage ranges (s8 and u8).
_ANY_STORAGE_RANGE = (min(d.int_range[0] for d in INT_DTYPES),
                      max(d.int_range[1] for d in INT_DTYPES))


@dataclass(frozen=True)
class QuantizePerGroupBackwardDescriptor(PerGroupDescriptor):
    """Straight-through estimator of quantize: ``dx = F(C(dy) / C(scale))`` in range, else 0."""

    op: ClassVar[Op] = Op.QUANTIZE_BACKWARD
    float_dtype: DType
    q_min: int
    q_max: int

    def validate(self) -> None:
        super().validate()
        if self.q_min is None or self.q_max is None:
            raise InvalidProblemError("q_min and q_max are required for quantize backward")
        q_range = resolve_q_range(self.q_min, self.q_max, *_ANY_STORAGE_RANGE, "s8/u8")
        object.__setattr__(self, "q_min", q_range[0])
        object.__setattr__(self, "q_max", q_range[1])


DESCRIPTORS = (DequantizePerGroupDescriptor, QuantizePerGroupDescriptor,
               DequantizePerGroupBackwardDescriptor, QuantizePerGroupBackwardDescriptor)


# --- Storage layouts beyond the seed (FORMATS.md) ---------------------------------------


class Layout(enum.Enum):
    """Where a kernel's integer values, scales and zero points live (FORMATS.md).

    A layout is an unpack rule plus the places of the scales and zero points; the
    group/scale/zero math is the same for all of them.
    """

    PLAIN = "plain"          # one s8/u8 value an element; scale/zero_point [outer, groups]
    PACKED4 = "packed4"      # u4/s4: two values a byte along the axis, low nibble first
    GPTQ = "gptq"            # int32 words packed along K; groups along K (the rows)
    AWQ = "awq"              # int32 words packed along N in the interleaved nibble order
    GGML_Q4_0 = "ggml_q4_0"  # 32-value blocks with their f16 scale (and min) inline
    GGML_Q4_1 = "ggml_q4_1"
    GGML_Q5_0 = "ggml_q5_0"
    GGML_Q8_0 = "ggml_q8_0"
    GGML_Q5_1 = "ggml_q5_1"
    GGML_Q2_K = "ggml_q2_k"  # 256-value super-blocks with packed sub-block scales
    GGML_Q3_K = "ggml_q3_k"
    GGML_Q4_K = "ggml_q4_k"
    GGML_Q5_K = "ggml_q5_k"
    GGML_Q6_K = "ggml_q6_k"
    GGML_Q8_K = "ggml_q8_k"
    GGML_IQ4_NL = "ggml_iq4_nl"  # 16-entry codebook
    GGML_IQ4_XS = "ggml_iq4_xs"
    GGML_TQ1_0 = "ggml_tq1_0"  # ternary
    GGML_TQ2_0 = "ggml_tq2_0"
    GGML_MXFP4 = "ggml_mxfp4"
    GGML_IQ2_XXS = "ggml_iq2_xxs"  # grids of gguf-py's
    GGML_IQ3_XXS = "ggml_iq3_xxs"
    GGML_IQ2_XS = "ggml_iq2_xs"
    GGML_IQ2_S = "ggml_iq2_s"
    GGML_IQ3_S = "ggml_iq3_s"
    GGML_IQ1_S = "ggml_iq1_s"
    GGML_IQ1_M = "ggml_iq1_m"
    GGML_NVFP4 = "ggml_nvfp4"  # 64-value blocks, four E4M3 scales
    GGML_Q1_0 = "ggml_q1_0"  # 128 sign bits a block (+-d)
    GGML_Q2_0 = "ggml_q2_0"  # 64 2-bit values a block, q - 1 in {-1, 0, 1, 2}
    GGML_F32 = "ggml_f32"    # float tensors, passed through (one value a "block")
    GGML_F16 = "ggml_f16"
    GGML_BF16 = "ggml_bf16"
    MLX = "mlx"              # MLX affine: a bit stream of b-bit values a row, scales and biases
    FP8_BLOCK = "fp8_block"  # FP8 values, one f32 scale a 2-D block (DeepSeek-V3) or row/tensor
    BNB4 = "bnb4"            # bitsandbytes NF4/FP4: indices two a byte, blocks over the flat tensor
    BNB8 = "bnb8"            # bitsandbytes LLM.int8: int8 values, one f32 SCB a row
    FP4 = "fp4"              # e2m1 pairs a byte, an E8M0 or E4M3 scale a block of 32 or 16


#: Bytes and values of one GGML block, by layout (gguf's GGML_QUANT_SIZES).
GGML_BLOCK_BYTES = {Layout.GGML_Q4_0: 18, Layout.GGML_Q4_1: 20, Layout.GGML_Q5_0: 22,
                    Layout.GGML_Q8_0: 34, Layout.GGML_Q5_1: 24, Layout.GGML_Q2_K: 84,
                    Layout.GGML_Q3_K: 110, Layout.GGML_Q4_K: 144, Layout.GGML_Q5_K: 176,
                    Layout.GGML_Q6_K: 210, Layout.GGML_Q8_K: 292, Layout.GGML_IQ4_NL: 18,
                    Layout.GGML_IQ4_XS: 136, Layout.GGML_TQ1_0: 54, Layout.GGML_TQ2_0: 66,
                    Layout.GGML_MXFP4: 17, Layout.GGML_IQ2_XXS: 66, Layout.GGML_IQ3_XXS: 98,
                    Layout.GGML_IQ2_XS: 74, Layout.GGML_IQ2_S: 82, Layout.GGML_IQ3_S: 110,
                    Layout.GGML_IQ1_S: 50, Layout.GGML_IQ1_M: 56, Layout.GGML_NVFP4: 36,
                    Layout.GGML_Q1_0: 18, Layout.GGML_Q2_0: 18,
                    Layout.GGML_F32: 4, Layout.GGML_F16: 2, Layout.GGML_BF16: 2}
_GGML_SMALL = (Layout.GGML_Q4_0, Layout.GGML_Q4_1, Layout.GGML_Q5_0, Layout.GGML_Q8_0,
               Layout.GGML_Q5_1, Layout.GGML_IQ4_NL, Layout.GGML_MXFP4)
_GGML_FLOATS = (Layout.GGML_F32, Layout.GGML_F16, Layout.GGML_BF16)
_GGML_OTHER_VALUES = {Layout.GGML_NVFP4: 64, Layout.GGML_Q1_0: 128, Layout.GGML_Q2_0: 64}
GGML_BLOCK_VALUES = {layout: 32 if layout in _GGML_SMALL else 1 if layout in _GGML_FLOATS
                     else _GGML_OTHER_VALUES.get(layout, 256)
                     for layout in GGML_BLOCK_BYTES}
GPTQ_BITS = (2, 3, 4, 8)
GPTQ_CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
# How a v1 ("gptq") file's stored zeros decode (FORMATS.md). "gptqmodel": a 1 in every
# field is added to the whole int32 word, carries crossing fields (GPTQModel, through
# which transformers and optimum load, subtracts it word-wise when it writes v1);
# "autogptq": 1 is added to each field modulo 2^bits (AutoGPTQ's torch dequant);
# "exllama": 1 is added to each field, a stored all-ones field reading 2^bits (the
# exllama/exllamav2 and vLLM GPTQ kernels). They differ only where a field is all ones.
GPTQ_V1_ZEROS = ("gptqmodel", "autogptq", "exllama")


def gptq_v1_word_offset(bits: int) -> int:
    """A 1 in every ``bits``-wide field of an int32 word (``0x11111111`` for 4 bits): what
    GPTQModel subtracts from each whole qzeros word to write v1 and adds back to read it."""
    return sum(1 << (bits * j) for j in range(32 // bits))
# Float dtypes a GGML block dequantizes to (the blocks' own math is f32).
GGML_FLOAT_DTYPES = (DType.F32, DType.F16, DType.BF16)


def parse_ggml_type(value: Any) -> Layout:
    """``"Q4_0"``, ``"q4_0"``, a ``Layout`` or a gguf ``GGMLQuantizationType`` -> Layout."""
    if isinstance(value, Layout) and value in GGML_BLOCK_BYTES:
        return value
    name = getattr(value, "name", value)
    if isinstance(name, str):
        for layout in GGML_BLOCK_BYTES:
            if layout.value == "ggml_" + name.strip().lower():
                return layout
    names = ", ".join(ggml_type_name(layout) for layout in GGML_BLOCK_BYTES)
    shown = repr(name) if isinstance(name, str) else _show(value)  # a type by its name
    raise UnsupportedError(f"qtype={shown} is not supported; expected one of: {names}")


def ggml_type_name(layout: Layout) -> str:
    """gguf's name of a GGML layout: ``Layout.GGML_Q4_K`` -> ``"Q4_K"``."""
    return layout.value[5:].upper()


@dataclass(frozen=True)
class FormatDescriptor:
    """Shared by the checkpoint-format descriptors: dtype parsing, identities.

    Fields named ``*dtype`` are parsed as float dtypes (the allowed set per class in
    ``float_dtypes``); ``validate()`` raises on anything FORMATS.md forbids.
    """

    op: ClassVar[Op] = Op.DEQUANTIZE
    layout: ClassVar[Layout]
    float_dtypes: ClassVar[tuple[DType, ...]] = FLOAT_DTYPES

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if f.name.endswith("dtype"):
                object.__setattr__(self, f.name, parse_dtype(getattr(self, f.name), f.name,
                                                             self.float_dtypes))
        self.validate()

    def validate(self) -> None:
        raise NotImplementedError

    def _set_int(self, name: str, **bounds) -> int:
        value = check_int(getattr(self, name), name, **bounds)
        object.__setattr__(self, name, value)
        return value

    def to_json(self) -> dict:
        out = {"op": self.op.name.lower(), "layout": self.layout.value}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.value if isinstance(value, enum.Enum) else value
        return out

    key = PerGroupDescriptor.key

    @property
    def int_type(self) -> DType | None:
        return None


@dataclass(frozen=True)
class _MatrixDescriptor(FormatDescriptor):
    """A ``[rows=K, cols=N]`` weight of int32-packed values, grouped along K."""

    rows: int
    cols: int
    group_size: int

    def _verify_matrix(self, pack_rows: int, pack_cols: int) -> None:
        rows, cols = self._set_int("rows"), self._set_int("cols")
        self._set_int("group_size", minimum=1, maximum=2**31 - 1)
        if rows % pack_rows:
            raise InvalidProblemError(
                f"rows (K)={rows} is not a multiple of {pack_rows}, the values an int32 "
                f"word packs along K")
        if cols % pack_cols:
            raise InvalidProblemError(
                f"cols (N)={cols} is not a multiple of {pack_cols}, the values an int32 "
                f"word packs along N")
        if rows * cols > INT64_MAX:
            raise InvalidProblemError(f"rows*cols={rows * cols} does not fit in int64")

    @property
    def num_groups(self) -> int:
        return -(-self.rows // self.group_size)


@dataclass(frozen=True)
class GptqDequantizeDescriptor(_MatrixDescriptor):
    """GPTQ ``W[k, n] = scales[g, n] * (q[k, n] - z[g, n])``, ``g = g_idx[k]`` (FORMATS.md).

    ``checkpoint_format`` ``"gptq"`` (v1) stores ``z - 1``, decoded by ``v1_zeros`` (one
    of ``GPTQ_V1_ZEROS``; set to the default for v2, where it has no effect); ``"gptq_v2"``
    stores ``z``. With ``act_order`` the kernel reads ``g_idx``; otherwise ``g = k //
    group_size``.
    """

    layout: ClassVar[Layout] = Layout.GPTQ
    bits: int = 4
    float_dtype: DType = DType.F16
    scale_dtype: DType = DType.F16
    checkpoint_format: str = "gptq"
    act_order: bool = False
    v1_zeros: str = "gptqmodel"

    def validate(self) -> None:
        bits = self._set_int("bits", minimum=0)
        if bits not in GPTQ_BITS:
            raise UnsupportedError(f"bits={bits} is not supported for GPTQ; expected one of "
                                   f"{', '.join(map(str, GPTQ_BITS))}")
        if self.checkpoint_format not in GPTQ_CHECKPOINT_FORMATS:
            raise UnsupportedError(f"checkpoint_format={self.checkpoint_format!r} is not "
                                   f"supported; expected one of: {', '.join(GPTQ_CHECKPOINT_FORMATS)}")
        if not isinstance(self.act_order, bool):
            raise InvalidProblemError(f"act_order must be a bool, got {self.act_order!r}")
        if self.v1_zeros not in GPTQ_V1_ZEROS:
            raise UnsupportedError(f"v1_zeros={self.v1_zeros!r} is not supported; expected "
                                   f"one of: {', '.join(GPTQ_V1_ZEROS)}")
        if self.checkpoint_format != "gptq":  # v2 stores z itself: one kernel, one key
            object.__setattr__(self, "v1_zeros", GPTQ_V1_ZEROS[0])
        per = 32 // math.gcd(32, bits)  # values in whole words: 32 in three for 3 bits
        self._verify_matrix(per, per)

    @property
    def uri(self) -> str:
        version = "v2" if self.checkpoint_format != "gptq" else (
            "v1" if self.v1_zeros == GPTQ_V1_ZEROS[0] else f"v1_{self.v1_zeros}")
        groups = "gidx" if self.act_order else f"g{self.group_size}"
        return (f"dequant_gptq{self.bits}_{version}_{self.scale_dtype.value}_"
                f"{self.float_dtype.value}_{groups}")


@dataclass(frozen=True)
class AwqDequantizeDescriptor(_MatrixDescriptor):
    """AWQ (GEMM) ``W[k, n] = (q[k, n] - z[k // G, n]) * scales[k // G, n]``, no "+1"."""

    layout: ClassVar[Layout] = Layout.AWQ
    float_dtype: DType = DType.F16
    scale_dtype: DType = DType.F16

    def validate(self) -> None:
        self._verify_matrix(1, 8)
        if self.rows % self.group_size:
            raise InvalidProblemError(f"rows (K)={self.rows} is not a multiple of "
                                      f"group_size={self.group_size}")

    @property
    def uri(self) -> str:
        return (f"dequant_awq4_{self.scale_dtype.value}_{self.float_dtype.value}_"
                f"g{self.group_size}")


@dataclass(frozen=True)
class GgmlDequantizeDescriptor(FormatDescriptor):
    """``blocks`` GGML blocks of one ``qtype`` (any of ``GGML_BLOCK_BYTES``) -> floats."""

    blocks: int
    qtype: Layout
    float_dtype: DType = DType.F32
    float_dtypes: ClassVar[tuple[DType, ...]] = GGML_FLOAT_DTYPES

    def __post_init__(self) -> None:
        object.__setattr__(self, "qtype", parse_ggml_type(self.qtype))
        super().__post_init__()

    def validate(self) -> None:
        blocks = self._set_int("blocks")
        if blocks * self.group_size > INT64_MAX:
            raise InvalidProblemError(f"blocks={blocks} is too many for int64 indexing")

    @property
    def layout(self) -> Layout:  # type: ignore[override]
        return self.qtype

    @property
    def group_size(self) -> int:
        """Values a block."""
        return GGML_BLOCK_VALUES[self.qtype]

    @property
    def block_bytes(self) -> int:
        return GGML_BLOCK_BYTES[self.qtype]

    @property
    def uri(self) -> str:
        return f"dequant_{self.qtype.value}_{self.float_dtype.value}"


@dataclass(frozen=True)
class DequantizeFloatZeroDescriptor(_RangedDescriptor):
    """Float zero point (torchao FLOAT domain, tinygemm): ``x = F(F(F(q - mid) * s) + z)``.

    ``mid = (q_max + q_min + 1) / 2``, a true division as torchao's (7.5 for [0, 14]; the
    range defaults to the storage type's); ``zero_point`` has the float dtype; each step
    rounds to the float dtype (no FMA), as torch does on tensors of it.
    """

    op: ClassVar[Op] = Op.DEQUANTIZE
    zero_kind: ClassVar[str] = "float"

    @property
    def mid(self) -> float:
        return (self.q_max + self.q_min + 1) / 2

    @property
    def uri(self) -> str:
        text = f"{abs(self.mid):g}".replace(".", "p")  # 8 -> m8, 7.5 -> m7p5, -0.5 -> mn0p5
        mid = f"m{text}" if self.mid >= 0 else f"mn{text}"
        return (f"dequant_fz_{self.int_dtype.value}_{self.float_dtype.value}_"
                f"g{self.group_size}_{mid}")


#: Bit widths HQQ packs (``hqq.core.bitpack.BitPack``): 8 in plain bytes; 4, 2 and 1 in
#: uint8 planes; 3 in int32 planes of ten values.
HQQ_BITS = (8, 4, 3, 2, 1)


@dataclass(frozen=True)
class HqqDequantizeDescriptor(PerGroupDescriptor):
    """HQQ (``hqq`` package): ``W = F(F(W_q - zero) * scale)``, ``zero`` and ``scale`` of F,
    each step rounded to F as torch does on F tensors (no ``mid``, no FMA).

    ``q`` holds ``[outer, axis]`` words of HQQ's ``BitPack`` (uint8; int32 for 3 bits), and
    a value is the ``bits``-wide field at bit ``shift`` of its word: one call dequantizes
    one plane. ``shift`` is a run-time argument of the kernel, so all planes share it.
    """

    op: ClassVar[Op] = Op.DEQUANTIZE
    zero_kind: ClassVar[str] = "float"
    zero_first: ClassVar[bool] = True   # the zero is subtracted from q, before the product
    float_dtype: DType
    bits: int = 4
    shift: int = 0

    def validate(self) -> None:
        super().validate()
        bits = check_int(self.bits, "bits", minimum=0)
        if bits not in HQQ_BITS:
            raise UnsupportedError(f"bits={bits} is not supported for HQQ; expected one of "
                                   f"{', '.join(map(str, HQQ_BITS))}")
        object.__setattr__(self, "bits", bits)
        top = 8 * self.int_dtype.itemsize - bits
        object.__setattr__(self, "shift", check_int(self.shift, "shift", minimum=0, maximum=top))

    @property
    def int_dtype(self) -> DType:
        return DType.I32 if self.bits == 3 else DType.U8

    @property
    def field_bits(self) -> int:
        """Bits of a field read at ``shift`` (0: the whole byte is the value)."""
        return 0 if self.bits == 8 else self.bits

    @property
    def mid(self) -> int:
        return 0

    @property
    def uri(self) -> str:
        return f"dequant_hqq{self.bits}_{self.float_dtype.value}_g{self.group_size}"
