"""The int8 linear (``compute="int8"``, SPEC.md §9): x quantized to int8 in blocks of 32
along K, the weight's own integers multiplied with it exactly (integer dot products:
AVX512-VNNI where the CPU has it, else AVX-512BW/AVX2 byte multiply-adds), each quad of
products scaled and summed in f32 in a fixed order.

As llama.cpp does for its types: x loses precision to its int8 codes (a relative error of
about 1/254 of its block's largest value), the weight none. The weight's integers, scales
and mins come from the format's block table (``ggml_integers`` reads the same in numpy);
each row is decoded once into int8 codes and a scale (and min) a quad, then multiplied
with every row of x. No thread count, ISA level or M changes a bit.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from .. import reference
from ..errors import UnsupportedError
from ..ir import DType, Op, ggml_type_name
from ..spec import CONVERT, Param, pointer
from . import ggml_knobs
from .ggml_blocks import LAYOUTS
from .ggml_integers import block_parts, int8_layout
from .ggml_knobs import GgmlKnobs, Run
from .own_loop import float_helpers, own_loop_spec
from .registry import kind_of

FORMULA = ("y[m, n] = F(sum64(fma(f32(d_w * d_x), P, acc)[, fma(f32(m_w * d_x), S, acc)]) "
           "+ bias[n]): P, S exact integer sums of a quad, x int8 in blocks of 32")
# Lane sums: four AVX-512 registers a row of x, so that four chains of fused multiply-adds
# run at once (one chain waits on the fma's latency).
LANES = reference.INT8_LANES
QUAD = reference.QUAD
X_BLOCK = reference.X_BLOCK
# Rows of x a micro-kernel multiplies with one decoded row of W: the largest that fits.
MICRO_ROWS = (4, 2, 1)
# Codes a step in a run decoded with byte vectors: 32 where the run allows (16 where a
# codebook is one 16-byte lookup).
BYTE_VECTORS = (32, 16)
# The decode asks for the bytes this far ahead: rows of W past the last-level cache are
# read from memory faster than the hardware prefetcher alone brings them (Q8_0 [4096,
# 14336] at M = 1: 3.0 -> 2.1 ms on one thread of an AMD EPYC).
PREFETCH_BYTES = 8192
# Values of a row of W decoded at a time (a multiple of the lanes' 256 values and of every
# block): its codes and a micro-kernel's rows of x stay in L1 however long K is.
K_CHUNK = 2048


@dataclass(frozen=True)
class CodeRun:
    """A run of the weight's integers (a ``Run`` of its q field, not cut at sub-blocks: the
    codes take no scale): decoded ``width`` at a time in byte vectors, or (0) one at a
    time."""

    run: Run
    width: int


@dataclass(frozen=True)
class DotVariant:
    """One compiled form of the dot product: its function-name suffix, the target
    attribute that lets it use instructions beyond the ISA level, and whether it takes
    the VNNI instruction."""

    suffix: str
    attribute: str
    vnni: bool
    comment: str


# AVX-512 levels: VNNI where the CPU has it (checked once a call), else AVX-512BW; both
# give the same exact integers.
AVX512_DOTS = (
    DotVariant("_vnni", '__attribute__((target("avx512vnni"))) ', True,
               "AVX512-VNNI: |C(q)| (unsigned) times x's codes\n * signed as C(q), four "
               "products an int32 lane: exact."),
    DotVariant("_bw", "", False,
               "AVX-512BW: |C(q)| (unsigned) times x's codes\n * signed as C(q), "
               "pairs then pairs of pairs (at most 2 * 128 * 127, no saturation): exact."))
PLAIN_DOTS = (DotVariant("", "", False, "The products in int32, exact."),)
AVX2_DOTS = (DotVariant("", "", False,
                        "AVX2: |C(q)| (unsigned) times x's codes signed as\n * C(q), pairs "
                        "then pairs of pairs (at most 2 * 128 * 127, no saturation): exact;\n"
                        " * lanes 0-7 and 8-15 in two registers."),)


@dataclass(frozen=True)
class Int8Knobs:
    """What ``linear_int8.c.j2`` prints: the block's decode (the GGML knobs: its d,
    sub-block scales and mins, words) and its integers' runs, the field's sign bit, offset
    and codebook, the micro-kernel rows, the SIMD kind and the conversions of x, bias, y."""

    ggml: GgmlKnobs
    type_name: str
    code_runs: tuple[CodeRun, ...]
    code_widths: tuple[int, ...]   # the byte vectors' widths the runs use
    q_sign: int              # the integers' sign bit (0: unsigned)
    vector_add: int          # byte vectors: C(q) = (raw ^ q_sign) + vector_add (mod 256)
    q_offset: int            # one at a time: C(q) = post-processed value - q_offset
    codebook: tuple[int, ...]  # the entries as bytes (mod 256)
    scalar_codebook: bool    # a run decoded one value at a time reads the codebook
    has_min: bool
    lane_regs: int           # registers 16 f32 lanes take: 1 (AVX-512), 2 (AVX2), 0 (plain C)
    dot_variants: tuple[DotVariant, ...]
    runtime_vnni: bool       # pick the VNNI variant at run time
    scales_apart: bool       # unpack sub-block scales in a call of its own (not inlined)
    prefetch_bytes: int      # how far ahead of the decode its bytes are asked for
    vector_field_runs: tuple[Run, ...]   # runs of the scales and mins unpacked as vectors
    field_vector_lengths: tuple[int, ...]
    scale_vector: str        # a vector's scales from its f32 lanes fv (d * fv, ...)
    min_vector: str          # and its mins (-(m * fv) or m * fv)
    micro_rows: tuple[int, ...]
    lanes: int
    k_step: int              # k is padded with zeros to whole steps of the lanes' quads
    k_chunk: int             # values of a row of W decoded at a time
    quads_per_sub: int
    sub_index512: tuple[int, ...]  # an AVX-512 register's 16 quads: each one's sub-block
    sub_index256: tuple[int, ...]  # (from the first) where they span several; () if one
    x_c_type: str
    bias_c_type: str         # "" without a bias
    x_load: str
    bias_load: str
    y_store: str


def _code_run(run: Run, codebook: bool) -> CodeRun:
    plain = all(not s.word and not s.mul and s.unit == 1 for s in run.sources)
    widths = [w for w in BYTE_VECTORS if plain and run.length % w == 0
              and not (codebook and w > 16)]
    return CodeRun(run, widths[0] if widths else 0)


def _field_vectors(g: GgmlKnobs) -> dict:
    """The runs of the sub-block scales and mins unpacked a whole run at once: 4, 8 or 16
    elements whose every plane reads consecutive bytes at one shift, within a byte (a table
    of scales is read one at a time), and the formulas of a vector, each operation rounded
    as the one-at-a-time unpacking's (``ggml_sub_scale``)."""
    def fits(run: Run) -> bool:
        return run.length in (4, 8, 16) and all(
            not s.word and not s.mul and s.unit == 1 and s.into + s.mask.bit_length() <= 8
            for s in run.sources)
    fields = [f for f in (g.scale if not g.scale_table else None, g.min) if f is not None]
    runs = tuple(r for f in fields for r in f.runs if fits(r))
    scale = (f"(d * ({g.scale_affine[0]!r}f + fv)) * {g.scale_affine[1]!r}f"
             if g.scale_affine else "d * fv")
    return {"vector_field_runs": runs,
            "field_vector_lengths": tuple(sorted({r.length for r in runs})),
            "scale_vector": scale, "min_vector": "-(m * fv)" if g.negate_min else "m * fv"}


def _sub_index(quads: int, per_sub: int) -> tuple[int, ...]:
    """Each of a register's ``quads`` quads' sub-block, counted from the first's; () where
    one sub-block spans them all."""
    return tuple(j // per_sub for j in range(quads)) if per_sub < quads else ()


def int8_type_names() -> tuple[str, ...]:
    """The GGML types the int8 linear reads: values int8 integers times a sub-block scale."""
    return tuple(ggml_type_name(t) for t in LAYOUTS if int8_layout(t) is not None)


def reads(weight) -> bool:
    """Whether the int8 linear reads weights of the format descriptor ``weight``."""
    return kind_of(weight).int8_block(weight) is not None


def weight_layout(weight):
    """The block layout of the format descriptor ``weight``, if the int8 linear reads it."""
    kind = kind_of(weight)
    block = kind.int8_block(weight)
    if block is None:
        raise UnsupportedError(
            f"compute='int8' does not read {kind.format_name(weight)} weights; it reads GGML "
            f"blocks whose values are int8 integers times a scale ({', '.join(int8_type_names())}); "
            "use compute='f32'")
    return weight.layout, block


@dataclass(frozen=True)
class _Simd:
    lane_regs: int
    dots: tuple[DotVariant, ...]
    micro_rows: tuple[int, ...]
    runtime_vnni: bool


def _simd(arch: str) -> _Simd:
    """The dot product's registers, forms and rows of x at once on ISA level ``arch`` (AVX2
    keeps one row: eight 8-lane sums a row fill half its sixteen registers)."""
    if arch.startswith("avx512"):
        return _Simd(1, AVX512_DOTS, MICRO_ROWS, True)
    if arch == "avx2":
        return _Simd(2, AVX2_DOTS, (1,), False)
    return _Simd(0, PLAIN_DOTS, (1,), False)


def lower(desc, target: str, arch: str, storage: dict):
    """The int8 linear's spec for ``desc`` (``compute == "int8"``)."""
    if target != "c":
        raise UnsupportedError("compute='int8' runs on the CPU only; use compute='f32' on CUDA")
    if desc.transpose:
        raise UnsupportedError("compute='int8' makes y = x @ W.T only; x's gradient "
                               "(the transposed product) is compute='f32'")
    layout, block = weight_layout(desc.weight)
    g = ggml_knobs.knobs(layout, "c", DType.F32)
    x = pointer("x", desc.x_dtype, "in", storage)
    bias = (pointer("bias", desc.x_dtype, "in", storage),) if desc.bias else ()
    params = (pointer("data", DType.U8, "in", storage), x, *bias,
              pointer("y", desc.y_dtype, "out", storage), Param("m", None, "scalar", "int64_t"),
              Param("n", None, "scalar", "int64_t"), Param("k", None, "scalar", "int64_t"))
    x_load = CONVERT.get(desc.x_dtype, ("", ""))[0]
    simd = _simd(arch)
    runs = tuple(_code_run(r, bool(block.q.codebook))
                 for r in ggml_knobs.field_runs("q", block.q, 0)[0])
    per_sub = g.sub // QUAD
    knobs = Int8Knobs(
        ggml=g, type_name=ggml_type_name(layout), code_runs=runs, q_sign=block.q.sign,
        vector_add=(-block.q.sign - block.q.offset) % 256, q_offset=block.q.offset,
        codebook=tuple(v % 256 for v in block.q.codebook),
        scalar_codebook=bool(block.q.codebook) and not all(r.width for r in runs),
        code_widths=tuple(sorted({r.width for r in runs} - {0})),
        has_min=block.m is not None, lane_regs=simd.lane_regs, dot_variants=simd.dots,
        runtime_vnni=simd.runtime_vnni, scales_apart=block.scale is not None,
        prefetch_bytes=PREFETCH_BYTES, **_field_vectors(g),
        micro_rows=simd.micro_rows, lanes=LANES, k_step=LANES * QUAD, k_chunk=K_CHUNK,
        quads_per_sub=per_sub,
        sub_index512=_sub_index(16, per_sub), sub_index256=_sub_index(8, per_sub),
        x_c_type=x.c_type, bias_c_type=bias[0].c_type if bias else "", x_load=x_load,
        bias_load=x_load if bias else "", y_store=CONVERT.get(desc.y_dtype, ("", ""))[1])
    helpers = float_helpers(desc, "load_f16_bits", *(h for h in (x_load,) if h))
    spec = own_loop_spec(desc, target, arch, storage, params, FORMULA,
                         float_helpers=helpers, template="linear_int8", layout_knobs=knobs,
                         load_float="", block_bytes=block.block_bytes, ggml=g)
    return dataclasses.replace(spec, op=Op.LINEAR, descriptor=(
        f"LinearDescriptor(weight={desc.weight.uri}, x_dtype={desc.x_dtype.value}, "
        f"y_dtype={desc.y_dtype.value}, bias={desc.bias}, compute=int8)"))


def parts(desc, data) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int]:
    """The weight ``[n, k]`` as integers ``[n, k]``, scales and mins ``[n, k / sub]`` and
    ``sub``, read from its blocks by ``ggml_integers``."""
    layout, block = weight_layout(desc.weight)
    codes, scales, mins = block_parts(layout, data)
    sub = block.sub or block.values
    n, k = desc.n, desc.k
    return (codes.reshape(n, k), scales.reshape(n, k // sub),
            None if mins is None else mins.reshape(n, k // sub), sub)


def oracle(desc, arrays: dict) -> np.ndarray:
    codes, scales, mins, sub = parts(desc, arrays["data"])
    bias = arrays.get("bias") if desc.bias else None
    return reference.linear_int8(arrays["x"], codes, scales, mins, sub, bias,
                                 desc.y_dtype.np_dtype)
