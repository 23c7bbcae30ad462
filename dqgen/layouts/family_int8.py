"""How the int8 linear reads the per-group family and float zero points
(``templates/c/int8_family.j2``): the stored integers as int8 codes, each group's f32
scale, and a min that carries the zero point, so that a value is ``scale * code + min``
(SPEC.md §9). The family: codes ``q`` (u8: ``q - 128``, its zero points moved with it),
``min = -(scale * f32(zero_point - bias))`` rounded once. Float zero points: codes
``q - mid`` (an integer mid), ``min`` the zero point widened."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class FamilyInt8Knobs:
    """What ``int8_family.j2`` prints: nibbles or bytes, signed nibbles, what the codes are
    moved by, and how a group's scale and min are read."""

    packed: bool             # u4/s4: two values a byte, low nibble first
    signed_nibbles: bool     # s4
    code_add: int            # added to each stored integer (mod 256): -128 (u8), -mid
    zero_bias: int           # integer zero points: moved by this much with the codes
    per_byte: int
    float_zero: bool         # the min is the zero point itself (float zero points)
    scale_load: str          # the scales' and zero points' widening ("" for f32)
    block: int = 0           # the block order's block: a group (0: the quad order)


def int8_knobs(int_dtype, code_add: int, float_zero: bool, scale_load: str) -> FamilyInt8Knobs:
    return FamilyInt8Knobs(packed=int_dtype.is_packed,
                           signed_nibbles=int_dtype.name == "S4",
                           code_add=code_add, zero_bias=0 if float_zero else -code_add,
                           per_byte=2 if int_dtype.is_packed else 1, float_zero=float_zero,
                           scale_load=scale_load)


def codes_unsigned(int_dtype, code_add: int) -> bool:
    """Whether every code (a stored integer plus ``code_add``) is 0 to 127."""
    lo, hi = {"U4": (0, 15), "S4": (-8, 7), "U8": (0, 255), "S8": (-128, 127)}[int_dtype.name]
    return 0 <= lo + code_add and hi + code_add <= 127


def family_int8_block_parts(desc, knobs: FamilyInt8Knobs, arrays: dict, n: int, k: int):
    """The block order's parts (``reference.linear_int8_blocks``'s): a group is a block of
    one sub-block, its scale the block's d, its min the block's min factor times 1."""
    codes, scales, mins = family_int8_parts(desc, knobs, arrays, n, k)
    ones = np.ones(scales.shape, np.int32)
    return codes, ones, scales, ones, mins


def family_int8_parts(desc, knobs: FamilyInt8Knobs, arrays: dict, n: int, k: int):
    """The weight's codes ``[n, k]`` (int8), scales and mins ``[n, k / group]`` (f32), as
    the kernel decodes them."""
    g = desc.group_size
    q = np.asarray(arrays["q"])
    if knobs.packed:
        b = q.view(np.uint8).reshape(n, k // 2).astype(np.int16)
        codes = np.empty((n, k), np.int16)
        codes[:, 0::2], codes[:, 1::2] = b & 15, b >> 4
        if knobs.signed_nibbles:
            codes = (codes ^ 8) - 8
    else:
        codes = q.reshape(n, k).astype(np.int16)
    codes = codes + knobs.code_add
    scales = np.asarray(arrays["scale"]).astype(np.float32).reshape(n, k // g)
    zero = np.asarray(arrays["zero_point"]).reshape(n, k // g)
    if knobs.float_zero:
        return codes.astype(np.int8), scales, zero.astype(np.float32)
    moved = zero.astype(np.int64) - knobs.zero_bias
    with np.errstate(all="ignore"):
        mins = -(scales * moved.astype(np.float32))
    return codes.astype(np.int8), scales, mins.astype(np.float32)
