"""How the int8 linear's dot reads a GGML block with no decoded copy of it
(``templates/c/int8_ggml.j2``'s ``code_vector``, ``lane_piece`` and ``gathered_fields``):
a register of codes as byte vectors of the block's planes, shifted and masked, and a
block's sub-block scales and mins gathered by one byte shuffle a plane. A decoded copy
costs a store and a load of every code, which bound the dot at M = 1. Every piece reads
only plain runs (``CodeRun.width`` set: consecutive bytes at one shift), so the codes are
the decode's own. ``runs`` are ``ggml_int8.CodeRun``s: a run, its vector width, its place."""

from __future__ import annotations

from dataclasses import dataclass

from .ggml_knobs import GgmlKnobs, Run

# A register of 64 bytes may be read as two halves of 32, each from a run of its own.
HALF = 32


@dataclass(frozen=True)
class PartPlane:
    """One plane of a ``CodePart``: the bytes at ``offset`` as 16-bit words shifted left by
    ``left`` or right by ``right`` (byte vectors have no shift instruction), then ``mask``
    keeps the bits each byte's own shift placed (none a neighbour's shift carried in)."""

    offset: int
    left: int
    right: int
    mask: int


@dataclass(frozen=True)
class CodePart:
    """``width`` of a block's stored codes as one byte vector read straight from the block:
    bytes ``skip`` on of run ``run`` (whose byte i reads its planes at ``offset + i``), each
    plane a word shift and a mask."""

    run: Run
    skip: int
    width: int
    planes: tuple[PartPlane, ...]


def _plane(src, skip: int) -> PartPlane | None:
    """``((byte >> shift) & mask) << into`` as a word shift and a mask, or None where a word
    shift would carry a neighbour's bits into the mask."""
    placed = src.mask << src.into
    left, right = max(src.into - src.shift, 0), max(src.shift - src.into, 0)
    # A left shift carries a byte's top bits into its neighbour's lowest `left` bits, below
    # `into` and so masked; a right shift carries them into the top `right` bits.
    if placed > 255 or placed >> (8 - right):
        return None
    return PartPlane(src.offset + skip, left, right, placed)


# The dot's code vectors: 64 bytes (AVX-512) and 32 (AVX2).
PIECE_WIDTHS = (64, 32)


def code_pieces(runs: tuple, values: int, width: int) -> tuple[tuple[CodePart, ...], ...]:
    """Each ``width`` bytes of a block's ``values`` stored codes as the byte vectors that
    read them from the block, so that the dot takes them from the weight, not from a decoded
    copy: one vector where one run holds the piece, two halves where two do; () where a piece
    is neither (runs decoded one value at a time, or 16 bytes at a time through a codebook)."""
    def part(start: int, size: int) -> CodePart | None:
        for cr in runs:
            if cr.width and cr.at <= start and start + size <= cr.at + max(
                    cr.run.length, cr.width):
                planes = tuple(_plane(src, start - cr.at) for src in cr.run.sources)
                return None if None in planes else CodePart(cr.run, start - cr.at, size, planes)
        return None
    pieces = []
    for start in range(0, values, width):
        whole = part(start, width)
        halves = [part(start + h, width // 2) for h in (0, width // 2)] if width > HALF else []
        if whole is None and (not halves or None in halves):
            return ()
        pieces.append((whole,) if whole else tuple(halves))
    return tuple(pieces)


# Raw codes below this multiply unsigned with x's int8 codes in byte pairs (maddubs) without
# saturating: 2 * 15 * 127 < 32767.
RAW_LIMIT = 16

# The quad order's blocks a register's codes come from whole: 32 values (16 a 128-bit lane).
LANE_BYTES = 16
QUAD_BLOCK = 32


@dataclass(frozen=True)
class LaneWindow:
    """16 bytes from byte ``offset`` of a register's block ``block``, loaded into its 128-bit
    lanes ``lanes`` (``dwords``: those lanes' 32-bit elements as a bit mask)."""

    block: int
    offset: int
    lanes: tuple[int, ...]
    dwords: int


@dataclass(frozen=True)
class LaneShift:
    """The lanes whose bytes shift right by ``right`` (a 16-bit word shift the masks make a
    byte shift), as masks of their 16-bit and 32-bit elements."""

    right: int
    words: int
    dwords: int


@dataclass(frozen=True)
class LanePiece:
    """A register of the quad order's codes read straight from the weight: ``blocks`` whole
    blocks of 32 values, 16 codes a 128-bit lane, each lane a plane's 16 bytes of its block
    (``windows``), shifted (``shifts``), masked (``masks``, a byte each lane), then the sign
    and offset where they change a byte (``post``) or the codebook."""

    blocks: int
    windows: tuple[LaneWindow, ...]
    lane_sources: tuple[tuple[int, int], ...]   # each lane's (block, offset)
    shifts: tuple[LaneShift, ...]
    masks: tuple[int, ...]
    mask_dwords: tuple[int, ...]   # the masks as the register's 32-bit elements, () if none
    post: bool
    # C(q) = raw + raw_offset for every raw value the masks leave, all below 16 (Q4_0: -8;
    # Q4_1: 0): the dot multiplies the raw bytes as unsigned and adds raw_offset times the
    # quad's x codes' sum (exact, as the signed product; maddubs cannot saturate); None if not
    raw_offset: int | None = None


def _lanes_piece(runs: tuple, starts: list[tuple[int, int]], blocks: int,
                 q_sign: int, vector_add: int, codebook: bool) -> LanePiece | None:
    """The register whose 128-bit lanes hold the codes from value ``within`` of block
    ``block`` (``starts``, a lane each) as a ``LanePiece``, where each lane's 16 values are one
    plane's consecutive bytes; None where not (bits from a word, several planes)."""
    lanes = []
    for block, within in starts:
        run = next((cr for cr in runs if cr.width and cr.at <= within
                    and within + LANE_BYTES <= cr.at + cr.run.length), None)
        if run is None or len(run.run.sources) != 1:
            return None
        plane = _plane(run.run.sources[0], within - run.at)
        if plane is None or plane.left:
            return None
        lanes.append((block, plane))

    def bits(chosen, per: int) -> int:
        return sum(((1 << per) - 1) << (per * lane) for lane in chosen)
    windows: dict[tuple[int, int], list[int]] = {}
    shifts: dict[int, list[int]] = {}
    for lane, (block, plane) in enumerate(lanes):
        windows.setdefault((block, plane.offset), []).append(lane)
        if plane.right:
            shifts.setdefault(plane.right, []).append(lane)
    identity = all((((v ^ q_sign) + vector_add) & 255) == v for v in range(256))
    top = max(plane.mask for _, plane in lanes)
    offset = ((q_sign + vector_add + 128) & 255) - 128   # C(0), as an int8
    affine = not codebook and top < RAW_LIMIT and all(
        (((v ^ q_sign) + vector_add + 128) & 255) - 128 == v + offset for v in range(top + 1))
    return LanePiece(blocks,
                     tuple(LaneWindow(b, o, tuple(ls), bits(ls, 4))
                           for (b, o), ls in windows.items()),
                     tuple((block, plane.offset) for block, plane in lanes),
                     tuple(LaneShift(r, bits(ls, 8), bits(ls, 4)) for r, ls in shifts.items()),
                     tuple(plane.mask for _, plane in lanes),
                     () if all(plane.mask == 255 for _, plane in lanes) else
                     tuple(plane.mask * 0x01010101 for _, plane in lanes for _ in range(4)),
                     not identity and not affine, offset if affine else None)


def lane_piece(runs: tuple, values: int, width: int, q_sign: int, vector_add: int,
               codebook: bool) -> LanePiece | None:
    """The quad order's register of ``width`` bytes (whole blocks of 32: Q4_0, IQ4_NL, MXFP4)
    as a ``LanePiece``; None for other blocks, where a lane is not one plane, or where the
    codes are the blocks' bytes unchanged."""
    if values != QUAD_BLOCK or width % values:
        return None
    starts = [(lane * LANE_BYTES // values, lane * LANE_BYTES % values)
              for lane in range(width // LANE_BYTES)]
    piece = _lanes_piece(runs, starts, width // values, q_sign, vector_add, codebook)
    if piece is not None and not (piece.shifts or piece.mask_dwords or piece.post):
        return None   # the blocks' own bytes (Q8_0): a decoded copy is a copy, read as fast
    return piece


def block_lane_pieces(runs: tuple, values: int, width: int, q_sign: int,
                       vector_add: int) -> tuple[LanePiece, ...]:
    """The block order's codes (stored in the runs' own order) as a ``LanePiece`` a register
    of ``width`` bytes, for a codebook's runs of 16 (IQ4_XS): () where a lane is not one
    plane's bytes."""
    pieces = tuple(_lanes_piece(runs, [(0, start + lane) for lane in range(0, width, LANE_BYTES)],
                                1, q_sign, vector_add, True)
                   for start in range(0, values, width))
    return () if None in pieces else pieces


# Bytes one load of the block's sub-block scales and mins reads (a 128-bit register).
GATHER_BYTES = 16


@dataclass(frozen=True)
class GatherGroup:
    """The lanes of a ``FieldGather`` whose plane ``slot`` takes one word shift (left or
    right): the gathered bytes shifted, then ``masks`` (a lane's placed bits, 0 in the other
    lanes)."""

    slot: int
    left: int
    right: int
    masks: tuple[int, ...]


@dataclass(frozen=True)
class FieldGather:
    """A block's sub-block scales' integers (lanes from 0) and mins' (lanes from ``scales``)
    as one 16-byte vector: the 16 bytes from ``base`` loaded once, each plane's bytes
    gathered to their lanes by a byte shuffle (``indices``, a plane each), then shifted and
    masked a group of lanes at a time and or-ed. Where a field's elements take several planes
    and several runs (Q4_K's 6-bit scales and mins), one shuffle a plane does what a vector
    a run did."""

    base: int
    indices: tuple[tuple[int, ...], ...]
    groups: tuple[GatherGroup, ...]
    scales: int
    mins: int


def field_gather(g: GgmlKnobs, block_bytes: int) -> FieldGather | None:
    """The gather of ``g``'s sub-block scales and mins where it applies: unsigned integers
    (an offset subtracted after), each a byte's bits (no words, tables or trits), all in one
    16-byte window of the block and 16 lanes, and more than one run (else one widening load
    a run is already as few instructions)."""
    fields = [f for f in (g.scale if not g.scale_table else None, g.min) if f is not None]
    runs = [r for f in fields for r in f.runs]
    if (not fields or len(runs) < 2 or any(f.field.sign for f in fields)
            or sum(r.length for r in runs) > GATHER_BYTES):
        return None
    lanes: list[tuple[int, int, PartPlane]] = []   # (lane, slot, plane), the byte at offset
    first = 0
    for f in fields:
        for run in f.runs:
            for slot, src in enumerate(run.sources):
                if src.word or src.mul or src.unit != 1:
                    return None
                for i in range(run.length):
                    plane = _plane(src, i)
                    if plane is None:
                        return None
                    lanes.append((first + run.start + i, slot, plane))
        first += sum(r.length for r in f.runs)
    offsets = [pl.offset for _, _, pl in lanes]
    base = max(0, min(min(offsets), block_bytes - GATHER_BYTES))
    if max(offsets) >= base + GATHER_BYTES or base + GATHER_BYTES > block_bytes:
        return None
    slots = 1 + max(slot for _, slot, _ in lanes)
    indices = [[0] * GATHER_BYTES for _ in range(slots)]
    groups: dict[tuple[int, int, int], list[int]] = {}
    for lane, slot, pl in lanes:
        indices[slot][lane] = pl.offset - base
        groups.setdefault((slot, pl.left, pl.right), [0] * GATHER_BYTES)[lane] = pl.mask
    scales = sum(r.length for r in fields[0].runs) if g.scale and not g.scale_table else 0
    return FieldGather(base, tuple(tuple(i) for i in indices),
                       tuple(GatherGroup(*key, tuple(m)) for key, m in groups.items()),
                       scales, first - scales)
