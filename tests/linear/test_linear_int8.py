"""The int8 linear (``compute="int8"``, SPEC.md §9): x quantized to int8 in blocks of 32
(256 beside a super-block weight), the weight's own integers multiplied exactly, each quad's
(or each super-block's) terms in a fixed f32 order.
Bit for bit ``reference.linear_int8`` for every GGML type it reads, every x dtype, M in
{1, 2, 3, 8, 17, 64}, K tails, every ISA and thread count; the weight's integer parts
recombine to the dequantized values exactly; the error against the exact product is
within the bound x's rounding allows."""

from __future__ import annotations

import gguf
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dqgen import InvalidProblemError, UnsupportedError, reference
from dqgen.formats import ggml
from dqgen.formats.plan import FormatPlan
from dqgen.formats.weight import QuantizedWeight, linear
from dqgen.ir import ggml_type_name
from dqgen.layouts import linear_int8
from dqgen.layouts.ggml_blocks import LAYOUTS
from dqgen.layouts.ggml_integers import (block_parts, int8_layout, recombine, superblock_layout,
                                         superblock_parts)
from dqgen.layouts.linear import LinearDescriptor
from dqgen.plans import PlanPreference
from formats_util import assert_bits_equal
from strategies import ISAS
from test_linear import family_weight

DTYPES = {"f32": np.float32, "f16": np.float16, "bf16": ml_dtypes.bfloat16}
MS = (1, 2, 3, 8, 17, 64)
INT8_TYPES = tuple(ggml_type_name(t) for t in LAYOUTS if int8_layout(t) is not None)
# The types llama.cpp's own comparison uses, and one of each other family.
MAIN_TYPES = ("Q4_0", "Q8_0", "Q4_K", "Q6_K", "IQ4_XS")
SUPERBLOCK_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K", "IQ4_XS", "TQ1_0", "TQ2_0")
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered")


def blocks(rng, qtype: str, count: int) -> np.ndarray:
    """``count`` blocks of random bytes whose stored floats are finite and small, as a
    quantizer writes them (the special values have a test of their own)."""
    layout = LAYOUTS[ggml.parse_ggml_type(qtype)]
    data = rng.integers(0, 256, (count, layout.block_bytes), dtype=np.uint8)
    for s in (layout.d, layout.m):
        if s is not None and s.kind == "f16":
            d = (rng.random(count) * 0.02 + 0.001).astype(np.float16)
            data[:, s.offset:s.offset + 2] = d.view(np.uint8).reshape(count, 2)
        elif s is not None and s.kind == "f32":
            d = (rng.random(count) * 0.02 + 0.001).astype(np.float32)
            data[:, s.offset:s.offset + 4] = d.view(np.uint8).reshape(count, 4)
    return data


def weight_of(rng, qtype: str, n: int, k: int) -> QuantizedWeight:
    values = ggml.block_values(qtype)
    return QuantizedWeight.ggml(blocks(rng, qtype, n * k // values), qtype, (n, k))


def x_of(rng, m: int, k: int, dtype) -> np.ndarray:
    """Rows whose blocks of 32 have very different magnitudes, as activations do."""
    scale = 10.0 ** rng.integers(-3, 3, (m, k // 32, 1))
    return (rng.standard_normal((m, k // 32, 32)) * scale).reshape(m, k).astype(dtype)


def expected(weight, x, bias, y_dtype):
    desc = LinearDescriptor(weight.descriptor, x.shape[0], *weight.shape, "f32", "f32",
                            compute="int8")
    return linear_int8.expected(desc, weight.arrays, x, bias, y_dtype)


def x_block(qtype: str) -> int:
    """x's block beside ``qtype``: 256 for a super-block type, else 32."""
    return 256 if qtype in SUPERBLOCK_TYPES else 32


@pytest.mark.parametrize("qtype", INT8_TYPES)
def test_integer_parts_recombine_to_the_dequantized_values(qtype):
    """(d_w * C(q)) + m_w from ggml_integers equals the dequantize kernel's f32 values
    (themselves bit-exact with gguf-py), special stored floats included."""
    rng = np.random.default_rng(len(qtype))
    data = rng.integers(0, 256, (64, LAYOUTS[ggml.parse_ggml_type(qtype)].block_bytes),
                        dtype=np.uint8)
    layout = ggml.parse_ggml_type(qtype)
    codes, scales, mins = block_parts(layout, data)
    assert codes.dtype == np.int8
    want = ggml.dequantize(data, qtype, "f32").reshape(codes.shape)
    assert_bits_equal(recombine(layout, codes, scales, mins), want)


@pytest.mark.parametrize("qtype", SUPERBLOCK_TYPES)
def test_superblock_parts_make_the_sub_block_scales_and_mins(qtype):
    """The super-block order's integers: d * C(sc) and -dmin * C(min), each rounded once in
    f32, are the quad order's sub-block scales and mins bit for bit (so recombined, gguf-py's
    values), and the codes are the same."""
    layout = ggml.parse_ggml_type(qtype)
    rng = np.random.default_rng(len(qtype) + 7)
    data = rng.integers(0, 256, (64, LAYOUTS[layout].block_bytes), dtype=np.uint8)
    codes, sc, d, mins, dmin = superblock_parts(layout, data)
    want_codes, scales, want_mins = block_parts(layout, data)
    assert np.array_equal(codes, want_codes) and sc.dtype == np.int32
    with np.errstate(all="ignore"):
        assert_bits_equal((d[:, None] * sc.astype(np.float32)).astype(np.float32), scales)
        if want_mins is None:
            assert mins is None and dmin is None
        else:
            assert_bits_equal((dmin[:, None] * mins.astype(np.float32)).astype(np.float32),
                              want_mins)


def test_the_superblock_types():
    """Blocks of 256 with integer sub-block scales take the super-block order; the others
    (blocks of 32 to 128, NVFP4's table of scales) the quad order."""
    assert {ggml_type_name(t) for t in LAYOUTS if superblock_layout(t) is not None} \
        == set(SUPERBLOCK_TYPES)


def test_the_types_it_reads():
    """Every type whose values are int8 integers times a sub-block scale; the grids and
    float tensors are refused by name."""
    assert set(MAIN_TYPES) <= set(INT8_TYPES)
    assert not {"IQ2_XXS", "IQ1_M", "F16"} & set(INT8_TYPES)
    with pytest.raises(UnsupportedError, match="IQ2_XXS.*compute='f32'"):
        linear(np.zeros((1, 256), np.float32), weight_of(np.random.default_rng(0), "IQ2_XXS",
                                                         2, 256), compute="int8")


@pytest.mark.parametrize("qtype", INT8_TYPES)
def test_bit_exact_every_type(qtype):
    rng = np.random.default_rng(sum(map(ord, qtype)))
    values = ggml.block_values(qtype)
    k = values * max(1, 416 // values)   # 416 = 13 blocks of 32: a tail past the lanes
    weight = weight_of(rng, qtype, 37, k)
    bias = rng.standard_normal(37).astype(np.float32)
    for m in (1, 5):
        x = x_of(rng, m, k, np.float32)
        b = bias if m == 5 else None
        assert_bits_equal(linear(x, weight, b, compute="int8"), expected(weight, x, b, np.float32))


@pytest.mark.parametrize("x_dtype", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("qtype", MAIN_TYPES)
def test_every_x_dtype_and_m(qtype, x_dtype):
    rng = np.random.default_rng(hash((qtype, x_dtype)) % 2**32)
    k = 2 * ggml.block_values(qtype) if ggml.block_values(qtype) > 32 else 352
    weight = weight_of(rng, qtype, 29, k)
    bias = rng.standard_normal(29).astype(DTYPES[x_dtype])
    for m in MS:
        x = x_of(rng, m, k, DTYPES[x_dtype])
        b = bias if m % 2 else None
        got = linear(x, weight, b, compute="int8")
        assert got.dtype == DTYPES[x_dtype]
        assert_bits_equal(got, expected(weight, x, b, DTYPES[x_dtype]))
        assert_bits_equal(linear(x, weight, b, "f32", compute="int8"),
                          expected(weight, x, b, np.float32))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_K", "Q6_K", "IQ4_XS", "Q5_0"])
def test_every_isa_gives_the_same_bits(isa, qtype):
    rng = np.random.default_rng(3)
    k = 768 if ggml.block_values(qtype) > 32 else 480
    weight = weight_of(rng, qtype, 19, k)
    for m in (1, 3, 6, 17):
        x = x_of(rng, m, k, ml_dtypes.bfloat16)
        desc = LinearDescriptor(weight.descriptor, m, 19, k, "bf16", "f32", compute="int8")
        plan = FormatPlan.select(desc, preference=PlanPreference(isa=isa))
        y = np.empty((m, 19), np.float32)
        plan.run({**weight.arrays, "x": x, "y": y})
        assert_bits_equal(y, expected(weight, x, None, np.float32))


# The types whose codes the dot reads from W's blocks on AVX-512 and AVX2: the block
# order's (a piece of a super-block) and the quad order's (a register of whole blocks).
FROM_W_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K", "TQ2_0", "IQ4_XS",
                "Q4_0", "Q4_1", "IQ4_NL", "MXFP4")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("qtype", FROM_W_TYPES)
def test_codes_read_from_the_blocks_give_the_same_bits(qtype, isa):
    """Up to two rows of x (one micro-kernel call; the quad order's one row on AVX2) the
    dot reads W's codes straight from its blocks (the block order: 64 or 32 bytes of a
    block, two halves where two runs hold them; the quad order: a 128-bit lane of a block's
    plane at a time);
    past them from a decoded copy, as in a chunk K's padding ends (W has no bytes there).
    All give the reference's bits on every ISA, one row to five, with K past a decoded
    chunk, a padded last chunk where the blocks allow it, and a bias."""
    rng = np.random.default_rng(sum(map(ord, qtype)) + 7)
    values = ggml.block_values(qtype)
    for k in (4096 + 512, 4096 + 416) if values == 32 else (4096 + 512,):
        weight = weight_of(rng, qtype, 9, k)
        bias = rng.standard_normal(9).astype(np.float32)
        for m in (1, 2, 3, 4, 5):
            x = x_of(rng, m, k, np.float32)
            desc = LinearDescriptor(weight.descriptor, m, 9, k, bias=True, compute="int8")
            plan = FormatPlan.select(desc, preference=PlanPreference(isa=isa))
            assert ("dotw" in plan.source()) == (isa != "generic")   # the test reaches it
            y = np.empty((m, 9), np.float32)
            plan.run({**weight.arrays, "x": x, "bias": bias, "y": y})
            assert_bits_equal(y, expected(weight, x, bias, np.float32))


def test_a_word_shift_is_the_byte_shift_it_stands_for():
    """The dot shifts byte vectors as 16-bit words (there is no byte shift), then masks: for
    every plane it accepts, every pair of neighbouring bytes gives each byte's own
    ((byte >> shift) & mask) << into; the planes it refuses are the ones a neighbour's bits
    would reach."""
    from dqgen.layouts.ggml_knobs import Source
    from dqgen.layouts.ggml_reads import _plane
    words = np.arange(1 << 16, dtype=np.uint32)
    accepted = 0
    for bits in range(1, 9):   # masks as wide as the layouts write them, or wider
        for shift in range(0, 8):
            for into in range(0, 9 - bits):
                src = Source(0, shift, (1 << bits) - 1, into)
                plane = _plane(src, 0)
                left, right, placed = max(into - shift, 0), max(shift - into, 0), src.mask << into
                shifted = (words << left) >> right
                exact = all(np.array_equal((shifted >> half) & placed,
                                           (((words >> half) & 255) >> shift & src.mask) << into)
                            for half in (0, 8))   # the word's low byte and its high one
                assert (plane is not None) == exact, src
                if plane is not None:
                    assert (plane.left, plane.right, plane.mask) == (left, right, placed)
                accepted += plane is not None
    assert accepted > 30   # the planes the K-quants take are among them


@pytest.mark.parametrize("isa", ISAS)
def test_rows_longer_than_a_decoded_chunk(isa):
    """K past the kernel's chunk of decoded values (4096), with a tail in the last chunk:
    the lane sums carry over the chunks in the same order, also where more than 16 rows of
    x have W decoded a tile of 8 rows at a time (11 rows: a whole tile and a part)."""
    rng = np.random.default_rng(13)
    for qtype, k in (("Q4_0", 2 * 4096 + 416), ("Q4_K", 4096 + 768)):
        weight = weight_of(rng, qtype, 11, k)
        for m in (1, 5, 19):
            x = x_of(rng, m, k, np.float32)
            desc = LinearDescriptor(weight.descriptor, m, 11, k, compute="int8")
            plan = FormatPlan.select(desc, preference=PlanPreference(isa=isa))
            y = np.empty((m, 11), np.float32)
            plan.run({**weight.arrays, "x": x, "y": y})
            assert_bits_equal(y, expected(weight, x, None, np.float32))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K", "IQ4_XS", "Q2_K", "TQ2_0", "u4 g128"])
def test_many_rows_of_x_give_the_same_bits(qtype, isa):
    """Past 12 rows of x on AVX-512 (24 on AVX2) x's rows are multiplied 16 or 8 to a
    vector (the GEMM), and below that past 16 rows (in plain C always) W is decoded a tile
    of 8 rows at a time: 13 to 50 rows (whole groups and a part), K past the GEMM's chunk of 1024
    values with a tail, N not whole tiles, two threads, a bias, f32 out (bf16 out once: its
    rounding hides most f32 differences); every row equals the reference. Covers unsigned
    and signed codes, scaled sub-blocks, 8 and 16 integer min lanes and float mins."""
    rng = np.random.default_rng(17)
    block = 128 if qtype == "u4 g128" else 256
    k = 1024 + 2 * block
    weight = (family_of(rng, "u4", 21, k, 128) if qtype == "u4 g128"
              else weight_of(rng, qtype, 21, k))
    bias = rng.standard_normal(21).astype(ml_dtypes.bfloat16)
    for m in (13, 17, 40, 50):
        x = x_of(rng, m, k, ml_dtypes.bfloat16)
        x[m - 1, 5] = np.inf   # the last row of a part-filled group: NaN
        y_dtype = ml_dtypes.bfloat16 if m == 40 else np.float32
        desc = LinearDescriptor(weight.descriptor, m, 21, k, "bf16", np.dtype(y_dtype).name,
                                bias=True, compute="int8")
        plan = FormatPlan.select(desc, preference=PlanPreference(isa=isa, num_threads=2))
        y = np.empty((m, 21), y_dtype)
        plan.run({**weight.arrays, "x": x, "bias": bias, "y": y})
        assert_bits_equal(y, expected(weight, x, bias, y_dtype))


def test_threads_and_runs_give_the_same_bits():
    rng = np.random.default_rng(11)
    weight = weight_of(rng, "Q4_K", 300, 512)
    x = x_of(rng, 5, 512, np.float32)
    results = []
    for threads in (1, 2, 3, 2):
        desc = LinearDescriptor(weight.descriptor, 5, 300, 512, compute="int8")
        plan = FormatPlan.select(desc, preference=PlanPreference(num_threads=threads))
        y = np.empty((5, 300), np.float32)
        plan.run({**weight.arrays, "x": x, "y": y})
        results.append(y)
    for y in results[1:]:
        assert_bits_equal(y, results[0])
    assert_bits_equal(results[0], expected(weight, x, None, np.float32))


@settings(max_examples=30, deadline=None)
@given(m=st.integers(0, 20), n=st.integers(1, 30), blocks_=st.integers(1, 9),
       special=st.sampled_from([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, 1e-38, 3e38]),
       whole_block=st.booleans())
def test_shapes_and_special_values(m, n, blocks_, special, whole_block):
    """Any M (0 too), N and K; an Inf or NaN in x makes its row NaN (d_x NaN), a block of
    tiny values (d_x below the smallest normal) counts as zeros, huge ones stay finite."""
    rng = np.random.default_rng(m * 1000 + n * 10 + blocks_)
    weight = weight_of(rng, "Q8_0", n, 32 * blocks_)
    x = x_of(rng, m, 32 * blocks_, np.float32)
    if x.size:
        i, j = rng.integers(0, m), rng.integers(0, blocks_) * 32
        if whole_block:
            x[i, j:j + 32] = special
        else:
            x[i, j + rng.integers(0, 32)] = special
    got = linear(x, weight, compute="int8")
    assert_bits_equal(got, expected(weight, x, None, np.float32))
    if x.size and not np.isfinite(special):
        assert np.isnan(got[i]).all()


@settings(max_examples=25, deadline=None)
@given(m=st.integers(0, 20), n=st.integers(1, 20), blocks_=st.integers(1, 5),
       qtype=st.sampled_from(["Q4_K", "Q6_K", "IQ4_XS", "u4 g128"]),
       special=st.sampled_from([0.0, np.inf, -np.inf, np.nan, 1e-45, 1e-38, 3e38]),
       whole_block=st.booleans())
def test_block_order_shapes_and_special_values(m, n, blocks_, qtype, special, whole_block):
    """The block order on any M (0 too), N and K: an Inf or NaN in x makes its row NaN, a
    block of tiny values counts as zeros, huge ones stay finite, as in the quad order."""
    rng = np.random.default_rng(m * 1000 + n * 10 + blocks_)
    block = 128 if qtype == "u4 g128" else 256
    k = block * blocks_
    weight = (family_of(rng, "u4", n, k, 128) if qtype == "u4 g128"
              else weight_of(rng, qtype, n, k))
    assert linear_int8.weight_view(weight.descriptor).block == block
    x = x_of(rng, m, k, np.float32)
    if x.size:
        i, j = rng.integers(0, m), rng.integers(0, blocks_) * block
        if whole_block:
            x[i, j:j + block] = special
        else:
            x[i, j + rng.integers(0, block)] = special
    got = linear(x, weight, compute="int8")
    assert_bits_equal(got, expected(weight, x, None, np.float32))
    if x.size and not np.isfinite(special):
        assert np.isnan(got[i]).all()


def test_x_quantization_rules():
    """d = amax / 127, codes rint(x / d) with ties to even, clamped; tiny blocks are zero."""
    x = np.zeros((3, 32), np.float32)
    x[0, :4] = [127.0, 0.5, 1.5, -2.5]      # d = 1: ties to even, 0.5 -> 0, 1.5 -> 2, -2.5 -> -2
    x[1, 0] = 1e-38                          # d below the smallest normal f32: all zeros
    x[2, 0] = np.nan
    q, d = reference.quantize_x_int8(x)
    assert d[0, 0] == 1.0 and list(q[0, :4]) == [127, 0, 2, -2]
    assert d[1, 0] > 0 and not q[1].any()
    assert np.isnan(d[2, 0]) and not q[2].any()


def test_error_against_the_exact_product_within_the_bound():
    """|y - sum in f64 of x W| <= sum |W| * d_x / 2 (x's rounding: half a step of its block)
    + gamma(K / 256 + 6) * sum |x~ W| (the f32 sums), with x~ x as its codes give it back."""
    rng = np.random.default_rng(5)
    for qtype in ("Q8_0", "Q4_K", "Q6_K"):
        weight = weight_of(rng, qtype, 48, 2048)
        x = x_of(rng, 3, 2048, np.float32)
        y = linear(x, weight, compute="int8").astype(np.float64)
        w = weight.dequantize("f32").astype(np.float64)
        exact = x.astype(np.float64) @ w.T
        q, d = reference.quantize_x_int8(x, x_block(qtype))
        step = np.repeat(d.astype(np.float64), x_block(qtype), axis=1)
        x_back = q * step
        steps = 2048 // 256 + 6
        gamma = steps * 2.0**-24 / (1 - steps * 2.0**-24)
        bound = (step / 2) @ np.abs(w).T + gamma * (np.abs(x_back) @ np.abs(w).T) * 4
        err = np.abs(y - exact)
        assert (err <= bound).all()
        rel = err.max() / np.abs(exact).max()
        assert 1e-5 < rel < 1e-2   # x's rounding shows, and stays small


def test_reference_order_is_what_the_kernel_computes():
    """A reference with sixteen lanes (the f32 linear's) differs from the kernel somewhere:
    the lane count is part of the definition, and the tests above would catch a kernel
    that summed otherwise."""
    rng = np.random.default_rng(9)
    weight = weight_of(rng, "Q4_0", 32, 1024)
    x = x_of(rng, 4, 1024, np.float32)
    got = linear(x, weight, compute="int8")
    desc = LinearDescriptor(weight.descriptor, 4, 32, 1024, compute="int8")
    codes, scales, mins, sub = linear_int8.parts(desc, weight.arrays)
    sixteen = reference.linear_int8(x, codes, scales, mins, sub, None, np.float32, lanes=16)
    assert not np.array_equal(got, sixteen)
    assert_bits_equal(got, expected(weight, x, None, np.float32))


def test_gguf_quantized_weights():
    """Weights gguf-py's own quantizer wrote: the same bits as the reference."""
    rng = np.random.default_rng(2)
    w = rng.standard_normal((24, 512)).astype(np.float32)
    for qtype in ("Q4_0", "Q8_0"):
        data = gguf.quants.quantize(w, gguf.GGMLQuantizationType[qtype])
        weight = QuantizedWeight.ggml(data, qtype, (24, 512))
        x = x_of(rng, 2, 512, np.float32)
        assert_bits_equal(linear(x, weight, compute="int8"), expected(weight, x, None, np.float32))


def test_what_it_refuses_is_named():
    rng = np.random.default_rng(0)
    weight = weight_of(rng, "Q4_0", 4, 64)
    x = np.zeros((1, 64), np.float32)
    with pytest.raises(InvalidProblemError, match="compute='int4'"):
        linear(x, weight, compute="int4")
    with pytest.raises(UnsupportedError, match="transposed product.*compute='f32'"):
        FormatPlan.select(LinearDescriptor(weight.descriptor, 1, 4, 64, transpose=True,
                                           compute="int8"))
    fp8 = QuantizedWeight.fp8(np.zeros((4, 64), np.uint8), np.ones((1, 1), np.float32),
                              (128, 128), fp8="e4m3")
    with pytest.raises(UnsupportedError, match="compute='int8' does not read .*fp8.* weights"):
        linear(x, fp8, compute="int8")


def test_cuda_is_refused_by_name():
    from dqgen.lower import lower
    weight = weight_of(np.random.default_rng(0), "Q4_0", 4, 64)
    desc = LinearDescriptor(weight.descriptor, 1, 4, 64, compute="int8")
    with pytest.raises(UnsupportedError, match="CPU only"):
        lower(desc, "cuda", "sm_90")


def test_one_kernel_serves_every_shape_and_the_text_is_deterministic():
    from dqgen.lower import lower
    from dqgen.render import render
    weight = weight_of(np.random.default_rng(0), "Q6_K", 4, 256)
    texts = {render(lower(LinearDescriptor(weight.descriptor, m, n, k, compute="int8"),
                          "c", "avx2")).text for m, n, k in ((1, 4, 256), (9, 300, 4352))}
    assert len(texts) == 1
    text = texts.pop()
    assert "compute=int8" in text and "300" not in text and "4352" not in text


# ------------------------------------------------------------------ the per-group family

FAMILY = ("u4", "s4", "s8", "u8")


def family_of(rng, storage: str, n: int, k: int, g: int) -> QuantizedWeight:
    """The family's weight (test_linear's) with zero points across and past its integers'
    range."""
    w = family_weight(rng, storage, n, k, g)
    zp = rng.integers(-300, 300, (n, k // g)).astype(np.int32)
    return QuantizedWeight.per_group(w.arrays["q"], w.arrays["scale"], zp, g, storage)


@pytest.mark.parametrize("storage", FAMILY)
def test_family_codes_recombine_to_the_dequantized_values(storage):
    """(code - (zero_point - bias)) * scale, rounded once, is the family's dequantized value:
    the codes are the stored integers in the kernel's order (u4/s4 low nibble first)."""
    rng = np.random.default_rng(len(storage))
    weight = family_of(rng, storage, 6, 256, 32)
    desc = LinearDescriptor(weight.descriptor, 1, 6, 256, compute="int8")
    codes, scales, mins, sub = linear_int8.parts(desc, weight.arrays)
    zero = weight.arrays["zero_point"].astype(np.int64) - (128 if storage == "u8" else 0)
    diff = codes.astype(np.int64) - np.repeat(zero, sub, axis=1)
    w = (diff.astype(np.float32) * np.repeat(scales, sub, axis=1)).astype(np.float32)
    assert_bits_equal(w, weight.dequantize("f32"))
    assert_bits_equal(mins, -(scales * zero.astype(np.float32)))


def test_family_groups_of_64_to_256_take_the_block_order():
    """A group of 64 to 256 values is a block of the block order (x in blocks as long); the
    others keep the quad order (x in blocks of 32)."""
    rng = np.random.default_rng(0)
    for g, block in ((16, 0), (32, 0), (64, 64), (128, 128), (256, 256), (512, 0)):
        weight = family_of(rng, "u4", 2, 1024, g)
        assert linear_int8.weight_view(weight.descriptor).block == block


@pytest.mark.parametrize("g", [16, 32, 128, 256])
@pytest.mark.parametrize("storage", FAMILY)
def test_family_bit_exact(storage, g):
    rng = np.random.default_rng(g + len(storage))
    # past a decoded chunk; g <= 32: a last chunk of 96 values, whose packed bytes end in a
    # 16-byte step after the 32-byte ones
    weight = family_of(rng, storage, 21, 4096 + 3 * max(g, 32), g)
    bias = rng.standard_normal(21).astype(ml_dtypes.bfloat16)
    for m in (1, 3, 8):
        x = x_of(rng, m, weight.shape[1], ml_dtypes.bfloat16)
        b = bias if m == 3 else None
        assert_bits_equal(linear(x, weight, b, compute="int8"),
                          expected(weight, x, b, ml_dtypes.bfloat16))


@pytest.mark.parametrize("isa", ISAS)
def test_family_every_isa(isa):
    rng = np.random.default_rng(8)
    for storage in ("u4", "u8"):
        weight = family_of(rng, storage, 11, 640, 64)
        x = x_of(rng, 5, 640, np.float32)
        desc = LinearDescriptor(weight.descriptor, 5, 11, 640, compute="int8")
        plan = FormatPlan.select(desc, preference=PlanPreference(isa=isa))
        y = np.empty((5, 11), np.float32)
        plan.run({**weight.arrays, "x": x, "y": y})
        assert_bits_equal(y, expected(weight, x, None, np.float32))


def test_family_groups_and_k_it_refuses_are_named():
    rng = np.random.default_rng(0)
    with pytest.raises(UnsupportedError, match="per-group u4 .group size 24. weights.*power of two"):
        linear(np.zeros((1, 96), np.float32), family_of(rng, "u4", 2, 96, 24), compute="int8")
    with pytest.raises(InvalidProblemError, match="k=48 is not a multiple of 32"):
        linear(np.zeros((1, 48), np.float32), family_of(rng, "s8", 2, 48, 16), compute="int8")


# ------------------------------------------------------------------- float zero points

def floatzp_of(rng, storage: str, n: int, k: int, g: int, float_name: str, q_min=None,
               q_max=None) -> QuantizedWeight:
    from dqgen.ir import DequantizeFloatZeroDescriptor
    f = DTYPES[float_name]
    lo, hi = {"u4": (0, 16), "s4": (-8, 8), "u8": (0, 256)}[storage]
    values = rng.integers(lo, hi, (n, k))
    if storage in ("u4", "s4"):
        v = values & 15
        q = (v[:, 0::2] | (v[:, 1::2] << 4)).astype(np.uint8)
    else:
        q = values.astype(np.uint8)
    scale = (rng.random((n, k // g)) * 0.1).astype(f)
    zero = rng.standard_normal((n, k // g)).astype(f)
    desc = DequantizeFloatZeroDescriptor(0, 0, g, float_name, storage, q_min, q_max)
    return QuantizedWeight(desc, {"q": q, "scale": scale, "zero_point": zero}, (n, k))


@pytest.mark.parametrize("storage", ["u4", "s4", "u8"])
def test_float_zero_points_codes_are_q_minus_mid(storage):
    """codes + mid are the stored integers, the scales and mins the stored scale and zero
    point widened: the parts of F(F(F(q - mid) * s) + z)."""
    from dqgen.layouts.family import stored_values
    rng = np.random.default_rng(3)
    weight = floatzp_of(rng, storage, 5, 256, 64, "bf16")
    desc = LinearDescriptor(weight.descriptor, 1, 5, 256, "bf16", compute="int8")
    codes, scales, mins, sub = linear_int8.parts(desc, weight.arrays)
    mid = weight.descriptor.mid
    assert np.array_equal(codes.astype(np.int64) + int(mid),
                          stored_values(weight.descriptor, weight.arrays["q"]))
    assert_bits_equal(scales, weight.arrays["scale"].astype(np.float32))
    assert_bits_equal(mins, weight.arrays["zero_point"].astype(np.float32))


@pytest.mark.parametrize("isa", ISAS)
def test_float_zero_points_bit_exact(isa):
    rng = np.random.default_rng(6)
    for storage, float_name, g in (("u4", "bf16", 128), ("s4", "f16", 32), ("u8", "bf16", 16)):
        weight = floatzp_of(rng, storage, 13, 2048 + 512, g, float_name)
        for m in (1, 6):
            x = x_of(rng, m, weight.shape[1], DTYPES[float_name])
            desc = LinearDescriptor(weight.descriptor, m, 13, weight.shape[1], float_name,
                                    compute="int8")
            plan = FormatPlan.select(desc, preference=PlanPreference(isa=isa))
            y = np.empty((m, 13), DTYPES[float_name])
            plan.run({**weight.arrays, "x": x, "y": y})
            assert_bits_equal(y, expected(weight, x, None, DTYPES[float_name]))


def test_float_zero_points_with_a_fractional_mid_are_refused():
    rng = np.random.default_rng(0)
    weight = floatzp_of(rng, "u4", 2, 64, 32, "bf16", q_min=0, q_max=14)   # mid 7.5
    with pytest.raises(UnsupportedError, match="compute='int8' does not read"):
        linear(np.zeros((1, 64), ml_dtypes.bfloat16), weight, compute="int8")


# ----------------------------------------------------------------------------- PyTorch

# --- MXFP4 rows (gpt-oss's experts, compressed-tensors) ------------------------------

def mxfp4_of(rng, fmt: str, n: int, k: int, special: bool = False) -> QuantizedWeight:
    """Random e2m1 codes with scales near 1 (``special``: every scale code, 0 and 255
    too, in one row)."""
    from dqgen.formats import weight_readers as readers
    w = rng.integers(0, 256, (n, k // 2), dtype=np.uint8)
    s = rng.integers(118, 136, (n, k // 32)).astype(np.uint8)
    if special:
        s[0] = np.arange(k // 32) * 255 // max(k // 32 - 1, 1)
    if fmt == "gpt-oss":
        return readers.gptoss_mxfp4_weight(w.reshape(n, k // 32, 16), s)
    return readers.ct_mxfp4_weight(w, s)


@pytest.mark.parametrize("fmt", ["gpt-oss", "compressed-tensors"])
def test_mxfp4_codes_recombine_to_the_dequantized_values(fmt):
    """C(q) = 2 * e2m1 and d_w = 2^(s - 128) (compressed-tensors' code 255: +inf) give the
    FP4 kernel's f32 values bit for bit, every code and every scale code."""
    rng = np.random.default_rng(30)
    weight = mxfp4_of(rng, fmt, 8, 256 * 32, special=True)
    codes, scales, mins = linear_int8.weight_view(weight.descriptor).parts(
        weight.arrays, *weight.shape)
    assert mins is None and set(np.unique(codes)) <= {0, 1, 2, 3, 4, 6, 8, 12, -1, -2, -3,
                                                      -4, -6, -8, -12}
    with np.errstate(all="ignore"):
        recombined = np.repeat(scales, 32, axis=1) * codes.astype(np.float32)
    want = weight.dequantize("f32")
    assert_bits_equal(np.where(want == 0, 0, recombined).astype(np.float32),
                      np.where(want == 0, 0, want).astype(np.float32))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", ["gpt-oss", "compressed-tensors"])
def test_mxfp4_bit_exact(fmt, isa):
    """Every ISA and M, K whole blocks of 32 but not of the decode's 32-byte steps or of
    the lanes' 256, a bias; a row of every scale code (0: subnormal, 255) too; K past a
    decoded chunk."""
    rng = np.random.default_rng(31)
    for k, special in ((288, False), (1024 + 96, True), (2048 + 512, True)):
        weight = mxfp4_of(rng, fmt, 13, k, special)
        bias = rng.standard_normal(13).astype(np.float32)
        for m in (1, 2, 3, 17):
            x = x_of(rng, m, k, np.float32)
            desc = LinearDescriptor(weight.descriptor, m, 13, k, bias=True, compute="int8")
            plan = FormatPlan.select(desc, preference=PlanPreference(isa=isa))
            y = np.empty((m, 13), np.float32)
            plan.run({**weight.arrays, "x": x, "bias": bias, "y": y})
            assert_bits_equal(y, expected(weight, x, bias, np.float32))


def test_mxfp4_rows_aot_and_verify(tmp_path):
    """dqgen aot --op linear --weight mxfp4|nvfp4 --compute int8 bundles MXFP4's forward
    kernels (gpt-oss's rows and compressed-tensors') and skips NVFP4's; verify checks them
    against the reference."""
    from dqgen import aot, bundle, cli, verify
    uris = [r.uri for r in aot.expand({"op": "linear", "weight": "mxfp4,nvfp4",
                                       "float": "bf16", "compute": "int8"})]
    assert sorted(uris) == ["linear_dequant_mxfp4_ct_f32_xbf16_ybf16_bias_i8",
                            "linear_dequant_mxfp4_ct_f32_xbf16_ybf16_i8",
                            "linear_dequant_mxfp4_gptossrows_f32_xbf16_ybf16_bias_i8",
                            "linear_dequant_mxfp4_gptossrows_f32_xbf16_ybf16_i8"]
    out = tmp_path / "bundle"
    assert cli.main(["aot", "--op", "linear", "--weight", "mxfp4", "--float", "f32",
                     "--compute", "int8", "-o", str(out), "-q"]) == 0
    outcomes = verify.verify_bundle(bundle.Bundle.open(out))
    assert len(outcomes) == 4 and all(o.status == verify.OK for o in outcomes), \
        [str(o) for o in outcomes]


def test_nvfp4_is_refused_by_name():
    """NVFP4's half scale is not exact where the scale is subnormal: f32 only."""
    from dqgen.formats import weight_readers as readers
    weight = readers.nvfp4_weight(np.zeros((2, 16), np.uint8), np.zeros((2, 2), np.uint8),
                                  np.float32(1.0))
    with pytest.raises(UnsupportedError, match="compute='int8' does not read modelopt nvfp4 "
                                               "weights; .*MXFP4 rows"):
        linear(np.zeros((1, 32), np.float32), weight, compute="int8")


def test_quant_linear_forward_gradient_compile_and_opcheck():
    """QuantLinear(compute="int8") gives the reference's bits; x's gradient is dy @ W in
    f32 (SPEC.md §8's transposed product: the int8 rounding of x is not differentiated);
    compile(fullgraph) and opcheck are clean."""
    torch = pytest.importorskip("torch")
    import dqgen.torch as dqt
    rng = np.random.default_rng(4)
    weight = weight_of(rng, "Q4_K", 24, 512)
    layer = dqt.QuantLinear(weight, compute="int8")
    assert "compute=int8" in repr(layer)
    x = torch.from_numpy(x_of(rng, 3, 512, np.float32)).requires_grad_(True)
    y = layer(x)
    assert_bits_equal(y.detach().numpy(), expected(weight, x.detach().numpy(), None, np.float32))
    dy = torch.randn(3, 24)
    y.backward(dy)
    w = weight.dequantize("f32")
    assert_bits_equal(x.grad.numpy(), reference.linear(dy.numpy(), w.T, None, np.float32))
    compiled = torch.compile(layer, fullgraph=True)
    assert torch.equal(compiled(x.detach()), y.detach())
    from torch.library import opcheck
    opcheck(torch.ops.dqgen.linear.default, (x.detach(), layer.weight_tensors, layer.format,
                                             24, 512, None, None, None, "int8"))
    with pytest.raises(UnsupportedError, match="IQ2_XXS"):
        dqt.QuantLinear(weight_of(rng, "IQ2_XXS", 4, 256), compute="int8")
    with pytest.raises(InvalidProblemError, match="compute='int4'"):
        dqt.QuantLinear(weight, compute="int4")


def test_quantize_model_computes_in_int8(tmp_path):
    """A tiny transformers Llama from a GGUF file: with compute="int8" every layer whose
    type the int8 linear reads computes so, and the logits stay within x's rounding of the
    f32 model's."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import dqgen.torch as dqt
    from test_torch_linear import _model, _write_gguf
    path = tmp_path / "tiny.gguf"
    _write_gguf(_model(), path, ("Q8_0", "Q4_0", "Q4_K", "Q6_K"))
    exact = dqt.quantize_model(_model(), path)
    int8 = dqt.quantize_model(_model(), path, compute="int8")
    layers = [m for m in int8.modules() if isinstance(m, dqt.QuantLinear)]
    assert layers and all(m.compute == "int8" for m in layers)
    ids = torch.tensor([[1, 5, 9, 13, 2, 7]])
    with torch.no_grad():
        got, want = int8(ids).logits, exact(ids).logits
    err = (got - want).abs().max() / want.abs().max()
    assert 0 < err < 0.05


def test_aot_emit_verify_and_a_bundle_serve_it(tmp_path, capsys, monkeypatch):
    """dqgen aot --compute int8 (or both) adds the forward kernels of the types it reads and
    skips the others; emit prints one; verify checks the bundle against the reference; with
    JIT disabled the bundled kernel runs."""
    import json

    from dqgen import aot, bundle, cli, jit, verify
    requests = aot.expand({"op": "linear", "weight": "ggml", "ggml_type": "Q4_K,IQ2_XXS",
                           "float": "f16", "compute": "both"})
    int8 = [r.uri for r in requests if r.uri.endswith("_i8")]
    assert int8 == ["linear_dequant_ggml_q4_k_f32_xf16_yf16_bias_i8",
                    "linear_dequant_ggml_q4_k_f32_xf16_yf16_i8"]
    assert len(requests) == 8   # f32: three kernels a type; int8: two, Q4_K only
    with pytest.raises(InvalidProblemError, match="compute='int4'"):
        aot.expand({"op": "linear", "compute": "int4"})
    assert cli.main(["emit", "linear", "--weight", "ggml", "--ggml-type", "Q8_0", "--float",
                     "f32", "--compute", "int8", "--filter", "*yf32_i8"]) == 0
    assert "compute=int8" in capsys.readouterr().out
    out = tmp_path / "bundle"
    assert cli.main(["aot", "--op", "linear", "--weight", "ggml", "--ggml-type", "Q5_K",
                     "--float", "bf16", "--compute", "int8", "-o", str(out), "-q"]) == 0
    assert len(json.loads((out / "manifest.json").read_text())["kernels"]) == 2
    outcomes = verify.verify_bundle(bundle.Bundle.open(out))
    assert outcomes and all(o.status == verify.OK for o in outcomes), [str(o) for o in outcomes]
    monkeypatch.setenv("DQGEN_DISABLE_JIT", "1")
    monkeypatch.setenv("DQGEN_CACHE_DIR", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(jit, "_memo", {})
    bundle.load_bundle(out)
    try:
        rng = np.random.default_rng(1)
        weight = weight_of(rng, "Q5_K", 5, 256)
        x = x_of(rng, 2, 256, ml_dtypes.bfloat16)
        plan = FormatPlan.select(LinearDescriptor(weight.descriptor, 2, 5, 256, "bf16",
                                                  compute="int8"))
        assert plan.kernel.origin == "bundle"
        y = np.empty((2, 5), ml_dtypes.bfloat16)
        plan.run({**weight.arrays, "x": x, "y": y})
        assert_bits_equal(y, expected(weight, x, None, ml_dtypes.bfloat16))
    finally:
        bundle.unload_all()
