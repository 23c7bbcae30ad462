"""How the int8 linear decodes a GGML row (``templates/c/int8_ggml.j2``): the block table's
q field unpacked into int8 codes in byte vectors, its sub-block scales and mins into f32,
from the same table the dequantize kernel reads (``ggml_integers`` reads it in numpy)."""

from __future__ import annotations

from dataclasses import dataclass

from ..ir import DType, Layout, ggml_type_name
from . import ggml_knobs
from .ggml_blocks import BlockLayout
from .ggml_knobs import GgmlKnobs, Run
from .ggml_reads import (GATHER_BYTES, PIECE_WIDTHS, FieldGather, block_lane_pieces,
                         code_pieces, field_gather, lane_piece)

# Codes a step in a run decoded with byte vectors: 32 where the run allows (16 where a
# codebook is one 16-byte lookup).
BYTE_VECTORS = (32, 16)


@dataclass(frozen=True)
class CodeRun:
    """A run of the weight's integers (a ``Run`` of its q field, not cut at sub-blocks: the
    codes take no scale): decoded ``width`` at a time in byte vectors, or (0) one at a
    time, into the codes from ``dest`` on (-1: the run's own place)."""

    run: Run
    width: int
    dest: int = -1

    @property
    def at(self) -> int:
        return self.run.start if self.dest < 0 else self.dest


# The block order's slots: runs of 32 values (eight quads), which it may store in any order
# (a lane sums the quads equal to it mod 8, wherever a slot puts them).
SLOT = 32
PAIR = 64   # two runs of 32 whose every plane's bytes lie 32 apart: one 64-byte vector


def _pairs(runs: tuple[CodeRun, ...]) -> tuple[tuple[CodeRun, ...], tuple[int, ...]] | None:
    """The block order's code vectors where runs of 32 pair into 64-byte vectors (Q4_K's low
    nibbles of bytes 0-63 are values 0-31 and 64-95): the vectors, each stored at its slots,
    and the run each slot holds; None where no two runs pair (or a run is not 32 plain
    values)."""
    if any(cr.run.length != SLOT or cr.width != SLOT for cr in runs):
        return None

    def pair(a: Run, b: Run) -> bool:
        return len(a.sources) == len(b.sources) and all(
            (s.shift, s.mask, s.into) == (t.shift, t.mask, t.into) and t.offset == s.offset + SLOT
            for s, t in zip(a.sources, b.sources))
    left, vectors, slots = list(runs), [], []
    while left:
        a = left.pop(0)
        b = next((cr for cr in left if pair(a.run, cr.run)), None)
        vectors.append(CodeRun(a.run, PAIR if b else SLOT, SLOT * len(slots)))
        slots.append(a.run.start // SLOT)
        if b:
            left.remove(b)
            slots.append(b.run.start // SLOT)
    return (tuple(vectors), tuple(slots)) if len(vectors) < len(runs) else None


# Bytes a prefetch brings: a block longer than a line (the K-quants' 84-292 bytes) asks
# for each of its lines, or its later lines come at the memory's latency when decoded.
CACHE_LINE = 64


@dataclass(frozen=True)
class FieldVector:
    """``length`` bytes widened to int32 lanes. Four (``shifts`` given): lane i is the
    little-endian word shifted right by ``shifts[i]`` and masked, a broadcast, a shift and
    an and, where GCC widens a 4-byte vector with a scalar insert a lane; eight and sixteen
    by one zero-extending load (``widen``, where the compiler defines ``widen_isa``), or two
    of half as many (``half`` under ``halves_isa``: sixteen on AVX2); GCC 12's own conversion
    takes the bytes out one at a time."""

    length: int
    shifts: tuple[int, ...]
    widen_isa: str = ""
    widen: str = ""
    halves_isa: str = ""     # where only the half's load is there (AVX2 for 16): two of them
    half: str = ""


# The zero-extending loads of 8 and 16 bytes to int32 lanes, and the ISA each needs.
_WIDEN = {8: ("__AVX2__", "_mm256_cvtepu8_epi32(_mm_loadl_epi64("),
          16: ("__AVX512F__", "_mm512_cvtepu8_epi32(_mm_loadu_si128(")}


def _field_vector(length: int) -> FieldVector:
    if length == 4:
        return FieldVector(4, (0, 8, 16, 24))
    return FieldVector(length, (), *_WIDEN[length], *_WIDEN.get(length // 2, ("", "")))


@dataclass(frozen=True)
class GgmlInt8Knobs:
    """What ``int8_ggml.j2`` prints: the GGML knobs (d, the sub-block scales and mins,
    words), the integers' runs, their sign bit, offset and codebook, and the scale and min
    runs unpacked as vectors."""

    ggml: GgmlKnobs
    type_name: str
    block_bytes: int
    prefetch_lines: tuple[int, ...]   # a block's cache lines: offsets each asked for ahead
    code_runs: tuple[CodeRun, ...]
    code_widths: tuple[int, ...]   # the byte vectors' widths the runs use
    block_runs: tuple[CodeRun, ...]  # the block order's: pairs of runs where they pair
    slot_runs: tuple[int, ...]     # the block order's run of 32 values in each slot
    q_sign: int              # the integers' sign bit (0: unsigned)
    vector_add: int          # byte vectors: C(q) = (raw ^ q_sign) + vector_add (mod 256)
    q_offset: int            # one at a time: C(q) = post-processed value - q_offset
    codebook: tuple[int, ...]  # the entries as bytes (mod 256)
    scalar_codebook: bool    # a run decoded one value at a time reads the codebook
    has_min: bool
    scales_apart: bool       # unpack sub-block scales in a call of its own (not inlined):
                             # where some are unpacked one at a time, not as vectors
    vector_field_runs: tuple[Run, ...]   # runs of the scales and mins unpacked as vectors
    word_shifts: dict        # (run, source) of those read from a word: each lane's shift
    field_vectors: tuple[FieldVector, ...]   # the vector lengths those runs use
    scale_vector: str        # a vector's scales from its f32 lanes fv (d * fv, ...)
    min_vector: str          # and its mins (-(m * fv) or m * fv)
    # by register width (only the widths read so): the block order's codes read from the
    # block, the quad order's register read from the blocks, and the block order's registers
    # read a lane at a time where a codebook's runs have no code_pieces
    code_pieces: dict
    lane_pieces: dict
    block_lane_pieces: dict
    field_gather: FieldGather | None   # the block order's scales and mins in one shuffle


def _code_run(run: Run, codebook: bool) -> CodeRun:
    plain = all(not s.word and not s.mul and s.unit == 1 for s in run.sources)
    widths = [w for w in BYTE_VECTORS if plain and run.length % w == 0
              and not (codebook and w > 16)]
    return CodeRun(run, widths[0] if widths else 0)


def _field_vectors(g: GgmlKnobs, gather: FieldGather | None) -> dict:
    """The runs of the sub-block scales and mins unpacked a whole run at once: 4, 8 or 16
    elements whose every plane reads consecutive bytes at one shift, within a byte, or bits
    of a word of at most 32 (IQ4_XS's packed scales: each lane its own shift, ``word_shifts``
    by run and source); a table of scales is read one at a time. And the formulas of a
    vector, each operation rounded as the one-at-a-time unpacking's (``ggml_sub_scale``)."""
    words = {w.name: w.nbytes for f in (g.scale, g.min) if f is not None for w in f.words}

    def fits(run: Run) -> bool:
        return run.length in (4, 8, 16) and all(
            (words[s.word] <= 4 and s.shift + run.length * s.bits <= 32) if s.word else
            (not s.mul and s.unit == 1 and s.into + s.mask.bit_length() <= 8)
            for s in run.sources)
    fields = [f for f in (g.scale if not g.scale_table else None, g.min) if f is not None]
    runs = tuple(r for f in fields for r in f.runs if fits(r))
    word_shifts = {(r, j): tuple(s.shift + i * s.bits for i in range(r.length))
                   for r in runs for j, s in enumerate(r.sources) if s.word}
    scale = (f"(d * ({g.scale_affine[0]!r}f + fv)) * {g.scale_affine[1]!r}f"
             if g.scale_affine else "d * fv")
    return {"vector_field_runs": runs, "word_shifts": word_shifts,
            "field_vectors": tuple(_field_vector(n) for n in sorted(
                {r.length for r in runs}
                | ({gather.scales, gather.mins} - {0} if gather else set()))),
            "scale_vector": scale, "min_vector": "-(m * fv)" if g.negate_min else "m * fv"}


def int8_ggml_knobs(layout: Layout, block: BlockLayout) -> GgmlInt8Knobs:
    """The knobs of ``layout``'s int8 decode (``block`` its table entry)."""
    g = ggml_knobs.knobs(layout, "c", DType.F32)
    runs = tuple(_code_run(r, bool(block.q.codebook))
                 for r in ggml_knobs.field_runs("q", block.q, 0)[0])
    gather = field_gather(g, block.block_bytes)
    vectors = _field_vectors(g, gather)
    paired = _pairs(runs) if block.values % SLOT == 0 else None
    block_runs = paired[0] if paired else runs
    vector_add = (-block.q.sign - block.q.offset) % 256

    def by_width(read) -> dict:
        """The widths whose registers ``read(width)`` can read from the block, and how."""
        return {w: p for w in PIECE_WIDTHS if (p := read(w))}
    pieces = by_width(lambda w: () if block.q.codebook
                      else code_pieces(block_runs, block.values, w))
    scalar_fields = [r for f in (g.scale, g.min) if f is not None for r in f.runs
                     if r not in vectors["vector_field_runs"]]
    return GgmlInt8Knobs(
        ggml=g, type_name=ggml_type_name(layout), block_bytes=block.block_bytes,
        prefetch_lines=tuple(range(0, block.block_bytes, CACHE_LINE)),
        code_runs=runs, block_runs=block_runs,
        slot_runs=paired[1] if paired else tuple(range(block.values // SLOT)),
        code_widths=tuple(sorted(({r.width for r in (*runs, *block_runs)}
                                  | {p.width for v in pieces.values() for ps in v for p in ps}
                                  | ({GATHER_BYTES} if gather else set()))
                                 - {0})),
        q_sign=block.q.sign, vector_add=vector_add,
        q_offset=block.q.offset, codebook=tuple(v % 256 for v in block.q.codebook),
        scalar_codebook=bool(block.q.codebook) and not all(r.width for r in runs),
        has_min=block.m is not None,
        scales_apart=block.scale is not None and (bool(scalar_fields) or bool(g.scale_table)),
        code_pieces=pieces, field_gather=gather,
        lane_pieces=by_width(lambda w: lane_piece(runs, block.values, w, block.q.sign,
                                                  vector_add, bool(block.q.codebook))),
        block_lane_pieces=by_width(lambda w: block_lane_pieces(
            block_runs, block.values, w, block.q.sign, vector_add)
            if block.q.codebook and block.values % w == 0 else ()),
        **vectors)
