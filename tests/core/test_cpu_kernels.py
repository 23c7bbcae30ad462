"""Generated CPU kernels equal dqgen.reference bit for bit (SPEC.md §3-4).

Every op, every (int, float) dtype pair and every ISA this CPU runs (the AVX-512 levels
it cannot run are compiled with warnings as errors under their -march); shapes, values,
zero points and scales from tests/strategies.py. Inputs and outputs are guarded arrays,
so a kernel that touches memory outside them faults or trips the canary. A few
hand-computed cases pin the spec's decisions independently of the reference.
"""

from __future__ import annotations

import concurrent.futures
import math
import os
import platform
import shutil
import subprocess
import tempfile

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import dqgen
from dqgen import isa as isa_module
from dqgen import reference
from dqgen.isa import ISA_LEVELS, isa_features, march_flags
from dqgen.layouts.per_group import FP16_ZERO_POINT_LIMIT
from dqgen.lower import lower
from dqgen.render import render
import strategies as S

ISAS = S.ISAS
# Quantize and the backward ops: AVX512_BF16 and AVX512-FP16 change only dequantize's
# schedule, so at those levels the other ops' sources are the avx512 ones, which run here
# at avx512 (and compile at every level in test_avx512_kernels_compile_warning_free...).
OTHER_OP_ISAS = tuple(i for i in ISAS if i not in ("avx512_bf16", "avx512_fp16"))
PAIRS = [(i, f) for i in S.INT_NAMES for f in S.FLOAT_NAMES]


def _select(plan_type, desc, isa):
    return plan_type.select(desc, device="cpu", preference=dqgen.PlanPreference(isa=isa))


def _group_shape(outer, axis, group_size):
    return (outer, axis // group_size)


# test -> (plan type, descriptor at group size gs) for its parameters, for S.prebuild.
_KERNELS_OF_TEST = {
    "test_dequantize_matches_reference": lambda gs, p: (
        dqgen.DequantizePerGroupPlan,
        dqgen.DequantizePerGroupDescriptor(1, gs, gs, p["float_name"], p["int_name"])),
    "test_quantize_matches_reference": lambda gs, p: (
        dqgen.QuantizePerGroupPlan,
        dqgen.QuantizePerGroupDescriptor(1, gs, gs, p["float_name"], p["int_name"])),
    "test_dequantize_backward_matches_reference": lambda gs, p: (
        dqgen.DequantizePerGroupBackwardPlan,
        dqgen.DequantizePerGroupBackwardDescriptor(1, gs, gs, p["float_name"])),
    "test_quantize_backward_matches_reference": lambda gs, p: (
        dqgen.QuantizePerGroupBackwardPlan,
        dqgen.QuantizePerGroupBackwardDescriptor(1, gs, gs, p["float_name"], -128, 255)),
}


@pytest.fixture(autouse=True)
def _prebuild_drawable_kernels(request):
    """Build every group size the test's hypothesis draws may pick, on all cores."""
    make = _KERNELS_OF_TEST.get(request.function.__name__)
    if make is not None:
        params = request.node.callspec.params
        S.prebuild([make(gs, params) for gs in S.GROUP_SIZES], params["isa"])


# ------------------------------------------------------------------- dequantize

@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("int_name,float_name", PAIRS)
@S.examples(0.5)
@given(data=st.data())
def test_dequantize_matches_reference(isa, int_name, float_name, data):
    outer, axis, gs = data.draw(S.shapes(), "shape")
    gshape = _group_shape(outer, axis, gs)
    q = S.guarded(data.draw(S.int_values(int_name, (outer, axis)), "q"))
    scale = S.guarded(data.draw(S.scales(float_name, gshape), "scale"))
    zp = S.guarded(data.draw(S.zero_points(gshape, int_name), "zero_point"))
    out = S.guarded_empty((outer, axis), S.np_dtype(float_name))
    desc = dqgen.DequantizePerGroupDescriptor(outer, axis, gs, float_name, int_name)
    plan = _select(dqgen.DequantizePerGroupPlan, desc, isa)
    plan.run(dqgen.DequantizePerGroupArgs(q, scale, zp, out))
    S.assert_same_bits(out, reference.dequantize_per_group(q, scale, zp, gs))
    assert S.canary_intact(out)


# --------------------------------------------------------------------- quantize

@pytest.mark.parametrize("isa", OTHER_OP_ISAS)
@pytest.mark.parametrize("int_name,float_name", PAIRS)
@S.examples(0.5)
@given(data=st.data())
def test_quantize_matches_reference(isa, int_name, float_name, data):
    outer, axis, gs = data.draw(S.shapes(), "shape")
    gshape = _group_shape(outer, axis, gs)
    q_min, q_max = data.draw(S.q_ranges(int_name), "q_range")
    if data.draw(st.booleans(), "tie scales"):
        scale = data.draw(S.tie_scales(float_name, gshape), "scale")
    else:
        scale = data.draw(S.scales(float_name, gshape), "scale")
    zp = data.draw(S.zero_points(gshape, int_name), "zero_point")
    x = data.draw(S.quantize_inputs(float_name, scale, zp, gs, (q_min, q_max)), "x")
    x, scale, zp = S.guarded(x), S.guarded(scale), S.guarded(zp)
    out = S.guarded_empty((outer, axis), S.np_dtype(int_name))
    desc = dqgen.QuantizePerGroupDescriptor(outer, axis, gs, float_name, int_name, q_min, q_max)
    plan = _select(dqgen.QuantizePerGroupPlan, desc, isa)
    plan.run(dqgen.QuantizePerGroupArgs(x, scale, zp, out))
    expected = reference.quantize_per_group(x, scale, zp, gs, S.np_dtype(int_name), q_min, q_max)
    S.assert_same_bits(out, expected)
    assert S.canary_intact(out)
    if out.size:
        assert q_min <= int(out.min()) and int(out.max()) <= q_max


# ------------------------------------------------------------ backward ops

@pytest.mark.parametrize("isa", OTHER_OP_ISAS)
@pytest.mark.parametrize("float_name", S.FLOAT_NAMES)
@S.examples(0.5)
@given(data=st.data())
def test_dequantize_backward_matches_reference(isa, float_name, data):
    outer, axis, gs = data.draw(S.shapes(), "shape")
    gshape = _group_shape(outer, axis, gs)
    dy = S.guarded(data.draw(S.float_values(float_name, (outer, axis)), "dy"))
    scale = S.guarded(data.draw(S.scales(float_name, gshape), "scale"))
    out = S.guarded_empty((outer, axis), S.np_dtype(float_name))
    desc = dqgen.DequantizePerGroupBackwardDescriptor(outer, axis, gs, float_name)
    plan = _select(dqgen.DequantizePerGroupBackwardPlan, desc, isa)
    plan.run(dqgen.DequantizePerGroupBackwardArgs(dy, scale, out))
    S.assert_same_bits(out, reference.dequantize_per_group_backward(dy, scale, gs))
    assert S.canary_intact(out)


@pytest.mark.parametrize("isa", OTHER_OP_ISAS)
@pytest.mark.parametrize("float_name", S.FLOAT_NAMES)
@S.examples(0.5)
@given(data=st.data())
def test_quantize_backward_matches_reference(isa, float_name, data):
    outer, axis, gs = data.draw(S.shapes(), "shape")
    gshape = _group_shape(outer, axis, gs)
    storage = data.draw(st.sampled_from(S.INT_NAMES), "storage")
    q_min, q_max = data.draw(S.q_ranges(storage), "q_range")
    if data.draw(st.booleans(), "tie scales"):
        scale = data.draw(S.tie_scales(float_name, gshape), "scale")
    else:
        scale = data.draw(S.scales(float_name, gshape), "scale")
    zp = data.draw(S.zero_points(gshape, storage), "zero_point")
    x = data.draw(S.quantize_inputs(float_name, scale, zp, gs, (q_min, q_max)), "x")
    dy = data.draw(S.float_values(float_name, (outer, axis)), "dy")
    dy, x, scale, zp = S.guarded(dy), S.guarded(x), S.guarded(scale), S.guarded(zp)
    out = S.guarded_empty((outer, axis), S.np_dtype(float_name))
    desc = dqgen.QuantizePerGroupBackwardDescriptor(outer, axis, gs, float_name, q_min, q_max)
    plan = _select(dqgen.QuantizePerGroupBackwardPlan, desc, isa)
    plan.run(dqgen.QuantizePerGroupBackwardArgs(dy, x, scale, zp, out))
    expected = reference.quantize_per_group_backward(dy, x, scale, zp, gs, q_min, q_max)
    S.assert_same_bits(out, expected)
    assert S.canary_intact(out)


# ------------------------------------------------------------- round trip

@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("int_name,float_name", PAIRS)
@S.examples(0.25)
@given(data=st.data())
def test_round_trip_within_half_a_step(isa, int_name, float_name, data):
    """|dequantize(quantize(x)) - x| <= scale/2 (+ rounding of F) for x in range."""
    outer, axis, gs = data.draw(S.shapes(group_sizes=(1, 7, 32), outers=(1, 5, 300)), "shape")
    gshape = _group_shape(outer, axis, gs)
    q_min, q_max = data.draw(S.q_ranges(int_name), "q_range")
    rng = data.draw(S.seeds(), "seed")
    fdt = S.np_dtype(float_name)
    top = 6 if float_name == "f16" else 10  # keeps 255 steps of the scale finite in f16
    scale = (np.exp2(rng.integers(-10, top, size=gshape)) * rng.uniform(1, 2, size=gshape))
    scale = scale.astype(np.float32).astype(fdt)
    zp = rng.integers(q_min, q_max + 1, size=gshape).astype(np.int32)
    s = np.repeat(scale.astype(np.float64), gs, axis=1)
    z = np.repeat(zp.astype(np.float64), gs, axis=1)
    u = rng.uniform(q_min - z, q_max - z) if axis else np.zeros((outer, axis))
    x = (u * s).astype(S.compute_dtype(float_name)).astype(fdt)
    pref = dqgen.PlanPreference(isa=isa)
    qd = dqgen.QuantizePerGroupDescriptor(outer, axis, gs, float_name, int_name, q_min, q_max)
    q = np.empty((outer, axis), S.np_dtype(int_name))
    dqgen.QuantizePerGroupPlan.select(qd, preference=pref).run(
        dqgen.QuantizePerGroupArgs(x, scale, zp, q))
    dd = dqgen.DequantizePerGroupDescriptor(outer, axis, gs, float_name, int_name)
    y = np.empty((outer, axis), fdt)
    dqgen.DequantizePerGroupPlan.select(dd, preference=pref).run(
        dqgen.DequantizePerGroupArgs(q, scale, zp, y))
    xf, yf = x.astype(np.float64), y.astype(np.float64)
    eps = float(S.finfo(float_name).eps)
    # x itself was rounded to F (it may sit a hair outside the range) and y is rounded
    # to F: allow a few ulps of F on top of half a step.
    slack = 2 * eps * (np.abs(xf) + np.abs(yf)) + 2 * eps * s
    err = np.abs(yf - xf)
    assert (err <= s / 2 + slack).all(), float((err - s / 2 - slack).max())


# ------------------------------------------- hand-computed spec decisions

@pytest.mark.parametrize("isa", OTHER_OP_ISAS)
@pytest.mark.parametrize("float_name", S.FLOAT_NAMES)
def test_quantize_rounds_half_to_even_before_adding_the_zero_point(isa, float_name):
    """SPEC.md §4 [decision]: r = rint(x / scale), then q = r + zp (not rint(t + zp))."""
    t = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, -3.5], dtype=np.float64)
    scale_value = 0.25
    x = (t * scale_value).astype(S.np_dtype(float_name))[None, :]
    expected_r = np.array([0, 2, 2, 0, -2, -2, 4, -4])
    for zp_value in (0, 1, 2, 3, -7):
        scale = np.full((1, 1), scale_value, S.np_dtype(float_name))
        zp = np.full((1, 1), zp_value, np.int32)
        desc = dqgen.QuantizePerGroupDescriptor(1, 8, 8, float_name, "s8")
        out = np.empty((1, 8), np.int8)
        _select(dqgen.QuantizePerGroupPlan, desc, isa).run(
            dqgen.QuantizePerGroupArgs(x, scale, zp, out))
        assert out[0].tolist() == (expected_r + zp_value).tolist(), zp_value


@pytest.mark.parametrize("isa", OTHER_OP_ISAS)
@pytest.mark.parametrize("float_name", S.FLOAT_NAMES)
@pytest.mark.parametrize("int_name,q_min,q_max", [("s8", -128, 127), ("s8", -8, 7),
                                                  ("u8", 0, 15), ("u8", 0, 255), ("s8", 5, 5)])
def test_quantize_special_inputs(isa, float_name, int_name, q_min, q_max):
    """NaN -> clamp(zp); +Inf -> q_max; -Inf -> q_min; huge values saturate; scale 0 ->
    clamp(zp); subnormal scales divide as IEEE says."""
    fdt = S.np_dtype(float_name)
    big = float(S.finfo(float_name).max)
    sub = float(S.finfo(float_name).smallest_subnormal)
    row = [math.nan, math.inf, -math.inf, big, -big, 1.0, -1.0, 0.0]
    x = np.array([row, row, row], dtype=np.float64).astype(fdt)
    scale = np.array([[1.0], [0.0], [sub]]).astype(fdt)
    zp_value = (q_min + q_max) // 2 + 1
    zp = np.full((3, 1), zp_value, np.int32)
    out = np.empty((3, 8), S.np_dtype(int_name))
    desc = dqgen.QuantizePerGroupDescriptor(3, 8, 8, float_name, int_name, q_min, q_max)
    _select(dqgen.QuantizePerGroupPlan, desc, isa).run(dqgen.QuantizePerGroupArgs(x, scale, zp, out))

    def clamp(v):
        return min(max(v, q_min), q_max)

    czp = clamp(zp_value)
    assert out[0].tolist() == [czp, q_max, q_min, q_max, q_min, clamp(zp_value + 1),
                               clamp(zp_value - 1), czp]
    assert out[1].tolist() == [czp] * 8  # scale == 0: t = 0 for every x, NaN included
    # 1 / smallest subnormal overflows F's range but not int saturation: +-1 -> ends
    assert out[2].tolist() == [czp, q_max, q_min, q_max, q_min, q_max, q_min, czp]


@pytest.mark.parametrize("isa", OTHER_OP_ISAS)
@pytest.mark.parametrize("float_name", S.FLOAT_NAMES)
def test_quantize_backward_mask_is_inclusive(isa, float_name):
    """SPEC.md §4 [decision]: the gradient passes where q_min <= r + zp <= q_max."""
    fdt = S.np_dtype(float_name)
    q_min, q_max, zp_value = -8, 7, 2
    # r + zp for each x/scale (scale 1): q_min - 1, q_min, q_max, q_max + 1, NaN, Inf
    t = [q_min - 1 - zp_value, q_min - zp_value, q_max - zp_value, q_max + 1 - zp_value,
         math.nan, math.inf, 0.0, 0.4]
    x = np.array([t, t], dtype=np.float64).astype(fdt)
    dy = np.full((2, 8), 3.0, fdt)
    scale = np.array([[2.0 ** 0], [0.0]]).astype(fdt)
    zp = np.full((2, 1), zp_value, np.int32)
    out = np.empty((2, 8), fdt)
    desc = dqgen.QuantizePerGroupBackwardDescriptor(2, 8, 8, float_name, q_min, q_max)
    _select(dqgen.QuantizePerGroupBackwardPlan, desc, isa).run(
        dqgen.QuantizePerGroupBackwardArgs(dy, x, scale, zp, out))
    assert out[0].astype(np.float64).tolist() == [0, 3, 3, 0, 0, 0, 3, 3]
    assert out[1].astype(np.float64).tolist() == [0] * 8  # scale == 0 blocks the gradient


@pytest.mark.parametrize("isa", ISAS)
def test_dequantize_extreme_zero_points_are_exact_in_f64(isa):
    """q - zp is exact integer arithmetic: int32 extremes survive into an f64 result."""
    q = np.array([[-128, 127, 0, -1]], np.int8)
    scale = np.ones((1, 2), np.float64)
    zp = np.array([[2**31 - 1, -2**31]], np.int32)
    out = np.empty((1, 4), np.float64)
    desc = dqgen.DequantizePerGroupDescriptor(1, 4, 2, "f64", "s8")
    _select(dqgen.DequantizePerGroupPlan, desc, isa).run(dqgen.DequantizePerGroupArgs(q, scale, zp, out))
    assert out[0].tolist() == [-128.0 - (2**31 - 1), 127.0 - (2**31 - 1), 2.0**31, 2.0**31 - 1]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("float_name", ["f16", "bf16"])
def test_dequantize_keeps_subnormal_results(isa, float_name):
    """No flush-to-zero: a subnormal scale times small q gives the subnormal results."""
    fdt = S.np_dtype(float_name)
    sub = S.finfo(float_name).smallest_subnormal
    q = np.arange(16, dtype=np.int8)[None, :]
    scale = np.array([[sub]], dtype=fdt)
    zp = np.zeros((1, 1), np.int32)
    out = np.empty((1, 16), fdt)
    desc = dqgen.DequantizePerGroupDescriptor(1, 16, 16, float_name, "s8")
    _select(dqgen.DequantizePerGroupPlan, desc, isa).run(dqgen.DequantizePerGroupArgs(q, scale, zp, out))
    expected = (np.arange(16, dtype=np.float64) * float(sub)).astype(fdt)[None, :]
    S.assert_same_bits(out, expected)
    assert (out.astype(np.float64)[0, 1:] > 0).all()


# ------------------------------------------------- the helpers can fail

def test_assert_same_bits_detects_differences():
    a = np.array([1.0, np.nan, -0.0], np.float32)
    S.assert_same_bits(a, np.array([1.0, -np.nan, -0.0], np.float32))
    with pytest.raises(AssertionError):
        S.assert_same_bits(a, np.array([1.0, np.nan, 0.0], np.float32))  # -0 vs +0
    with pytest.raises(AssertionError):
        S.assert_same_bits(a, np.array([1.0, 1.0, -0.0], np.float32))  # NaN vs number
    with pytest.raises(AssertionError):
        S.assert_same_bits(np.array([1, 2], np.int8), np.array([1, 3], np.int8))


def test_guarded_array_sits_against_the_end_of_its_mapping():
    arr = S.guarded_empty((3, 5), np.float32)
    assert arr.flags.c_contiguous and arr.flags.writeable
    end = arr.__array_interface__["data"][0] + arr.nbytes
    assert end % S.PAGE == 0
    assert S.canary_intact(arr)
    before = np.frombuffer(S._mapping(arr), dtype=np.uint8)
    start = arr.__array_interface__["data"][0] - before.ctypes.data
    before[start - 1] = 0
    assert not S.canary_intact(arr)


def test_reading_past_a_guarded_array_faults():
    """The guard page is real: one byte past the end kills the process (SIGSEGV)."""
    import os
    import signal
    import subprocess
    import sys
    script = ("import ctypes, sys; sys.path.insert(0, 'tests'); import numpy as np, strategies as S; "
              "a = S.guarded_empty((3, 5), np.float32); "
              "end = a.__array_interface__['data'][0] + a.nbytes; "
              "ctypes.c_char.from_address(end - 1).value; print('inside ok', flush=True); "
              "ctypes.c_char.from_address(end).value; print('past end read')")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=root, timeout=60)
    assert "inside ok" in proc.stdout and "past end read" not in proc.stdout
    assert proc.returncode == -signal.SIGSEGV, (proc.returncode, proc.stderr[-500:])


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("int_name,float_name", PAIRS)
def test_dequantize_zero_points_at_path_boundaries(isa, int_name, float_name):
    """Storage values against zero points on both sides of the path limits (2^24, where
    q - zp stops being exact in f32; 32512, where it stops fitting int16) and at the ends
    of int32, groups of each kind side by side. With groups of 256 every group sees every
    storage value, so the extreme differences are there for each zero point."""
    lo, hi = S.INT_RANGES[int_name]
    values = np.arange(lo, hi + 1)
    zps = np.array(S.ZP_EDGES + (lo, hi, 2**24 + 7, -(2**24 + 9)), dtype=np.int64)
    fdt = S.np_dtype(float_name)
    for gs, scale_value in ((32, 1.0), (32, 3.0), (32, 0.1), (256, 1.0), (256, 0.1)):
        row = np.tile(values, len(zps) * gs // len(values) + 1)[: len(zps) * gs]
        q = np.stack([row, row[::-1]]).astype(S.np_dtype(int_name))
        zp = np.stack([zps, zps[::-1]]).astype(np.int32)
        scale = np.full(zp.shape, scale_value).astype(fdt)
        out = S.guarded_empty(q.shape, fdt)
        desc = dqgen.DequantizePerGroupDescriptor(2, q.shape[1], gs, float_name, int_name)
        _select(dqgen.DequantizePerGroupPlan, desc, isa).run(
            dqgen.DequantizePerGroupArgs(S.guarded(q), S.guarded(scale), S.guarded(zp), out))
        S.assert_same_bits(out, reference.dequantize_per_group(q, scale, zp, gs), f"group {gs}, scale {scale_value}")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("int_name", S.INT_NAMES)
@pytest.mark.parametrize("float_name", ["f16", "bf16"])
@pytest.mark.parametrize("group_size", [32, 256])
def test_dequantize_every_scale_bit_pattern(isa, int_name, float_name, group_size):
    """Every 16-bit scale pattern (zero, subnormal, negative, the largest the fused path
    takes and the next, Inf, NaN) against zero points on both sides of every path limit.
    The fused path's exactness rests on the scale's bits (FMA_SCALE_MAX_BITS in the
    schedule), so each pattern is run, not sampled. Groups of 32 take f16's batched
    prologue; groups of 256 see every storage value."""
    lo, hi = S.INT_RANGES[int_name]
    patterns = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    zps = np.array(S.ZP_EDGES + (lo, hi, 5, -7), dtype=np.int64)
    rows = 2 if group_size == 32 else 1
    n_groups = patterns.size
    g = np.arange(n_groups)
    # row r pairs pattern p with zero point zps[(p * (7r + 1) + 3r) % len]
    zp = np.stack([zps[(g * (7 * r + 1) + 3 * r) % zps.size] for r in range(rows)]).astype(np.int32)
    scale = np.broadcast_to(patterns.view(S.np_dtype(float_name)), (rows, n_groups)).copy()
    if group_size == 256:
        within = np.arange(256)
    else:  # 32 values spread over the range; the offset varies by group, so 0 and 255 occur
        within = (np.arange(32) * 8)[None, :] + (g * 37 % 8)[:, None]
    q = (np.broadcast_to(within, (n_groups, group_size)).reshape(-1) + lo).astype(S.np_dtype(int_name))
    q = np.broadcast_to(q, (rows, q.size)).copy()
    desc = dqgen.DequantizePerGroupDescriptor(rows, q.shape[1], group_size, float_name, int_name)
    out = np.empty(q.shape, S.np_dtype(float_name))
    _select(dqgen.DequantizePerGroupPlan, desc, isa).run(dqgen.DequantizePerGroupArgs(q, scale, zp, out))
    S.assert_same_bits(out, reference.dequantize_per_group(q, scale, zp, group_size),
                       f"{float_name} scales, group {group_size}")


# ------------------------------------------------------------- AVX-512 levels

AVX512_LEVELS = tuple(level for level in ISA_LEVELS if "avx512" in isa_features(level))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("int_name", S.INT_NAMES)
def test_dequantize_f16_zero_points_at_the_fp16_limit(isa, int_name):
    """AVX512-FP16's path holds q - zp in f16, exact up to 2048: zero points on both sides
    of its limit (FP16_ZERO_POINT_LIMIT), with every storage value, so |q - zp| reaches 2048
    inside it and 2049 just outside; every scale kind beside them."""
    lo, hi = S.INT_RANGES[int_name]
    limit = FP16_ZERO_POINT_LIMIT
    zps = np.array([limit, limit + 1, -limit, -limit - 1, 2048 - hi, 2049 - hi, -2048 - lo,
                    -2049 - lo, 0, 7], dtype=np.int32)
    scales = np.array([1.0, 0.1, -3.0, 6e-8, 0.0, -0.0, np.inf, np.nan, 65504.0, 1e-3], np.float16)
    gs = 256
    q = np.tile(np.arange(lo, hi + 1), (1, zps.size)).astype(S.np_dtype(int_name))
    for shift in range(3):  # each zero point meets each scale
        zp = np.roll(zps, shift)[None, :]
        scale = np.roll(scales, 2 * shift)[None, :]
        out = S.guarded_empty(q.shape, np.float16)
        desc = dqgen.DequantizePerGroupDescriptor(1, q.shape[1], gs, "f16", int_name)
        _select(dqgen.DequantizePerGroupPlan, desc, isa).run(
            dqgen.DequantizePerGroupArgs(S.guarded(q), S.guarded(scale), S.guarded(zp), out))
        S.assert_same_bits(out, reference.dequantize_per_group(q, scale, zp, gs), f"shift {shift}")


def test_schedule_picks_the_avx512_features_each_kernel_uses():
    """Which instructions of a level a kernel uses is the schedule's decision: the 512-bit
    register path for dequantize at every AVX-512 level, AVX512_BF16's narrowing and
    AVX512-FP16's arithmetic only where the level has them and the group fits."""
    def spec(f, isa, i="s8", gs=128):
        return lower(dqgen.DequantizePerGroupDescriptor(1, gs, gs, f, i), "c", isa)
    f16, bf16 = spec("f16", "avx512_fp16"), spec("bf16", "avx512_fp16")
    assert f16.half_path and f16.arch == "avx512_fp16" and f16.register_lanes == 32
    assert f16.fast_zero_point_limit == FP16_ZERO_POINT_LIMIT and not f16.fma_zero_point_limit
    assert bf16.store_pairs and bf16.fma_scale_min_bits == 0x80 and not bf16.half_path
    assert not spec("bf16", "avx512").store_pairs and spec("bf16", "avx512").fma_scale_min_bits == 1
    assert not spec("f16", "avx512_bf16").half_path and spec("f16", "avx512_bf16").vector_bits == 512
    for f in ("f32", "f64"):
        assert not spec(f, "avx512_fp16").half_path and spec(f, "avx512").vector_bits == 512
    assert spec("f64", "avx512").simd_stage_int and spec("f64", "avx512").register_lanes == 8
    assert not spec("f16", "avx512_fp16", gs=16).half_path  # no whole 32-lane step
    assert spec("f32", "avx2").vector_bits == 256 and not spec("f32", "avx2").simd_headers
    quant = lower(dqgen.QuantizePerGroupDescriptor(1, 128, 128, "f16", "s8"), "c", "avx512_fp16")
    assert quant.vector_bits == 256  # the other ops stage through F16C blocks
    assert march_flags("avx512_fp16")[-2:] == ("-mavx512bf16", "-mavx512fp16")


def test_isa_levels_follow_the_cpu_flags(monkeypatch):
    base = {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq"}
    for flags, best in ((base | {"avx512_bf16", "avx512_fp16"}, "avx512_fp16"),
                        (base | {"avx512_bf16"}, "avx512_bf16"), (base | {"avx512_fp16"}, "avx512"),
                        (base - {"avx512dq"}, "avx2"), (set(), "generic")):
        monkeypatch.setattr(isa_module, "cpu_flags", lambda flags=flags: set(flags))
        monkeypatch.setattr(isa_module, "_is_x86", lambda: True)
        isa_module.supported_isas.cache_clear()
        try:
            assert isa_module.supported_isas()[0] == best, flags
        finally:
            isa_module.supported_isas.cache_clear()


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc for the syntax check")
def test_avx512_kernels_compile_warning_free_under_their_march():
    """Every AVX-512 level's dequantize kernels (remainders, 32-lane steps, streaming
    stores) pass -Wall -Wextra -Wconversion -Werror under the level's -march, also where
    this CPU cannot run them."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("x86 only")
    units = {}
    for isa in AVX512_LEVELS:
        for f in S.FLOAT_NAMES:
            for i, gs in (("s8", 32), ("u8", 48), ("s8", 12), ("u8", 128)):
                spec = lower(dqgen.DequantizePerGroupDescriptor(1, gs, gs, f, i), "c", isa)
                units[(spec.uri, isa)] = render(spec).text

    def check(item):
        (uri, arch), text = item
        with tempfile.NamedTemporaryFile("w", suffix=".c", delete=False) as fh:
            fh.write(text)
        try:
            return uri, arch, subprocess.run(
                ["gcc", "-fsyntax-only", "-std=c11", "-fopenmp", "-Wall", "-Wextra", "-Wshadow",
                 "-Wconversion", "-Werror", *march_flags(arch), fh.name],
                capture_output=True, text=True, timeout=120)
        finally:
            os.unlink(fh.name)
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        for uri, arch, proc in pool.map(check, units.items()):
            assert proc.returncode == 0, f"{uri} ({arch}):\n{proc.stderr[-2000:]}"
    assert {arch for _, arch in units} == set(AVX512_LEVELS)


@pytest.mark.parametrize("isa", [i for i in ISAS if i in AVX512_LEVELS])
@pytest.mark.parametrize("int_name,float_name", [("s8", "f32"), ("s8", "f16"), ("u8", "bf16"), ("u8", "f64")])
def test_dequantize_group_remainders_in_masked_steps(isa, int_name, float_name):
    """AVX-512 takes a group's remainder (20 = 16 + 4, 44 = 32 + 12, 16 + 16 + 12 or 40 + 4)
    in one masked step: its loads stop at the group's end (guarded arrays fault past the last
    one), its stores write only the remainder, and every scale kind and path limit holds."""
    lo, hi = S.INT_RANGES[int_name]
    rng = np.random.default_rng(20)
    fdt = S.np_dtype(float_name)
    pool = np.array(S.scale_pool(float_name), dtype=np.float64)
    for gs in (20, 44):
        groups = 3 * len(pool)
        q = rng.integers(lo, hi + 1, (2, groups * gs)).astype(S.np_dtype(int_name))
        with np.errstate(all="ignore"):
            scale = np.stack([np.resize(pool, groups), np.resize(pool[::-1], groups)]).astype(fdt)
        zp = rng.choice(np.array(S.ZP_EDGES + (lo, hi, 3, -5), np.int64), (2, groups)).astype(np.int32)
        out = S.guarded_empty(q.shape, fdt)
        desc = dqgen.DequantizePerGroupDescriptor(2, q.shape[1], gs, float_name, int_name)
        plan = _select(dqgen.DequantizePerGroupPlan, desc, isa)
        assert plan._kernel.spec.tail_mask, "no masked remainder: the test would not test it"
        plan.run(dqgen.DequantizePerGroupArgs(S.guarded(q), S.guarded(scale), S.guarded(zp), out))
        S.assert_same_bits(out, reference.dequantize_per_group(q, scale, zp, gs), f"group {gs}")
