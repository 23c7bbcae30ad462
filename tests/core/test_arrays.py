"""What an array is, one rule for every entry point (dqgen/arrays.py): buffers (bytes,
memoryview, array.array) are arrays of their format and shape; inputs that are strided
or unaligned are copied by the plain and format functions and refused by plans; ml_dtypes
int4/uint4 arrays are unpacked 4-bit values, packed where a function takes s4/u4 ``q``
and refused where packed storage is expected; anything else is refused by name. And
``ggml.dequantize`` returns f16 unless asked, as ``GGUFFile.dequantize`` and ``convert``."""

from __future__ import annotations

import array

import ml_dtypes
import numpy as np
import pytest

import dqgen
from dqgen import InvalidProblemError, UnsupportedError, plans, reference
from dqgen.formats import awq, floatzp, ggml, gptq, hqq, packed
from dqgen.ir import DequantizePerGroupDescriptor, DType
from formats_util import assert_bits_equal, random_f16, random_words
from oracles import checkpoints as oracle

G = 32


def _problem(seed=0, outer=2, axis=64):
    rng = np.random.default_rng(seed)
    q = rng.integers(-128, 128, (outer, axis), dtype=np.int8)
    scale = rng.uniform(0.5, 2, (outer, axis // G)).astype(np.float32)
    zp = rng.integers(-5, 6, (outer, axis // G)).astype(np.int32)
    return q, scale, zp


def _q8_0_blocks(rng, shape) -> np.ndarray:
    """GGML Q8_0 blocks (an f16 scale, 32 int8 values) as uint8 ``[*shape[:-1], 34 *
    shape[-1]]``."""
    n = int(np.prod(shape))
    blocks = np.zeros((n, 34), np.uint8)
    blocks[:, :2] = rng.uniform(0.01, 1, (n, 1)).astype(np.float16).view(np.uint8)
    blocks[:, 2:] = rng.integers(0, 256, (n, 32), dtype=np.uint8)
    return blocks.reshape(*shape[:-1], shape[-1] * 34)


def _unaligned(arr: np.ndarray) -> np.ndarray:
    """A copy of ``arr`` at an address one byte off its elements' alignment."""
    raw = np.zeros(arr.nbytes + 1, np.uint8)[1:]
    out = raw.view(arr.dtype).reshape(arr.shape)
    out[...] = arr
    assert not out.flags.aligned
    return out


# ------------------------------------------------------------------ buffers are arrays


def test_the_family_functions_take_buffers():
    q, scale, zp = _problem()
    want = reference.dequantize_per_group(q, scale, zp, G)
    got = dqgen.dequantize_per_group(memoryview(q), memoryview(scale), memoryview(zp), G)
    assert isinstance(got, np.ndarray) and got.shape == (2, 64)
    assert_bits_equal(got, want)
    bytes_want = reference.dequantize_per_group(q[:1].view(np.uint8), scale[:1], zp[:1], G)[0]
    for raw in (q[0].tobytes(), bytearray(q[0].tobytes())):  # bytes are uint8 [n]
        flat = dqgen.dequantize_per_group(raw, array.array("f", scale[0]), memoryview(zp[0]), G)
        assert flat.shape == (64,)
        assert_bits_equal(flat, bytes_want)
    x = want.copy()
    assert np.array_equal(dqgen.quantize_per_group(memoryview(x), memoryview(scale), zp, G),
                          dqgen.quantize_per_group(x, scale, zp, G))
    assert_bits_equal(dqgen.dequantize_per_group_backward(memoryview(x), memoryview(scale), G),
                      dqgen.dequantize_per_group_backward(x, scale, G))


def test_the_format_functions_take_buffers():
    rng = np.random.default_rng(1)
    values = rng.integers(0, 16, (2, 64))
    qp, scale, zp = oracle.pack_int4(values), rng.uniform(0.5, 2, (2, 2)).astype(np.float32), \
        np.full((2, 2), 3, np.int32)
    assert_bits_equal(packed.dequantize(memoryview(qp), memoryview(scale), memoryview(zp), G),
                      packed.dequantize(qp, scale, zp, G))
    qweight, qzeros = random_words(rng, (8, 32)), random_words(rng, (2, 4))
    scales = random_f16(rng, (2, 32), extreme=False)
    assert_bits_equal(gptq.dequantize(memoryview(qweight), memoryview(qzeros), memoryview(scales)),
                      gptq.dequantize(qweight, qzeros, scales))
    aw, az = random_words(rng, (64, 4)), random_words(rng, (2, 4))
    assert_bits_equal(awq.dequantize(memoryview(aw), memoryview(az), memoryview(scales)),
                      awq.dequantize(aw, az, scales))
    W_q = rng.integers(0, 256, (4, 64), dtype=np.uint8)
    hs, hz = random_f16(rng, (8, 1), extreme=False), random_f16(rng, (8, 1), extreme=False)
    assert_bits_equal(hqq.dequantize(memoryview(W_q), memoryview(hs), memoryview(hz), 4,
                                     (8, 64), 64),
                      hqq.dequantize(W_q, hs, hz, 4, (8, 64), 64))
    q8 = rng.integers(0, 256, (2, 64), dtype=np.uint8)
    fs, fz = random_f16(rng, (2, 2), extreme=False), random_f16(rng, (2, 2), extreme=False)
    assert_bits_equal(floatzp.dequantize(q8[0].tobytes(), memoryview(fs[0]), memoryview(fz[0]), G),
                      floatzp.dequantize(q8[0], fs[0], fz[0], G))


def test_a_memoryview_keeps_its_rows_in_ggml():
    """[4, 144] Q4_K bytes are four rows of 256 values, through a memoryview too; bytes
    are one row."""
    rng = np.random.default_rng(2)
    data = np.zeros((4, 144), np.uint8)  # zero scales: every value 0, any bytes are valid
    data[:, 16:] = rng.integers(0, 256, (4, 128), dtype=np.uint8)
    got = ggml.dequantize(memoryview(data), "Q4_K", dtype="f32")
    assert got.shape == (4, 256)
    assert_bits_equal(got, ggml.dequantize(data, "Q4_K", dtype="f32"))
    blocks = _q8_0_blocks(rng, (3, 2))
    assert ggml.dequantize(memoryview(blocks), "Q8_0").shape == (3, 64)
    assert ggml.dequantize(blocks.tobytes(), "Q8_0").shape == (3 * 64,)


def test_plans_take_buffers_as_they_are():
    q, scale, zp = _problem()
    y = np.empty((2, 64), np.float32)
    plan = plans.DequantizePerGroupPlan.select(DequantizePerGroupDescriptor(2, 64, G, "f32", "s8"))
    plan.run(plans.DequantizePerGroupArgs(memoryview(q), memoryview(scale), memoryview(zp),
                                          memoryview(y)))
    assert_bits_equal(y, reference.dequantize_per_group(q, scale, zp, G))
    with pytest.raises(InvalidProblemError, match="input has dtype uint8, expected int8"):
        plan.run(plans.DequantizePerGroupArgs(q.tobytes(), scale, zp, y))
    with pytest.raises(InvalidProblemError, match="output is read-only"):
        plan.run(plans.DequantizePerGroupArgs(q, scale, zp, memoryview(y).toreadonly()))


@pytest.mark.parametrize("call", [
    lambda: dqgen.dequantize_per_group([[1] * 64], np.ones((1, 2), np.float32),
                                       np.zeros((1, 2), np.int32), G),
    lambda: dqgen.quantize_per_group(np.ones((1, 64), np.float32), [[1.0, 1.0]],
                                     np.zeros((1, 2), np.int32), G),
    lambda: packed.dequantize(np.zeros((1, 32), np.uint8), [[1.0, 1.0]],
                              np.zeros((1, 2), np.int32), G),
    lambda: gptq.dequantize(np.zeros((8, 32), np.int32), [[0] * 4] * 2,
                            np.ones((2, 32), np.float16)),
    lambda: ggml.dequantize([0] * 34, "Q8_0"),
    lambda: hqq.dequantize([[0] * 64] * 4, np.ones((8, 1), np.float16),
                           np.ones((8, 1), np.float16), 4, (8, 64), 64),
])
def test_anything_else_is_refused_by_name(call):
    with pytest.raises(UnsupportedError, match=r"^\w+ must be an array: a numpy array"):
        call()


# ------------------------------------------------------------------ strided and unaligned


def test_unaligned_inputs_are_copied_by_every_function():
    q, scale, zp = _problem(3)
    bf16 = scale.astype(ml_dtypes.bfloat16)
    want = reference.dequantize_per_group(q, bf16, zp, G)
    assert_bits_equal(dqgen.dequantize_per_group(q, _unaligned(bf16), _unaligned(zp), G), want)
    x = want.astype(np.float32)
    assert np.array_equal(dqgen.quantize_per_group(_unaligned(x), _unaligned(scale), zp, G),
                          dqgen.quantize_per_group(x, scale, zp, G))
    rng = np.random.default_rng(4)
    qp = oracle.pack_int4(rng.integers(0, 16, (2, 64)))
    assert_bits_equal(packed.dequantize(qp, _unaligned(scale), _unaligned(zp), G),
                      packed.dequantize(qp, scale, zp, G))
    qweight, qzeros = random_words(rng, (8, 32)), random_words(rng, (2, 4))
    scales = random_f16(rng, (2, 32), extreme=False)
    assert_bits_equal(gptq.dequantize(_unaligned(qweight), _unaligned(qzeros), _unaligned(scales)),
                      gptq.dequantize(qweight, qzeros, scales))


def test_an_unaligned_out_is_refused_naming_out():
    blocks = _q8_0_blocks(np.random.default_rng(5), (1, 1))
    out = _unaligned(np.zeros((1, 32), np.float16))
    with pytest.raises(InvalidProblemError, match="^out is not aligned"):
        ggml.dequantize(blocks, "Q8_0", out=out)
    plan = plans.DequantizePerGroupPlan.select(DequantizePerGroupDescriptor(2, 64, G, "f32", "s8"))
    q, scale, zp = _problem()
    with pytest.raises(InvalidProblemError, match="output is not aligned"):
        plan.run(plans.DequantizePerGroupArgs(q, scale, zp, _unaligned(np.zeros((2, 64),
                                                                                np.float32))))
    with pytest.raises(InvalidProblemError, match="scale is not aligned"):
        plan.run(plans.DequantizePerGroupArgs(q, _unaligned(scale), zp,
                                              np.zeros((2, 64), np.float32)))


# ------------------------------------------------------------------ ml_dtypes int4 / uint4


@pytest.mark.parametrize("storage,np_type,lo,hi", [("s4", ml_dtypes.int4, -8, 8),
                                                   ("u4", ml_dtypes.uint4, 0, 16)])
def test_ml_dtypes_4_bit_arrays_are_unpacked_values(storage, np_type, lo, hi):
    from dqgen.arrays import q_rows
    rng = np.random.default_rng(6)
    values = rng.integers(lo, hi, (2, 64))
    scale = rng.uniform(0.5, 2, (2, 2)).astype(np.float32)
    zp = rng.integers(lo, hi, (2, 2)).astype(np.int32)
    four = values.astype(np_type)
    q2, got_storage = q_rows(four, "q")
    assert got_storage is DType(storage)
    assert np.array_equal(q2, oracle.pack_int4(values))
    want = reference.dequantize_per_group(values, scale, zp, G)
    assert_bits_equal(packed.dequantize(four, scale, zp, G), want)
    assert_bits_equal(packed.dequantize(four, scale, zp, G, dtype=storage), want)
    got = packed.dequantize(four.reshape(2, 2, 32), scale.reshape(2, 2, 1), zp.reshape(2, 2, 1), G)
    assert_bits_equal(got.reshape(2, 64), want)
    other = "u4" if storage == "s4" else "s4"
    with pytest.raises(InvalidProblemError,
                       match=f"q is an ml_dtypes .*int4 array.*dtype='{other}'"):
        packed.dequantize(four, scale, zp, G, dtype=other)
    with pytest.raises(InvalidProblemError, match=f"q is an ml_dtypes .*int4 array.*'{other}'"):
        q_rows(four, "q", other)


def test_ml_dtypes_4_bit_arrays_need_an_even_axis():
    with pytest.raises(InvalidProblemError, match="q has 33 values along its last axis"):
        packed.dequantize(np.zeros((1, 33), ml_dtypes.int4), np.ones((1, 1), np.float32),
                          np.zeros((1, 1), np.int32), 33)


def test_ml_dtypes_4_bit_arrays_are_not_packed_storage():
    """Where the bytes themselves are the packed fields, an array of one value a byte
    would be misread: it is refused, naming the argument."""
    four = np.zeros((4, 64), ml_dtypes.uint4)
    with pytest.raises(InvalidProblemError, match="^W_q is an ml_dtypes uint4 array"):
        hqq.dequantize(four, np.ones((8, 1), np.float16), np.ones((8, 1), np.float16), 4,
                       (8, 64), 64)
    with pytest.raises(InvalidProblemError, match="^data is an ml_dtypes int4 array"):
        ggml.dequantize(np.zeros((1, 34), ml_dtypes.int4), "Q8_0")
    with pytest.raises(InvalidProblemError, match="qweight"):
        gptq.dequantize(np.zeros((8, 32), ml_dtypes.int4), np.zeros((2, 4), np.int32),
                        np.ones((2, 32), np.float16))


# ------------------------------------------------------------------ the GGML default dtype


def test_ggml_dequantize_defaults_to_f16_like_gguf_files():
    blocks = _q8_0_blocks(np.random.default_rng(7), (2, 3))
    got = ggml.dequantize(blocks, "Q8_0")
    assert got.dtype == np.float16 and got.shape == (2, 96)
    assert_bits_equal(got, ggml.dequantize(blocks, "Q8_0", dtype="f32").astype(np.float16))


def test_format_plans_take_cpu_tensors_and_buffers_like_the_family_plans():
    """One rule for every plan: a FormatPlan takes CPU torch tensors and buffers as the
    family's plans do (views, never copies), and writes into a tensor output in place."""
    torch = pytest.importorskip("torch")
    from dqgen.formats import ggml
    from dqgen.formats.plan import FormatPlan
    from dqgen.ir import GgmlDequantizeDescriptor
    blocks = np.zeros((2, 34), np.uint8)
    blocks[:, 0:2] = np.frombuffer(np.float16(0.5).tobytes(), np.uint8)
    blocks[:, 2:] = np.arange(32, dtype=np.int8).view(np.uint8)
    plan = FormatPlan.select(GgmlDequantizeDescriptor(2, "Q8_0", "f32"))
    out = torch.zeros((2, 32), dtype=torch.float32)
    plan.run({"data": memoryview(blocks), "y": out})
    assert torch.equal(out, torch.from_numpy(ggml.dequantize(blocks, "Q8_0", "f32")))
    out2 = np.zeros((2, 32), np.float32)
    plan.run({"data": torch.from_numpy(blocks), "y": out2})
    assert np.array_equal(out2, out.numpy())
    with pytest.raises(dqgen.UnsupportedError, match="data"):
        plan.run({"data": [1, 2, 3], "y": out2})
