"""Every GGML block type as data: where its values, scales and mins sit in the block's
bytes (gguf-py's ``gguf/quants.py`` is the specification, bit for bit).

One rule serves every type. A block of ``values`` values is ``subs`` sub-blocks of
``sub`` values; value ``j`` of sub-block ``k`` is

    y = d_k * C(q_j)            (no min)
    y = (d_k * C(q_j)) + m_k    (with a min; K-quants store it to subtract: m_k < 0 here)

with ``d_k = d * C(scale_k)`` (or ``d``; ``(d * (bias + C(scale_k))) * factor`` for the
i-quants, ``d * table[scale_k]`` for NVFP4) and ``m_k = -(dmin * C(min_k))`` (or ``m``),
each product and sum rounded once in f32, as numpy does. The integers ``q``, ``scale``
and ``min`` are ``Field``s: bits gathered from ``Plane``s of the block's bytes, then sign-
extended, offset, or looked up in a codebook. The grid types' ``q`` is a signed row entry
of gguf-py's grid (``Grid``). The schedule turns these into the kernel's constants and
tables; the templates only print them.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..ir import GGML_BLOCK_BYTES, GGML_BLOCK_VALUES, Layout


@dataclass(frozen=True)
class Plane:
    """Elements ``[start, start + count)`` of a field take bits from bytes at ``offset``.

    The bytes come in runs of ``width`` (little-endian integers of ``unit`` bytes; runs
    ``stride`` bytes apart, default back to back); a run holds ``per_byte`` consecutive
    runs of elements, element ``t`` (counted from ``start``) reading the integer at
    ``offset + (t // (width * per_byte)) * stride + (t % width) * unit`` at bit
    ``shift + ((t // width) % per_byte) * spacing`` (spacing defaults to ``bits``), ``bits``
    wide, placed at bit ``into`` of
    the element. A ``trit`` plane reads base-3 digit ``s`` (TQ1_0): ``((uint8)(byte * 3^s)
    * 3) >> 8``.
    """

    start: int
    count: int
    offset: int
    width: int
    bits: int
    per_byte: int = 1
    shift: int = 0
    into: int = 0
    trit: bool = False
    unit: int = 1
    stride: int = 0
    spacing: int = 0   # bits from one of a byte's elements to the next (default: bits)

    @property
    def step(self) -> int:
        """Bytes from one run to the next."""
        return self.stride or self.width * self.unit

    @property
    def chunks(self) -> int:
        return self.count // (self.width * self.per_byte)

    @property
    def mask(self) -> int:
        return (1 << self.bits) - 1

    @property
    def shifts(self) -> tuple[int, ...]:
        """Bit of each of a byte's ``per_byte`` elements (0 for trits)."""
        step = self.spacing or self.bits
        return tuple(0 if self.trit else self.shift + s * step for s in range(self.per_byte))

    @property
    def multipliers(self) -> tuple[int, ...]:
        """Trits: what each of a byte's elements multiplies the byte by (1 otherwise)."""
        return tuple(3 ** s if self.trit else 1 for s in range(self.per_byte))

    def check(self, size: int, block_bytes: int) -> None:
        run = self.width * self.per_byte
        if self.count % run or self.start + self.count > size:
            raise ValueError(f"plane {self} does not tile its field of {size}")
        if self.offset + (self.chunks - 1) * self.step + self.width * self.unit > block_bytes:
            raise ValueError(f"plane {self} reads past a {block_bytes}-byte block")
        if not self.trit and max(self.shifts) + self.bits > 8 * self.unit:
            raise ValueError(f"plane {self} reads past its integer")


@dataclass(frozen=True)
class Field:
    """``count`` integers: the planes' bits ORed together, then sign-extended from
    ``sign_bits`` (0: unsigned), minus ``offset``, then ``codebook[v]`` if there is one."""

    count: int
    planes: tuple[Plane, ...]
    sign_bits: int = 0
    offset: int = 0
    codebook: tuple[int, ...] = ()

    @property
    def sign(self) -> int:
        """The sign bit's value (``v = (v ^ sign) - sign`` sign-extends); 0: unsigned."""
        return 1 << (self.sign_bits - 1) if self.sign_bits else 0


@dataclass(frozen=True)
class Grid:
    """Grid-based values (IQ2_XXS, IQ3_XXS): ``q_t = sign_t * grid[index_{t // width}][t %
    width]`` with ``sign_t`` bit ``t % 8`` of ``KSIGNS[signs_{t // 8}]`` set meaning -1.
    The grid is gguf-py's own (class ``table`` of ``gguf.quants``), read when a kernel is
    scheduled."""

    width: int
    index: Field
    signs: Field | None
    table: str
    ksigns: bool = True   # the signs are 7-bit KSIGNS indices (else the 8 sign bits)
    delta: Field | None = None  # IQ1: q = grid * delta_scale -+ 1, bit set meaning -1
    delta_values: int = 0       # values sharing a delta bit
    delta_scale: int = 8        # 1 / delta (the block's scale carries the 1/8)


@dataclass(frozen=True)
class Scalar:
    """A float stored once a block: ``kind`` (f16, f32, bf16 or e8m0_half) at ``offset``, or
    (IQ1_M) an f16 whose 16 bits are gathered by ``field`` (one element)."""

    kind: str
    offset: int
    field: Field | None = None


@dataclass(frozen=True)
class BlockLayout:
    """One GGML type: bytes and values of a block, and how each value decodes."""

    block_bytes: int
    values: int
    q: Field | None                 # None: a float tensor passed through (``d`` is the value)
    d: Scalar
    sub: int = 0                    # values sharing a scale (0: the whole block)
    scale: Field | None = None      # integer sub-block scales: d_k = d * scale_k
    m: Scalar | None = None         # the min's float factor (dmin, or Q4_1's m)
    min: Field | None = None        # integer sub-block mins: m_k = -(dmin * min_k)
    formula: str = ""
    grid: Grid | None = None        # the values come from a grid of gguf-py's (q is None)
    scale_bias: float = 0.0         # d_k = (d * (bias + C(scale_k))) * factor where set
    scale_factor: float = 1.0
    scale_table: str = ""           # d_k = d * table[scale_k]: a float format (NVFP4)

    @property
    def subs(self) -> int:
        return self.values // (self.sub or self.values)


def _nibbles(count: int, offset: int, width: int, start: int = 0) -> Plane:
    """Low nibbles of a run of ``width`` bytes, then their high nibbles."""
    return Plane(start, count, offset, width, 4, 2)


def _crumbs(count: int, offset: int, into: int = 0) -> Plane:
    """2-bit fields of runs of 32 bytes, lowest first (Q2_K, Q3_K, Q6_K's high bits)."""
    return Plane(0, count, offset, 32, 2, 4, into=into)


def _bits(count: int, offset: int, width: int, into: int) -> Plane:
    """One bit an element, bit ``s`` of runs of ``width`` bytes (the high bits)."""
    return Plane(0, count, offset, width, 1, 8, into=into)


def _bytes(count: int, offset: int) -> Plane:
    return Plane(0, count, offset, count, 8)


# IQ4_NL / IQ4_XS codebook (gguf-py IQ4_NL.kvalues) and MXFP4's e2m1 values doubled
# (MXFP4.kvalues); the tests check both against the installed gguf package.
IQ4_CODEBOOK = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
MXFP4_CODEBOOK = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)

# Q4_K/Q5_K: 8 scales and 8 mins of 6 bits in 12 bytes at byte 4. Elements 0-3 are the low
# six bits of bytes 4-7 (scales) and 8-11 (mins); elements 4-7 are a nibble of bytes 12-15
# (low: scale, high: min) with the top two bits of bytes 4-7 (scale) or 8-11 (min) above it.
_K_SCALES = Field(8, (Plane(0, 4, 4, 4, 6), Plane(4, 4, 12, 4, 4),
                      Plane(4, 4, 4, 4, 2, shift=6, into=4)))
_K_MINS = Field(8, (Plane(0, 4, 8, 4, 6), Plane(4, 4, 12, 4, 4, shift=4),
                    Plane(4, 4, 8, 4, 2, shift=6, into=4)))

_F16_AT_0 = Scalar("f16", 0)
LAYOUTS: dict[Layout, BlockLayout] = {
    Layout.GGML_Q4_0: BlockLayout(18, 32, Field(32, (_nibbles(32, 2, 16),), offset=8),
                                  _F16_AT_0, formula="y = F(C(nibble - 8) * C(d))"),
    Layout.GGML_Q4_1: BlockLayout(20, 32, Field(32, (_nibbles(32, 4, 16),)), _F16_AT_0,
                                  m=Scalar("f16", 2),
                                  formula="y = F((C(nibble) * C(d)) + C(m)), each rounded"),
    Layout.GGML_Q5_0: BlockLayout(
        22, 32, Field(32, (_nibbles(32, 6, 16), Plane(0, 32, 2, 1, 1, 8, into=4)), offset=16),
        _F16_AT_0, formula="y = F(C((nibble | high_bit << 4) - 16) * C(d))"),
    Layout.GGML_Q5_1: BlockLayout(
        24, 32, Field(32, (_nibbles(32, 8, 16), Plane(0, 32, 4, 1, 1, 8, into=4))),
        _F16_AT_0, m=Scalar("f16", 2),
        formula="y = F((C(nibble | high_bit << 4) * C(d)) + C(m)), each rounded"),
    Layout.GGML_Q8_0: BlockLayout(34, 32, Field(32, (_bytes(32, 2),), sign_bits=8), _F16_AT_0,
                                  formula="y = F(C(q) * C(d))"),
    Layout.GGML_Q2_K: BlockLayout(
        84, 256, Field(256, (_crumbs(256, 16),)), Scalar("f16", 80), sub=16,
        scale=Field(16, (Plane(0, 16, 0, 16, 4),)), m=Scalar("f16", 82),
        min=Field(16, (Plane(0, 16, 0, 16, 4, shift=4),)),
        formula="y = F((C(q) * C(d * sc)) - C(dmin * m)), 16 sub-blocks of 16, each rounded"),
    Layout.GGML_Q3_K: BlockLayout(
        110, 256, Field(256, (_crumbs(256, 32), _bits(256, 0, 32, 2)), offset=4),
        Scalar("f16", 108), sub=16,
        scale=Field(16, (Plane(0, 16, 96, 8, 4, 2), Plane(0, 16, 104, 4, 2, 4, into=4)),
                    offset=32),
        formula="y = F(C((q2 | high_bit << 2) - 4) * C(d * (sc - 32))), 16 sub-blocks of 16"),
    Layout.GGML_Q4_K: BlockLayout(
        144, 256, Field(256, (_nibbles(256, 16, 32),)), _F16_AT_0, sub=32, scale=_K_SCALES,
        m=Scalar("f16", 2), min=_K_MINS,
        formula="y = F((C(q) * C(d * sc)) - C(dmin * m)), 8 sub-blocks of 32, each rounded"),
    Layout.GGML_Q5_K: BlockLayout(
        176, 256, Field(256, (_nibbles(256, 48, 32), _bits(256, 16, 32, 4))), _F16_AT_0,
        sub=32, scale=_K_SCALES, m=Scalar("f16", 2), min=_K_MINS,
        formula="y = F((C(q | high_bit << 4) * C(d * sc)) - C(dmin * m)), 8 sub-blocks of 32"),
    Layout.GGML_Q6_K: BlockLayout(
        210, 256, Field(256, (Plane(0, 256, 0, 64, 4, 2), _crumbs(256, 128, into=4)), offset=32),
        Scalar("f16", 208), sub=16, scale=Field(16, (_bytes(16, 192),), sign_bits=8),
        formula="y = F(C((ql | qh << 4) - 32) * C(d * sc)), 16 sub-blocks of 16, sc int8"),
    Layout.GGML_Q8_K: BlockLayout(292, 256, Field(256, (_bytes(256, 4),), sign_bits=8),
                                  Scalar("f32", 0), formula="y = F(C(q) * d), d f32"),
    Layout.GGML_IQ4_NL: BlockLayout(
        18, 32, Field(32, (_nibbles(32, 2, 16),), codebook=IQ4_CODEBOOK), _F16_AT_0,
        formula="y = F(C(codebook[nibble]) * C(d))"),
    Layout.GGML_IQ4_XS: BlockLayout(
        136, 256, Field(256, (_nibbles(256, 8, 16),), codebook=IQ4_CODEBOOK), _F16_AT_0,
        sub=32, scale=Field(8, (Plane(0, 8, 4, 1, 4, 2), Plane(0, 8, 2, 1, 2, 4, into=4)),
                            offset=32),
        formula="y = F(C(codebook[nibble]) * C(d * (sc - 32))), 8 sub-blocks of 32"),
    Layout.GGML_TQ1_0: BlockLayout(
        54, 256, Field(256, (Plane(0, 160, 0, 32, 8, 5, trit=True),
                             Plane(160, 80, 32, 16, 8, 5, trit=True),
                             Plane(240, 16, 48, 4, 8, 4, trit=True)), offset=1),
        Scalar("f16", 52), formula="y = F(C(trit - 1) * C(d)), base-3 digits of bytes"),
    Layout.GGML_TQ2_0: BlockLayout(66, 256, Field(256, (_crumbs(256, 0),), offset=1),
                                   Scalar("f16", 64), formula="y = F(C(q - 1) * C(d))"),
    # Q1_0: bit t % 8 of byte 2 + t / 8 picks +d or -d; Q2_0: the 2-bit field at bit
    # 2 * (t % 4) of byte 2 + t / 4, minus 1 (llama.cpp's dequantize_row_q1_0 / _q2_0)
    # (bit strings of at most 64 bits a plane)
    Layout.GGML_Q1_0: BlockLayout(
        18, 128, Field(128, (Plane(0, 64, 2, 1, 1, 8), Plane(64, 64, 10, 1, 1, 8)),
                       codebook=(-1, 1) + (0,) * 14),
        _F16_AT_0, formula="y = F(C(bit ? 1 : -1) * C(d))"),
    Layout.GGML_Q2_0: BlockLayout(
        18, 64, Field(64, (Plane(0, 32, 2, 1, 2, 4), Plane(32, 32, 10, 1, 2, 4)), offset=1),
        _F16_AT_0, formula="y = F(C(q - 1) * C(d))"),
    Layout.GGML_MXFP4: BlockLayout(
        17, 32, Field(32, (_nibbles(32, 1, 16),), codebook=MXFP4_CODEBOOK),
        Scalar("e8m0_half", 0), formula="y = F(C(e2m1x2[nibble]) * 2^(e - 128)), e8m0 e"),
    Layout.GGML_IQ2_XXS: BlockLayout(
        66, 256, None, _F16_AT_0, sub=32,
        scale=Field(8, (Plane(0, 8, 6, 1, 4, shift=28, unit=4, stride=8),)),
        scale_bias=0.5, scale_factor=0.25,
        grid=Grid(8, Field(32, (Plane(0, 32, 2, 4, 8, stride=8),)),
                  Field(32, (Plane(0, 32, 6, 1, 7, 4, unit=4, stride=8),)), "IQ2_XXS"),
        formula="y = F(C(sign * grid[i][j]) * C((d * (0.5 + sc)) * 0.25)), 8 sub-blocks of 32"),
    Layout.GGML_IQ3_XXS: BlockLayout(
        98, 256, None, _F16_AT_0, sub=32,
        scale=Field(8, (Plane(0, 8, 66, 1, 4, shift=28, unit=4),)),
        scale_bias=0.5, scale_factor=0.5,
        grid=Grid(4, Field(64, (_bytes(64, 2),)),
                  Field(32, (Plane(0, 32, 66, 1, 7, 4, unit=4),)), "IQ3_XXS"),
        formula="y = F(C(sign * grid[i][j]) * C((d * (0.5 + sc)) * 0.5)), 8 sub-blocks of 32"),
    Layout.GGML_IQ2_XS: BlockLayout(
        74, 256, None, _F16_AT_0, sub=16, scale=Field(16, (Plane(0, 16, 66, 1, 4, 2),)),
        scale_bias=0.5, scale_factor=0.25,
        grid=Grid(8, Field(32, (Plane(0, 32, 2, 1, 9, unit=2),)),
                  Field(32, (Plane(0, 32, 2, 1, 7, shift=9, unit=2),)), "IQ2_XS"),
        formula="y = F(C(sign * grid[i][j]) * C((d * (0.5 + sc)) * 0.25)), 16 sub-blocks of 16"),
    Layout.GGML_IQ2_S: BlockLayout(
        82, 256, None, _F16_AT_0, sub=16, scale=Field(16, (Plane(0, 16, 74, 1, 4, 2),)),
        scale_bias=0.5, scale_factor=0.25,
        grid=Grid(8, Field(32, (_bytes(32, 2), Plane(0, 32, 66, 1, 2, 4, into=8))),
                  Field(32, (_bytes(32, 34),)), "IQ2_S", ksigns=False),
        formula="y = F(C(sign * grid[i][j]) * C((d * (0.5 + sc)) * 0.25)), 16 sub-blocks of 16"),
    Layout.GGML_IQ3_S: BlockLayout(
        110, 256, None, _F16_AT_0, sub=32,
        scale=Field(8, (Plane(0, 8, 106, 1, 4, 2, into=1),), offset=-1),
        grid=Grid(4, Field(64, (_bytes(64, 2), Plane(0, 64, 66, 1, 1, 8, into=8))),
                  Field(32, (_bytes(32, 74),)), "IQ3_S", ksigns=False),
        formula="y = F(C(sign * grid[i][j]) * C(d * (2 * sc + 1))), 8 sub-blocks of 32"),
    Layout.GGML_IQ1_S: BlockLayout(
        50, 256, None, _F16_AT_0, sub=32,
        scale=Field(8, (Plane(0, 8, 34, 1, 3, shift=12, into=1, unit=2),), offset=-1),
        scale_factor=0.125,
        grid=Grid(8, Field(32, (_bytes(32, 2), Plane(0, 32, 34, 1, 3, 4, into=8, unit=2))),
                  None, "IQ1_S", delta=Field(8, (Plane(0, 8, 34, 1, 1, shift=15, unit=2),)),
                  delta_values=32),
        formula="y = F(C(8 * grid[i][j] -+ 1) * C((d * (2 * sc + 1)) * 0.125)), "
                "8 sub-blocks of 32"),
    Layout.GGML_IQ1_M: BlockLayout(
        56, 256, None,
        Scalar("f16", 0, Field(1, tuple(Plane(0, 1, 49 + 2 * k, 1, 4, shift=4, into=4 * k)
                                        for k in range(4)))), sub=16,
        scale=Field(16, (Plane(0, 16, 48, 1, 3, 4, into=1, unit=2),), offset=-1),
        scale_factor=0.125,
        grid=Grid(8, Field(32, (_bytes(32, 0), Plane(0, 32, 32, 1, 3, 2, into=8, spacing=4))),
                  None, "IQ1_M", delta=Field(32, (Plane(0, 32, 32, 1, 1, 2, shift=3, spacing=4),)),
                  delta_values=8),
        formula="y = F(C(8 * grid[i][j] -+ 1) * C((d * (2 * sc + 1)) * 0.125)), d's bits in "
                "the scales' top nibbles, 16 sub-blocks of 16"),
    Layout.GGML_NVFP4: BlockLayout(
        36, 64, Field(64, (Plane(0, 64, 4, 8, 4, 2),), codebook=MXFP4_CODEBOOK),
        Scalar("one", 0), sub=16, scale=Field(4, (_bytes(4, 0),)), scale_table="ue4m3_half",
        formula="y = F(C(e2m1x2[nibble]) * ue4m3(sc) / 2), 4 sub-blocks of 16"),
    Layout.GGML_F32: BlockLayout(4, 1, None, Scalar("f32", 0), formula="y = F(x), x f32"),
    Layout.GGML_F16: BlockLayout(2, 1, None, Scalar("f16", 0), formula="y = F(x), x f16"),
    Layout.GGML_BF16: BlockLayout(2, 1, None, Scalar("bf16", 0), formula="y = F(x), x bf16"),
}


def _check_table() -> None:
    """Every layout tiles its fields and agrees with the IR's block sizes."""
    for layout, spec in LAYOUTS.items():
        assert spec.block_bytes == GGML_BLOCK_BYTES[layout], layout
        assert spec.values == GGML_BLOCK_VALUES[layout], layout
        grid = (spec.grid.index, spec.grid.signs, spec.grid.delta) if spec.grid else ()
        for f in (spec.q, spec.scale, spec.min, spec.d.field, *grid):
            for plane in (f.planes if f else ()):
                plane.check(f.count, spec.block_bytes)
        assert spec.scale is None or spec.scale.count == spec.subs, layout
    assert set(LAYOUTS) == set(GGML_BLOCK_BYTES)


_check_table()
