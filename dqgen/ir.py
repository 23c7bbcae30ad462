"""The descriptor IR: what a kernel computes, validated, with stable identities.

A descriptor is a frozen dataclass. Construction normalises dtypes to ``DType`` members
and runs ``verify()``, so an invalid descriptor cannot exist and nothing unvalidated can
reach a template. ``uri`` names the kernel (only the fields it is specialised on);
``key()`` hashes the whole descriptor.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
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
    I32 = "i32"
    F16 = "f16"
    BF16 = "bf16"
    F32 = "f32"
    F64 = "f64"

    @property
    def short(self) -> str:
        return self.value

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
    def int_range(self) -> tuple[int, int]:
        info = np.iinfo(self.np_dtype)
        return int(info.min), int(info.max)


_NP = {
    DType.S8: np.dtype(np.int8), DType.U8: np.dtype(np.uint8), DType.I32: np.dtype(np.int32),
    DType.F16: np.dtype(np.float16), DType.BF16: np.dtype(ml_dtypes.bfloat16),
    DType.F32: np.dtype(np.float32), DType.F64: np.dtype(np.float64),
}
INT_DTYPES = (DType.S8, DType.U8)
FLOAT_DTYPES = (DType.F32, DType.F64, DType.F16, DType.BF16)
_ALIASES = {
    "int8": DType.S8, "uint8": DType.U8, "float16": DType.F16, "half": DType.F16,
    "bfloat16": DType.BF16, "float32": DType.F32, "float": DType.F32,
    "float64": DType.F64, "double": DType.F64,
}


def dtype_from_any(value: Any) -> DType | None:
    """Map a DType, short name, numpy dtype, ml_dtypes type or torch dtype to a DType."""
    if isinstance(value, DType):
        return value
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
        if candidate == npd and member is not DType.I32:
            return member
    return None


def parse_dtype(value: Any, field: str, allowed: tuple[DType, ...]) -> DType:
    """Normalise ``value`` for ``field``, raising ``UnsupportedError`` naming both."""
    member = dtype_from_any(value)
    if member is None or member not in allowed:
        names = ", ".join(d.value for d in allowed)
        raise UnsupportedError(f"{field}={value!r} is not supported; expected one of: {names}")
    return member


def check_int(value: Any, field: str, *, minimum: int = 0, maximum: int = INT64_MAX) -> int:
    """A plain integer in ``[minimum, maximum]`` (bools and floats are refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InvalidProblemError(
            f"{field} must be an integer, got {type(value).__name__} {value!r}")
    value = int(value)
    if not minimum <= value <= maximum:
        raise InvalidProblemError(f"{field}={value} is out of range [{minimum}, {maximum}]")
    return value


class Op(enum.Enum):
    """The four ops of the per-group family; the value is the URI stem."""

    DEQUANTIZE = "dequant_pg"
    QUANTIZE = "quant_pg"
    DEQUANTIZE_BACKWARD = "dequant_pg_bwd"
    QUANTIZE_BACKWARD = "quant_pg_bwd"


@dataclass(frozen=True)
class _PerGroupDescriptor:
    """Fields and checks shared by the family: an ``[outer, axis]`` problem in groups."""

    op: ClassVar[Op]
    outer: int
    axis: int
    group_size: int

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if f.name.endswith("dtype"):
                allowed = INT_DTYPES if f.name == "int_dtype" else FLOAT_DTYPES
                object.__setattr__(self, f.name, parse_dtype(getattr(self, f.name), f.name, allowed))
        self.verify()

    def verify(self) -> None:
        """Raise ``InvalidProblemError`` naming the first field the spec forbids."""
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


@dataclass(frozen=True)
class DequantizePerGroupDescriptor(_PerGroupDescriptor):
    """``y = F(C(q - zp) * C(scale))`` (SPEC.md §3)."""

    op: ClassVar[Op] = Op.DEQUANTIZE
    float_dtype: DType
    int_dtype: DType


@dataclass(frozen=True)
class QuantizePerGroupDescriptor(_PerGroupDescriptor):
    """``q = clamp(rint(x / scale) + zp, q_min, q_max)`` (SPEC.md §4).

    ``q_min``/``q_max`` default to the storage dtype's full range.
    """

    op: ClassVar[Op] = Op.QUANTIZE
    float_dtype: DType
    int_dtype: DType
    q_min: int | None = None
    q_max: int | None = None

    def verify(self) -> None:
        super().verify()
        lo, hi = self.int_dtype.int_range
        q_range = resolve_q_range(self.q_min, self.q_max, lo, hi, self.int_dtype.value)
        object.__setattr__(self, "q_min", q_range[0])
        object.__setattr__(self, "q_max", q_range[1])


@dataclass(frozen=True)
class DequantizePerGroupBackwardDescriptor(_PerGroupDescriptor):
    """``dq = F(C(dy) * C(scale))``."""

    op: ClassVar[Op] = Op.DEQUANTIZE_BACKWARD
    float_dtype: DType


# The backward of quantize names no storage dtype; its range is checked against the
# union of the family's storage ranges (s8 and u8).
_ANY_STORAGE_RANGE = (min(d.int_range[0] for d in INT_DTYPES),
                      max(d.int_range[1] for d in INT_DTYPES))


@dataclass(frozen=True)
class QuantizePerGroupBackwardDescriptor(_PerGroupDescriptor):
    """Straight-through estimator of quantize: ``dx = F(C(dy) / C(scale))`` in range, else 0."""

    op: ClassVar[Op] = Op.QUANTIZE_BACKWARD
    float_dtype: DType
    q_min: int
    q_max: int

    def verify(self) -> None:
        super().verify()
        if self.q_min is None or self.q_max is None:
            raise InvalidProblemError("q_min and q_max are required for quantize backward")
        q_range = resolve_q_range(self.q_min, self.q_max, *_ANY_STORAGE_RANGE, "s8/u8")
        object.__setattr__(self, "q_min", q_range[0])
        object.__setattr__(self, "q_max", q_range[1])


DESCRIPTORS = (DequantizePerGroupDescriptor, QuantizePerGroupDescriptor,
               DequantizePerGroupBackwardDescriptor, QuantizePerGroupBackwardDescriptor)
