"""The public surface's plain functions (dqgen/api.py; the Plan API they run on:
test_plans.py): any rank, strided inputs, ``out=``, torch tensors in and out, ISA selection
by environment, and ``choose_qparams_per_group``.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import dqgen
from dqgen import reference
import strategies as S
from test_plans import _wild_problem


def _torch():
    return pytest.importorskip("torch", reason="torch (CPU build) is an optional test dependency")


@pytest.mark.parametrize("isa", S.ISAS)
def test_env_isa_selects_the_kernel_for_plain_functions(isa, monkeypatch):
    monkeypatch.setenv("DQGEN_ISA", isa)
    desc = dqgen.DequantizePerGroupDescriptor(2, 64, 32, "f16", "s8")
    assert dqgen.DequantizePerGroupPlan.select(desc).sku().arch == isa
    x, q, scale, zp = _wild_problem("f16", outer=5, axis=64, gs=32)
    S.assert_same_bits(dqgen.dequantize_per_group(q, scale, zp, 32),
                       reference.dequantize_per_group(q, scale, zp, 32))
    small = (zp % 5).astype(np.int32)
    S.assert_same_bits(dqgen.quantize_per_group(x, scale, small, 32, dtype="s8"),
                       reference.quantize_per_group(x, scale, small, 32, np.int8, -128, 127))
    S.assert_same_bits(dqgen.dequantize_per_group_backward(x, scale, 32),
                       reference.dequantize_per_group_backward(x, scale, 32))
    S.assert_same_bits(dqgen.quantize_per_group_backward(x, x, scale, small, 32, 0, 15),
                       reference.quantize_per_group_backward(x, x, scale, small, 32, 0, 15))


# -------------------------------------------------------------- plain functions

@pytest.mark.parametrize("float_name", S.FLOAT_NAMES)
def test_plain_functions_match_the_reference_at_rank_3(float_name):
    x, q, scale, zp = _wild_problem(float_name, outer=6, axis=64, gs=16)
    small = (zp % 9).astype(np.int32)
    shape3, gshape3 = (2, 3, 64), (2, 3, 4)
    y = dqgen.dequantize_per_group(q.reshape(shape3), scale.reshape(gshape3), zp.reshape(gshape3), 16)
    assert y.shape == shape3 and y.dtype == S.np_dtype(float_name)
    S.assert_same_bits(y.reshape(6, 64), reference.dequantize_per_group(q, scale, zp, 16))
    qq = dqgen.quantize_per_group(x.reshape(shape3), scale.reshape(gshape3), small.reshape(gshape3),
                                  16, dtype="u8", q_min=0, q_max=15)
    assert qq.shape == shape3 and qq.dtype == np.uint8
    S.assert_same_bits(qq.reshape(6, 64),
                       reference.quantize_per_group(x, scale, small, 16, np.uint8, 0, 15))
    d = dqgen.dequantize_per_group_backward(x.reshape(shape3), scale.reshape(gshape3), 16)
    S.assert_same_bits(d.reshape(6, 64), reference.dequantize_per_group_backward(x, scale, 16))
    d = dqgen.quantize_per_group_backward(x.reshape(shape3), x.reshape(shape3), scale.reshape(gshape3),
                                          small.reshape(gshape3), 16, -8, 7)
    S.assert_same_bits(d.reshape(6, 64),
                       reference.quantize_per_group_backward(x, x, scale, small, 16, -8, 7))


def test_rank_1_input_is_one_row():
    q = np.arange(-8, 8, dtype=np.int8)
    y = dqgen.dequantize_per_group(q, np.array([0.5, 2.0], np.float32), np.array([1, -1], np.int32), 8)
    assert y.shape == (16,)
    assert y.tolist() == [(v - 1) * 0.5 for v in range(-8, 0)] + [(v + 1) * 2.0 for v in range(0, 8)]


@pytest.mark.parametrize("shape", [(0,), (2, 3, 0)])
def test_empty_last_axis_at_any_rank(shape):
    """SPEC.md §1: axis == 0 is valid and does nothing, at any rank."""
    q = np.zeros(shape, np.int8)
    y = dqgen.dequantize_per_group(q, np.zeros(shape, np.float32), np.zeros(shape, np.int32), 4)
    assert y.shape == shape and y.dtype == np.float32


@pytest.mark.parametrize("float_name", ["f32", "bf16"])
def test_strided_inputs_are_copied_not_refused(float_name):
    x, q, scale, zp = _wild_problem(float_name, outer=4, axis=64, gs=16)
    wide_q = np.zeros((8, 128), q.dtype)
    wide_q[::2, ::2] = q
    wide_s = np.zeros((4, 8), scale.dtype)
    wide_s[:, ::2] = scale
    fortran_zp = np.asfortranarray(zp)
    y = dqgen.dequantize_per_group(wide_q[::2, ::2], wide_s[:, ::2], fortran_zp, 16)
    S.assert_same_bits(y, reference.dequantize_per_group(q, scale, zp, 16))
    xt = np.ascontiguousarray(x.T).T  # same values, Fortran order
    small = (zp % 3).astype(np.int32)
    S.assert_same_bits(dqgen.quantize_per_group(xt, wide_s[:, ::2], small, 16),
                       reference.quantize_per_group(x, scale, small, 16, np.int8, -128, 127))


def test_out_is_filled_and_returned():
    x, q, scale, zp = _wild_problem("f32", outer=4, axis=64, gs=16)
    out = np.empty((4, 64), np.float32)
    assert dqgen.dequantize_per_group(q, scale, zp, 16, out=out) is out
    S.assert_same_bits(out, reference.dequantize_per_group(q, scale, zp, 16))
    out3 = np.empty((2, 2, 64), np.float32)
    res = dqgen.dequantize_per_group(q.reshape(2, 2, 64), scale.reshape(2, 2, 4),
                                     zp.reshape(2, 2, 4), 16, out=out3)
    assert res is out3
    S.assert_same_bits(out3.reshape(4, 64), reference.dequantize_per_group(q, scale, zp, 16))
    qout = np.empty((4, 64), np.uint8)
    small = (zp % 3).astype(np.int32)
    assert dqgen.quantize_per_group(x, scale, small, 16, dtype="u8", out=qout) is qout
    S.assert_same_bits(qout, reference.quantize_per_group(x, scale, small, 16, np.uint8, 0, 255))
    g = np.empty((4, 64), np.float32)
    assert dqgen.dequantize_per_group_backward(x, scale, 16, out=g) is g
    assert dqgen.quantize_per_group_backward(x, x, scale, small, 16, -8, 7, out=g) is g
    S.assert_same_bits(g, reference.quantize_per_group_backward(x, x, scale, small, 16, -8, 7))


def test_zero_point_of_another_integer_dtype_is_accepted_when_it_fits():
    q = np.arange(16, dtype=np.int8).reshape(2, 8)
    scale = np.ones((2, 2), np.float32)
    zp64 = np.array([[1, 2], [3, 4]], np.int64)
    S.assert_same_bits(dqgen.dequantize_per_group(q, scale, zp64, 4),
                       reference.dequantize_per_group(q, scale, zp64.astype(np.int32), 4))


@pytest.mark.parametrize("float_name", S.FLOAT_NAMES)
def test_torch_tensors_in_torch_tensors_out(float_name):
    torch = _torch()
    tdt = {"f32": torch.float32, "f64": torch.float64, "f16": torch.float16,
           "bf16": torch.bfloat16}[float_name]
    x, q, scale, zp = _wild_problem(float_name, outer=4, axis=64, gs=16)
    small = (zp % 3).astype(np.int32)

    def tt(a):
        if a.dtype == S.NP_DTYPES["bf16"]:
            return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
        return torch.from_numpy(a.copy())

    def back(t):
        assert isinstance(t, torch.Tensor) and t.device.type == "cpu"
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(S.NP_DTYPES["bf16"])
        return t.numpy()

    y = dqgen.dequantize_per_group(tt(q), tt(scale), tt(zp), 16)
    assert y.dtype == tdt and tuple(y.shape) == (4, 64)
    S.assert_same_bits(back(y), reference.dequantize_per_group(q, scale, zp, 16))
    qq = dqgen.quantize_per_group(tt(x), tt(scale), tt(small), 16, dtype="s8")
    assert qq.dtype == torch.int8
    S.assert_same_bits(back(qq), reference.quantize_per_group(x, scale, small, 16, np.int8, -128, 127))
    g = dqgen.dequantize_per_group_backward(tt(x), tt(scale), 16)
    assert g.dtype == tdt
    S.assert_same_bits(back(g), reference.dequantize_per_group_backward(x, scale, 16))
    g = dqgen.quantize_per_group_backward(tt(x), tt(x), tt(scale), tt(small), 16, 0, 15)
    assert g.dtype == tdt
    S.assert_same_bits(back(g), reference.quantize_per_group_backward(x, x, scale, small, 16, 0, 15))
    # A torch out= is written in place; a strided torch input is copied.
    out = torch.empty((4, 64), dtype=tdt)
    assert dqgen.dequantize_per_group(tt(q), tt(scale), tt(zp), 16, out=out) is out
    S.assert_same_bits(back(out), reference.dequantize_per_group(q, scale, zp, 16))
    strided = tt(np.repeat(q, 2, axis=1))[:, ::2]
    S.assert_same_bits(back(dqgen.dequantize_per_group(strided, tt(scale), tt(zp), 16)),
                       reference.dequantize_per_group(q, scale, zp, 16))
    # Tensors that require grad are read, not refused.
    xg = tt(x).requires_grad_(True)
    S.assert_same_bits(back(dqgen.dequantize_per_group_backward(xg, tt(scale), 16)),
                       reference.dequantize_per_group_backward(x, scale, 16))


def test_torch_plan_arguments():
    torch = _torch()
    desc = dqgen.DequantizePerGroupDescriptor(2, 8, 4, "bf16", "s8")
    plan = dqgen.DequantizePerGroupPlan.select(desc)
    q = torch.arange(16, dtype=torch.int8).reshape(2, 8)
    scale = torch.full((2, 2), 0.5, dtype=torch.bfloat16)
    zp = torch.zeros((2, 2), dtype=torch.int32)
    out = torch.empty((2, 8), dtype=torch.bfloat16)
    plan.run(dqgen.DequantizePerGroupArgs(q, scale, zp, out))
    assert out.float().tolist() == (torch.arange(16).reshape(2, 8) * 0.5).tolist()
    with pytest.raises(dqgen.InvalidProblemError, match="output"):
        plan.run(dqgen.DequantizePerGroupArgs(q, scale, zp, torch.empty((2, 16), dtype=torch.bfloat16)[:, ::2]))
    with pytest.raises(dqgen.InvalidProblemError, match="scale"):
        plan.run(dqgen.DequantizePerGroupArgs(q, scale.float(), zp, out))
    with pytest.raises(dqgen.InvalidProblemError, match="overlap"):
        plan.run(dqgen.DequantizePerGroupArgs(q, out.view(-1)[4:8].view(2, 2), zp, out))


# ------------------------------------------------------- choose_qparams

@pytest.mark.parametrize("float_name", S.FLOAT_NAMES)
@pytest.mark.parametrize("int_name", S.INT_NAMES)
@pytest.mark.parametrize("symmetric", [False, True])
def test_choose_qparams_constant_groups_get_a_positive_scale(float_name, int_name, symmetric):
    x = np.array([[0.0] * 8 + [5.0] * 8 + [-3.0] * 8 + [1e-30] * 8]).astype(S.np_dtype(float_name))
    scale, zp = dqgen.choose_qparams_per_group(x, 8, dtype=int_name, symmetric=symmetric)
    assert scale.shape == (1, 4) and scale.dtype == S.np_dtype(float_name)
    assert zp.shape == (1, 4) and zp.dtype == np.int32
    s = scale.astype(np.float64)
    assert (s > 0).all() and np.isfinite(s).all()
    lo, hi = S.INT_RANGES[int_name]
    assert ((lo <= zp) & (zp <= hi)).all()
    q = dqgen.quantize_per_group(x, scale, zp, 8, dtype=int_name)
    y = dqgen.dequantize_per_group(q, scale, zp, 8)
    err = np.abs(y.astype(np.float64) - x.astype(np.float64))
    assert (err <= np.repeat(s, 8, axis=1) / 2 + 4 * float(S.finfo(float_name).eps) * np.abs(x.astype(np.float64))).all()


def test_choose_qparams_symmetric_zero_point_is_the_middle():
    x = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
    _, zp = dqgen.choose_qparams_per_group(x, 32, dtype="s8", symmetric=True)
    assert (zp == 0).all()
    _, zp = dqgen.choose_qparams_per_group(x, 32, dtype="u8", symmetric=True)
    assert (zp == 128).all()
    _, zp = dqgen.choose_qparams_per_group(x, 32, dtype="s8", symmetric=True, q_min=-8, q_max=7)
    assert (zp == 0).all()
    scale, zp = dqgen.choose_qparams_per_group(x, 32, dtype="u8", symmetric=True, q_min=0, q_max=15)
    assert (zp == 8).all()
    amax = np.abs(x).reshape(3, 2, 32).max(axis=-1)
    np.testing.assert_allclose(scale, amax / 7.5, rtol=1e-6)


def test_choose_qparams_ignores_nan_and_returns_torch_for_torch():
    x = np.linspace(-1, 3, 32, dtype=np.float32)[None, :].copy()
    x[0, 5] = np.nan
    scale, zp = dqgen.choose_qparams_per_group(x, 16)
    assert np.isfinite(scale).all() and (scale > 0).all()
    torch = pytest.importorskip("torch", reason="torch (CPU build) is an optional test dependency")
    ts, tz = dqgen.choose_qparams_per_group(torch.from_numpy(x), 16)
    assert isinstance(ts, torch.Tensor) and isinstance(tz, torch.Tensor)
    assert ts.numpy().tobytes() == scale.tobytes() and tz.numpy().tolist() == zp.tolist()


def test_choose_qparams_round_trip_with_floored_f16_scales():
    # 2e-4 / 255 = 7.8e-7 is below f16's smallest normal: the scale is that floor (6.1e-5,
    # not a subnormal that rounds below the range and saturates), and values come back
    # within half a step.
    x = np.array([[2e-4] * 4 + [0.0] * 4], np.float16)
    scale, zp = dqgen.choose_qparams_per_group(x, 8, dtype="s8")
    assert scale[0, 0] == np.finfo(np.float16).smallest_normal
    y = dqgen.dequantize_per_group(dqgen.quantize_per_group(x, scale, zp, 8), scale, zp, 8)
    s = np.repeat(scale.astype(np.float64), 8, axis=1)
    err = np.abs(y.astype(np.float64) - x.astype(np.float64))
    assert (err <= s / 2 + 2 * float(S.finfo("f16").eps) * np.abs(x.astype(np.float64))).all()


@S.examples(0.5)
@given(float_name=st.sampled_from(S.FLOAT_NAMES), int_name=st.sampled_from(S.INT_NAMES),
       symmetric=st.booleans(), group_size=st.sampled_from((1, 7, 32)),
       seed=st.integers(0, 2**32 - 1), magnitude=st.sampled_from((1e-3, 1.0, 100.0)),
       offset=st.sampled_from((0.0, 1.0, -5.0)),
       narrow=st.booleans())
def test_choose_qparams_then_quantize_round_trips(float_name, int_name, symmetric, group_size,
                                                  seed, magnitude, offset, narrow):
    """Every value of a group lies inside its chosen range, so it comes back within half a
    step (plus F's rounding). f16 groups of ~1e-3 get the smallest-normal floor: tested above."""
    if float_name == "f16" and magnitude < 0.01:
        magnitude = 0.05
    rng = np.random.default_rng(seed)
    fdt = S.np_dtype(float_name)
    x = ((rng.standard_normal((5, group_size * 3)) + offset) * magnitude).astype(fdt)
    lo, hi = S.INT_RANGES[int_name]
    q_range = {} if not narrow else ({"q_min": 0, "q_max": 15} if int_name == "u8" or symmetric
                                     else {"q_min": -8, "q_max": 7})
    scale, zp = dqgen.choose_qparams_per_group(x, group_size, dtype=int_name, symmetric=symmetric,
                                               **q_range)
    q_lo, q_hi = q_range.get("q_min", lo), q_range.get("q_max", hi)
    assert ((q_lo <= zp) & (zp <= q_hi)).all()
    assert (scale.astype(np.float64) > 0).all()
    q = dqgen.quantize_per_group(x, scale, zp, group_size, dtype=int_name, **q_range)
    y = dqgen.dequantize_per_group(q, scale, zp, group_size)
    s = np.repeat(scale.astype(np.float64), group_size, axis=1)
    xf, yf = x.astype(np.float64), y.astype(np.float64)
    eps = float(S.finfo(float_name).eps)
    slack = 2 * eps * (np.abs(xf) + np.abs(yf)) + 2 * eps * s
    err = np.abs(yf - xf)
    assert (err <= s / 2 + slack).all(), float((err - s / 2 - slack).max())
