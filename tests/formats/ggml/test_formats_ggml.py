"""GGML blocks (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) bit for bit against the gguf package
(every other type: test_formats_gguf_types.py)."""

from __future__ import annotations

import numpy as np
import pytest

from dqgen import InvalidProblemError, UnsupportedError
from dqgen.formats import ggml
from formats_util import FLOATS, assert_bits_equal, random_f16

gguf = pytest.importorskip("gguf", reason="the gguf package (test-only) is the GGML oracle")
from gguf.quants import dequantize as gguf_dequantize  # noqa: E402

QTYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]


def random_blocks(rng, qtype: str, shape: tuple[int, ...], extreme: bool = True) -> np.ndarray:
    """Random block bytes whose f16 d (and Q4_1's m) are NaN-free, extremes included."""
    bb = ggml.block_bytes(qtype)
    data = rng.integers(0, 256, size=(*shape[:-1], shape[-1] * bb), dtype=np.uint8)
    blocks = data.reshape(-1, bb)
    blocks[:, 0:2] = random_f16(rng, (blocks.shape[0],), extreme).view(np.uint8).reshape(-1, 2)
    if qtype in ("Q4_1", "Q5_1"):
        blocks[:, 2:4] = random_f16(rng, (blocks.shape[0],), extreme).view(np.uint8).reshape(-1, 2)
    return data


def oracle(data, qtype, out):
    with np.errstate(all="ignore"):
        return gguf_dequantize(data, gguf.GGMLQuantizationType[qtype]).astype(FLOATS[out])


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("out", ["f32", "f16", "bf16"])
def test_matches_gguf(qtype, out):
    rng = np.random.default_rng(QTYPES.index(qtype))
    data = random_blocks(rng, qtype, (7, 5))
    assert_bits_equal(ggml.dequantize(data, qtype, dtype=out), oracle(data, qtype, out))


@pytest.mark.parametrize("qtype", QTYPES)
def test_large_and_shapes(qtype):
    """Multithreaded sizes, and gguf's shape convention for 1-D and 3-D byte arrays."""
    rng = np.random.default_rng(20)
    data = random_blocks(rng, qtype, (2, 3, 400), extreme=False)
    got = ggml.dequantize(data, gguf.GGMLQuantizationType[qtype], dtype="f32")
    assert got.shape == (2, 3, 400 * 32)
    assert_bits_equal(got, oracle(data, qtype, "f32"))
    flat = data.reshape(-1)
    assert_bits_equal(ggml.dequantize(flat, qtype, dtype="f32"), oracle(flat, qtype, "f32"))


@pytest.mark.parametrize("qtype,out", [("Q4_0", "f32"), ("Q8_0", "f16"), ("Q4_1", "f32")])
def test_large_outputs_aligned_or_not(qtype, out):
    """16 MiB outputs (the size where a kernel may switch store kinds), into a new array
    and into a caller's buffer that is not 16-byte aligned: both equal gguf."""
    rng = np.random.default_rng(22)
    values = (16 << 20) // FLOATS[out].itemsize
    data = random_blocks(rng, qtype, (values // 32 // 64, 64), extreme=False)
    want = oracle(data, qtype, out)
    assert_bits_equal(ggml.dequantize(data, qtype, dtype=out), want)
    buf = np.empty(want.size + 8, FLOATS[out])
    start = next(i for i in range(8) if (buf[i:].__array_interface__["data"][0] % 16) == 4)
    misaligned = buf[start:start + want.size].reshape(want.shape)
    ggml.dequantize(data, qtype, dtype=out, out=misaligned)
    assert_bits_equal(misaligned, want)


def test_quantized_by_gguf_round_trip():
    """Blocks written by gguf's own quantizer read back as gguf reads them."""
    rng = np.random.default_rng(21)
    w = rng.standard_normal((16, 256)).astype(np.float32)
    for qtype in QTYPES:
        data = gguf.quants.quantize(w, gguf.GGMLQuantizationType[qtype])
        got = ggml.dequantize(data, qtype, dtype="f32")
        assert_bits_equal(got, oracle(data, qtype, "f32"))
        assert np.abs(got - w).max() < 0.5


def test_bad_inputs():
    data = np.zeros((2, 18 * 3), np.uint8)
    with pytest.raises(InvalidProblemError, match="not a multiple of the 20-byte Q4_1 block"):
        ggml.dequantize(data, "Q4_1")
    with pytest.raises(UnsupportedError, match="qtype='Q8_1' is not supported"):
        ggml.dequantize(data, "Q8_1")
    with pytest.raises(InvalidProblemError, match="expected uint8 block bytes"):
        ggml.dequantize(data.astype(np.float32), "Q4_0")
    with pytest.raises(UnsupportedError, match="dtype='f64'"):
        ggml.dequantize(data, "Q4_0", dtype="f64")
    assert ggml.dequantize(np.zeros((0, 18), np.uint8), "Q4_0").shape == (0, 32)
