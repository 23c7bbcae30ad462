"""HQQ: ``W = F(F(W_q - zero) * scale)`` from HQQ's BitPack words, bit-exact with
``hqq.core.quantize.Quantizer.dequantize`` (8/4/3/2/1 bits, f16/bf16/f32) and with the
oracle (every ISA, f64 too, special scales and zeros), on the CPU and the CUDA text."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dqgen import PlanPreference
from dqgen.errors import InvalidProblemError, UnsupportedError
from dqgen.formats import floatzp, hqq
from dqgen.formats.plan import FormatPlan
from dqgen.ir import HqqDequantizeDescriptor
from dqgen.lower import lower
from formats_util import FLOATS, assert_bits_equal, random_f16
from oracles import checkpoints as oracle
from strategies import ISAS

SPECIAL = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 6e-8, 1e-45, 65504.0, 3e38, 1 / 3,
                    -2.5, 7.5], np.float64)


def _hqq():
    torch = pytest.importorskip("torch", reason="torch is the oracle's runtime")
    quantize = pytest.importorskip(
        "hqq.core.quantize", reason="hqq is the oracle (pip install --no-deps hqq termcolor)")
    return torch, quantize.Quantizer


def _np(t) -> np.ndarray:
    import torch
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _quantized(torch, Quantizer, bits, dtype, shape=(48, 128), group_size=64, axis=1, **kw):
    """A random weight through HQQ's own quantizer; scale and zero in the compute dtype."""
    torch.manual_seed(bits * 10 + len(str(dtype)))
    w = (torch.randn(*shape) * 0.02).to(dtype)
    W_q, meta = Quantizer.quantize(w, nbits=bits, group_size=group_size, axis=axis,
                                   device="cpu", compute_dtype=dtype, **kw)
    meta.update(compute_dtype=dtype, scale=meta["scale"].to(dtype), zero=meta["zero"].to(dtype))
    return W_q, meta


@pytest.mark.parametrize("dtype", ["f16", "bf16", "f32"])
@pytest.mark.parametrize("bits", [8, 4, 3, 2, 1])
def test_matches_hqq(bits, dtype):
    torch, Quantizer = _hqq()
    tdtype = {"f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32}[dtype]
    W_q, meta = _quantized(torch, Quantizer, bits, tdtype, optimize=bits != 8)
    want = _np(Quantizer.dequantize(W_q, meta))
    got = hqq.dequantize(W_q.numpy(), _np(meta["scale"]), _np(meta["zero"]), bits,
                         meta["shape"], meta["group_size"])
    assert_bits_equal(got, want)
    # torch tensors in, a torch tensor out, the same bits
    got_t = hqq.dequantize(W_q, meta["scale"], meta["zero"], bits, meta["shape"],
                           meta["group_size"])
    assert isinstance(got_t, torch.Tensor) and _np(got_t).tobytes() == want.tobytes()


@pytest.mark.parametrize("bits,dtype", [(4, "f16"), (3, "bf16"), (8, "f32"), (1, "bf16")])
def test_matches_hqq_axis_0(bits, dtype):
    """axis=0: a column of [group_size, numel / group_size] is a group."""
    torch, Quantizer = _hqq()
    tdtype = {"f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32}[dtype]
    W_q, meta = _quantized(torch, Quantizer, bits, tdtype, shape=(32, 80), axis=0,
                           optimize=False)
    assert meta["scale"].shape == (1, 32 * 80 // 64)
    want = _np(Quantizer.dequantize(W_q, meta))
    got = hqq.dequantize(W_q.numpy(), _np(meta["scale"]), _np(meta["zero"]), bits,
                         meta["shape"], meta["group_size"], axis=0)
    assert_bits_equal(got, want)


def test_matches_hqq_float_view_and_whole_rows():
    """``view_as_float`` words, and ``group_size=None`` (a row of the weight a group)."""
    torch, Quantizer = _hqq()
    W_q, meta = _quantized(torch, Quantizer, 4, torch.float16, view_as_float=True)
    assert W_q.dtype == torch.float16
    want = _np(Quantizer.dequantize(W_q, meta))
    assert_bits_equal(hqq.dequantize(W_q, meta["scale"].numpy(), meta["zero"].numpy(), 4,
                                     meta["shape"], meta["group_size"]), want)
    W_q, meta = _quantized(torch, Quantizer, 2, torch.bfloat16, shape=(16, 96), group_size=None)
    want = _np(Quantizer.dequantize(W_q, meta))
    assert_bits_equal(hqq.dequantize(W_q.numpy(), _np(meta["scale"]), _np(meta["zero"]), 2,
                                     meta["shape"], None), want)


def test_is_not_the_float_zero_rule():
    """HQQ's (q - z) * s, two roundings, is not torchao's (q - mid) * s + z' (4-bit f16
    differs in thousands of values): the rules are separate, and each has its oracle."""
    torch, Quantizer = _hqq()
    W_q, meta = _quantized(torch, Quantizer, 4, torch.float16, shape=(256, 128))
    s, z = _np(meta["scale"]), _np(meta["zero"])
    want = _np(Quantizer.dequantize(W_q, meta))
    values = oracle.unpack_hqq(W_q.numpy(), 4, 512)
    zf = ((8 - z.astype(np.float32)) * s.astype(np.float32)).astype(np.float16)
    mapped = floatzp.dequantize(values.astype(np.uint8), s, zf, 64).reshape(want.shape)
    assert (mapped.view(np.uint16) != want.view(np.uint16)).sum() > 100
    assert_bits_equal(hqq.dequantize(W_q, s, z, 4, meta["shape"], 64), want)


@st.composite
def planes(draw):
    bits = draw(st.sampled_from([8, 4, 3, 2, 1]))
    words = 32 if bits == 3 else 8
    top = 27 if bits == 3 else words - bits
    return (bits, draw(st.integers(0, top)) if bits != 8 else 0,
            draw(st.sampled_from(["f16", "bf16", "f32", "f64"])),
            draw(st.sampled_from((1, 12, 64))), draw(st.sampled_from(ISAS)),
            draw(st.integers(0, 2**32 - 1)))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(planes())
def test_plane_matches_oracle(plane):
    """One plane of any bit offset (bits of other fields set), any dtype and ISA; scales and
    zeros with Inf, NaN, subnormals and huge values."""
    bits, shift, float_dtype, group, isa, seed = plane
    rng = np.random.default_rng(seed)
    rows, f = 5, FLOATS[float_dtype]
    word = np.dtype(np.int32 if bits == 3 else np.uint8)
    q = rng.integers(np.iinfo(word).min, np.iinfo(word).max, size=(rows, group), dtype=word,
                     endpoint=True)
    params = []
    for _ in range(2):
        a = np.where(rng.random((rows, 1)) < 0.25, rng.choice(SPECIAL, size=(rows, 1)),
                     random_f16(rng, (rows, 1)).astype(np.float64) * 8)
        with np.errstate(all="ignore"):
            params.append(a.astype(f))
    scale, zero = params
    desc = HqqDequantizeDescriptor(rows, group, group, float_dtype, bits, shift)
    y = np.empty((rows, group), f)
    FormatPlan.select(desc, preference=PlanPreference(isa=isa)).run(
        {"q": q, "scale": scale, "zero_point": zero, "y": y})
    values = (q.view(np.uint32 if bits == 3 else np.uint8).astype(np.int64) >> shift) & (
        (1 << bits) - 1)
    assert_bits_equal(y, oracle.hqq_dequantize(values, scale, zero, f))


@pytest.mark.parametrize("bits,dtype", [(4, "bf16"), (3, "f16"), (1, "f32"), (8, "bf16")])
def test_cuda_emulated(bits, dtype, tmp_path):
    """The CUDA text (host emulation, tests/cuda_emu) reads the same fields, same rounding."""
    from test_formats_cuda import needs_gxx, run_emulated
    if needs_gxx.args[0]:
        pytest.skip(needs_gxx.kwargs["reason"])
    rng = np.random.default_rng(bits)
    rows, group, f = 4, 64, FLOATS[dtype]
    shift = {4: 4, 3: 12, 1: 5, 8: 0}[bits]
    word = np.dtype(np.int32 if bits == 3 else np.uint8)
    q = rng.integers(np.iinfo(word).min, np.iinfo(word).max, size=(rows, group), dtype=word)
    scale = random_f16(rng, (rows, 1)).astype(f)
    zero = (random_f16(rng, (rows, 1), extreme=False) * 100).astype(f)
    y = np.zeros((rows, group), f)
    desc = HqqDequantizeDescriptor(rows, group, group, dtype, bits, shift)
    scalars = [rows, group] + ([shift] if bits != 8 else [])
    run_emulated(desc, [q, scale, zero, y], scalars, y.size, tmp_path)
    values = (q.view(np.uint32 if bits == 3 else np.uint8).astype(np.int64) >> shift) & (
        (1 << bits) - 1)
    assert_bits_equal(y, oracle.hqq_dequantize(values, scale, zero, f))


def test_nvrtc_compiles():
    nvrtc = pytest.importorskip("dqgen.build.nvrtc")
    if not nvrtc.nvrtc_available():
        pytest.skip("NVRTC is not installed (pip install dqgen[cuda])")
    from dqgen.render import render
    for bits, dtype in [(4, "bf16"), (3, "f16"), (8, "f32")]:
        desc = HqqDequantizeDescriptor(0, 0, 64, dtype, bits)
        source = render(lower(desc, "cuda", "sm_90"))
        art = nvrtc.compile_cuda(source.text, name=desc.uri, arch="sm_90")
        assert source.entry.encode() in art.ptx and b"fma.rn" not in art.ptx


def test_bad_inputs():
    s = np.ones((8, 1), np.float16)
    with pytest.raises(UnsupportedError, match="nbits=5"):
        hqq.dequantize(np.zeros((8, 4), np.uint8), s, s, 5, (8, 4), 4)
    with pytest.raises(UnsupportedError, match="axis=2"):
        hqq.dequantize(np.zeros((4, 4), np.uint8), s, s, 4, (8, 4), 4, axis=2)
    with pytest.raises(InvalidProblemError, match=r"scale has shape \(8, 1\), expected \(1, 8\)"):
        hqq.dequantize(np.zeros((2, 8), np.uint8), s, s, 4, (8, 4), 4, axis=0)
    with pytest.raises(InvalidProblemError, match=r"W_q has shape \(8, 4\), expected \(4, 4\) for 4-bit"):
        hqq.dequantize(np.zeros((8, 4), np.uint8), s, s, 4, (8, 4), 4)
    with pytest.raises(InvalidProblemError, match="W_q has dtype int16"):
        hqq.dequantize(np.zeros((4, 4), np.int16), s, s, 4, (8, 4), 4)
    with pytest.raises(InvalidProblemError, match="zero has dtype float32"):
        hqq.dequantize(np.zeros((4, 4), np.uint8), s, s.astype(np.float32), 4, (8, 4), 4)
    with pytest.raises(InvalidProblemError, match=r"scale has shape \(4, 1\), expected \(8, 1\): one"):
        hqq.dequantize(np.zeros((4, 4), np.uint8), s[:4], s, 4, (8, 4), 4)
    with pytest.raises(InvalidProblemError, match="shift=5"):
        HqqDequantizeDescriptor(1, 4, 4, "f16", 4, 5)
