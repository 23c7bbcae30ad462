"""``choose_qparams_per_group``: the scale's floor (the dtype's smallest normal, as
torchao's) and its rounding to f16/bf16 (up, on purpose: see the docstring)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dqgen
from formats_util import FLOATS


def _torchao():
    torch = pytest.importorskip("torch", reason="torch is the oracle's runtime")
    qp = pytest.importorskip("torchao.quantization.quant_primitives",
                             reason="torchao (pip install torchao) is the oracle")
    return torch, qp


def _round_trip(x, group, dtype="s8", q_min=None, q_max=None, qparams=None):
    scale, zp = qparams or dqgen.choose_qparams_per_group(x, group, dtype=dtype, q_min=q_min,
                                                          q_max=q_max)
    q = dqgen.quantize_per_group(x, scale, zp, group, dtype=dtype, q_min=q_min, q_max=q_max)
    return dqgen.dequantize_per_group(q, scale, zp, group), scale


@pytest.mark.parametrize("float_dtype", ["f16", "bf16", "f32", "f64"])
def test_floor_is_the_smallest_normal(float_dtype):
    f = FLOATS[float_dtype]
    x = np.zeros((1, 16), f)
    x[0, 8:] = 1e-30 if float_dtype in ("f32", "f64") else 0
    scale, zp = dqgen.choose_qparams_per_group(x, 8, dtype="u8")
    assert scale[0, 0] == np.finfo(f).smallest_normal and zp[0, 0] == 0
    if float_dtype in ("f32", "f64"):  # 1e-30 / 255 is above the floor: its own scale
        assert scale[0, 1] == f.type(1e-30) / f.type(255)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("dtype,q_range", [("s8", (None, None)), ("u8", (0, 15))])
def test_tiny_f32_weights_match_torchao(symmetric, dtype, q_range):
    """Weights ~1e-7: the scales and zero points equal torchao's bit for bit (f32 needs no
    rounding), and so does the round trip error (half a step of about 1e-9 for s8, not
    the 6e-8 of an f32 epsilon floor)."""
    torch, qp = _torchao()
    x = (np.random.default_rng(3).standard_normal((16, 64)) * 1e-7).astype(np.float32)
    scale, zp = dqgen.choose_qparams_per_group(x, 32, dtype=dtype, symmetric=symmetric,
                                               q_min=q_range[0], q_max=q_range[1])
    lo, hi = (-128, 127) if dtype == "s8" else q_range
    mapping = qp.MappingType.SYMMETRIC if symmetric else qp.MappingType.ASYMMETRIC
    int_dtype = torch.int8 if dtype == "s8" else torch.uint8
    xt = torch.from_numpy(x)
    ts, tz = qp.choose_qparams_affine(xt, mapping, (1, 32), int_dtype, lo, hi)
    assert scale.tobytes() == ts.numpy().reshape(scale.shape).tobytes()
    assert zp.tolist() == tz.numpy().reshape(zp.shape).tolist()
    tq = qp.quantize_affine(xt, (1, 32), ts, tz, int_dtype, lo, hi)
    ty = qp.dequantize_affine(tq, (1, 32), ts, tz, int_dtype, lo, hi).numpy()
    y, _ = _round_trip(x, 32, dtype, q_range[0], q_range[1], (scale, zp))
    err, torchao_err = np.abs(y - x).max(), np.abs(ty - x).max()
    assert err <= torchao_err * (1 + 1e-6) and err <= 0.5 * scale.max()
    assert scale.max() < np.finfo(np.float32).eps   # the old floor clamped every group


def _nearest_qparams(x, group, hi):
    """The same quotient rounded to nearest (torchao's choice), zero point as dqgen's."""
    c = x.astype(np.float32).reshape(x.shape[0], -1, group)
    lo_v, hi_v = np.minimum(c.min(-1), 0), np.maximum(c.max(-1), 0)
    scale = ((hi_v - lo_v) / np.float32(hi)).astype(x.dtype)
    zp = np.clip(-np.rint(lo_v / scale.astype(np.float32)), 0, hi).astype(np.int32)
    return scale, zp


def _violations(x, y, scale, group, eps):
    """Values further from x than half a step plus half an ulp of the result."""
    s = np.repeat(scale.astype(np.float64), group, axis=1)
    y64 = y.astype(np.float64)
    return int((np.abs(y64 - x.astype(np.float64)) > s / 2 + eps / 2 * np.abs(y64)).sum())


@pytest.mark.parametrize("float_dtype", ["bf16", "f16"])
def test_16_bit_scales_round_up_so_no_value_saturates(float_dtype):
    """A scale rounded to nearest can be below range / (q_max - q_min): the group's extreme
    saturates, up to almost two steps off for bf16 (the test sees such values). Rounded up,
    every value comes back within half a step (plus the result's own rounding)."""
    f = FLOATS[float_dtype]
    eps = float(ml_dtypes.finfo(f).eps)
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((2000, 32)) + rng.choice([0, 3], size=(2000, 1))).astype(f)
    y, scale = _round_trip(x, 32, "u8")
    assert _violations(x, y, scale, 32, eps) == 0
    exact = (np.maximum(x.astype(np.float32).max(1), 0) - np.minimum(x.astype(np.float32).min(1), 0)) / 255
    assert (scale[:, 0].astype(np.float32) >= exact).all()
    nearest = _nearest_qparams(x, 32, 255)
    y_near, _ = _round_trip(x, 32, "u8", qparams=nearest)
    assert _violations(x, y_near, nearest[0], 32, eps) > 0   # why the rounding is up


@settings(max_examples=40, deadline=None)
@given(float_dtype=st.sampled_from(["f16", "bf16", "f32", "f64"]),
       magnitude=st.sampled_from([1e-7, 1e-3, 1.0, 300.0]), symmetric=st.booleans(),
       seed=st.integers(0, 2**32 - 1))
def test_scale_is_the_quotient_rounded_up_above_the_floor(float_dtype, magnitude, symmetric, seed):
    """scale = the smallest F value >= max(quotient in the compute type, F's smallest normal)."""
    f = FLOATS[float_dtype]
    c = np.float64 if float_dtype == "f64" else np.float32
    x = (np.random.default_rng(seed).standard_normal((4, 64)) * magnitude).astype(f)
    scale, _ = dqgen.choose_qparams_per_group(x, 16, dtype="s8", symmetric=symmetric)
    g = x.astype(c).reshape(4, 4, 16)
    lo_v, hi_v = np.minimum(g.min(-1), 0), np.maximum(g.max(-1), 0)
    quotient = (np.maximum(-lo_v, hi_v) / c(127.5) if symmetric else (hi_v - lo_v) / c(255))
    want = np.maximum(quotient, c(np.finfo(f).smallest_normal))
    s = scale.astype(c)
    assert (s >= want).all()
    below = np.nextafter(s.astype(f), np.asarray(0, f)) if f != FLOATS["bf16"] else \
        (scale.view(np.uint16) - 1).view(f)
    assert (below.astype(c) < want).all()   # one F step down is below the exact value
