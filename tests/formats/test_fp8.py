"""FP8 weights with block scales (DeepSeek-V3/R1's weight + weight_scale_inv, per-tensor
and per-row scales): ``W = F(f32(w) * s[block])`` bit for bit with torch's own float8
conversion and product, e4m3fn and e5m2, blocks that do not divide the shape, on every
ISA, in the CUDA text's host emulation, through aot, emit and verify."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest

from dqgen import InvalidProblemError, UnsupportedError, aot, bundle, cli, verify
from dqgen.formats import fp8
from dqgen.formats.plan import FormatPlan
from dqgen.layouts.fp8 import Fp8BlockDescriptor
from dqgen.lower import lower
from dqgen.plans import PlanPreference
from dqgen.render import render
from formats_util import assert_bits_equal
from strategies import ISAS

ENCODINGS = {"e4m3": "float8_e4m3fn", "e5m2": "float8_e5m2"}   # torch's names
OUTS = {"bf16": "bfloat16", "f16": "float16", "f32": "float32"}


def _torch():
    """torch, whose float8 conversion is the oracle (a test without it is skipped, so the
    module still collects where torch is absent: the NVRTC test needs none)."""
    return pytest.importorskip("torch", reason="torch's float8 conversion is the oracle")


def layer(rng, rows, cols, block, encoding="e4m3", specials=True):
    """Every FP8 code (NaN, Inf for e5m2, subnormals, both zeros) and scales with specials."""
    torch = _torch()
    codes = rng.integers(0, 256, (rows, cols), dtype=np.uint8)
    sr = -(-rows // block[0]) if block[0] else 1
    sc = -(-cols // block[1]) if block[1] else 1
    scale = (rng.standard_normal((sr, sc)) * 0.01).astype(np.float32)
    if specials and scale.size > 4:
        scale.flat[:4] = [0.0, -0.0, np.inf, 1e-40]
    return (torch.from_numpy(codes).view(getattr(torch, ENCODINGS[encoding])),
            torch.from_numpy(scale))


def torch_dequant(w, scale, block, out):
    """DeepSeek-V3's weight_dequant written in torch: f32 product, one rounding."""
    torch = _torch()
    rows = torch.arange(w.shape[0]) // block[0] if block[0] else torch.zeros(w.shape[0], dtype=torch.long)
    cols = torch.arange(w.shape[1]) // block[1] if block[1] else torch.zeros(w.shape[1], dtype=torch.long)
    return (w.to(torch.float32) * scale[rows][:, cols]).to(getattr(torch, OUTS[out]))


def host(t):
    torch = _torch()
    return t.view(torch.uint8).numpy().view({torch.bfloat16: ml_dtypes.bfloat16,
                                             torch.float16: np.float16,
                                             torch.float32: np.float32}[t.dtype])


@pytest.mark.parametrize("out", list(OUTS))
@pytest.mark.parametrize("encoding", list(ENCODINGS))
def test_matches_torch(encoding, out):
    rng = np.random.default_rng(len(encoding) + len(out))
    for shape, block in (((300, 520), (128, 128)), ((257, 129), (128, 128)),
                         ((64, 96), (0, 0)), ((40, 100), (1, 0)), ((33, 70), (16, 32))):
        w, scale = layer(rng, *shape, block, encoding)
        got = fp8.dequantize(w, scale, block, out)
        assert got.dtype == getattr(_torch(), OUTS[out]) and tuple(got.shape) == shape
        assert_bits_equal(host(got), host(torch_dequant(w, scale, block, out)))


def test_numpy_codes_and_inferred_blocks():
    torch = _torch()
    rng = np.random.default_rng(3)
    w, scale = layer(rng, 50, 64, (1, 0), specials=False)
    want = host(torch_dequant(w, scale, (1, 0), "bf16"))
    as_numpy = w.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)
    assert_bits_equal(fp8.dequantize(as_numpy, scale.numpy()[:, 0], None), want)  # [N]: per row
    codes = w.view(torch.uint8).numpy()
    assert_bits_equal(fp8.dequantize(codes, scale.numpy(), None, fp8="e4m3"), want)
    one = np.float32(0.25)
    assert_bits_equal(fp8.dequantize(as_numpy, np.array(one), None, "f32"),
                      (as_numpy.astype(np.float32) * one))


@pytest.mark.parametrize("isa", ISAS)
def test_every_isa(isa):
    torch = _torch()
    rng = np.random.default_rng(9)
    for out, encoding in (("bf16", "e4m3"), ("f16", "e5m2"), ("f32", "e4m3")):
        w, scale = layer(rng, 130, 260, (128, 128), encoding)
        desc = Fp8BlockDescriptor(130, 260, 128, 128, encoding, "f32", out)
        y = np.empty((130, 260), {"bf16": ml_dtypes.bfloat16, "f16": np.float16,
                                  "f32": np.float32}[out])
        FormatPlan.select(desc, preference=PlanPreference(isa=isa)).run(
            {"w": w.view(torch.uint8).numpy(), "scales": scale.numpy(), "y": y})
        assert_bits_equal(y, host(torch_dequant(w, scale, (128, 128), out)))


def test_cuda_text_in_emulation(tmp_path):
    torch = _torch()
    from test_formats_cuda import needs_gxx, run_emulated
    if needs_gxx.args[0]:
        pytest.skip(needs_gxx.kwargs["reason"])
    rng = np.random.default_rng(4)
    for out, encoding, block in (("bf16", "e4m3", (128, 128)), ("f16", "e5m2", (1, 0))):
        w, scale = layer(rng, 130, 140, block, encoding)
        desc = Fp8BlockDescriptor(130, 140, *block, encoding, "f32", out)
        want = host(torch_dequant(w, scale, block, out))
        y = np.zeros_like(want)
        run_emulated(desc, [w.view(torch.uint8).numpy(), scale.numpy(), y], [130, 140], y.size,
                     tmp_path)
        assert_bits_equal(y, want)


def test_nvrtc_compiles():
    from dqgen.build import nvrtc
    if not nvrtc.nvrtc_available():
        pytest.skip("NVRTC is not installed")
    for encoding in ENCODINGS:
        for out in OUTS:
            desc = Fp8BlockDescriptor(0, 0, 128, 128, encoding, "f32", out)
            source = render(lower(desc, "cuda", "sm_90"))
            art = nvrtc.compile_cuda(source.text, name=desc.uri, arch="sm_90")
            assert source.entry.encode() in art.ptx and b"fma.rn" not in art.ptx


def test_bad_inputs():
    torch = _torch()
    rng = np.random.default_rng(5)
    w, scale = layer(rng, 64, 64, (32, 32), specials=False)
    with pytest.raises(InvalidProblemError, match=r"scale has shape \(2, 2\), expected \(1, 1\)"):
        fp8.dequantize(w, scale, (128, 128))
    with pytest.raises(InvalidProblemError, match="pass fp8='e4m3' or 'e5m2'"):
        fp8.dequantize(w.view(torch.uint8), scale, (32, 32))
    with pytest.raises(InvalidProblemError, match="weight is float8_e4m3fn but fp8='e5m2'"):
        fp8.dequantize(w, scale, (32, 32), fp8="e5m2")
    with pytest.raises(InvalidProblemError, match="weight has dtype float32"):
        fp8.dequantize(w.to(torch.float32), scale, (32, 32))
    with pytest.raises(UnsupportedError, match="dtype"):
        fp8.dequantize(w, scale, (32, 32), "f64")
    with pytest.raises(InvalidProblemError, match="block_size"):
        fp8.dequantize(w, scale, "big")


def test_aot_emit_and_verify(tmp_path, capsys):
    requests = aot.expand({"op": "fp8"})
    assert [r.uri for r in requests] == ["dequant_fp8_e4m3_b128x128_f32_bf16",
                                         "dequant_fp8_e4m3_b128x128_f32_f16"]
    assert cli.main(["emit", "fp8", "--block", "1x0", "--fp8", "e5m2", "--float", "f16"]) == 0
    assert "dqgen_dequant_fp8_e5m2_b1x0_f32_f16" in capsys.readouterr().out
    out = tmp_path / "bundle"
    assert cli.main(["aot", "--op", "fp8", "--float", "bf16", "-o", str(out), "-q"]) == 0
    outcomes = verify.verify_bundle(bundle.Bundle.open(out))
    assert outcomes and all(o.status == verify.OK for o in outcomes), [str(o) for o in outcomes]
    assert json.loads((out / "manifest.json").read_text())["kernels"]


def test_verify_oracle_is_its_own():
    """The oracle decodes with ml_dtypes, the kernel with the schedule's table: a table
    with one code changed is caught."""
    from dqgen.layouts import fp8 as layout
    desc = Fp8BlockDescriptor(4, 256, 128, 128, "e4m3", "f32", "f32")
    arrays = {"w": np.arange(1024, dtype=np.uint32).astype(np.uint8).reshape(4, 256),
              "scales": np.ones((1, 2), np.float32), "y": None}
    want = layout.FP8.oracle(desc, arrays)
    table = list(layout.fp8_bits("e4m3"))
    table[0x38] ^= 1  # 1.0 off by one ulp
    broken = np.array(table, np.uint32).view(np.float32)[arrays["w"]]
    assert not np.array_equal(broken, want)


def _deepseek_checkpoint(path, block=(128, 128)):
    """A small DeepSeek-V3-style FP8 checkpoint in two shards: FP8 weights whose shapes are
    not multiples of the block, their weight_scale_inv, a bf16 norm, an activation scale."""
    torch = _torch()
    st = pytest.importorskip("safetensors.torch")
    rng = np.random.default_rng(31)
    path.mkdir()
    tensors = {}
    for name, shape in (("model.layers.0.self_attn.q_proj", (200, 300)),
                        ("model.layers.0.mlp.down_proj", (130, 260)),
                        ("model.layers.1.mlp.up_proj", (256, 128))):
        w, scale = layer(rng, *shape, block, specials=False)
        tensors[f"{name}.weight"] = w
        tensors[f"{name}.weight_scale_inv"] = scale
    tensors["model.norm.weight"] = torch.randn(64).to(torch.bfloat16)
    tensors["model.layers.0.self_attn.q_proj.input_scale"] = torch.tensor([0.5])
    names = sorted(tensors)
    shards = (names[:4], names[4:])
    weight_map = {}
    for i, part in enumerate(shards, 1):
        file = f"model-0000{i}-of-00002.safetensors"
        st.save_file({n: tensors[n].contiguous() for n in part}, str(path / file))
        weight_map.update({n: file for n in part})
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = {"model_type": "deepseek_v3", "quantization_config": {
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
        "weight_block_size": list(block)}}
    (path / "config.json").write_text(json.dumps(config))
    return tensors


def test_convert_reads_a_deepseek_fp8_checkpoint_with_no_flags(tmp_path):
    torch = _torch()
    st = pytest.importorskip("safetensors.torch")
    tensors = _deepseek_checkpoint(tmp_path / "in")
    out = tmp_path / "out"
    assert cli.main(["convert", str(tmp_path / "in"), str(out), "--dtype", "bf16", "--quiet"]) == 0
    got = {}
    for shard in sorted(out.glob("*.safetensors")):
        got.update(st.load_file(str(shard)))
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj",
                 "model.layers.1.mlp.up_proj"):
        want = torch_dequant(tensors[f"{name}.weight"], tensors[f"{name}.weight_scale_inv"],
                             (128, 128), "bf16")
        assert_bits_equal(host(got[f"{name}.weight"]), host(want))  # any NaN equals any NaN
        assert f"{name}.weight_scale_inv" not in got
    assert torch.equal(got["model.norm.weight"], tensors["model.norm.weight"])
    assert torch.equal(got["model.layers.0.self_attn.q_proj.input_scale"], torch.tensor([0.5]))
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["torch_dtype"] == "bfloat16"


def test_convert_names_a_contradicting_block(tmp_path, capsys):
    _deepseek_checkpoint(tmp_path / "in")
    config = json.loads((tmp_path / "in" / "config.json").read_text())
    config["quantization_config"]["weight_block_size"] = [64, 64]
    (tmp_path / "in" / "config.json").write_text(json.dumps(config))
    assert cli.main(["convert", str(tmp_path / "in"), str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "weight_scale_inv has shape" in err and "weight_block_size" in err
    assert not (tmp_path / "out").exists()
