"""How the int8 linear reads the per-group family (``templates/c/int8_family.j2``): the
stored integers as int8 codes (u8 moved by -128, its zero points with it), each group's
f32 scale, and a min that carries the zero point: a value is ``scale * code + min`` with
``min = -(scale * f32(zero_point - bias))`` rounded once (SPEC.md §9)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class FamilyInt8Knobs:
    """What ``int8_family.j2`` prints: nibbles or bytes, signed nibbles, the move of u8."""

    packed: bool             # u4/s4: two values a byte, low nibble first
    signed_nibbles: bool     # s4
    zero_bias: int           # u8: 128 (codes q - 128, zero points zp - 128); else 0
    per_byte: int


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
        codes = q.reshape(n, k).astype(np.int16) - knobs.zero_bias
    scales = np.asarray(arrays["scale"], np.float32).reshape(n, k // g)
    zero = np.asarray(arrays["zero_point"]).astype(np.int64).reshape(n, k // g) - knobs.zero_bias
    with np.errstate(all="ignore"):
        mins = -(scales * zero.astype(np.float32))
    return codes.astype(np.int8), scales, mins.astype(np.float32)
