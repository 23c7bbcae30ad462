"""Every GGML block type bit for bit against gguf-py (``gguf.quants.dequantize``), on the
CPU and in the CUDA kernel's host emulation.

The f16 ``d`` (and ``dmin``/``m``) fields of the blocks run through every bit pattern
(NaN, Inf, subnormals, both zeros; 256-value types a strided sample plus every special),
the other bytes are random, so every value of the packed sub-block scales occurs.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from dqgen import InvalidProblemError, UnsupportedError
from dqgen.formats import ggml
from dqgen.layouts.ggml_blocks import IQ4_CODEBOOK, LAYOUTS, MXFP4_CODEBOOK
from dqgen.layouts.ggml_knobs import SCALE_TABLES
from dqgen.ir import GgmlDequantizeDescriptor, ggml_type_name
from formats_util import FLOATS, assert_bits_equal
from oracles.llama_cpp import NEWER_THAN_GGUF_PY, llama_cpp_rows

gguf = pytest.importorskip("gguf", reason="the gguf package (test-only) is the GGML oracle")
from gguf.quants import dequantize as gguf_dequantize  # noqa: E402

TYPES = ggml.TYPES
FLOAT_TYPES = ("F32", "F16", "BF16")
OUTS = ("f32", "f16", "bf16")
# NaN scales make NaN results: numpy warns converting them, which is expected here.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered")


def _f16_fields(layout) -> list[int]:
    """Byte offsets of a block's stored f16 scalars (d, and dmin or m)."""
    return [s.offset for s in (layout.d, layout.m)
            if s is not None and s.kind == "f16" and s.field is None]


def _scatter_d(data: np.ndarray, layout, bits: np.ndarray) -> None:
    """Write f16 ``bits`` into a d gathered from nibbles (IQ1_M): nibble k of d is the
    high nibble of the byte its plane k reads."""
    for k, plane in enumerate(layout.d.field.planes):
        nibble = ((bits >> (4 * k)) & 15).astype(np.uint8)
        data[:, plane.offset] = (data[:, plane.offset] & 0x0F) | (nibble << 4)


def all_f16_patterns(step: int) -> np.ndarray:
    """Every ``step``-th f16 bit pattern plus every special one: both zeros, both
    infinities, NaNs, the smallest and largest subnormals and normals."""
    specials = [0x0000, 0x8000, 0x7C00, 0xFC00, 0x7E00, 0xFE00, 0x7C01, 0xFFFF, 0x0001,
                0x8001, 0x03FF, 0x83FF, 0x0400, 0x8400, 0x7BFF, 0xFBFF, 0x3C00, 0xBC00]
    return np.unique(np.r_[np.arange(0, 1 << 16, step), specials]).astype(np.uint16)


def random_blocks(rng, qtype: str, blocks: int | None = None, step: int | None = None):
    """``[blocks, block_bytes]`` random bytes; with ``step`` (and no ``blocks``) one block
    per f16 pattern of ``all_f16_patterns(step)`` in every f16 field (rolled against each
    other, so d and dmin meet different patterns)."""
    layout = LAYOUTS[ggml.parse_ggml_type(qtype)]
    patterns = all_f16_patterns(step) if step else None
    n = blocks if blocks is not None else len(patterns)
    data = rng.integers(0, 256, size=(n, layout.block_bytes), dtype=np.uint8)
    if qtype in FLOAT_TYPES:
        return data
    for i, at in enumerate(_f16_fields(layout)):
        bits = np.roll(patterns, 977 * i) if patterns is not None else \
            rng.integers(0, 1 << 16, size=n).astype(np.uint16)
        data[:, at:at + 2] = bits[:n].view(np.uint8).reshape(n, 2)
    if layout.d.field is not None:
        bits = patterns if patterns is not None else rng.integers(0, 1 << 16, size=n)
        _scatter_d(data, layout, np.asarray(bits[:n], np.uint32))
    return data


def oracle(data: np.ndarray, qtype: str, out: str) -> np.ndarray:
    """gguf-py's f32 values rounded once to ``out``; Q8_K (which gguf-py does not
    dequantize) as ggml's dequantize_row_q8_K: its f32 d times each int8; Q1_0 and Q2_0
    as llama.cpp's own rows (``llama_cpp_rows``)."""
    with np.errstate(all="ignore"):
        if qtype in NEWER_THAN_GGUF_PY:
            y = llama_cpp_rows(data, qtype)
        elif qtype == "Q8_K":
            rows = data.reshape(-1, 292)
            d = rows[:, :4].copy().view(np.float32)
            y = (d * rows[:, 4:260].view(np.int8).astype(np.float32)).reshape(
                *data.shape[:-1], -1)
        else:
            y = gguf_dequantize(data, gguf.GGMLQuantizationType[qtype])
        return y.astype(FLOATS[out])


def _step(qtype: str) -> int:
    """All 65536 patterns for 32-value blocks, every 7th (plus specials) for 256."""
    return 1 if ggml.block_values(qtype) <= 32 else 7


def test_table_matches_gguf():
    """Block sizes and codebooks are gguf-py's own."""
    for name in TYPES:
        values, size = NEWER_THAN_GGUF_PY.get(name) or \
            gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]]
        assert (ggml.block_values(name), ggml.block_bytes(name)) == (values, size), name
    assert IQ4_CODEBOOK == tuple(gguf.quants.IQ4_NL.kvalues)
    assert MXFP4_CODEBOOK == tuple(gguf.quants.MXFP4.kvalues) == tuple(gguf.quants.NVFP4.kvalues)
    theirs = gguf.quants.NVFP4.ue4m3_to_fp32(np.arange(256, dtype=np.uint8)).astype(np.float32)
    assert_bits_equal(np.array(SCALE_TABLES["ue4m3_half"], np.float32), theirs)


@pytest.mark.parametrize("qtype", [t for t in TYPES if t not in FLOAT_TYPES])
def test_every_scale_pattern(qtype):
    """One block per d (and dmin) bit pattern, random values and sub-block scales, into
    every output dtype."""
    rng = np.random.default_rng(TYPES.index(qtype))
    data = random_blocks(rng, qtype, step=_step(qtype))
    want = oracle(data, qtype, "f32")
    for out in OUTS:
        with np.errstate(all="ignore"):
            rounded = want.astype(FLOATS[out])
        assert_bits_equal(ggml.dequantize(data, qtype, dtype=out), rounded)


def test_k_scales_cover_every_value():
    """The random bytes above give every 6-bit scale and min of every Q4_K/Q5_K
    sub-block (read by gguf-py's own unpacking), so all of them were compared."""
    rng = np.random.default_rng(TYPES.index("Q4_K"))
    data = random_blocks(rng, "Q4_K", step=_step("Q4_K"))
    sc, mn = gguf.quants.Q4_K.get_scale_min(data[:, 4:16])
    for values in (sc, mn):
        assert all(len(np.unique(values[:, k])) == 64 for k in range(8))


@pytest.mark.parametrize("qtype", FLOAT_TYPES)
def test_float_tensors(qtype):
    """F32/F16/BF16 pass through: every bit pattern of a 16-bit type, random f32 words
    with their specials, rounded once to each output."""
    rng = np.random.default_rng(30)
    if qtype == "F32":
        words = rng.integers(0, 1 << 32, size=70001, dtype=np.uint64).astype(np.uint32)
        words[:6] = [0, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00001, 1]
        data = words.view(np.uint8)
    else:
        data = np.arange(1 << 16, dtype=np.uint16).view(np.uint8)
    for out in OUTS:
        assert_bits_equal(ggml.dequantize(data, qtype, dtype=out), oracle(data, qtype, out))


@pytest.mark.parametrize("qtype", TYPES)
def test_rows_of_one_block_and_of_many(qtype):
    """A single block, one row of one block, rows of several blocks, a 1-D byte array,
    and multithreaded sizes written into a caller's (misaligned) buffer."""
    rng = np.random.default_rng(40 + TYPES.index(qtype))
    bb, bv = ggml.block_bytes(qtype), ggml.block_values(qtype)
    one = random_blocks(rng, qtype, blocks=1)
    assert_bits_equal(ggml.dequantize(one.reshape(-1), qtype, dtype="f32"),
                      oracle(one.reshape(-1), qtype, "f32"))
    assert_bits_equal(ggml.dequantize(one, qtype, dtype="f32"), oracle(one, qtype, "f32"))
    rows = random_blocks(rng, qtype, blocks=15).reshape(3, 5 * bb)
    got = ggml.dequantize(rows, qtype, dtype="bf16")
    assert got.shape == (3, 5 * bv)
    assert_bits_equal(got, oracle(rows, qtype, "bf16"))
    many = random_blocks(rng, qtype, blocks=(1 << 18) // bv).reshape(8, -1)
    want = oracle(many, qtype, "f16")
    buf = np.empty(want.size + 8, np.float16)
    start = next(i for i in range(8) if buf[i:].__array_interface__["data"][0] % 16 == 6)
    misaligned = buf[start:start + want.size].reshape(want.shape)
    # a gguf type object names the type too, where gguf-py has one
    by = gguf.GGMLQuantizationType[qtype] if hasattr(gguf.GGMLQuantizationType, qtype) else qtype
    assert ggml.dequantize(many, by, dtype="f16", out=misaligned) is misaligned
    assert_bits_equal(misaligned, want)


@pytest.mark.parametrize("isa", ["generic", "avx2"])
def test_every_isa(isa):
    """The explicit vectors (and their codebook permute, lane-indexed bit strings and
    scalar tails) on the narrower ISAs, where a vector is several registers."""
    from dqgen.formats.plan import FormatPlan
    from dqgen.isa import supported_isas
    from dqgen.plans import PlanPreference
    if isa not in supported_isas():
        pytest.skip(f"this CPU cannot run {isa} code")
    rng = np.random.default_rng(70)
    for qtype, out in (("Q5_0", "f16"), ("IQ4_XS", "bf16"), ("TQ1_0", "f32"), ("Q6_K", "f16"),
                       ("IQ3_XXS", "f32")):
        data = random_blocks(rng, qtype, blocks=9)
        desc = GgmlDequantizeDescriptor(9, qtype, out)
        y = np.empty((9, ggml.block_values(qtype)), FLOATS[out])
        FormatPlan.select(desc, preference=PlanPreference(isa=isa)).run({"data": data, "y": y})
        assert_bits_equal(y, oracle(data, qtype, out).reshape(y.shape))


def test_read_only_bytes_without_a_copy(tmp_path):
    """Block bytes from a read-only memoryview and from an np.memmap of a file."""
    rng = np.random.default_rng(50)
    data = random_blocks(rng, "Q6_K", blocks=12)
    want = oracle(data, "Q6_K", "f32").reshape(-1)
    assert_bits_equal(ggml.dequantize(memoryview(data.tobytes()), "Q6_K", dtype="f32"), want)
    odd = memoryview(b"\0" + data.tobytes())[1:]  # blocks at an odd address
    assert_bits_equal(ggml.dequantize(odd, "Q6_K", dtype="f32"), want)
    for qtype in ("F16", "IQ2_XS"):  # 2-byte loads, a 16-bit word plane
        blocks = random_blocks(rng, qtype, blocks=64 // ggml.block_values(qtype) + 3)
        odd = memoryview(b"\0" + blocks.tobytes())[1:]
        assert_bits_equal(ggml.dequantize(odd, qtype, dtype="f32"),
                          oracle(blocks, qtype, "f32").reshape(-1))
    path = tmp_path / "blocks.bin"
    data.tofile(path)
    mapped = np.memmap(path, np.uint8, mode="r", shape=data.shape)
    assert np.shares_memory(ggml._bytes(mapped), mapped)
    assert_bits_equal(ggml.dequantize(mapped, "Q6_K", dtype="f32"), want.reshape(12, 256))


def test_types_named_in_errors():
    with pytest.raises(UnsupportedError, match=r"qtype='Q8_1' is not supported; expected "
                                               r"one of: Q4_0, .*Q4_K.*"):
        ggml.dequantize(np.zeros(36, np.uint8), gguf.GGMLQuantizationType.Q8_1)
    with pytest.raises(UnsupportedError, match="qtype='Q9_X'"):
        ggml.dequantize(np.zeros(66, np.uint8), "Q9_X")
    with pytest.raises(InvalidProblemError,
                       match="data rows have 145 bytes, not a multiple of the 144-byte Q4_K"):
        ggml.dequantize(np.zeros((2, 145), np.uint8), "Q4_K")
    assert ggml.dequantize(np.zeros((0, 210), np.uint8), "Q6_K").shape == (0, 256)


# --- CUDA: NVRTC compiles every type; the host emulation equals gguf-py ----------------

def _cuda_cases():
    return [(t, OUTS[i % 3]) for i, t in enumerate(TYPES)]


def test_nvrtc_compiles_every_type():
    from dqgen.lower import lower
    from dqgen.render import render
    nvrtc = pytest.importorskip("dqgen.build.nvrtc")
    if not nvrtc.nvrtc_available():
        pytest.skip("NVRTC is not installed (pip install dqgen[cuda])")
    for qtype, out in _cuda_cases():
        desc = GgmlDequantizeDescriptor(3, qtype, out)
        source = render(lower(desc, "cuda", "sm_90"))
        art = nvrtc.compile_cuda(source.text, name=desc.uri, arch="sm_90")
        assert source.entry.encode() in art.ptx and b"fma.rn" not in art.ptx, qtype


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ runs the emulation")
@pytest.mark.parametrize("qtype,out", _cuda_cases())
def test_emulated_cuda(qtype, out, tmp_path):
    from test_formats_cuda import run_emulated
    rng = np.random.default_rng(60 + TYPES.index(qtype))
    n = 7 if ggml.block_values(qtype) > 1 else 1500
    data = random_blocks(rng, qtype, blocks=n)
    if qtype not in FLOAT_TYPES:
        data[:4] = random_blocks(rng, qtype, step=1 << 14)[[0, 2, 4, 6]]  # +-0, +-Inf
    desc = GgmlDequantizeDescriptor(n, qtype, out)
    y = np.zeros((n, ggml.block_values(qtype)), FLOATS[out])
    run_emulated(desc, [data, y], [n], y.size, tmp_path)
    assert_bits_equal(y, oracle(data, qtype, out).reshape(y.shape))


def test_llama_cpp_itself():
    """Q1_0 and Q2_0 against llama.cpp's own to_float (ggml_get_type_traits) in a
    libggml-base built from the llama-cpp-python sdist's vendor/llama.cpp (cmake, a few
    minutes): set GGML_BASE_LIB to its path. Every f16 d pattern meets random bits."""
    import ctypes
    import os
    path = os.environ.get("GGML_BASE_LIB")
    if not path:
        pytest.skip("GGML_BASE_LIB (a built libggml-base) is not set")
    lib = ctypes.CDLL(path)

    class Traits(ctypes.Structure):
        _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                    ("blck_size_interleave", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                    ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p)]
    lib.ggml_get_type_traits.restype = ctypes.POINTER(Traits)
    to_float = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_float),
                                ctypes.c_int64)
    rng = np.random.default_rng(41)
    for type_id, qtype in ((41, "Q1_0"), (42, "Q2_0")):
        traits = lib.ggml_get_type_traits(type_id).contents
        assert traits.type_name.decode().upper() == qtype
        data = random_blocks(rng, qtype, step=1)
        want = np.empty(data.shape[0] * traits.blck_size, np.float32)
        to_float(traits.to_float)(data.ctypes.data,
                                  want.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), want.size)
        assert_bits_equal(ggml.dequantize(data, qtype, "f32").reshape(-1), want)
        assert_bits_equal(llama_cpp_rows(data, qtype).reshape(-1), want)
