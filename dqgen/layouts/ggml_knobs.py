"""Lowering a GGML block layout (``ggml_blocks.py``) to the knobs the ggml templates
print: runs of values a vectorizable loop reads, little-endian words, grid tables, and the
raw float loads."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UnsupportedError
from ..ir import DType, Layout
from .ggml_blocks import LAYOUTS, Field, Grid, Plane

# Raw float loads: the helper that turns a field's bits into an f32, and its byte width.
SCALAR_LOADS = {"f16": ("load_f16_bits", 2), "bf16": ("load_bf16_bits", 2),
                "f32": ("load_f32_bits", 4), "e8m0_half": ("load_e8m0_half", 1),
                "one": ("", 0)}  # no d stored: 1 (the sub-block scales are floats)


def ue4m3_half(x: int) -> float:
    """NVFP4's unsigned E4M3 sub-block scale byte, halved (gguf-py's ue4m3_to_fp32):
    0 and 0x7F are 0, bit 7 is ignored; every value is exact in f32."""
    exp, man = (x >> 3) & 15, x & 7
    if x in (0, 0x7F):
        return 0.0
    raw = man * 2.0 ** -9 if exp == 0 else (1 + man / 8) * 2.0 ** (exp - 7)
    return raw * 0.5


SCALE_TABLES = {"ue4m3_half": tuple(ue4m3_half(x) for x in range(256))}
# C: runs of values go through explicit vectors of this many 32-bit lanes (GCC vector
# extensions: one AVX-512 register, two AVX2 ones). The compiler's own loop vectorizer
# sizes a loop by its narrowest type (the bytes read), so a run of 16 would otherwise
# compute its floats four to an SSE register. A 16-entry codebook is one permute.
VECTOR_LANES = 16
# Float tensors (C): values a batch, whose two arrays (stored and f32) stay in L1.
PASSTHROUGH_STAGE = 1024
# Float tensors (C): values copied into an array of the storage type, then converted as
# a batch by the shared converters (F16C eight at a time for f16).
RAW_FLOATS = {"f16": ("uint16_t", "load_f16"), "bf16": ("uint16_t", "load_bf16"),
              "f32": ("float", "")}


@dataclass(frozen=True)
class Source:
    """One plane's bits for a run of elements ``i = 0, 1, ...``: byte ``offset + i`` shifted
    by ``shift`` (``word`` empty), or bits ``shift + i * bits`` of the 64-bit local
    ``word``; masked, times ``mul`` first for a trit, placed at bit ``into``."""

    offset: int
    shift: int
    mask: int
    into: int
    mul: int = 0
    word: str = ""
    bits: int = 0
    unit: int = 1    # bytes of the little-endian integer element i reads at offset + i * unit


@dataclass(frozen=True)
class Run:
    """Elements ``[start, start + length)`` of a field, all in sub-block ``sub``, whose
    every plane reads consecutive bytes (or bits) at one shift: one vectorizable loop."""

    start: int
    length: int
    sub: int
    sources: tuple[Source, ...]
    lanes: int = 0   # C: VECTOR_LANES a step in explicit vectors (0: a plain loop)


@dataclass(frozen=True)
class Word:
    """A little-endian integer of ``nbytes`` at ``offset`` (a plane of one byte a run,
    read as a bit string: Q5_0's 32 high bits, IQ4_XS's packed scales)."""

    name: str
    offset: int
    nbytes: int


@dataclass(frozen=True)
class FieldKnobs:
    """A field as the templates unpack it: ``runs`` (C loops) or the function ``name_at``
    of an element index (CUDA)."""

    name: str
    field: Field
    offset: int               # subtracted by the unpacking (the values' offset is zp's)
    runs: tuple[Run, ...]
    words: tuple[Word, ...]


@dataclass(frozen=True)
class GridKnobs:
    """A grid's fields and tables as the templates print them."""

    width: int
    index: FieldKnobs
    signs: FieldKnobs | None
    delta: FieldKnobs | None
    delta_values: int
    delta_scale: int
    delta_lanes: int               # C: lanes of a vector sharing a delta bit
    delta_mask: int                # and that many one bits
    table: tuple[int, ...]         # grid[i][j] at i * width + j
    ksigns: tuple[int, ...]        # gguf-py's KSIGNS: 7 stored sign bits -> 8 with parity
                                   # (empty: the signs field holds the 8 bits)


def _grid_tables(grid: Grid) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """gguf-py's grid for ``grid`` (integers, checked) and its sign table."""
    try:
        from gguf import quants
    except ImportError:
        raise UnsupportedError(f"{grid.table} reads its grid from gguf-py: pip install "
                               "'dqgen[gguf]'") from None
    cls = getattr(quants, grid.table)
    cls.init_grid()
    values = cls.grid.reshape(-1)
    table = tuple(int(v) for v in values)
    if (list(values) != list(table) or cls.grid.shape[-1] != grid.width
            or not all(-128 <= v < 128 for v in table)):
        raise UnsupportedError(f"gguf-py's {grid.table} grid is not {grid.width} integers a row")
    return table, tuple(quants.IQ2_XXS.ksigns) if grid.signs and grid.ksigns else ()


@dataclass(frozen=True)
class GgmlKnobs:
    """Everything the ggml templates read about a block type."""

    values: int
    sub: int
    subs: int
    passthrough: bool              # a float tensor: one value a block, no fields
    q: FieldKnobs | None
    scale: FieldKnobs | None
    min: FieldKnobs | None
    q_offset: int                  # the values' offset, the kernel's integer zero point
    d: tuple[str, int, int]        # (load helper, bytes, offset) of the block's d
    m: tuple[str, int, int] | None  # the same for its min factor (dmin or m)
    negate_min: bool               # K-quants subtract dmin * min: m_k = -(...)
    loads: tuple[str, ...]         # raw float loads the prelude defines (f16's is shared)
    as_float: str                  # the target's u32 -> f32 bit cast
    raw: tuple[str, str]           # float tensors: the raw storage's C type and its load
    float_helpers: tuple[str, ...]  # conversions of the shared prelude the kernel calls
    vector_lanes: int              # C: lanes of the explicit vectors (0: none used)
    lane_index: bool               # C: a vector run reads a word (needs the lane numbers)
    scalar_codebook: bool          # the codebook is read one value at a time (CUDA, C tails)
    stage: bool                    # C: a block's results staged as floats, then converted
    passthrough_stage: int         # C, float tensors: values copied and converted a batch
    copy: bool                     # C: a float tensor stored as the output's type: a copy
    grid: GridKnobs | None         # grid-based values (q is None)
    d_field: FieldKnobs | None     # d's 16 bits gathered from the block (IQ1_M)
    scale_table: tuple[str, ...]   # d_k = d * table[scale_k]: C float literals, exact
    scale_affine: tuple[float, float] | None  # (bias, factor) of d_k, where the type has them


def _is_word(p: Plane) -> bool:
    """A plane of one-byte runs whose bits follow each other: a bit string."""
    return (p.width == 1 and p.unit == 1 and not p.stride and not p.trit and p.shift == 0
            and not p.spacing and p.bits * p.per_byte == 8)


def field_runs(name: str, f: Field, sub: int) -> tuple[tuple[Run, ...], tuple[Word, ...]]:
    """Cut the field at every border of a plane's byte runs and of the sub-blocks of
    ``sub`` elements (0: none), so each piece reads every plane at one shift from
    consecutive bytes."""
    words = {}
    cuts = {0, f.count, *range(0, f.count, sub or f.count)}
    for p in f.planes:
        cuts |= {p.start, p.start + p.count}
        if _is_word(p):
            if p.count * p.bits > 64:
                raise ValueError(f"plane {p} is more than 64 bits")
            words[p] = Word(f"{name}_w{len(words)}", p.offset, -(-p.count * p.bits // 8))
        else:
            cuts |= set(range(p.start, p.start + p.count, p.width))
    cuts = sorted(cuts)
    word_bytes = {w.name: w.nbytes for w in words.values()}
    runs = []
    for a, b in zip(cuts, cuts[1:]):
        sources = []
        for p in f.planes:
            if not p.start <= a < p.start + p.count:
                continue
            t = a - p.start
            if p in words:
                sources.append(Source(0, p.shift + t * p.bits, p.mask, p.into,
                                      word=words[p].name, bits=p.bits))
                continue
            s = (t // p.width) % p.per_byte
            at = p.offset + (t // (p.width * p.per_byte)) * p.step + (t % p.width) * p.unit
            sources.append(Source(at, p.shifts[s], p.mask, p.into,
                                  mul=p.multipliers[s] if p.trit else 0, unit=p.unit))
        # whole vectors of lanes, words that fit a lane (their shifts stay below 32)
        vector = (b - a) % VECTOR_LANES == 0 and all(
            (not src.word or word_bytes[src.word] <= 4) and src.unit == 1 for src in sources)
        runs.append(Run(a, b - a, a // sub if sub else 0, tuple(sources),
                        VECTOR_LANES if vector else 0))
    return tuple(runs), tuple(words.values())


def _field_knobs(name: str, f: Field | None, with_offset: bool, sub: int) -> FieldKnobs | None:
    if f is None:
        return None
    covered = [0] * f.count
    for p in f.planes:
        for t in range(p.start, p.start + p.count):
            covered[t] += 1
    if min(covered) == 0:
        raise ValueError(f"the planes of {name} leave elements unset")
    if f.codebook and f.offset:
        raise ValueError(f"{name}: an offset before a codebook lookup is not supported")
    runs, words = field_runs(name, f, sub)
    return FieldKnobs(name, f, f.offset if with_offset else 0, runs, words)


def knobs(layout: Layout, target: str, float_dtype: DType) -> GgmlKnobs:
    """The ggml templates' knobs for ``layout`` on ``target`` ("c" or "cuda") writing
    ``float_dtype``."""
    block = LAYOUTS[layout]
    passthrough = block.q is None and block.grid is None
    q = _field_knobs("q", block.q, False, block.sub or block.values)
    if q is not None and q.field.codebook and len(q.field.codebook) != VECTOR_LANES:
        raise ValueError("a codebook is one vector of VECTOR_LANES entries")
    # grids: VECTOR_LANES values (whole sign bytes and grid rows) a vector step
    grid_vector = bool(block.grid)
    if grid_vector and ((block.sub or block.values) % VECTOR_LANES
                        or VECTOR_LANES % block.grid.width or VECTOR_LANES % 8):
        raise ValueError("a grid's sub-blocks are whole vectors of whole rows and sign bytes")
    scalars = [block.d] + ([block.m] if block.m else [])
    load = {id(s): SCALAR_LOADS[s.kind] for s in scalars}
    return GgmlKnobs(
        values=block.values, sub=block.sub or block.values, subs=block.subs,
        passthrough=passthrough,
        q=q,
        scale=_field_knobs("sc", block.scale, True, 0),
        min=_field_knobs("mn", block.min, True, 0),
        q_offset=block.q.offset if block.q else 0,
        d=(*load[id(block.d)], block.d.offset),
        m=(*load[id(block.m)], block.m.offset) if block.m else None,
        negate_min=block.min is not None,
        loads=tuple(sorted({load[id(s)][0] for s in scalars} - {"load_f16_bits", ""})),
        as_float="__uint_as_float" if target == "cuda" else "u32_as_float",
        raw=RAW_FLOATS.get(block.d.kind, ("", "")) if passthrough else ("", ""),
        float_helpers=("load_bf16",) if passthrough and block.d.kind == "bf16" else (),
        vector_lanes=VECTOR_LANES if (q is not None and any(r.lanes for r in q.runs))
        or grid_vector else 0,
        lane_index=grid_vector or q is not None and any(
            r.lanes and any(src.word for src in r.sources) for r in q.runs),
        scalar_codebook=target == "cuda" or (q is not None and not all(r.lanes for r in q.runs)),
        stage=float_dtype is not DType.F32, passthrough_stage=PASSTHROUGH_STAGE,
        copy=passthrough and block.d.kind == float_dtype.value,
        grid=GridKnobs(block.grid.width, _field_knobs("gi", block.grid.index, True, 0),
                       _field_knobs("gs", block.grid.signs, True, 0),
                       _field_knobs("gd", block.grid.delta, True, 0), block.grid.delta_values,
                       block.grid.delta_scale, min(block.grid.delta_values, VECTOR_LANES),
                       (1 << min(block.grid.delta_values, VECTOR_LANES)) - 1,
                       *_grid_tables(block.grid)) if block.grid else None,
        d_field=_field_knobs("dd", block.d.field, True, 0),
        scale_table=tuple(v.hex() + "f" for v in SCALE_TABLES[block.scale_table])
        if block.scale_table else (),
        scale_affine=(block.scale_bias, block.scale_factor)
        if (block.scale_bias, block.scale_factor) != (0.0, 1.0) else None)
