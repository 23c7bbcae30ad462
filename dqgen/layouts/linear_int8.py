"""The int8 linear (``compute="int8"``, SPEC.md §9): x quantized to int8 in blocks of 32
along K, the weight's own integers multiplied with it exactly (integer dot products:
AVX512-VNNI on the levels whose CPUs have it, else AVX-512BW/AVX2 byte multiply-adds),
each quad of products scaled and summed in f32 in a fixed order. GGML's super-block types
(blocks of 256, integer sub-block scales) are multiplied as llama.cpp does, and the
family's groups of 64 to 256 the same way: x in blocks of the weight's, the sub-block
scales applied to the integers, one f32 term a block a lane (the block order,
``linear_int8_blocks.c.j2``).

As llama.cpp does for its types: x loses precision to its int8 codes (a relative error of
about 1/254 of its block's largest value), the weight none. A format takes part through
its kind's ``int8_view`` (GGML blocks, the per-group family): the C macros that decode a
chunk of a row into int8 codes and a scale (and min) a run, and the same reading in numpy
for the reference. Each chunk is decoded once, then multiplied with every row of x. No
thread count, ISA level or M changes a bit.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from .. import reference
from ..errors import InvalidProblemError, UnsupportedError
from ..ir import Op
from ..spec import CONVERT, Param, pointer
from .own_loop import float_helpers, own_loop_spec
from .registry import kind_of, kinds

FORMULA = ("y[m, n] = F(sum64(fma(f32(d_w * d_x), P, acc)) [+ sumL(fma(f32(m_w * d_x), S, "
           "acc))] + bias[n]): P an exact integer sum of a quad, S of a segment, x int8 in "
           "blocks of 32")
BLOCK_FORMULA = ("y[m, n] = F(sum8(fma(f32(d * d_x), S, acc)) [+ sumJ(fma(f32(m_b * d_x), "
                 "M, acc))] + bias[n]): S an exact integer sum of C(sc) * C(q) * q_x, M of "
                 "C(min) * q_x, m_b the block's min factor, x int8 in blocks of W's")
# Lane sums: four AVX-512 registers a row of x, so that four chains of fused multiply-adds
# run at once (one chain waits on the fma's latency).
LANES = reference.INT8_LANES
QUAD = reference.QUAD
X_BLOCK = reference.X_BLOCK
# Rows of x a micro-kernel multiplies with one decoded row of W: the largest that fits.
MICRO_ROWS = (4, 2, 1)
# The decode asks for the bytes this far ahead: rows of W past the last-level cache are
# read from memory faster than the hardware prefetcher alone brings them (Q8_0 [4096,
# 14336] at M = 1: 3.0 -> 2.1 ms on one thread of an AMD EPYC).
PREFETCH_BYTES = 8192
# Values of a row of W decoded at a time (a multiple of the lanes' 256 values and of every
# block): its codes and a micro-kernel's rows of x stay in L1 however long K is.
K_CHUNK = 2048
# The block order's chunk: a row of 4096 values in one decode and one dot call (its x
# codes, a byte a value, and a micro-kernel's four rows still stay in L1).
BLOCK_K_CHUNK = 4096
# Past TILE_FROM_M rows of x, W_TILE rows of W are decoded together and each group of x's
# rows multiplied with all of them, so x's codes (M * K bytes: past L2 at M = 512) are read
# once a tile of W, not once a row.
W_TILE = 8
TILE_FROM_M = 16
# The block order's GEMM (AVX-512, AVX2) past GEMM_FROM_M rows of x (u4 group 128 and Q4_K
# [4096, 4096] on an AMD EPYC: even with the rows' micro-kernel at 12 rows, 1.3-1.4x ahead
# at 16); values of W's tile decoded at a time, so that they and two groups of sixteen rows
# of x's codes stay in L1.
GEMM_FROM_M = 12
GEMM_K_CHUNK = 1024
# AVX2's GEMM (8 rows of x a vector) past 24 rows: below, the rows' micro-kernel of four
# is ahead (Q4_K and Q6_K [4096, 4096], one thread: 1.4x at M = 17, 1.02-1.08x at 24); from
# 48 rows on the two are within 7% of each other.
AVX2_GEMM_FROM_M = 24
# Up to FROM_W_MAX_M rows of x (one micro-kernel call), the dot reads W's codes straight
# from its blocks where the view says how, a register of this many bytes on each ISA level
# (AVX-512, AVX2): a decoded copy costs a store and a load of every code (M = 1, [4096,
# 4096], one thread of an AMD EPYC: Q4_K 342 -> 288 us, Q4_0 619 -> 538 us). Past them the
# copy is decoded once for every micro-kernel call (at M = 3, two calls: Q6_K 744 us from
# the copy, 892 us from the blocks; at M = 4 they are even).
PIECE_BYTES = {1: 64, 2: 32}
FROM_W_MAX_M = 2


@dataclass(frozen=True)
class DotVariant:
    """One compiled form of the dot product: its function-name suffix, the target
    attribute that lets it use instructions beyond the ISA level, and whether it takes
    the VNNI instruction."""

    suffix: str
    attribute: str
    vnni: bool
    comment: str


# The forms of the dot product; all give the same exact integers.
VNNI_DOT = DotVariant("_vnni", '__attribute__((target("avx512vnni"))) ', True,
                        "AVX512-VNNI: |C(q)| (unsigned) times x's codes\n * signed as C(q), "
                        "four products an int32 lane: exact.")
AVX512_DOT = DotVariant("_bw", "", False,
                          "AVX-512BW: |C(q)| (unsigned) times x's codes\n * signed as C(q), "
                          "pairs then pairs of pairs (at most 2 * 128 * 127, no saturation): "
                          "exact.")
# The ISA levels whose CPUs all have AVX512-VNNI (BF16 came after it: Cooper Lake, Zen 4,
# Sapphire Rapids); plain avx512 (Skylake-X) multiplies bytes with AVX-512BW.
VNNI_LEVELS = ("avx512_bf16", "avx512_fp16")
PLAIN_DOT = DotVariant("", "", False, "The products in int32, exact.")
AVX2_DOT = DotVariant("", "", False,
                        "AVX2: |C(q)| (unsigned) times x's codes signed as\n * C(q), pairs "
                        "then pairs of pairs (at most 2 * 128 * 127, no saturation): exact;\n"
                        " * lanes in registers of eight.")


@dataclass(frozen=True)
class Int8Knobs:
    """What ``linear_int8.c.j2`` prints: the weight's decode (its view's template and
    knobs, its input arrays, how far ahead it prefetches), the quads' sub-blocks, the
    dot product's forms, registers and rows of x, and the conversions of x, bias and y."""

    view: object             # registry.Int8View
    decode: object           # its knobs, for its template
    weight_inputs: tuple     # the weight's arrays (Params), in the kernel's order
    sub: int
    has_min: bool
    lane_regs: int           # registers 16 f32 lanes take: 1 (AVX-512), 2 (AVX2), 0 (plain C)
    dot: DotVariant          # the dot product's form on this ISA level
    prefetch_bytes: int      # how far ahead of the decode its bytes are asked for
    micro_rows: tuple[int, ...]
    lanes: int
    k_step: int              # k is padded with zeros to whole steps of the lanes' quads
    k_chunk: int             # values of a row of W decoded at a time
    w_tile: int              # rows of W decoded together past tile_from_m rows of x
    tile_from_m: int
    seg: int                 # values a min term covers (one block of x, one sub-block)
    min_lanes: int           # the min terms' lane sums: a step's segments
    quads_per_sub: int
    sub_index512: tuple[int, ...]  # an AVX-512 register's 16 quads: each one's sub-block
    sub_index256: tuple[int, ...]  # (from the first) where they span several; () if one
    x_c_type: str
    bias_c_type: str         # "" without a bias
    x_load: str
    bias_load: str
    y_store: str
    # the block order (SPEC.md §9)
    x_block: int = 32        # x's block: the weight's block
    subs: int = 1            # sub-blocks a block
    scaled: bool = True      # the weight has sub-block scales to multiply (not Q8_K, TQ*)
    signed_dot: bool = False     # |C(q)| times x's codes signed as C(q) (else C(q) itself)
    integer_mins: bool = True    # mins are integers times a block's factor (else one a block)
    gemm: bool = False       # past gemm_from_m rows of x, the GEMM (AVX-512, AVX2)
    gemm_m: int = 16         # rows of x a vector of the GEMM
    gemm_mvs: tuple[int, ...] = (2, 1)   # the GEMM's vectors of x at once, most first
    gemm_prefix: str = "_mm512"          # the GEMM's intrinsics, by vector width
    gemm_bits: int = 512
    gemm_float_type: str = "__m512"
    gemm_int_type: str = "__m512i"
    gemm_sign_mask: bool = True          # a code's sign moves onto x by a byte mask (AVX-512)
    gemm_products: str = ""              # the GEMM's products, in its comment
    gemm_from_m: int = GEMM_FROM_M
    gemm_k_chunk: int = GEMM_K_CHUNK
    slot_runs: tuple[int, ...] = ()   # the run of 32 values each slot holds
    permuted: bool = False       # slots not in the runs' order: x's codes follow W's
    slot_subs512: tuple[tuple[int, ...], ...] = ()   # AVX-512 register r: its lanes' sub-blocks
    scales_fill_register: bool = False   # a block's 16 sub-block scales are one AVX-512 load
                                         # (else 8: half of one)
    slot_subs256: tuple[int, ...] = ()   # AVX2 register (slot) s: its first lane's sub-block
    quad_subs: tuple[int, ...] = ()      # plain C: each stored quad's sub-block
    fused_pieces: tuple = ()     # the block order's code vectors read from W's blocks (the
                                 # view's pieces at the ISA's width; () where decoded first)
    fused_lanes: tuple = ()      # or its registers read a 128-bit lane at a time
    lane_piece: object = None    # the quad order's register of codes read from W's blocks
    raw_codes: bool = False      # it multiplies the raw codes unsigned (C(q) = raw + offset)
    raw_offset: int = 0          # and adds offset times x's quad sums (0: none)
    reads_w: bool = False        # the dot may read W's codes from its blocks (then the
                                 # decode skips the codes where asked)
    dot_forms: tuple[bool, ...] = (False,)   # the dots compiled: codes from a decoded copy
                                             # (False), from W's blocks (True)
    from_w_max_m: int = 0        # rows of x up to which the dot reads W's blocks


def _sub_index(quads: int, per_sub: int) -> tuple[int, ...]:
    """Each of a register's ``quads`` quads' sub-block, counted from the first's; () where
    one sub-block spans them all."""
    return tuple(j // per_sub for j in range(quads)) if per_sub < quads else ()


def readable_formats() -> tuple[str, ...]:
    """What the int8 linear reads, for messages: each kind's own words."""
    return tuple(dict.fromkeys(name for kind in kinds() for name in kind.int8_names()))


def reads(weight) -> bool:
    """Whether the int8 linear reads weights of the format descriptor ``weight``."""
    return kind_of(weight).int8_view(weight) is not None


def weight_view(weight):
    """The ``Int8View`` of the format descriptor ``weight``, if the int8 linear reads it."""
    kind = kind_of(weight)
    view = kind.int8_view(weight)
    if view is None:
        raise UnsupportedError(
            f"compute='int8' does not read {kind.format_name(weight)} weights; it reads "
            f"{'; '.join(readable_formats())}; use compute='f32'")
    return view


def check_k(weight, k: int) -> None:
    """K a whole number of the view's runs and of x's blocks."""
    view = weight_view(weight)
    if k % view.k_multiple:
        raise InvalidProblemError(f"k={k} is not a multiple of {view.k_multiple}, which "
                                  "compute='int8' needs for this weight")


@dataclass(frozen=True)
class _Simd:
    lane_regs: int
    dot: DotVariant
    micro_rows: tuple[int, ...]
    block_micro_rows: tuple[int, ...]


def _simd(arch: str) -> _Simd:
    """The dot product's registers, forms and rows of x at once on ISA level ``arch``, in the
    quad order and in the block order. AVX2 keeps one row in the quad order (eight 8-lane
    sums a row fill half its sixteen registers) and four in the block order (a row's lanes
    are one register; Q4_K, Q6_K and IQ4_XS [4096, 4096] at M = 8 on an AMD EPYC: 1.1-1.4x
    faster than one row)."""
    if arch in VNNI_LEVELS:
        return _Simd(1, VNNI_DOT, MICRO_ROWS, MICRO_ROWS)
    if arch.startswith("avx512"):
        return _Simd(1, AVX512_DOT, MICRO_ROWS, MICRO_ROWS)
    if arch == "avx2":
        return _Simd(2, AVX2_DOT, (1,), MICRO_ROWS)
    return _Simd(0, PLAIN_DOT, (1,), (1,))


def lower(desc, target: str, arch: str, storage: dict):
    """The int8 linear's spec for ``desc`` (``compute == "int8"``)."""
    if target != "c":
        raise UnsupportedError("compute='int8' runs on the CPU only; use compute='f32' on CUDA")
    if desc.transpose:
        raise UnsupportedError("compute='int8' makes y = x @ W.T only; x's gradient "
                               "(the transposed product) is compute='f32'")
    view = weight_view(desc.weight)
    decode = kind_of(desc.weight).lower(desc.weight, target, arch, storage)
    inputs = tuple(p for p in decode.params if p.role == "in")
    x = pointer("x", desc.x_dtype, "in", storage)
    bias = (pointer("bias", desc.x_dtype, "in", storage),) if desc.bias else ()
    params = (*inputs, x, *bias, pointer("y", desc.y_dtype, "out", storage),
              Param("m", None, "scalar", "int64_t"), Param("n", None, "scalar", "int64_t"),
              Param("k", None, "scalar", "int64_t"))
    x_load = CONVERT.get(desc.x_dtype, ("", ""))[0]
    simd = _simd(arch)
    if view.block:
        simd = dataclasses.replace(simd, micro_rows=simd.block_micro_rows)
    per_sub = view.sub // QUAD
    order = {"lanes": LANES, "k_step": LANES * QUAD, "k_chunk": K_CHUNK,
             "seg": min(view.sub, X_BLOCK), "min_lanes": LANES * QUAD // min(view.sub, X_BLOCK)}
    width = PIECE_BYTES.get(simd.lane_regs)
    pieces, lanes = view.code_pieces.get(width, ()), view.lane_pieces.get(width)
    reads_w = bool(pieces or lanes)
    from_w = {"reads_w": reads_w, "dot_forms": (False, True) if reads_w else (False,),
              "from_w_max_m": min(FROM_W_MAX_M, simd.micro_rows[0]) if reads_w else 0}
    if view.block:
        order = {**_block_order(view), **_gemm(simd), **from_w, "fused_pieces": pieces,
                 "fused_lanes": () if pieces else lanes or ()}
    else:
        raw = lanes.raw_offset if lanes is not None else None
        order = {**order, **from_w, "lane_piece": lanes, "raw_codes": raw is not None,
                 "raw_offset": raw or 0}
    knobs = Int8Knobs(
        view=view, decode=view.knobs, weight_inputs=inputs, sub=view.sub,
        has_min=view.has_min, lane_regs=simd.lane_regs, dot=simd.dot,
        prefetch_bytes=PREFETCH_BYTES, micro_rows=simd.micro_rows,
        w_tile=W_TILE, tile_from_m=TILE_FROM_M, quads_per_sub=per_sub,
        sub_index512=_sub_index(16, per_sub), sub_index256=_sub_index(8, per_sub),
        x_c_type=x.c_type, bias_c_type=bias[0].c_type if bias else "", x_load=x_load,
        bias_load=x_load if bias else "", y_store=CONVERT.get(desc.y_dtype, ("", ""))[1],
        **order)
    helpers = float_helpers(desc, "load_f16_bits", *(h for h in (x_load,) if h),
                            *view.helpers)
    ggml = getattr(view.knobs, "ggml", None)
    spec = own_loop_spec(desc, target, arch, storage, params,
                         BLOCK_FORMULA if view.block else FORMULA,
                         float_helpers=helpers, layout_knobs=knobs,
                         template="linear_int8_blocks" if view.block else "linear_int8",
                         load_float="", **({"ggml": ggml} if ggml is not None else {}))
    return dataclasses.replace(spec, op=Op.LINEAR, descriptor=(
        f"LinearDescriptor(weight={desc.weight.uri}, x_dtype={desc.x_dtype.value}, "
        f"y_dtype={desc.y_dtype.value}, bias={desc.bias}, compute=int8)"))


def _gemm(simd: _Simd) -> dict:
    """The block order's GEMM knobs on an ISA level: AVX-512 puts 16 rows of x in a vector
    and two vectors at once, past 12 rows; AVX2 8 rows and one (its sixteen registers hold
    one vector's eight lane sums, not two), past 24; plain C has none."""
    if simd.lane_regs == 0:
        return {"gemm": False}
    wide = simd.lane_regs == 1
    bits = 512 if wide else 256
    return {"gemm": True, "gemm_m": 16 if wide else 8, "gemm_mvs": (2, 1) if wide else (1,),
            "gemm_from_m": GEMM_FROM_M if wide else AVX2_GEMM_FROM_M,
            "gemm_prefix": f"_mm{bits}", "gemm_bits": bits,
            "gemm_float_type": f"__m{bits}", "gemm_int_type": f"__m{bits}i",
            "gemm_sign_mask": wide,
            "gemm_products": ("AVX-512 VNNI" if simd.dot.vnni else
                              "AVX-512BW's byte and word products" if wide else
                              "AVX2's byte and word products")}


def _block_order(view) -> dict:
    """The block order's knobs: eight lanes, x in blocks of the weight's, a min lane a
    sub-block, the sub-block scales, whether the codes' signs move onto x's, and the order of
    a block's runs of 32 (the decode's, which x's codes take too) with each stored quad's
    sub-block."""
    slots = view.slot_runs or tuple(range(view.block // 32))
    quad_subs = tuple((32 * slots[t // 8] + 4 * (t % 8)) // view.sub
                      for t in range(view.block // 4))
    return {"slot_runs": slots, "permuted": slots != tuple(sorted(slots)),
            "slot_subs512": tuple(quad_subs[16 * r:16 * r + 16]
                                  for r in range(view.block // 64)),
            "slot_subs256": quad_subs[::8], "quad_subs": quad_subs,
            "lanes": reference.BLOCK_LANES, "k_step": view.block, "k_chunk": BLOCK_K_CHUNK,
            "x_block": view.block, "subs": view.block // view.sub,
            "scales_fill_register": view.block // view.sub == 16,
            "min_lanes": view.block // view.sub, "seg": view.sub,
            "scaled": view.sub < view.block, "signed_dot": not view.unsigned_codes,
            "integer_mins": view.integer_mins}


def parts(desc, arrays: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int]:
    """The weight ``[n, k]`` as integers ``[n, k]``, scales and mins ``[n, k / sub]`` and
    ``sub``, read in numpy by its view (the quad order's parts)."""
    view = weight_view(desc.weight)
    codes, scales, mins = view.parts(arrays, desc.n, desc.k)
    return codes, scales, mins, view.sub


def expected(desc, arrays: dict, x, bias, y_dtype) -> np.ndarray:
    """y for ``x`` times the weight in ``arrays`` (``desc``'s), as the reference computes it:
    ``reference.linear_int8``, or ``linear_int8_blocks`` for a view with a block."""
    view = weight_view(desc.weight)
    if view.block:
        return reference.linear_int8_blocks(x, *view.block_parts(arrays, desc.n, desc.k),
                                            bias, y_dtype)
    codes, scales, mins, sub = parts(desc, arrays)
    return reference.linear_int8(x, codes, scales, mins, sub, bias, y_dtype)


def oracle(desc, arrays: dict) -> np.ndarray:
    return expected(desc, arrays, arrays["x"], arrays.get("bias") if desc.bias else None,
                    desc.y_dtype.np_dtype)
