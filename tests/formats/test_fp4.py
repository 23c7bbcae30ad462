"""FP4 (e2m1) block formats: gpt-oss MXFP4 bit for bit with transformers'
``convert_moe_packed_tensors`` (layout and dtype included), ModelOpt NVFP4 with ModelOpt's
dequantize (tests/oracles/modelopt.py), compressed-tensors' nvfp4-/mxfp4-pack-quantized with
the library's own compressors; every scale code and nibble, on every ISA this CPU runs, in
the CUDA text's host emulation and NVRTC, through aot, emit and verify."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dqgen import InvalidProblemError, UnsupportedError, aot, bundle, cli, verify
from dqgen.formats import compressed_tensors as ct
from dqgen.formats import fp4
from dqgen.formats.plan import FormatPlan
from dqgen.layouts import fp4 as layout
from dqgen.layouts.fp4 import PRODUCERS, Fp4DequantizeDescriptor
from dqgen.lower import lower
from dqgen.plans import PlanPreference
from dqgen.render import render
from formats_util import assert_bits_equal
from strategies import ISAS

torch = pytest.importorskip("torch")
OUTS = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}
NP = {"bf16": ml_dtypes.bfloat16, "f16": np.float16, "f32": np.float32}
FORMATS = [(fp4_, fmt) for fp4_, formats in PRODUCERS.items() for fmt in formats]


def host(t) -> np.ndarray:
    """A torch result's bits as numpy (bf16 through ml_dtypes)."""
    if not isinstance(t, torch.Tensor):
        return t
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def codes(rng, shape, every=True) -> np.ndarray:
    """Random uint8 codes, the first 256 of them every code in turn (every nibble pair)."""
    out = rng.integers(0, 256, shape, dtype=np.uint8)
    if every:
        flat = out.reshape(-1)
        flat[:min(256, flat.size)] = np.arange(min(256, flat.size))
    return out


def layer(rng, fmt, experts, rows, cols, global_scale=0.37):
    """The arrays of a layer: codes with every byte, scales with every scale code (E4M3
    NaNs, subnormals and zeros included), the per-tensor scale where the format has one."""
    p = PRODUCERS[fmt[0]][fmt[1]]
    w = codes(rng, (experts * rows, cols // 2))
    s = codes(rng, (experts * rows, cols // p.block))
    gs = np.array([global_scale], np.float32) if p.global_scale else None
    return w, s, gs


def library(fmt, w, s, gs, experts, rows, cols, out):
    """What the tool that writes ``fmt`` dequantizes ``w``, ``s`` (and ``gs``) to, as numpy."""
    tw, ts = torch.from_numpy(w), torch.from_numpy(s)
    if fmt == ("mxfp4", "gpt-oss"):
        from transformers.integrations.mxfp4 import convert_moe_packed_tensors
        return host(convert_moe_packed_tensors(tw.reshape(experts, rows, cols // 32, 16),
                                               ts.reshape(experts, rows, cols // 32),
                                               dtype=OUTS[out]))
    if fmt == ("nvfp4", "modelopt"):
        from oracles.modelopt import nvfp4_dequantize
        return host(nvfp4_dequantize(tw, ts.view(torch.float8_e4m3fn),
                                     torch.from_numpy(gs).reshape(()), (rows, cols), OUTS[out]))
    from compressed_tensors.compressors import MXFP4PackedCompressor, NVFP4PackedCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    nv = fmt[0] == "nvfp4"
    args = QuantizationArgs(num_bits=4, type="float", group_size=16 if nv else 32,
                            strategy="tensor_group" if nv else "group", symmetric=True)
    state = {"weight_packed": tw, "weight_scale": ts.view(torch.float8_e4m3fn) if nv else ts}
    if nv:
        state["weight_global_scale"] = torch.from_numpy(gs)
    compressor = NVFP4PackedCompressor if nv else MXFP4PackedCompressor
    weight = compressor.decompress(state, QuantizationScheme(targets=["Linear"], weights=args))
    return host(weight["weight"].to(OUTS[out]))  # the library's is bf16: exact to f32


def ours(fmt, w, s, gs, experts, rows, cols, out, **kw):
    """dqgen's user function of ``fmt`` on the same arrays."""
    if fmt == ("mxfp4", "gpt-oss"):
        return host(fp4.dequantize_mxfp4(w.reshape(experts, rows, cols // 32, 16),
                                         s.reshape(experts, rows, cols // 32), out, **kw))
    if fmt == ("nvfp4", "modelopt"):
        return host(fp4.dequantize_nvfp4(w, s.view(ml_dtypes.float8_e4m3fn), gs, out, **kw))
    if fmt[0] == "nvfp4":
        return host(ct.dequantize_nvfp4(w, s.view(ml_dtypes.float8_e4m3fn), gs, out, **kw))
    return host(ct.dequantize_mxfp4(w, s, out, **kw))


def sizes(fmt, rows=40, groups=9):
    experts = 3 if PRODUCERS[fmt[0]][fmt[1]].transposed else 1
    return experts, rows, groups * PRODUCERS[fmt[0]][fmt[1]].block


@pytest.mark.parametrize("out", list(OUTS))
@pytest.mark.parametrize("fmt", FORMATS, ids="-".join)
def test_matches_the_library(fmt, out):
    """Every byte and every scale code; the library's own output dtype and layout (gpt-oss:
    [E, K, N]); compressed-tensors returns bf16, so other dtypes compare with its bf16
    result only where that is exact (f32)."""
    if fmt[1] == "compressed-tensors" and out == "f16":
        pytest.skip("compressed-tensors' decompress returns bf16")
    pytest.importorskip("transformers" if fmt[1] == "gpt-oss" else "compressed_tensors")
    rng = np.random.default_rng(len(fmt[0] + fmt[1] + out))
    e, n, k = sizes(fmt)
    w, s, gs = layer(rng, fmt, e, n, k)
    want = library(fmt, w, s, gs, e, n, k, out)
    if fmt[1] == "compressed-tensors" and out == "f32":  # its bf16, widened
        want = library(fmt, w, s, gs, e, n, k, "bf16").astype(np.float32)
        got = ours(fmt, w, s, gs, e, n, k, "bf16").astype(np.float32)
    else:
        got = ours(fmt, w, s, gs, e, n, k, out)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert_bits_equal(got, want)


def test_gpt_oss_returns_what_transformers_returns():
    """torch in, torch out: the library's dtype (bf16 by default), shape [E, K, N] and
    contiguity; numpy in, numpy out; out= written in place."""
    pytest.importorskip("transformers")
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors
    rng = np.random.default_rng(2)
    blocks = torch.from_numpy(codes(rng, (2, 33, 3, 16)))
    scales = torch.from_numpy(codes(rng, (2, 33, 3)))
    want = convert_moe_packed_tensors(blocks, scales)
    got = fp4.dequantize_mxfp4(blocks, scales)
    assert isinstance(got, torch.Tensor) and got.dtype == want.dtype == torch.bfloat16
    assert got.shape == want.shape == (2, 96, 33) and got.is_contiguous()
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))
    out = np.empty((2, 96, 33), np.float32)
    assert fp4.dequantize_mxfp4(blocks.numpy(), scales.numpy(), "f32", out=out) is out
    assert_bits_equal(out, host(convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)))


def test_gpt_oss_scale_255_is_ldexp_and_compressed_tensors_is_infinity():
    """E8M0 code 255: transformers' ldexp keeps a zero value zero and 0.5 finite (2^127);
    compressed-tensors' 2.0 ** 128 is +inf, so a zero value is NaN. Same codes, two
    formats, each as its tool computes it."""
    blocks = np.zeros((1, 1, 1, 16), np.uint8)
    blocks[..., 0] = 0x10  # values 0.0, 0.5
    scales = np.full((1, 1, 1), 255, np.uint8)
    gpt_oss = fp4.dequantize_mxfp4(blocks, scales, "f32")[0, :2, 0]
    assert gpt_oss[0] == 0 and gpt_oss[1] == np.float32(2.0 ** 127)
    compressed = ct.dequantize_mxfp4(blocks.reshape(1, 16), scales.reshape(1, 1), "f32")[0, :2]
    assert np.isnan(compressed[0]) and compressed[1] == np.inf


def test_zero_code_sign_is_the_tools():
    """Code 8 is -0.0 in transformers' and compressed-tensors' tables, +0.0 in ModelOpt's."""
    w = np.full((1, 8), 0x88, np.uint8)
    one = np.full((1, 1), 0x38, np.uint8).view(ml_dtypes.float8_e4m3fn)  # 1.0
    modelopt = fp4.dequantize_nvfp4(w, one, np.float32(1.0), "f32")
    compressed = ct.dequantize_nvfp4(w, one, np.float32(1.0), "f32")
    assert not np.signbit(modelopt).any() and np.signbit(compressed).all()


def test_what_compressed_tensors_writes_round_trips():
    """A weight quantized by the library itself (its observer's scales, global scale and
    packing), then its decompress, for both FP4 formats."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors import MXFP4PackedCompressor, NVFP4PackedCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam
    torch.manual_seed(4)
    w = torch.randn(48, 256, dtype=torch.bfloat16)
    for compressor, group, strategy in ((NVFP4PackedCompressor, 16, "tensor_group"),
                                        (MXFP4PackedCompressor, 32, "group")):
        args = QuantizationArgs(num_bits=4, type="float", strategy=strategy, group_size=group,
                                symmetric=True)
        scheme = QuantizationScheme(targets=["Linear"], weights=args)
        grouped = w.float().reshape(48, -1, group)
        gs = generate_gparam(w.float().amin(), w.float().amax()) if group == 16 else None
        scale, zero = calculate_qparams(grouped.amin(-1), grouped.amax(-1), args, global_scale=gs)
        state = {"weight": w, "weight_scale": scale, "weight_zero_point": zero}
        if gs is not None:
            state["weight_global_scale"] = gs
        packed = compressor.compress(state, scheme)
        want = compressor.decompress(dict(packed), scheme)["weight"]
        if group == 16:
            got = ct.dequantize_nvfp4(packed["weight_packed"], packed["weight_scale"],
                                      packed["weight_global_scale"])
        else:
            got = ct.dequantize_mxfp4(packed["weight_packed"], packed["weight_scale"])
        assert got.dtype == want.dtype == torch.bfloat16
        assert torch.equal(got.view(torch.int16), want.view(torch.int16))


@pytest.mark.parametrize("isa", ISAS)
def test_every_isa(isa):
    """Each format's kernel on each ISA level (vector lanes of 16, 8, or a plain loop)
    against the tools, a row count no tile divides."""
    rng = np.random.default_rng(9)
    for fmt, out in zip(FORMATS, ("bf16", "f16", "f32", "bf16")):
        if fmt[1] == "compressed-tensors":
            pytest.importorskip("compressed_tensors")
            out = "bf16"
        e, n, k = sizes(fmt, rows=37, groups=3)
        w, s, gs = layer(rng, fmt, e, n, k, global_scale=3.1)
        desc = Fp4DequantizeDescriptor(n, k, e, *fmt, out)
        plan = FormatPlan.select(desc, preference=PlanPreference(isa=isa))
        y = np.empty(plan.arguments[-1].shape, NP[out])
        arrays = {"w": w, "scales": s, "y": y, **({"global_scale": gs} if gs is not None else {})}
        plan.run(arrays)
        assert_bits_equal(y, library(fmt, w, s, gs, e, n, k, out))


@pytest.mark.parametrize("fmt", FORMATS, ids="-".join)
def test_verify_oracle_is_the_tools(fmt):
    """dqgen verify's numpy oracle (ml_dtypes' e2m1 and E4M3, np.ldexp) equals the tools."""
    pytest.importorskip("transformers" if fmt[1] == "gpt-oss" else "compressed_tensors")
    rng = np.random.default_rng(12)
    e, n, k = sizes(fmt, rows=20, groups=4)
    w, s, gs = layer(rng, fmt, e, n, k)
    desc = Fp4DequantizeDescriptor(n, k, e, *fmt, "bf16")
    got = layout.FP4.oracle(desc, {"w": w, "scales": s, "global_scale": gs})
    assert_bits_equal(got, library(fmt, w, s, gs, e, n, k, "bf16"))


def test_the_tables_are_what_the_oracle_decodes():
    """The kernel's tables (from bit fields) against ml_dtypes; one entry changed is caught."""
    want = np.arange(16, dtype=np.uint8).view(ml_dtypes.float4_e2m1fn).astype(np.float32)
    assert np.array_equal(np.array(layout.e2m1_bits(True), np.uint32), want.view(np.uint32))
    broken = list(layout.e2m1_bits(True))
    broken[5] ^= 1 << 22  # 3.0 -> 2.0
    assert not np.array_equal(np.array(broken, np.uint32), want.view(np.uint32))
    e8m0 = np.array(layout.e8m0_bits(), np.uint32).view(np.float32)
    assert e8m0[127] == 1 and e8m0[0] == np.float32(2.0 ** -127) and e8m0[255] == np.inf


def test_cuda_text_in_emulation(tmp_path):
    from test_formats_cuda import needs_gxx, run_emulated
    if needs_gxx.args[0]:
        pytest.skip(needs_gxx.kwargs["reason"])
    rng = np.random.default_rng(4)
    for fmt, out in zip(FORMATS, ("bf16", "f16", "f32", "bf16")):
        if fmt[1] == "compressed-tensors":
            pytest.importorskip("compressed_tensors")
            out = "bf16"
        e, n, k = sizes(fmt, rows=19, groups=3)
        w, s, gs = layer(rng, fmt, e, n, k, global_scale=0.05)
        desc = Fp4DequantizeDescriptor(n, k, e, *fmt, out)
        want = library(fmt, w, s, gs, e, n, k, out)
        y = np.zeros_like(want)
        arrays = [w, s] + ([gs] if gs is not None else []) + [y]
        run_emulated(desc, arrays, [e, n, k], e * n * k // 2, tmp_path)
        assert_bits_equal(y, want)


def test_nvrtc_compiles():
    from dqgen.build import nvrtc
    if not nvrtc.nvrtc_available():
        pytest.skip("NVRTC is not installed")
    for fmt in FORMATS:
        for out in OUTS:
            desc = Fp4DequantizeDescriptor(0, 0, 1, *fmt, out)
            source = render(lower(desc, "cuda", "sm_90"))
            art = nvrtc.compile_cuda(source.text, name=desc.uri, arch="sm_90")
            assert source.entry.encode() in art.ptx and b"fma.rn" not in art.ptx


@settings(max_examples=20, deadline=None)
@given(fmt=st.sampled_from(FORMATS), experts=st.integers(1, 3), rows=st.integers(0, 70),
       groups=st.integers(0, 5), out=st.sampled_from(list(OUTS)), seed=st.integers(0, 99),
       global_scale=st.sampled_from([1.0, 0.0, np.inf, 1e-40, 448.0, -2.5]))
def test_any_shape(fmt, experts, rows, groups, out, seed, global_scale):
    """Any row count and block count (empty too), experts for gpt-oss, special global
    scales: equal to the verify oracle (itself equal to the tools above)."""
    if not PRODUCERS[fmt[0]][fmt[1]].transposed:
        experts = 1
    rng = np.random.default_rng(seed)
    e, n, k = experts, rows, groups * PRODUCERS[fmt[0]][fmt[1]].block
    w, s, gs = layer(rng, fmt, e, n, k, global_scale)
    desc = Fp4DequantizeDescriptor(n, k, e, *fmt, out)
    want = layout.FP4.oracle(desc, {"w": w, "scales": s, "global_scale": gs})
    assert_bits_equal(ours(fmt, w, s, gs, e, n, k, out), want)


def test_bad_inputs():
    rng = np.random.default_rng(5)
    blocks, scales = codes(rng, (2, 4, 3, 16)), codes(rng, (2, 4, 3))
    with pytest.raises(InvalidProblemError, match=r"blocks has shape \(4, 3, 16\); gpt-oss"):
        fp4.dequantize_mxfp4(blocks[0], scales[0])
    with pytest.raises(InvalidProblemError, match=r"scales has shape \(2, 4, 2\), expected "
                                                  r"\(2, 4, 3\)"):
        fp4.dequantize_mxfp4(blocks, scales[..., :2])
    with pytest.raises(InvalidProblemError, match="blocks has dtype float32"):
        fp4.dequantize_mxfp4(blocks.astype(np.float32), scales)
    with pytest.raises(UnsupportedError, match="dtype"):
        fp4.dequantize_mxfp4(blocks, scales, "f64")
    w = codes(rng, (4, 32))
    e4m3 = codes(rng, (4, 4)).view(ml_dtypes.float8_e4m3fn)
    with pytest.raises(InvalidProblemError, match=r"weight_scale has shape \(4, 2\), expected "
                                                  r"\(4, 4\)"):
        fp4.dequantize_nvfp4(w, e4m3[:, :2], 1.0)
    with pytest.raises(InvalidProblemError, match="weight_scale has dtype float32; expected "
                                                  "float8_e4m3fn"):
        fp4.dequantize_nvfp4(w, np.ones((4, 4), np.float32), 1.0)
    with pytest.raises(InvalidProblemError, match="weight_scale_2 has shape \\(2,\\)"):
        fp4.dequantize_nvfp4(w, e4m3, np.ones(2, np.float32))
    with pytest.raises(InvalidProblemError, match="weight_scale_2 has dtype float64"):
        fp4.dequantize_nvfp4(w, e4m3, np.float64(2.0).reshape(1))
    with pytest.raises(InvalidProblemError, match="weight_packed has shape \\(4, 31\\)"):
        ct.dequantize_mxfp4(w[:, :31], codes(rng, (4, 2)))
    with pytest.raises(InvalidProblemError, match=r"out has shape \(4, 32\), expected \(4, 64\)"):
        ct.dequantize_nvfp4(w, e4m3, 1.0, out=np.empty((4, 32), ml_dtypes.bfloat16))
    with pytest.raises(UnsupportedError, match="checkpoint_format='gpt-oss' is not a nvfp4"):
        Fp4DequantizeDescriptor(4, 64, 1, "nvfp4", "gpt-oss")
    with pytest.raises(InvalidProblemError, match="experts=2: compressed-tensors mxfp4"):
        Fp4DequantizeDescriptor(4, 64, 2, "mxfp4", "compressed-tensors")


def test_aot_emit_and_verify(tmp_path, capsys):
    """dqgen aot enumerates both ops and every checkpoint format, emit prints one, and
    dqgen verify checks the bundled kernels against the format's oracle."""
    assert [r.uri for r in aot.expand({"op": "mxfp4", "float": "bf16"})] == [
        "dequant_mxfp4_ct_bf16", "dequant_mxfp4_gptoss_bf16"]
    assert [r.uri for r in aot.expand({"op": "nvfp4", "checkpoint_format": "modelopt"})] == [
        "dequant_nvfp4_modelopt_bf16", "dequant_nvfp4_modelopt_f16"]
    assert cli.main(["emit", "nvfp4", "--checkpoint-format", "compressed-tensors", "--float",
                     "f32"]) == 0
    assert "dqgen_dequant_nvfp4_ct_f32" in capsys.readouterr().out
    out = tmp_path / "bundle"
    assert cli.main(["aot", "--op", "mxfp4", "--op", "nvfp4", "--float", "bf16", "-o", str(out),
                     "-q"]) == 0
    assert len(json.loads((out / "manifest.json").read_text())["kernels"]) == 4
    outcomes = verify.verify_bundle(bundle.Bundle.open(out))
    assert len(outcomes) == 4 and all(o.status == verify.OK for o in outcomes), \
        [str(o) for o in outcomes]


def test_one_kernel_serves_every_expert_count():
    """Run-time sizes (experts, rows, cols) are arguments: the source is the same."""
    a = render(lower(Fp4DequantizeDescriptor(8, 64, 2, "mxfp4", "gpt-oss"), "c", "generic"))
    b = render(lower(Fp4DequantizeDescriptor(0, 0, 1, "mxfp4", "gpt-oss"), "c", "generic"))
    assert a.text == b.text


@pytest.mark.parametrize("fmt", [("mxfp4", "gpt-oss"), ("nvfp4", "modelopt")], ids="-".join)
def test_two_threads_split_the_same_bits(fmt, monkeypatch):
    """Past the parallel threshold the work (tiles of an expert's rows, or rows) is split
    between threads: the same bits as the oracle, rows no tile divides."""
    monkeypatch.setenv("DQGEN_NUM_THREADS", "2")
    rng = np.random.default_rng(8)
    e, n, k = (3, 45, 256) if fmt[1] == "gpt-oss" else (1, 133, 256)
    w, s, gs = layer(rng, fmt, e, n, k)
    desc = Fp4DequantizeDescriptor(n, k, e, *fmt, "bf16")
    want = layout.FP4.oracle(desc, {"w": w, "scales": s, "global_scale": gs})
    assert_bits_equal(ours(fmt, w, s, gs, e, n, k, "bf16"), want)
