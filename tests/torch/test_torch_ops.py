"""dqgen.torch: the registered ops against SPEC.md written in torch, opcheck, QAT, compile, export.

The references below are SPEC.md sections 3 and 4 as plain torch code (no dqgen), so an
op equal to them bit for bit is right by the spec's definition; the gradients are
elementwise formulas and are compared exactly too. Only the ``scale`` gradients are sums,
compared with the same sums written out here.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import strategies as S

torch = pytest.importorskip("torch", reason="torch (CPU build) is an optional dependency; "
                            "`pip install torch` to run the dqgen.torch operator tests")

import dqgen  # noqa: E402
import dqgen.torch as dt  # noqa: E402
from dqgen.formats import ggml  # noqa: E402
from dqgen.formats.pack import quantize_awq, quantize_gptq  # noqa: E402

OPS = tuple(getattr(dt, name) for name in dt.__all__ if hasattr(getattr(dt, name), "overload"))
FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
gpu = pytest.mark.skipif(not torch.cuda.is_available(),
                         reason="needs a CUDA device and a CUDA build of torch")


# --------------------------------------------------------------------------- SPEC.md in torch

def compute(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def per_element(params, group_size):
    return params.repeat_interleave(group_size, dim=-1)


def ref_quantized(x, scale, zp, group_size, q_min, q_max):
    """``(q, inside)``: SPEC.md 4's levels (as f64) and the inclusive STE mask."""
    c = compute(x.dtype)
    s = per_element(scale.to(c), group_size)
    z = per_element(zp.to(torch.float64), group_size)
    t = torch.where(s == 0, torch.zeros((), dtype=c), x.to(c) / torch.where(s == 0, 1, s))
    r = torch.round(t).to(torch.float64)
    inside = (r + z >= q_min) & (r + z <= q_max) & (s != 0)  # a NaN r is outside
    return torch.where(torch.isnan(r), z, r + z).clamp(q_min, q_max), inside


def ref_fake_quantize(x, scale, zp, group_size, q_min, q_max):
    """SPEC.md 3 applied to SPEC.md 4: ``F(C(q - zp) * C(scale))``."""
    c = compute(scale.dtype)
    q, _ = ref_quantized(x, scale, zp, group_size, q_min, q_max)
    diff = (q.to(torch.int64) - per_element(zp.to(torch.int64), group_size)).to(c)
    return (diff * per_element(scale.to(c), group_size)).to(scale.dtype)


def ref_fake_quantize_grad(dy, x, scale, zp, group_size, q_min, q_max):
    """The chain: ``dq = F(C(dy) * C(s))``, then ``dx = F(C(dq) / C(s))`` inside, else 0."""
    c = compute(scale.dtype)
    s = per_element(scale.to(c), group_size)
    dq = (dy.to(c) * s).to(dy.dtype)
    _, inside = ref_quantized(x, scale, zp, group_size, q_min, q_max)
    dx = torch.where(inside, dq.to(c) / torch.where(s == 0, 1, s), torch.zeros((), dtype=c))
    return dx.to(dy.dtype)


class RefFakeQuantize(torch.autograd.Function):
    """The same fake quantize as plain torch, for the training comparison."""

    @staticmethod
    def forward(ctx, x, scale, zp, group_size, q_min, q_max):
        ctx.save_for_backward(x, scale, zp)
        ctx.args = (group_size, q_min, q_max)
        return ref_fake_quantize(x, scale, zp, group_size, q_min, q_max)

    @staticmethod
    def backward(ctx, dy):
        x, scale, zp = ctx.saved_tensors
        return (ref_fake_quantize_grad(dy, x, scale, zp, *ctx.args), None, None, None, None,
                None)


def assert_bits(got, want):
    """Equal bit patterns, NaN where the reference is NaN (SPEC.md's equality)."""
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, got.shape,
                                                                 want.dtype, want.shape)
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan)
    width = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[got.element_size()]
    same = got.contiguous().view(width) == want.contiguous().view(width)
    bad = ~(same | nan)
    assert not bad.any(), f"{int(bad.sum())} differ, first at {bad.nonzero()[0].tolist()}"


def special_values(shape, dtype, seed):
    """Normal values with zeros, signed infinities, NaN and subnormals sprinkled in."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 3
    flat = x.view(-1)
    tiny = torch.finfo(dtype).tiny
    specials = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"),
                             tiny / 4, -tiny / 2, 0.5, 1.5, -2.5], dtype=torch.float64)
    idx = torch.randperm(flat.numel(), generator=gen)[:specials.numel()]
    flat[idx] = specials
    return x.to(dtype)


def qparams(x, group_size, dtype="s8", seed=0):
    scale, zp = dqgen.choose_qparams_per_group(x.detach().to(torch.float32), group_size,
                                               dtype=dtype)
    scale = scale.to(x.dtype)
    scale.view(-1)[seed % scale.numel()] = 0  # a zero scale: t = 0, no gradient
    return scale, zp


# --------------------------------------------------------------------------- import

def test_dqgen_imports_without_torch_and_dqgen_torch_says_what_it_needs():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import dqgen\n"
            "try:\n    import dqgen.torch\nexcept ImportError as e:\n    print('ERR', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "ERR dqgen.torch needs PyTorch" in out.stdout, out.stdout + out.stderr


# --------------------------------------------------------------------------- opcheck

def _gptq_layer(seed=0):
    w = np.random.default_rng(seed).standard_normal((64, 16)).astype(np.float32)
    return {k: torch.from_numpy(v) for k, v in quantize_gptq(w, 32).items()}


def _awq_layer(seed=0):
    w = np.random.default_rng(seed).standard_normal((64, 16)).astype(np.float32)
    return {k: torch.from_numpy(v) for k, v in quantize_awq(w, 32).items()}


def _ggml_blocks(qtype, rows=2, blocks=2, seed=0):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (rows, blocks * ggml.block_bytes(qtype)), dtype=np.uint8)
    d = data.reshape(rows * blocks, -1)
    d[:, :2] = np.frombuffer(rng.uniform(0.01, 1, rows * blocks).astype(np.float16).tobytes(),
                             np.uint8).reshape(-1, 2)
    if qtype in ("Q4_1", "Q4_K"):  # m / dmin: finite too
        d[:, 2:4] = d[:, :2]
    return torch.from_numpy(data)


def _q8_rows(rows: int, cols: int) -> np.ndarray:
    """Q8_0 bytes of a random [rows, cols] weight (gguf-py's quantizer)."""
    import gguf
    w = np.random.default_rng(2).standard_normal((rows, cols)).astype(np.float32)
    return gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0)


def opcheck_cases():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 64, generator=gen)
    scale, zp = qparams(x, 32)
    q = dt.quantize_per_group(x, scale, zp, 32)
    x3 = torch.randn(2, 3, 64, generator=gen, dtype=torch.float64)
    s3, z3 = qparams(x3, 16, "u8")
    q3 = dt.quantize_per_group(x3, s3, z3, 16, "u8")
    packed_q = torch.randint(0, 256, (4, 32), dtype=torch.uint8, generator=gen)
    bf = torch.randn(4, 64, generator=gen).to(torch.bfloat16)
    sbf, zbf = qparams(bf, 32)
    dy = torch.randn(4, 64, generator=gen)
    g, a = _gptq_layer(), _awq_layer()
    from dqgen.formats.weight import QuantizedWeight
    linear = dt.QuantLinear(QuantizedWeight.ggml(_q8_rows(8, 64), "Q8_0", (8, 64)))

    def grad(t):
        return t.clone().requires_grad_()

    return [
        (dt.dequantize_per_group, (q, grad(scale), zp, 32)),
        (dt.dequantize_per_group, (q3, grad(s3), z3, 16)),
        (dt.dequantize_per_group, (packed_q, grad(sbf), zbf, 32, "s4")),
        (dt.quantize_per_group, (grad(x), scale, zp, 32)),
        (dt.quantize_per_group, (x3, s3, z3, 16, "u8", 3, 200)),
        (dt.quantize_per_group, (bf, sbf, zbf, 32, "u4")),
        (dt.dequantize_per_group_backward, (grad(dy), grad(scale), 32)),
        (dt.dequantize_per_group_backward, (grad(bf), sbf, 32)),
        (dt.quantize_per_group_backward, (grad(dy), x, grad(scale), zp, 32, -100, 90)),
        (dt.quantize_per_group_backward, (bf, bf, sbf, zbf, 32, -128, 127)),
        (dt.fake_quantize_per_group, (grad(x), grad(scale), zp, 32, -128, 127)),
        (dt.fake_quantize_per_group, (grad(x3), s3, z3, 16, 0, 15)),
        (dt.gptq_dequantize, (g["qweight"], g["qzeros"], g["scales"], g["g_idx"])),
        (dt.gptq_dequantize, (g["qweight"], g["qzeros"], g["scales"], None, 4, "gptq",
                              torch.float32, 32)),
        (dt.awq_dequantize, (a["qweight"], a["qzeros"], a["scales"], torch.bfloat16)),
        (dt.ggml_dequantize, (_ggml_blocks("Q4_0"), "Q4_0")),
        (dt.ggml_dequantize, (_ggml_blocks("Q4_1"), "Q4_1", torch.float16)),
        (dt.ggml_dequantize, (_ggml_blocks("Q4_K", blocks=1), "Q4_K", torch.bfloat16)),
        (dt.packed_dequantize, (packed_q, scale, zp, 32, "u4")),
        (dt.floatzp_dequantize, (q.view(torch.uint8), scale, scale * 3, 32)),
        (dt.floatzp_dequantize, (packed_q, bf[:, :2].contiguous(), bf[:, 2:4].contiguous(), 32,
                                 "u4", 0, 14)),
        (dt.hqq_dequantize, (packed_q, bf.reshape(8, 32)[:, :1].contiguous(),
                             bf.reshape(8, 32)[:, 1:2].contiguous(), 4, [8, 32], 32)),
        (dt.hqq_dequantize, (packed_q, bf[:, :1].contiguous(), bf[:, 1:2].contiguous(), 8,
                             [4, 32], None)),
        (dt.linear, (grad(x), list(linear.weight_tensors), linear.format, 8, 64,
                     grad(bf[0, :8].float()))),
        (dt.linear, (bf, list(linear.weight_tensors), linear.format, 8, 64, None,
                     torch.float32)),
        (dt.linear_backward, (torch.randn(3, 8, generator=gen), list(linear.weight_tensors),
                              linear.format, 8, 64)),
    ]


def test_opcheck_every_op():
    """Schema, fake tensor, autograd registration and AOT dispatch of each registered op."""
    checked = set()
    for op, args in opcheck_cases():
        torch.library.opcheck(op.overload, args)
        checked.add(op.overload)
    assert checked == {op.overload for op in OPS}


# --------------------------------------------------------------------------- values and gradients

@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("q_range", [(-128, 127), (0, 255), (-8, 7), (0, 15), (5, 5)])
def test_fake_quantize_forward_and_gradient_are_spec_bit_for_bit(dtype, q_range):
    x = special_values((6, 96), dtype, seed=q_range[0] + 7).requires_grad_()
    scale, zp = qparams(x, 32, "u8" if q_range[0] >= 0 else "s8", seed=q_range[1])
    zp = zp - 3  # zero points need not lie in the range
    dy = special_values((6, 96), dtype, seed=3)
    y = dt.fake_quantize_per_group(x, scale, zp, 32, *q_range)
    assert_bits(y.detach(), ref_fake_quantize(x.detach(), scale, zp, 32, *q_range))
    (dx,) = torch.autograd.grad(y, x, dy)
    assert_bits(dx, ref_fake_quantize_grad(dy, x.detach(), scale, zp, 32, *q_range))


def to_torch(a: np.ndarray):
    if a.dtype == S.NP_DTYPES["bf16"]:
        return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(a.copy())


@pytest.mark.parametrize("float_name", S.FLOAT_NAMES)
@S.examples(0.25)
@given(data=st.data())
def test_fake_quantize_is_spec_bit_for_bit_on_any_input(float_name, data):
    """Shapes (empty ones too), NaN/Inf/subnormal values and scales, any int32 zero point,
    any q range: the value and the x gradient equal SPEC.md in torch."""
    outer, axis, gs = data.draw(S.shapes(group_sizes=(32,), outers=(0, 1, 5)), "shape")
    int_name = data.draw(st.sampled_from(S.INT_NAMES), "storage")
    q_range = data.draw(S.q_ranges(int_name), "q_range")
    gshape = (outer, axis // gs)
    x = to_torch(data.draw(S.float_values(float_name, (outer, axis)), "x")).requires_grad_()
    scale = to_torch(data.draw(S.scales(float_name, gshape), "scale"))
    zp = to_torch(data.draw(S.zero_points(gshape, int_name), "zero_point"))
    dy = to_torch(data.draw(S.float_values(float_name, (outer, axis)), "dy"))
    y = dt.fake_quantize_per_group(x, scale, zp, gs, *q_range)
    assert_bits(y.detach(), ref_fake_quantize(x.detach(), scale, zp, gs, *q_range))
    (dx,) = torch.autograd.grad(y, x, dy)
    assert_bits(dx, ref_fake_quantize_grad(dy, x.detach(), scale, zp, gs, *q_range))


@pytest.mark.parametrize("dtype", FLOATS)
def test_backward_ops_are_spec_bit_for_bit(dtype):
    x = special_values((5, 64), dtype, seed=11)
    dy = special_values((5, 64), dtype, seed=12)
    scale, zp = qparams(x, 16, seed=2)
    c = compute(dtype)
    s = per_element(scale.to(c), 16)
    assert_bits(dt.dequantize_per_group_backward(dy, scale, 16), (dy.to(c) * s).to(dtype))
    _, inside = ref_quantized(x, scale, zp, 16, -20, 30)
    want = torch.where(inside, dy.to(c) / torch.where(s == 0, 1, s), torch.zeros((), dtype=c))
    assert_bits(dt.quantize_per_group_backward(dy, x, scale, zp, 16, -20, 30), want.to(dtype))


@pytest.mark.parametrize("dtype", FLOATS)
def test_dequantize_scale_gradient_is_the_per_group_sum(dtype):
    gen = torch.Generator().manual_seed(5)
    q = torch.randint(-128, 128, (3, 2, 64), dtype=torch.int8, generator=gen)
    scale = (torch.rand(6, 4, generator=gen) + 0.1).to(dtype).requires_grad_()
    zp = torch.randint(-5, 5, (6, 4), dtype=torch.int32, generator=gen)
    dy = torch.randn(3, 2, 64, generator=gen).to(dtype)
    (ds,) = torch.autograd.grad(dt.dequantize_per_group(q, scale, zp, 16), scale, dy)
    c = compute(dtype)
    diff = (q.reshape(6, 64).to(torch.int64) - per_element(zp.to(torch.int64), 16)).to(c)
    want = (dy.reshape(6, 64).to(c) * diff).reshape(6, 4, 16).sum(-1).to(dtype)
    assert_bits(ds, want)


def test_gradcheck_f64():
    """Numerical gradients agree where the ops are smooth (values kept off rounding ties)."""
    gen = torch.Generator().manual_seed(9)
    q = torch.randint(-128, 128, (3, 32), dtype=torch.int8, generator=gen)
    scale = (torch.rand(3, 2, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
    zp = torch.randint(-3, 3, (3, 2), dtype=torch.int32, generator=gen)
    dy = torch.randn(3, 32, generator=gen, dtype=torch.float64, requires_grad=True)
    x = ((torch.randint(-10, 10, (3, 32), generator=gen) + 0.25)
         * per_element(scale.detach(), 16))
    assert torch.autograd.gradcheck(lambda s: dt.dequantize_per_group(q, s, zp, 16), (scale,))
    assert torch.autograd.gradcheck(lambda d, s: dt.dequantize_per_group_backward(d, s, 16),
                                    (dy, scale))
    assert torch.autograd.gradcheck(
        lambda d, s: dt.quantize_per_group_backward(d, x, s, zp, 16, -6, 6), (dy, scale))
    assert torch.autograd.gradgradcheck(
        lambda d, s: dt.dequantize_per_group_backward(d, s, 16), (dy, scale))


def test_fake_quantize_scale_gradient_is_lsq():
    """LSQ (Esser et al.): d/ds of s * clamp(round(x / s)) is round(x/s) - x/s inside the
    range and the clamped level outside it (here written per case, zero point 2)."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(4, 64, generator=gen) * 4
    x[0, 0] = float("nan")
    scale = torch.full((4, 2), 0.1).requires_grad_()
    zp = torch.full((4, 2), 2, dtype=torch.int32)
    dy = torch.randn(4, 64, generator=gen)
    (ds,) = torch.autograd.grad(dt.fake_quantize_per_group(x, scale, zp, 32, -16, 15), scale, dy)
    t = x / 0.1
    r = torch.round(t)
    below, above = r + 2 < -16, r + 2 > 15
    step = torch.where(below, -18.0, torch.where(above, 13.0, r - t))
    step = torch.where(torch.isnan(t), 0.0, step)  # NaN quantizes to the zero point
    want = (dy * step).reshape(4, 2, 32).sum(-1)
    assert torch.equal(ds, want)


def test_strided_inputs_give_what_contiguous_ones_do():
    """The plain functions copy strided tensors; the result is contiguous, as the fakes say."""
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(64, 6, generator=gen, dtype=torch.float64).t().requires_grad_()
    scale, zp = qparams(x.detach().contiguous(), 32)
    dy = torch.randn(64, 6, generator=gen, dtype=torch.float64).t()
    y = dt.fake_quantize_per_group(x, scale, zp, 32, -8, 7)
    (dx,) = torch.autograd.grad(y, x, dy)
    assert y.is_contiguous() and dx.is_contiguous()
    xc = x.detach().contiguous().requires_grad_()
    yc = dt.fake_quantize_per_group(xc, scale, zp, 32, -8, 7)
    assert_bits(y.detach(), yc.detach())
    assert_bits(dx, torch.autograd.grad(yc, xc, dy.contiguous())[0])


def test_errors_are_dqgen_errors():
    x = torch.randn(2, 64)
    scale, zp = qparams(x, 32)
    with pytest.raises(dqgen.InvalidProblemError, match="q_min=-200"):
        dt.fake_quantize_per_group(x, scale, zp, 32, -200, 100)
    with pytest.raises(dqgen.InvalidProblemError, match="group_size"):
        dt.fake_quantize_per_group(x, scale, zp, 48, -8, 7)
    with pytest.raises(dqgen.UnsupportedError, match="q.dtype"):
        dt.dequantize_per_group(x, scale, zp, 32)
    with pytest.raises(dqgen.UnsupportedError, match="q.dtype"):  # the fake says it too
        dt.dequantize_per_group(x.to("meta"), scale.to("meta"), zp.to("meta"), 32)


def test_an_op_without_a_gradient_says_so_in_backward():
    """A format op given a scale that requires grad: the result joins the graph (so a
    backward cannot silently skip the scale) and backward names the op."""
    layer = _awq_layer()
    scales = layer["scales"].clone().requires_grad_()
    y = dt.awq_dequantize(layer["qweight"], layer["qzeros"], scales)
    assert y.requires_grad
    with pytest.raises(dqgen.UnsupportedError, match="dqgen::awq_dequantize has no gradient"):
        y.float().sum().backward()
    with torch.no_grad():
        assert not dt.awq_dequantize(layer["qweight"], layer["qzeros"], scales).requires_grad
    # the integer result of quantize carries no gradient either way
    x = torch.randn(2, 64, requires_grad=True)
    scale, zp = qparams(x.detach(), 32)
    assert not dt.quantize_per_group(x, scale, zp, 32).requires_grad


# --------------------------------------------------------------------------- training

class QatLinear(torch.nn.Module):
    """A linear layer whose weight is fake-quantized per group of input features."""

    def __init__(self, weight, bias, group_size, q_range, fake_quantize):
        super().__init__()
        self.weight = torch.nn.Parameter(weight.clone())
        self.bias = torch.nn.Parameter(bias.clone())
        scale, zp = dqgen.choose_qparams_per_group(weight, group_size, dtype="s8",
                                                   q_min=q_range[0], q_max=q_range[1])
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zp)
        self.args = (group_size, *q_range)
        self.fake_quantize = fake_quantize

    def forward(self, x):
        w = self.fake_quantize(self.weight, self.scale, self.zero_point, *self.args)
        return torch.nn.functional.linear(x, w, self.bias)


def _train(fake_quantize, steps=5):
    gen = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(16, 64, generator=gen) * 0.2, torch.randn(16, generator=gen)
    model = torch.nn.Sequential(QatLinear(weight, bias, 32, (-8, 7), fake_quantize),
                                torch.nn.ReLU(), torch.nn.Linear(16, 4))
    torch.manual_seed(1)
    model[2].reset_parameters()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    inputs, targets = torch.randn(8, 64, generator=gen), torch.randn(8, 4, generator=gen)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(inputs), targets)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return model, torch.stack(losses)


def test_qat_training_matches_spec_written_in_torch_bit_for_bit():
    ours, ours_loss = _train(dt.fake_quantize_per_group)
    ref, ref_loss = _train(RefFakeQuantize.apply)
    assert torch.equal(ours_loss, ref_loss)
    assert ours_loss[-1] < ours_loss[0]
    for (name, a), (_, b) in zip(ours.named_parameters(), ref.named_parameters()):
        assert torch.equal(a, b), name


# --------------------------------------------------------------------------- compile and export

class OnTheFly(torch.nn.Module):
    """A GPTQ linear dequantized on the fly, then a fake-quantized projection."""

    def __init__(self):
        super().__init__()
        for name, t in _gptq_layer(3).items():
            self.register_buffer(name, t)
        gen = torch.Generator().manual_seed(2)
        self.proj = torch.nn.Parameter(torch.randn(8, 16, generator=gen))
        scale, zp = dqgen.choose_qparams_per_group(self.proj.detach(), 8, dtype="s8")
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zp)

    def forward(self, x):
        w = dt.gptq_dequantize(self.qweight, self.qzeros, self.scales, self.g_idx, 4, "gptq",
                               torch.float32)
        h = torch.relu(x @ w)
        p = dt.fake_quantize_per_group(self.proj, self.scale, self.zero_point, 8, -128, 127)
        return h @ p.t()


def test_compile_has_no_graph_break_and_matches_eager():
    model, x = OnTheFly(), torch.randn(5, 64)
    explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    got = compiled(x)
    want = model(x)
    assert torch.equal(got, want)
    got.sum().backward()
    compiled_grad = model.proj.grad.clone()
    model.proj.grad = None
    want.sum().backward()
    assert torch.equal(compiled_grad, model.proj.grad)


def test_export_carries_the_ops_with_dynamic_shapes():
    class Dequant(torch.nn.Module):
        def forward(self, q, scale, zp, x):
            y = (x @ dt.dequantize_per_group(q, scale, zp, 32).t()).sum(-1)
            z = dt.fake_quantize_per_group(x, x.new_ones(x.shape[0], 2),
                                           x.new_zeros(x.shape[0], 2, dtype=torch.int32), 32,
                                           -8, 7)
            return y + z.sum(-1) + dt.ggml_dequantize(qblocks, "Q4_0").sum()

    qblocks = _ggml_blocks("Q4_0")
    gen = torch.Generator().manual_seed(6)

    def inputs(rows, batch):
        w = torch.randn(rows, 64, generator=gen)
        scale, zp = qparams(w, 32)
        return (dt.quantize_per_group(w, scale, zp, 32), scale, zp,
                torch.randn(batch, 64, generator=gen))

    rows, batch = torch.export.Dim("rows", min=2, max=4096), torch.export.Dim("batch", min=2)
    exported = torch.export.export(Dequant(), inputs(8, 3), dynamic_shapes=(
        {0: rows}, {0: rows}, {0: rows}, {0: batch}))
    text = str(exported.graph)
    for name in ("dequantize_per_group", "fake_quantize_per_group", "ggml_dequantize"):
        assert f"dqgen.{name}" in text
    args = inputs(20, 5)  # other sizes than traced
    assert torch.equal(exported.module()(*args), Dequant()(*args))


# --------------------------------------------------------------------------- CUDA

@gpu
def test_cuda_ops_match_cpu():
    x = special_values((8, 256), torch.float32, seed=1)
    scale, zp = qparams(x, 64)
    dy = torch.randn(8, 256)
    xc, sc, zc, dyc = (t.cuda() for t in (x, scale, zp, dy))
    xc.requires_grad_()
    y = dt.fake_quantize_per_group(xc, sc, zc, 64, -8, 7)
    (dx,) = torch.autograd.grad(y, xc, dyc)
    assert_bits(y.detach().cpu(), ref_fake_quantize(x, scale, zp, 64, -8, 7))
    assert_bits(dx.cpu(), ref_fake_quantize_grad(dy, x, scale, zp, 64, -8, 7))
    q = dt.quantize_per_group(xc, sc, zc, 64, "u4")
    assert torch.equal(dt.packed_dequantize(q, sc, zc, 64).cpu(),
                       dt.packed_dequantize(q.cpu(), scale, zp, 64))


@gpu
def test_cuda_format_ops_match_cpu():
    g = _gptq_layer()
    args = (g["qweight"], g["qzeros"], g["scales"], g["g_idx"])
    assert torch.equal(dt.gptq_dequantize(*(t.cuda() for t in args)).cpu(),
                       dt.gptq_dequantize(*args))
    blocks = _ggml_blocks("Q4_K", blocks=1)
    assert torch.equal(dt.ggml_dequantize(blocks.cuda(), "Q4_K").cpu(),
                       dt.ggml_dequantize(blocks, "Q4_K"))
    q = torch.randint(0, 256, (2, 32), dtype=torch.uint8)  # u8: one group of 32 a row
    scale, zero = torch.rand(2, 1, dtype=torch.float16), torch.rand(2, 1, dtype=torch.float16)
    assert torch.equal(dt.floatzp_dequantize(q.cuda(), scale.cuda(), zero.cuda(), 32).cpu(),
                       dt.floatzp_dequantize(q, scale, zero, 32))
    w_q = torch.randint(0, 256, (4, 64), dtype=torch.uint8)   # 4-bit HQQ: two planes of 4 rows
    scale, zero = torch.rand(8, 1, dtype=torch.float16), torch.rand(8, 1, dtype=torch.float16)
    on_gpu = dt.hqq_dequantize(w_q.cuda(), scale.cuda(), zero.cuda(), 4, [8, 64], 64)
    assert torch.equal(on_gpu.cpu(), dt.hqq_dequantize(w_q, scale, zero, 4, [8, 64], 64))
