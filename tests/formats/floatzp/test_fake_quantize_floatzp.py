"""torchao's FLOAT zero-point domain (tinygemm) end to end, bit for bit against torchao's
own functions: ``choose_qparams_per_group(..., zero_point_domain="float")`` against
``_choose_qparams_affine_tinygemm``, ``floatzp.quantize`` against
``_quantize_affine_tinygemm``, and ``fake_quantize_per_group`` with a float zero point
against ``_fake_quantize_affine(..., ZeroPointDomain.FLOAT)``, values and gradients, on
f32, bf16 and f16."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import dqgen
from dqgen import InvalidProblemError, UnsupportedError
from dqgen.formats import floatzp

torch = pytest.importorskip("torch", reason="torchao is the oracle; it runs on torch")
qp = pytest.importorskip("torchao.quantization.quant_primitives",
                         reason="torchao (pip install torchao) is the oracle")
import dqgen.torch as dt  # noqa: E402

G = 32
FLOATS = ["float32", "bfloat16", "float16"]
# (q_min, q_max, the torch dtype torchao checks them against): mids 8, 7.5, 0, 128, -36
RANGES = [(0, 15, "uint4"), (0, 14, "uint8"), (-8, 7, "int8"), (0, 255, "uint8"),
          (-100, 27, "int8")]


def _x(float_dtype: str, rows=6, cols=128, seed=0) -> "torch.Tensor":
    """Weights of several magnitudes, a constant group, a group of tiny values, and
    groups wholly positive or negative (0 is not in every range)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    x *= 10.0 ** torch.randint(-6, 3, (rows, 1), generator=gen)
    x[0, :G] = 0.25
    x[1, :G] = x[1, :G] * 1e-30
    x[2, G:2 * G] = x[2, G:2 * G].abs() + 3
    x[3, G:2 * G] = -x[3, G:2 * G].abs() - 3
    return x.to(getattr(torch, float_dtype))


def _np(t: "torch.Tensor") -> np.ndarray:
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _torch(a: np.ndarray) -> "torch.Tensor":
    if a.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def _equal(got: "torch.Tensor", want: "torch.Tensor") -> None:
    """Same dtype, same bits, NaN where torchao has NaN."""
    assert got.dtype == want.dtype and got.shape == want.shape
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan)
    assert torch.equal(got[~nan], want[~nan]), (got[~nan] != want[~nan]).nonzero()[:3]


def _torchao_qparams(x, q_min, q_max, torch_dtype):
    return qp._choose_qparams_affine_tinygemm(x, qp.MappingType.ASYMMETRIC, (1, G),
                                              getattr(torch, torch_dtype), q_min, q_max)


@pytest.mark.parametrize("float_dtype", FLOATS)
@pytest.mark.parametrize("q_min,q_max,torch_dtype", RANGES)
def test_choose_qparams_matches_torchao(float_dtype, q_min, q_max, torch_dtype):
    x = _x(float_dtype)
    want_scale, want_zero = _torchao_qparams(x, q_min, q_max, torch_dtype)
    storage = "s8" if q_min < 0 else "u8"
    scale, zero = dqgen.choose_qparams_per_group(x, G, int_dtype=storage, q_min=q_min,
                                                 q_max=q_max, zero_point_domain="float")
    _equal(scale, want_scale)
    _equal(zero, want_zero)
    s_np, z_np = dqgen.choose_qparams_per_group(_np(x), G, int_dtype=storage, q_min=q_min,
                                                q_max=q_max, zero_point_domain="float")
    assert s_np.tobytes() == _np(want_scale).tobytes()
    assert z_np.tobytes() == _np(want_zero).tobytes()


def test_choose_qparams_u4_defaults_and_torchao_enum():
    """``int_dtype="u4"`` gives [0, 15]; torchao's ZeroPointDomain.FLOAT is taken by name."""
    x = _x("bfloat16", seed=1)
    want_scale, want_zero = _torchao_qparams(x, 0, 15, "uint4")
    scale, zero = dqgen.choose_qparams_per_group(x, G, "u4",
                                                 zero_point_domain=qp.ZeroPointDomain.FLOAT)
    _equal(scale, want_scale)
    _equal(zero, want_zero)


@pytest.mark.parametrize("float_dtype", FLOATS)
def test_quantize_matches_torchao(float_dtype):
    """One value a byte as torchao stores it (u8), and packed u4 (two a byte)."""
    x = _x(float_dtype, seed=2)
    scale, zero = _torchao_qparams(x, 0, 15, "uint4")
    x[4, 3], x[5, 7] = float("inf"), -float("inf")
    want = qp._quantize_affine_tinygemm(x, (1, G), scale, zero, torch.uint4, 0, 15)
    got = floatzp.quantize(x, scale, zero, G, int_dtype="u8", q_min=0, q_max=15)
    assert torch.equal(got, want)
    packed = floatzp.quantize(_np(x), _np(scale), _np(zero), G)
    assert np.array_equal(packed, (want[:, 0::2] | (want[:, 1::2] << 4)).numpy())


@pytest.mark.parametrize("float_dtype", FLOATS)
@pytest.mark.parametrize("q_min,q_max,torch_dtype", RANGES)
def test_fake_quantize_matches_torchao(float_dtype, q_min, q_max, torch_dtype):
    """Values (infinities, NaN, a zero scale's 0 / 0 included) and the gradient for x,
    as torch's autograd computes it through torchao's fake quantize."""
    x = _x(float_dtype, seed=3) * 1.5  # beyond the range the qparams cover
    scale, zero = _torchao_qparams(_x(float_dtype, seed=3), q_min, q_max, torch_dtype)
    x[4, 0], x[4, 1], x[4, 2] = float("inf"), -float("inf"), float("nan")
    scale[5, 1] = 0
    x_ao, x_dq = x.clone().requires_grad_(), x.clone().requires_grad_()
    want = qp._fake_quantize_affine(x_ao, (1, G), scale, zero, getattr(torch, torch_dtype),
                                    q_min, q_max, qp.ZeroPointDomain.FLOAT)
    got = dt.fake_quantize_per_group(x_dq, scale, zero, G, q_min, q_max)
    _equal(got, want.detach())
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(4)).to(x.dtype)
    want.backward(dy)
    got.backward(dy)
    _equal(x_dq.grad, x_ao.grad)
    on_numpy = floatzp.fake_quantize(_np(x), _np(scale), _np(zero), G, q_min, q_max)
    _equal(_torch(on_numpy), want.detach())


def test_fake_quantize_float_zero_opcheck():
    x = _x("float32", rows=4, cols=64, seed=5)
    scale, zero = _torchao_qparams(x, 0, 15, "uint4")
    torch.library.opcheck(dt.fake_quantize_per_group.overload,
                          (x.clone().requires_grad_(), scale, zero, G, 0, 15))


def test_float_zero_errors():
    x = _x("float32", rows=4, cols=64)
    scale, zero = _torchao_qparams(x, 0, 15, "uint4")
    with pytest.raises(UnsupportedError, match="symmetric=True needs integer zero points"):
        dqgen.choose_qparams_per_group(x, G, "u4", symmetric=True, zero_point_domain="float")
    with pytest.raises(UnsupportedError, match="zero_point_domain='none'"):
        dqgen.choose_qparams_per_group(x, G, "u4", zero_point_domain="none")
    with pytest.raises(InvalidProblemError, match="zero_point has dtype bfloat16"):
        floatzp.quantize(x, scale, zero.bfloat16(), G)
    with pytest.raises(InvalidProblemError, match=r"scale has shape \(4, 1\), expected \(4, 2\)"):
        dt.fake_quantize_per_group(x, scale[:, :1].contiguous(), zero, G, 0, 15)
    scale.requires_grad_()
    y = dt.fake_quantize_per_group(x, scale, zero, G, 0, 15)
    with pytest.raises(UnsupportedError, match="no gradient for scale or zero_point"):
        y.sum().backward()
