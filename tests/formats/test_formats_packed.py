"""Packed u4/s4 storage and float zero points in the family's kernels, bit for bit
against dqgen.reference applied to values unpacked by the independent oracle."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, strategies as st

from dqgen import InvalidProblemError, UnsupportedError, reference
from dqgen.formats import floatzp, packed
from dqgen.formats.plan import FormatPlan
from dqgen.ir import (DequantizeFloatZeroDescriptor, DequantizePerGroupDescriptor,
                      QuantizePerGroupDescriptor)
from dqgen.lower import lower
from formats_util import FLOATS, assert_bits_equal, random_f16
from oracles import checkpoints as oracle

RANGES = {"u4": (0, 15), "s4": (-8, 7)}


def problem(rng, storage, float_dtype, rows, axis, group):
    lo, hi = RANGES[storage]
    values = rng.integers(lo, hi + 1, size=(rows, axis))
    scale = random_f16(rng, (rows, axis // group)).astype(FLOATS[float_dtype])
    zp = rng.integers(-20, 30, size=(rows, axis // group)).astype(np.int32)
    return values, scale, zp


@given(storage=st.sampled_from(["u4", "s4"]), float_dtype=st.sampled_from(["f32", "f16", "bf16"]),
       rows=st.integers(0, 4), pairs=st.integers(1, 12), group=st.sampled_from([3, 32]),
       seed=st.integers(0, 2**32 - 1))
def test_packed_dequantize(storage, float_dtype, rows, pairs, group, seed):
    rng = np.random.default_rng(seed)
    axis = 2 * pairs * group  # even, a multiple of the group
    values, scale, zp = problem(rng, storage, float_dtype, rows, axis, group)
    got = packed.dequantize(oracle.pack_int4(values), scale, zp, group, storage)
    assert_bits_equal(got, reference.dequantize_per_group(values, scale, zp, group))


@given(storage=st.sampled_from(["u4", "s4"]), float_dtype=st.sampled_from(["f32", "f16", "bf16"]),
       rows=st.integers(1, 4), pairs=st.integers(1, 12), group=st.sampled_from([3, 32]),
       seed=st.integers(0, 2**32 - 1))
def test_packed_quantize(storage, float_dtype, rows, pairs, group, seed):
    """Quantize writes two values a byte, low nibble first; odd groups share bytes."""
    rng = np.random.default_rng(seed)
    axis = 2 * pairs * group
    lo, hi = RANGES[storage]
    x = (rng.standard_normal((rows, axis)) * 8).astype(FLOATS[float_dtype])
    x.flat[rng.integers(0, x.size, 3)] = [np.nan, np.inf, -np.inf]
    scale = (rng.random((rows, axis // group)) + 0.25).astype(FLOATS[float_dtype])
    scale.flat[0] = 0
    zp = rng.integers(-3, 4, size=(rows, axis // group)).astype(np.int32)
    got = packed.quantize(x, scale, zp, group, storage)
    assert got.dtype == np.uint8 and got.shape == (rows, axis // 2)
    want = reference.quantize_per_group(x, scale, zp, group, np.int64, lo, hi)
    assert np.array_equal(oracle.unpack_int4(got, storage == "s4"), want)


@pytest.mark.parametrize("storage", ["u4", "s4"])
@pytest.mark.parametrize("group", [64, 3])
def test_packed_large_multithreaded(storage, group):
    rng = np.random.default_rng(7)
    rows, axis = 96, 768
    x = rng.standard_normal((rows, axis)).astype(np.float16)
    scale = (rng.random((rows, axis // group)) * 0.3 + 0.05).astype(np.float16)
    zp = np.zeros((rows, axis // group), np.int32)
    q = packed.quantize(x, scale, zp, group, storage)
    lo, hi = RANGES[storage]
    values = reference.quantize_per_group(x, scale, zp, group, np.int64, lo, hi)
    assert np.array_equal(oracle.unpack_int4(q, storage == "s4"), values)
    assert_bits_equal(packed.dequantize(q, scale, zp, group, storage),
                      reference.dequantize_per_group(values, scale, zp, group))


def test_round_trip_3d_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(8)
    x = torch.from_numpy(rng.standard_normal((2, 3, 64)).astype(np.float32))
    scale = torch.full((2, 3, 2), 0.25)
    zp = torch.full((2, 3, 2), 8, dtype=torch.int32)
    q = packed.quantize(x, scale, zp, 32, "u4")
    assert isinstance(q, torch.Tensor) and tuple(q.shape) == (2, 3, 32)
    y = packed.dequantize(q, scale, zp, 32, "u4")
    assert tuple(y.shape) == (2, 3, 64)
    assert float((y - x.clamp(-2, 1.75)).abs().max()) <= 0.125


def test_plan_api_for_packed():
    desc = DequantizePerGroupDescriptor(4, 64, 32, "bf16", "s4")
    plan = FormatPlan.select(desc)
    assert plan.sku().int_dtype == "s4" and "dequant_pg_s4_bf16_g32" in str(plan.sku())
    shapes = {a.name: a.shape for a in plan.arguments}
    assert shapes == {"q": (4, 32), "scale": (4, 2), "zero_point": (4, 2), "y": (4, 64)}
    args = {a.name: np.zeros(a.shape, a.dtype) for a in plan.arguments}
    plan.run(args)
    args["q"] = np.zeros((4, 64), np.uint8)
    with pytest.raises(InvalidProblemError, match=r"q has shape \(4, 64\), expected \(4, 32\)"):
        plan.can_implement(args)
    args["q"] = args["y"].view(np.uint8)[:, :32]
    with pytest.raises(InvalidProblemError, match="not C-contiguous|overlaps"):
        plan.run(args)


def test_packed_bad_inputs():
    with pytest.raises(InvalidProblemError, match="axis=5 is odd"):
        DequantizePerGroupDescriptor(2, 5, 5, "f32", "u4")
    with pytest.raises(InvalidProblemError, match="axis=6 is odd|q_max=16"):
        QuantizePerGroupDescriptor(2, 6, 3, "f32", "u4", q_max=16)
    with pytest.raises(InvalidProblemError, match="q_max=16 is outside the u4 storage range"):
        QuantizePerGroupDescriptor(2, 6, 3, "f32", "u4", q_max=16)
    with pytest.raises(InvalidProblemError, match="is odd"):
        packed.quantize(np.zeros((2, 5), np.float32), np.ones((2, 1), np.float32),
                        np.zeros((2, 1), np.int32), 5)
    with pytest.raises(InvalidProblemError, match="stored in uint8 bytes"):
        packed.dequantize(np.zeros((2, 4), np.int32), np.ones((2, 1), np.float32),
                          np.zeros((2, 1), np.int32), 8)
    with pytest.raises(UnsupportedError, match="dtype='u8'"):
        packed.dequantize(np.zeros((2, 4), np.uint8), np.ones((2, 1), np.float32),
                          np.zeros((2, 1), np.int32), 8, dtype="u8")
    with pytest.raises(InvalidProblemError, match="scale has shape"):
        packed.dequantize(np.zeros((2, 4), np.uint8), np.ones((2, 2), np.float32),
                          np.zeros((2, 1), np.int32), 8)
    # The CUDA target schedules packed storage too (tests/cuda/test_packed_cuda.py runs it).
    cuda = lower(DequantizePerGroupDescriptor(2, 4, 2, "f32", "u4"), "cuda", "sm_90")
    assert cuda.bits == 4 and cuda.vector_elems == 2 and cuda.vector_streams[0].vector_bytes == 1


# --- float zero point -----------------------------------------------------------------------

@pytest.mark.parametrize("storage,float_dtype", [
    ("u4", "f32"), ("u4", "f16"), ("u4", "bf16"), ("s4", "f64"), ("s4", "bf16"), ("u8", "f32"),
    ("s8", "bf16"), ("u8", "f16")])
def test_float_zero_point(storage, float_dtype):
    """(q - mid) * s + z, each step rounded; extreme s and z (Inf, subnormal) included."""
    rng = np.random.default_rng(len(storage) + len(float_dtype))
    rows, axis, group = 6, 128, 32
    lo, hi = {"u4": (0, 15), "s4": (-8, 7), "u8": (0, 255), "s8": (-128, 127)}[storage]
    values = rng.integers(lo, hi + 1, size=(rows, axis))
    f = FLOATS[float_dtype]
    scale = random_f16(rng, (rows, axis // group)).astype(f)
    zero = random_f16(rng, (rows, axis // group)).astype(f)
    if storage in RANGES:
        q = oracle.pack_int4(values)
    else:
        q = values.astype(np.uint8 if storage == "u8" else np.int8)
    got = floatzp.dequantize(q, scale, zero, group, int_dtype=storage)
    assert_bits_equal(got, oracle.float_zero_dequantize(values, scale, zero, group, lo, hi, f))


def test_float_zero_point_no_fma_and_custom_range():
    """A case where a fused multiply-add would round differently; mid from q_min/q_max."""
    q = np.array([[7, 1]], np.uint8)
    s = np.array([[1 + 2**-23]], np.float32)
    z = np.array([[-3]], np.float32)
    got = floatzp.dequantize(q, s, z, 2, q_min=0, q_max=7)  # mid = 4, q - mid = 3
    want = oracle.float_zero_dequantize(q, s, z, 2, 0, 7, np.float32)
    assert_bits_equal(got, want)
    fused = np.float32(np.float64(3) * np.float64(s[0, 0]) + np.float64(z[0, 0]))  # 3 * 2^-23
    assert got[0, 0] != fused  # the test separates the two roundings
    with pytest.raises(InvalidProblemError, match="zero_point has dtype float16"):
        floatzp.dequantize(q, s, z.astype(np.float16), 2)
    assert DequantizeFloatZeroDescriptor(1, 2, 2, "f32", "s4").mid == 0
    assert "_mn" in DequantizeFloatZeroDescriptor(1, 2, 2, "f32", "s8", -8, -5).uri


@pytest.mark.parametrize("isa", __import__("strategies").ISAS)
@given(storage=st.sampled_from(["u4", "s4"]), float_dtype=st.sampled_from(["f32", "f16", "bf16"]),
       rows=st.integers(1, 3), blocks=st.integers(1, 5), group=st.sampled_from([8, 16, 32, 128]),
       data=st.data())
def test_packed_dequantize_register_path_every_isa(isa, storage, float_dtype, rows, blocks,
                                                    group, data):
    """The eight-nibble register path (and the exact path it leaves to) on every ISA:
    wild scales (NaN, infinities, subnormals, zero) and zero points anywhere in int32."""
    import strategies as S
    from dqgen.plans import PlanPreference
    axis = blocks * group
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), "seed"))
    lo, hi = RANGES[storage]
    values = rng.integers(lo, hi + 1, size=(rows, axis))
    scale = data.draw(S.scales(float_dtype, (rows, blocks)), "scale")
    zp = data.draw(S.zero_points((rows, blocks)), "zero_point")
    desc = DequantizePerGroupDescriptor(rows, axis, group, float_dtype, storage)
    y = np.empty((rows, axis), FLOATS[float_dtype])
    FormatPlan.select(desc, preference=PlanPreference(isa=isa)).run(
        {"q": oracle.pack_int4(values), "scale": scale, "zero_point": zp, "y": y})
    assert_bits_equal(y, reference.dequantize_per_group(values, scale, zp, group))
