"""A GGML block's integer parts, read from the block table in numpy: each value's integer
``C(q)``, each sub-block's scale ``d_k`` and min ``m_k`` (f32), so that the value is
``(d_k * C(q)) + m_k``, each operation rounded in f32 (``m_k`` absent: ``d_k * C(q)``).

The int8 linear (SPEC.md §9) multiplies these integers, not the floats; its reference
reads them here. A super-block type (256 values, integer sub-block scales: the K-quants,
IQ4_XS, Q8_K, TQ1_0, TQ2_0) is read one step further, as llama.cpp multiplies it: the
sub-block scales and mins stay integers and the block's d and dmin are the only floats
(``superblock_parts``). The tests check that recombining the parts gives gguf-py's own
dequantized values bit for bit, so this reading of the table is checked by the oracle.
"""

from __future__ import annotations

import numpy as np

from ..ir import Layout
from .ggml_blocks import LAYOUTS, BlockLayout, Field, Plane, Scalar
from .ggml_knobs import SCALE_TABLES


def int8_layout(layout: Layout) -> BlockLayout | None:
    """``layout``'s block if its values are integers of int8 range times a sub-block scale
    (plus a min) in sub-blocks of whole quads, as the int8 linear needs; else None."""
    block = LAYOUTS.get(layout)
    if block is None or block.q is None or block.grid is not None or block.d.field:
        return None
    sub = block.sub or block.values
    if sub % 4 or block.values % 32:
        return None
    lo, hi = _range(block.q)
    return block if -128 <= lo and hi <= 127 else None


# Values of a super-block, and the lane sums its integer products make (SPEC.md §9).
SUPERBLOCK = 256
SUPERBLOCK_LANES = 8
# The largest integer every f32 holds exactly: a lane's and a min's integer sum stay within.
EXACT_F32 = 1 << 24


def superblock_layout(layout: Layout) -> BlockLayout | None:
    """``layout``'s block if the int8 linear multiplies it a super-block at a time: 256
    values whose sub-block scales are integers times ``d`` (no table, bias or factor) and
    whose mins, if any, integers times ``dmin``; every lane's integer sum (32 values of a
    block) and every min's (a sub-block of x's codes) is exact in f32."""
    block = int8_layout(layout)
    if block is None or block.values != SUPERBLOCK or block.scale_table \
            or (block.scale_bias, block.scale_factor) != (0.0, 1.0) \
            or (block.m is not None and block.min is None):
        return None
    q = max(abs(v) for v in _range(block.q))
    sc = max(abs(v) for v in _range(block.scale)) if block.scale is not None else 1
    mn = max(abs(v) for v in _range(block.min)) if block.min is not None else 0
    per_lane = SUPERBLOCK // SUPERBLOCK_LANES
    if q * 127 * sc * per_lane >= EXACT_F32 or mn * 127 * (block.sub or SUPERBLOCK) >= EXACT_F32:
        return None
    return block


def codes_unsigned(block: BlockLayout) -> bool:
    """Whether every integer ``C(q)`` of ``block`` is 0 to 127 (a byte multiply-add takes it
    as its unsigned operand; others move their sign onto x's codes)."""
    lo, hi = _range(block.q)
    return 0 <= lo and hi <= 127


def _range(f: Field) -> tuple[int, int]:
    """The smallest and largest integer field ``f`` can hold."""
    bits = max(p.into + (2 if p.trit else p.bits) for p in f.planes)
    raw = range(3 if all(p.trit for p in f.planes) else 1 << bits)
    values = [_post(f, np.asarray(v)) for v in raw]
    return int(min(values)), int(max(values))


def _plane(p: Plane, blocks: np.ndarray) -> np.ndarray:
    """Plane ``p``'s bits for its elements, [blocks, p.count] int64, placed at ``into``."""
    t = np.arange(p.count)
    at = p.offset + (t // (p.width * p.per_byte)) * p.step + (t % p.width) * p.unit
    raw = np.zeros((blocks.shape[0], p.count), np.int64)
    for b in range(p.unit):  # a little-endian integer of `unit` bytes
        raw |= blocks[:, at + b].astype(np.int64) << (8 * b)
    s = (t // p.width) % p.per_byte
    if p.trit:
        mul = np.asarray(p.multipliers)[s]
        bits = (((raw * mul) & 255) * 3) >> 8
    else:
        bits = (raw >> np.asarray(p.shifts)[s]) & p.mask
    return bits << p.into


def _post(f: Field, v: np.ndarray) -> np.ndarray:
    """Sign extension, the field's offset, its codebook."""
    if f.sign:
        v = (v ^ f.sign) - f.sign
    v = v - f.offset
    return np.asarray(f.codebook, np.int64)[v] if f.codebook else v


def field_values(f: Field, blocks: np.ndarray) -> np.ndarray:
    """Field ``f`` of every block: [blocks, f.count] int64, post-processed."""
    v = np.zeros((blocks.shape[0], f.count), np.int64)
    for p in f.planes:
        v[:, p.start:p.start + p.count] |= _plane(p, blocks)
    return _post(f, v)


def _scalar(s: Scalar, blocks: np.ndarray) -> np.ndarray:
    """The block's stored float (d, dmin or m) as f32, [blocks, 1]."""
    if s.kind == "one":
        return np.ones((blocks.shape[0], 1), np.float32)
    width = {"f16": 2, "bf16": 2, "f32": 4, "e8m0_half": 1}[s.kind]
    raw = np.ascontiguousarray(blocks[:, s.offset:s.offset + width])
    if s.kind == "f16":
        return raw.view("<f2").astype(np.float32)
    if s.kind == "f32":
        return raw.view("<f4").astype(np.float32)
    if s.kind == "bf16":
        return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
    e = raw.astype(np.uint32)  # e8m0_half: 2^(e - 128), subnormal below e = 2
    bits = np.where(e < 2, np.uint32(0x00200000) << e, (e - 1) << 23).astype(np.uint32)
    return bits.view(np.float32)


def block_parts(layout: Layout, data) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``data`` ([blocks, block_bytes] uint8) of an ``int8_layout``: the values' integers
    [blocks, values] (int8), the sub-block scales ``d_k`` and mins ``m_k`` [blocks, subs]
    (f32; mins None where the type has none), as the dequantize kernel computes them."""
    block = int8_layout(layout)
    if block is None:
        raise ValueError(f"{layout.value} values are not int8 integers times a scale")
    blocks = np.asarray(data, np.uint8).reshape(-1, block.block_bytes)
    codes = field_values(block.q, blocks).astype(np.int8)
    d = _scalar(block.d, blocks)
    with np.errstate(all="ignore"):
        if block.scale is None:
            scales = d
        else:
            sc = field_values(block.scale, blocks).astype(np.float32)
            if block.scale_table:
                table = np.asarray(SCALE_TABLES[block.scale_table], np.float32)
                scales = d * table[field_values(block.scale, blocks)]
            elif (block.scale_bias, block.scale_factor) != (0.0, 1.0):
                scales = (d * (np.float32(block.scale_bias) + sc)) * np.float32(block.scale_factor)
            else:
                scales = d * sc
        mins = None
        if block.m is not None:
            m = _scalar(block.m, blocks)
            mins = -(m * field_values(block.min, blocks).astype(np.float32)) \
                if block.min is not None else m
    return codes, scales.astype(np.float32), None if mins is None else mins.astype(np.float32)


def superblock_parts(layout: Layout, data):
    """``data`` ([blocks, block_bytes] uint8) of a ``superblock_layout``: the values'
    integers [blocks, 256] (int8), the sub-block scales' integers ``C(sc)`` [blocks, subs]
    (int32; ones where the type has none), ``d`` [blocks] (f32), and, where the type has
    mins, their integers ``C(min)`` [blocks, subs] (int32) and the block's min factor
    [blocks] (f32, ``-dmin``: a value is ``d * C(sc) * C(q) + (-dmin) * C(min)``); else
    None, None."""
    block = superblock_layout(layout)
    if block is None:
        raise ValueError(f"{layout.value} is not multiplied a super-block at a time")
    blocks = np.asarray(data, np.uint8).reshape(-1, block.block_bytes)
    codes = field_values(block.q, blocks).astype(np.int8)
    subs = block.subs
    sc = (field_values(block.scale, blocks) if block.scale is not None
          else np.ones((blocks.shape[0], subs), np.int64)).astype(np.int32)
    d = _scalar(block.d, blocks)[:, 0]
    if block.m is None:
        return codes, sc, d, None, None
    return (codes, sc, d, field_values(block.min, blocks).astype(np.int32),
            -_scalar(block.m, blocks)[:, 0])


def recombine(layout: Layout, codes, scales, mins) -> np.ndarray:
    """The float values the parts make, [blocks, values] f32: ``(d_k * C(q)) + m_k``."""
    block = LAYOUTS[layout]
    sub = block.sub or block.values
    d = np.repeat(scales, sub, axis=1)
    with np.errstate(all="ignore"):
        w = d * codes.astype(np.float32)
        if mins is not None:
            w = w + np.repeat(mins, sub, axis=1)
    return w.astype(np.float32)
