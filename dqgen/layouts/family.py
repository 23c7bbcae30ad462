"""The per-group family as a format: quantize, dequantize and their backwards on s8/u8
and packed u4/s4 storage (SPEC.md §1-4), with ``dqgen.reference`` as the oracle."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np

from .. import reference
from ..errors import InvalidProblemError, UnsupportedError
from ..ir import (DESCRIPTORS, DequantizePerGroupBackwardDescriptor, DequantizePerGroupDescriptor,
                  DType, Op, PerGroupDescriptor, QuantizePerGroupBackwardDescriptor,
                  QuantizePerGroupDescriptor, check_int)
from ..spec import Param
from .family_int8 import codes_unsigned, family_int8_block_parts, family_int8_parts, int8_knobs
from .linear_int8 import K_CHUNK
from .per_group import lower_per_group
from .registry import FormatKind, Int8View, LinearView, RowSlice, cuda_block_values, register

# Command-line op names of the family and the descriptor each one builds.
OPS = {
    "dequantize": DequantizePerGroupDescriptor,
    "quantize": QuantizePerGroupDescriptor,
    "dequantize-backward": DequantizePerGroupBackwardDescriptor,
    "quantize-backward": QuantizePerGroupBackwardDescriptor,
}
OP_NAMES = {cls.op: name for name, cls in OPS.items()}
# The ops that read or write a storage dtype (the backwards of dequantize take none).
_STORING = (Op.DEQUANTIZE, Op.QUANTIZE)


def op_class(name: str) -> type:
    cls = OPS.get(str(name).strip().lower().replace("_", "-"))
    if cls is None:
        raise UnsupportedError(f"op {name!r} is not known; expected one of: {', '.join(OPS)}")
    return cls


def make_descriptor(op: str, int_dtype: str | None, float_dtype: str, group_size: int):
    """The descriptor of one family kernel. ``outer``/``axis`` are runtime arguments (0
    here); ops without a storage dtype ignore ``int_dtype``; quantize-backward's range is
    a runtime argument too, so any valid one names the same kernel."""
    cls = op_class(op)
    group_size = check_int(group_size, "group_size", minimum=1, maximum=2**31 - 1)
    if cls.op in _STORING:
        if int_dtype is None:
            raise InvalidProblemError(f"op {op!r} needs an int dtype (--int s8 or u8)")
        return cls(0, 0, group_size, float_dtype, int_dtype)
    if cls.op is Op.QUANTIZE_BACKWARD:
        return cls(0, 0, group_size, float_dtype, -128, 127)
    return cls(0, 0, group_size, float_dtype)


def unpack_nibbles(packed: np.ndarray, signed: bool) -> np.ndarray:
    """[..., n/2] bytes -> [..., n]: element 2k in the low nibble of byte k (FORMATS.md)."""
    b = packed.astype(np.int64)
    out = np.stack([b & 15, b >> 4], axis=-1).reshape(*packed.shape[:-1], -1)
    return np.where(out >= 8, out - 16, out) if signed else out


def stored_values(desc, q: np.ndarray) -> np.ndarray:
    """The integer values of ``q`` as int64, unpacked where the storage is packed."""
    t = desc.int_dtype
    return unpack_nibbles(q, t is DType.S4) if t.is_packed else q.astype(np.int64)


# Groups the int8 linear multiplies in the block order (SPEC.md §9): a group a block, from
# a whole AVX-512 register of codes to a GGML super-block; shorter and longer ones take the
# quad order.
BLOCK_GROUPS = (64, 256)


def int8_group_view(desc, knobs, scales: str):
    """The int8 linear's view of a per-group weight ``desc`` read as ``knobs`` say, or None
    where its groups are not a power of two from 16 values to a decoded chunk (whole quads,
    whole groups a chunk); groups of 64 to 256 in the block order."""
    g = desc.group_size
    if g < 16 or g & (g - 1) or K_CHUNK % g:
        return None
    if g < BLOCK_GROUPS[0] or g > BLOCK_GROUPS[1]:
        return Int8View("c/int8_family.j2", knobs, g, True, max(g, 32),
                        lambda arrays, n, k: family_int8_parts(desc, knobs, arrays, n, k),
                        f"{desc.int_dtype.value} values in groups of {g} along k, {scales} each",
                        (knobs.scale_load,) if knobs.scale_load else ())
    knobs = dataclasses.replace(knobs, block=g)
    return Int8View("c/int8_family.j2", knobs, g, True, g,
                    lambda arrays, n, k: family_int8_parts(desc, knobs, arrays, n, k),
                    f"{desc.int_dtype.value} values in groups of {g} along k, {scales} each",
                    (knobs.scale_load,) if knobs.scale_load else (), block=g,
                    block_parts=lambda arrays, n, k: family_int8_block_parts(
                        desc, knobs, arrays, n, k),
                    unsigned_codes=codes_unsigned(desc.int_dtype, knobs.code_add),
                    integer_mins=False)


class PerGroupKind(FormatKind):
    """``[outer, axis]`` problems in groups along the axis: scales and zero points
    ``[outer, groups]``; the family's schedule lowers every one of them."""

    descriptors = (PerGroupDescriptor,)
    aot_ops = (*OPS, "packed")

    aot_defaults = {"packed": {"int": ("u4", "s4")}}
    aot_keys = {"packed": ("int", "group_size")}

    def lower(self, desc, target, arch, storage):
        return lower_per_group(desc, target, arch, storage)

    def aot_candidates(self, op, value):
        floats, groups = value("float"), value("group_size")
        if op == "packed":  # the family's dequantize and quantize on u4/s4 storage
            for name, i, f, g in itertools.product(("dequantize", "quantize"), value("int"),
                                                   floats, groups):
                def make(name=name, i=i, f=f, g=g):
                    if not DType(i).is_packed:
                        raise UnsupportedError(f"int={i} is not a packed 4-bit type (u4, s4)")
                    return make_descriptor(name, i, f, g)
                yield make
            return
        ints = value("int") if op_class(op).op in _STORING else [None]
        for i, f, g in itertools.product(ints, floats, groups):
            yield lambda i=i, f=f, g=g: make_descriptor(op, i, f, g)

    def aot_descriptor(self, op, int_dtype, float_dtype, group_size, knobs):
        return make_descriptor(op, int_dtype, float_dtype, group_size)

    def aot_request(self, desc):
        int_dtype = desc.int_type.value if desc.int_type is not None else None
        return OP_NAMES[desc.op], int_dtype, desc.group_size, {}

    def array_shape(self, desc, param: Param) -> tuple[int, ...]:
        if param.name in ("scale", "zero_point"):
            return (desc.outer, desc.num_groups)
        return param.dtype.storage_shape(desc.outer, desc.axis)  # packed q: axis / 2 bytes

    def launch_elements(self, desc) -> int:
        return desc.outer * desc.axis

    def small_problem(self, desc, remake):
        g = desc.group_size
        # two groups a row, and at least 32 values (the vector steps of small groups run)
        return remake(outer=3, axis=g * max(2, -(-32 // g)) if g <= 1 << 15 else g,
                      **self.extra_sizes(desc))

    def extra_sizes(self, desc) -> dict:
        """Run-time arguments beyond the shape a small problem sets (none here)."""
        return {}

    def int8_view(self, desc):
        if type(desc) is not DequantizePerGroupDescriptor:
            return None
        i = desc.int_dtype
        return int8_group_view(desc, int8_knobs(i, -128 if i is DType.U8 else 0, False, ""),
                               "an f32 scale and an int32 zero point")

    def int8_names(self) -> tuple[str, ...]:
        return ("the per-group family (s8, u8, u4, s4; GPTQ and AWQ repacked) with groups of "
                "16 to 2048 values, a power of two",)

    def format_name(self, desc) -> str:
        return f"per-group {desc.int_dtype.value} (group size {desc.group_size})"

    def linear_view(self, desc):
        # the family's dequantize with integer zero points (plain and packed); its
        # f32 kernel gives the value C(q - zp) * C(scale) before the output's rounding
        if type(desc) is not DequantizePerGroupDescriptor:
            return None
        g, i = desc.group_size, desc.int_dtype
        packed = 2 if i.is_packed else 1
        return LinearView(
            slices={"q": RowSlice(1, 1, packed), "scale": RowSlice(1, 1, g),
                    "zero_point": RowSlice(1, 1, g)},
            sizes={"outer": (0, 1), "axis": (1, 1)}, cuda_value="per_group",
            cuda_block_values=cuda_block_values(g), k_multiple=g * packed // np.gcd(g, packed),
            decode=DequantizePerGroupDescriptor(0, 0, g, DType.F32, i),
            sized=lambda n, k: DequantizePerGroupDescriptor(n, k, g, DType.F32, i))

    def random_input(self, desc, name, shape, rng):
        if name == "zero_point" and getattr(desc, "zero_kind", "int") == "int":
            return rng.integers(-300, 300, shape).astype(np.int32)
        return None

    def oracle(self, desc, arrays: dict) -> np.ndarray:
        if type(desc) not in DESCRIPTORS:
            raise LookupError(f"no oracle for {type(desc).__name__}")
        g = desc.group_size
        if desc.op is Op.DEQUANTIZE:
            return reference.dequantize_per_group(stored_values(desc, arrays["q"]),
                                                  arrays["scale"], arrays["zero_point"], g)
        if desc.op is Op.QUANTIZE:
            q = reference.quantize_per_group(arrays["x"], arrays["scale"], arrays["zero_point"],
                                             g, np.int64, desc.q_min, desc.q_max)
            if desc.int_dtype.is_packed:
                v = q & 15
                return (v[:, 0::2] | (v[:, 1::2] << 4)).astype(np.uint8)
            return q.astype(desc.int_dtype.np_dtype)
        if desc.op is Op.DEQUANTIZE_BACKWARD:
            return reference.dequantize_per_group_backward(arrays["d_output"], arrays["scale"], g)
        return reference.quantize_per_group_backward(arrays["d_output"], arrays["x"],
                                                     arrays["scale"], arrays["zero_point"], g,
                                                     desc.q_min, desc.q_max)


FAMILY = register(PerGroupKind())
