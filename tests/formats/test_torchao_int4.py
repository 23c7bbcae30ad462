"""torchao's ``Int4Tensor`` (``Int4WeightOnlyConfig``, plain packing): ``W = F(F(q * scale)
+ zero)`` with the scales stored transposed, bit for bit with the weight torchao builds
(its own ``quantize_``, mslk's quantize rewritten in ``tests/oracles/torchao_int4.py``)
and the values its linear multiplies with, for bf16 and f16 weights, group sizes 32, 64
and 128, on every ISA this CPU runs and in the CUDA text's host emulation; the fused
linear over those values."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from dqgen import InvalidProblemError, UnsupportedError, reference
from dqgen.formats import torchao_int4
from dqgen.formats.weight import linear
from dqgen.ir import DequantizeFloatZeroDescriptor
from formats_util import assert_bits_equal, random_f16
from strategies import ISAS

torch = pytest.importorskip("torch", reason="torch is the oracle's runtime")
int4_module = pytest.importorskip("torchao.quantization.quantize_.workflows.int4.int4_tensor",
                                  reason="torchao (pip install torchao) makes the Int4Tensor")
from oracles import torchao_int4 as oracle  # noqa: E402  (imports torch)

TORCH_FLOATS = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}
NUMPY_FLOATS = {torch.bfloat16: ml_dtypes.bfloat16, torch.float16: np.float16,
                torch.float32: np.float32}


@pytest.fixture
def torchao_quantize(monkeypatch):
    """``quantize_(linear, Int4WeightOnlyConfig(group_size))`` run by torchao itself on the
    CPU, mslk's two functions (a CUDA package) replaced by their rewrites: the layer's
    weight becomes torchao's own ``Int4Tensor``."""
    from torchao.quantization import Int4WeightOnlyConfig, quantize_
    monkeypatch.setattr(int4_module, "int4_row_quantize_zp", oracle.int4_row_quantize_zp)
    monkeypatch.setattr(int4_module, "pack_int4", oracle.pack_int4)

    def run(w: torch.Tensor, group_size: int):
        layer = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=w.dtype)
        with torch.no_grad():
            layer.weight.copy_(w)
        quantize_(layer, Int4WeightOnlyConfig(group_size=group_size))
        assert type(layer.weight).__name__ == "Int4Tensor"
        return layer.weight
    return run


def weights(seed: int, n: int, k: int, dtype) -> torch.Tensor:
    """A weight with groups of very different ranges (tiny, wide, constant, one-sided)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.logspace(-4, 2, n).reshape(n, 1)
    w[0, : k // 2] = 0.5                                  # constant groups: scale 1e-6
    w[1] = w[1].abs() + 3                                  # one-sided: zero far from 0
    return w.to(dtype)


def bits(t: torch.Tensor) -> np.ndarray:
    """A torch float tensor's values as numpy (bf16 through ml_dtypes), bits kept."""
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def int4_arrays(rng, lead, n, k, g, dtype):
    """Random packed bytes (every nibble) and scales/zeros with the float's specials
    (infinities, subnormals, both zeros), transposed as Int4Tensor keeps them."""
    qdata = torch.from_numpy(rng.integers(-128, 128, (*lead, n, k // 2), dtype=np.int8))
    raw = random_f16(rng, (2, *lead, k // g, n)).astype(np.float32)
    scale, zero = (torch.from_numpy(a).to(dtype) for a in raw)
    return qdata, scale, zero


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("float_name", ["bf16", "f16"])
def test_matches_torchao(torchao_quantize, float_name, group_size):
    """torchao's own Int4Tensor of a bf16/f16 weight with several groups a row: read
    whole, and as its three arrays (torch and numpy), the same bits as the oracle."""
    dtype = TORCH_FLOATS[float_name]
    w = weights(group_size, 6, 384, dtype)
    t = torchao_quantize(w, group_size)
    want = oracle.dequantize(t.qdata, t.scale, t.zero_point, group_size)
    got = torchao_int4.dequantize(t)
    assert isinstance(got, torch.Tensor) and got.dtype == dtype and got.shape == (6, 384)
    assert_bits_equal(bits(got), bits(want))
    assert_bits_equal(bits(torchao_int4.dequantize(t.qdata, t.scale, t.zero_point)),
                      bits(want))
    arrays = [t.qdata.numpy(), bits(t.scale), bits(t.zero_point)]
    assert_bits_equal(torchao_int4.dequantize(*arrays, group_size=group_size), bits(want))
    err = (want.float() - w.float()).abs().max() / w.float().abs().max()
    assert err < 0.1   # a real quantization of w, not a layout accident


def test_every_nibble_and_special_scales():
    """All 16 values of each nibble, scales and zeros with infinities, subnormals and
    signed zeros: the oracle's bits (NaN where it has NaN)."""
    rng = np.random.default_rng(1)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        qdata, scale, zero = int4_arrays(rng, (), 8, 256, 32, dtype)
        got = torchao_int4.dequantize(qdata, scale, zero, 32)
        assert_bits_equal(bits(got), bits(oracle.dequantize(qdata, scale, zero, 32)))


def test_product_rounds_before_the_sum():
    """q = 7, bf16 scale 0.3359375, zero -2: 7 * s = 2.3515625 rounds to bf16 (2.34375, a
    tie to even) before the sum, as the kernel's two bf16 operations do: 0.34375; one
    rounding of the whole expression would give 0.3515625."""
    bf16 = ml_dtypes.bfloat16
    s, z = np.array([[0.3359375]], bf16), np.array([[-2.0]], bf16)
    y = torchao_int4.dequantize(np.array([[0x07]], np.int8), s, z, 2)
    assert y.astype(np.float32).tolist() == [[0.34375, -2.0]]
    fused = np.float32(7 * 0.3359375 - 2.0).astype(bf16)
    assert float(fused) == 0.3515625


@pytest.mark.parametrize("isa", ISAS)
def test_every_isa(isa, monkeypatch):
    monkeypatch.setenv("DQGEN_ISA", isa)
    rng = np.random.default_rng(2)
    qdata, scale, zero = int4_arrays(rng, (), 5, 384, 32, torch.bfloat16)
    got = torchao_int4.dequantize(qdata, scale, zero, 32)
    assert_bits_equal(bits(got), bits(oracle.dequantize(qdata, scale, zero, 32)))


def test_experts_out_and_dtype():
    """A MoE layer's [E, N, K / 2] with [E, K / g, N] scales; out= written in place; a
    dtype other than F converts the F values (exactly to f32)."""
    rng = np.random.default_rng(3)
    qdata, scale, zero = int4_arrays(rng, (3,), 4, 128, 32, torch.bfloat16)
    want = bits(oracle.dequantize(qdata, scale, zero, 32))
    out = np.empty((3, 4, 128), ml_dtypes.bfloat16)
    got = torchao_int4.dequantize(qdata.numpy(), bits(scale), bits(zero), out=out)
    assert got is out
    assert_bits_equal(out, want)
    wide = torchao_int4.dequantize(qdata, scale, zero, dtype="f32")
    assert wide.dtype == torch.float32
    assert_bits_equal(bits(wide), want.astype(np.float32))
    out32 = np.empty((3, 4, 128), np.float32)
    assert torchao_int4.dequantize(qdata.numpy(), bits(scale), bits(zero), dtype="f32",
                                   out=out32) is out32
    assert_bits_equal(out32, want.astype(np.float32))
    out16 = torch.empty(3, 4, 128, dtype=torch.float16)
    assert torchao_int4.dequantize(qdata, scale, zero, dtype="f16", out=out16) is out16
    with np.errstate(over="ignore"):   # bf16 beyond f16's range: inf, as torch's .to
        assert_bits_equal(bits(out16), want.astype(np.float16))


def test_refusals_name_the_argument():
    rng = np.random.default_rng(4)
    qdata, scale, zero = int4_arrays(rng, (), 4, 64, 32, torch.bfloat16)
    with pytest.raises(InvalidProblemError, match=r"scale has shape \(4, 2\).*transposed"):
        torchao_int4.dequantize(qdata, scale.t(), zero.t())   # [N, K / g]: not transposed
    with pytest.raises(InvalidProblemError, match="zero_point has dtype float16"):
        torchao_int4.dequantize(qdata, scale, zero.to(torch.float16))
    with pytest.raises(InvalidProblemError, match="qdata has dtype float32"):
        torchao_int4.dequantize(qdata.float(), scale, zero)
    with pytest.raises(InvalidProblemError, match="group_size=16"):
        torchao_int4.dequantize(qdata, scale, zero, group_size=16)
    with pytest.raises(InvalidProblemError, match="zero_point has shape"):
        torchao_int4.dequantize(qdata, scale, zero[:1])
    with pytest.raises(UnsupportedError, match="scale has dtype float64"):
        torchao_int4.dequantize(qdata, scale.double(), zero.double())
    with pytest.raises(InvalidProblemError, match="pass qdata, scale and zero_point"):
        torchao_int4.dequantize(qdata)
    other = type("Int4PreshuffledTensor", (), {})()
    with pytest.raises(UnsupportedError, match="PRESHUFFLED"):
        torchao_int4.dequantize(other)


def test_a_tensor_is_read_whole(torchao_quantize):
    t = torchao_quantize(weights(5, 4, 128, torch.bfloat16), 64)
    with pytest.raises(InvalidProblemError, match="carries its scale"):
        torchao_int4.dequantize(t, t.scale, t.zero_point)
    with pytest.raises(InvalidProblemError, match="block_size"):
        torchao_int4.dequantize(t, group_size=32)
    assert_bits_equal(bits(torchao_int4.dequantize(t, group_size=64)),
                      bits(oracle.dequantize(t.qdata, t.scale, t.zero_point, 64)))


def test_linear_over_the_weights_values(torchao_quantize):
    """The fused linear reads the Int4Tensor's values (in F, widened): the reference
    linear over the oracle's weight, bit for bit, x f32 and bf16 (with a bias)."""
    rng = np.random.default_rng(6)
    t = torchao_quantize(weights(6, 7, 192, torch.bfloat16), 32)
    qw = torchao_int4.weight(t)
    assert qw.shape == (7, 192)
    w = bits(oracle.dequantize(t.qdata, t.scale, t.zero_point, 32)).astype(np.float32)
    assert_bits_equal(qw.dequantize("f32"), w)
    x = rng.standard_normal((3, 192)).astype(np.float32)
    assert_bits_equal(linear(x, qw), reference.linear(x, w, None, np.float32))
    xb = x.astype(ml_dtypes.bfloat16)
    bias = rng.standard_normal(7).astype(ml_dtypes.bfloat16)
    assert_bits_equal(linear(xb, qw, bias), reference.linear(xb, w, bias, ml_dtypes.bfloat16))


def test_linear_refuses_what_it_cannot_apply(torchao_quantize):
    t = torchao_quantize(weights(7, 4, 64, torch.bfloat16), 32)
    t.act_pre_scale = torch.ones(64, dtype=torch.bfloat16)
    with pytest.raises(UnsupportedError, match="act_pre_scale"):
        torchao_int4.weight(t)
    rng = np.random.default_rng(7)
    qdata, scale, zero = int4_arrays(rng, (2,), 4, 64, 32, torch.bfloat16)
    with pytest.raises(InvalidProblemError, match="one expert at a time"):
        torchao_int4.weight(qdata, scale, zero)


def test_cuda_text_in_emulation(tmp_path):
    """The float zero point's CUDA text with s4 storage and mid 0, compiled for the host
    (tests/cuda_emu), against the oracle."""
    from test_formats_cuda import needs_gxx, run_emulated
    if needs_gxx.args[0]:
        pytest.skip(needs_gxx.kwargs["reason"])
    rng = np.random.default_rng(8)
    qdata, scale, zero = int4_arrays(rng, (), 4, 64, 32, torch.bfloat16)
    desc = DequantizeFloatZeroDescriptor(4, 64, 32, "bf16", "s4")
    y = np.zeros((4, 64), ml_dtypes.bfloat16)
    rows = [torchao_int4.transposed(bits(a), "scale") for a in (scale, zero)]
    run_emulated(desc, [qdata.numpy().view(np.uint8), *rows, y], [4, 64], y.size, tmp_path)
    assert_bits_equal(y, bits(oracle.dequantize(qdata, scale, zero, 32)))
