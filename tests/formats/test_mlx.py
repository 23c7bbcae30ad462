"""MLX affine quantization (mlx_lm checkpoints): ``w = F(F(q * scale) + bias)`` from each
row's bit stream of 2/3/4/5/6/8-bit values, bit for bit with ``mlx.core.dequantize`` on
every ISA this CPU runs, in the CUDA text's host emulation, through verify and aot."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest

from dqgen import InvalidProblemError, UnsupportedError, aot, cli, verify
from dqgen.formats import mlx as dqgen_mlx
from dqgen.formats.plan import FormatPlan
from dqgen.layouts.mlx import MLX_BITS, MlxDequantizeDescriptor
from dqgen.lower import lower
from dqgen.plans import PlanPreference
from dqgen.render import render
from formats_util import assert_bits_equal, random_f16
from strategies import ISAS

mx = pytest.importorskip("mlx.core", reason="mlx (the oracle; mlx-cpu on Linux) is not installed")

FLOATS = {"f16": (np.float16, "float16"), "bf16": (ml_dtypes.bfloat16, "bfloat16"),
          "f32": (np.float32, "float32")}


def layer(rng, rows, cols, bits, group, float_name, extreme=True):
    """Random stored words (every bit pattern) and scales/biases with the float type's
    specials (NaN, Inf, subnormals, both zeros) when ``extreme``."""
    words = rng.integers(0, 2**32, (rows, cols * bits // 32), dtype=np.uint64).astype(np.uint32)
    np_dtype = FLOATS[float_name][0]
    scales = random_f16(rng, (rows, cols // group), extreme=extreme).astype(np_dtype)
    biases = random_f16(rng, (rows, cols // group), extreme=extreme).astype(np_dtype)
    return words, scales, biases


def mlx_dequantize(words, scales, biases, group, bits, float_name) -> np.ndarray:
    """mlx.core.dequantize itself, its result's bits back as numpy."""
    dtype = getattr(mx, FLOATS[float_name][1])
    s = mx.array(scales.astype(np.float32)).astype(dtype)
    b = mx.array(biases.astype(np.float32)).astype(dtype)
    w = mx.dequantize(mx.array(words), s, b, group_size=group, bits=bits)
    return np.array(w.astype(mx.float32)).astype(FLOATS[float_name][0])


@pytest.mark.parametrize("float_name", list(FLOATS))
@pytest.mark.parametrize("bits", MLX_BITS)
def test_matches_mlx(bits, float_name):
    rng = np.random.default_rng(bits)
    for group in (32, 64, 128):
        words, scales, biases = layer(rng, 5, 256, bits, group, float_name)
        got = dqgen_mlx.dequantize(words, scales, biases, group, bits)
        assert got.dtype == FLOATS[float_name][0] and got.shape == (5, 256)
        assert_bits_equal(got, mlx_dequantize(words, scales, biases, group, bits, float_name))


def test_what_mlx_quantize_writes_round_trips():
    """A weight quantized by mlx itself, its three arrays straight from mlx."""
    w = mx.array(np.random.default_rng(1).standard_normal((8, 512)).astype(np.float32)).astype(mx.bfloat16)
    for bits in MLX_BITS:
        q, s, b = mx.quantize(w, group_size=64, bits=bits)
        want = np.array(mx.dequantize(q, s, b, group_size=64, bits=bits).astype(mx.float32))
        got = dqgen_mlx.dequantize(np.array(q), np.array(s.astype(mx.float32)).astype(ml_dtypes.bfloat16),
                                   np.array(b.astype(mx.float32)).astype(ml_dtypes.bfloat16), 64, bits)
        assert np.array_equal(got.astype(np.float32), want)


@pytest.mark.parametrize("isa", ISAS)
def test_every_isa(isa):
    rng = np.random.default_rng(7)
    for bits, float_name in ((3, "f16"), (5, "bf16"), (6, "f32"), (2, "f16"), (8, "bf16")):
        words, scales, biases = layer(rng, 4, 128, bits, 32, float_name)
        desc = MlxDequantizeDescriptor(4, 128, 32, bits, float_name)
        y = np.empty((4, 128), FLOATS[float_name][0])
        FormatPlan.select(desc, preference=PlanPreference(isa=isa)).run(
            {"q": words.view(np.int32), "scales": scales, "biases": biases, "y": y})
        assert_bits_equal(y, mlx_dequantize(words, scales, biases, 32, bits, float_name))


def test_experts_out_and_threads(monkeypatch):
    """A MoE layer's [experts, N, K'] words are rows; out= is written in place; more than
    one thread gives the same bits."""
    monkeypatch.setenv("DQGEN_NUM_THREADS", "2")
    rng = np.random.default_rng(3)
    words, scales, biases = layer(rng, 3 * 64, 1024, 4, 64, "bf16", extreme=False)
    want = mlx_dequantize(words, scales, biases, 64, 4, "bf16").reshape(3, 64, 1024)
    out = np.empty((3, 64, 1024), ml_dtypes.bfloat16)
    got = dqgen_mlx.dequantize(words.reshape(3, 64, -1), scales.reshape(3, 64, -1),
                               biases.reshape(3, 64, -1), 64, 4, out=out)
    assert got is out
    assert_bits_equal(out, want)


def test_cuda_text_in_emulation(tmp_path):
    from test_formats_cuda import needs_gxx, run_emulated
    if needs_gxx.args[0]:
        pytest.skip(needs_gxx.kwargs["reason"])
    rng = np.random.default_rng(11)
    for bits, float_name in ((3, "bf16"), (6, "f16"), (4, "f32")):
        words, scales, biases = layer(rng, 3, 128, bits, 64, float_name)
        desc = MlxDequantizeDescriptor(3, 128, 64, bits, float_name)
        y = np.zeros((3, 128), FLOATS[float_name][0])
        run_emulated(desc, [words.view(np.int32), scales, biases, y], [3, 128], y.size, tmp_path)
        assert_bits_equal(y, mlx_dequantize(words, scales, biases, 64, bits, float_name))


def test_nvrtc_compiles_every_width():
    from dqgen.build import nvrtc
    if not nvrtc.nvrtc_available():
        pytest.skip("NVRTC is not installed")
    for bits in MLX_BITS:
        for float_name in FLOATS:
            desc = MlxDequantizeDescriptor(0, 0, 64, bits, float_name)
            source = render(lower(desc, "cuda", "sm_90"))
            art = nvrtc.compile_cuda(source.text, name=desc.uri, arch="sm_90")
            assert source.entry.encode() in art.ptx and b"fma.rn" not in art.ptx


def test_bad_inputs():
    rng = np.random.default_rng(5)
    words, scales, biases = layer(rng, 2, 128, 4, 64, "f16", extreme=False)
    with pytest.raises(InvalidProblemError, match="bits=7 is not an MLX width"):
        dqgen_mlx.dequantize(words, scales, biases, 64, 7)
    with pytest.raises(UnsupportedError, match="group_size=16 is not an MLX group size"):
        dqgen_mlx.dequantize(words, np.repeat(scales, 4, axis=1), np.repeat(biases, 4, axis=1),
                             16, 4)
    with pytest.raises(InvalidProblemError, match="biases have dtype bf16"):
        dqgen_mlx.dequantize(words, scales, biases.astype(ml_dtypes.bfloat16), 64, 4)
    with pytest.raises(InvalidProblemError, match=r"scales has shape \(2, 4\), expected \(2, 2\)"):
        dqgen_mlx.dequantize(words, np.repeat(scales, 2, axis=1), biases, 64, 4)
    with pytest.raises(InvalidProblemError, match="w_q has dtype float32"):
        dqgen_mlx.dequantize(words.view(np.float32), scales, biases, 64, 4)
    with pytest.raises(UnsupportedError, match="float_dtype"):
        MlxDequantizeDescriptor(2, 128, 64, 4, "f64")


def test_aot_emit_and_verify(tmp_path, capsys):
    """One module makes a format: dqgen aot enumerates it, emit prints it, and dqgen
    verify checks the bundled kernel against the format's oracle."""
    requests = aot.expand({"op": "mlx", "bits": [3, 4], "float": "bf16"})
    assert [r.uri for r in requests] == ["dequant_mlx3_bf16_g64", "dequant_mlx4_bf16_g64"]
    assert cli.main(["emit", "mlx", "--bits", "5", "--float", "f16", "--group-size", "32"]) == 0
    assert "dqgen_dequant_mlx5_f16_g32" in capsys.readouterr().out
    out = tmp_path / "bundle"
    assert cli.main(["aot", "--op", "mlx", "--bits", "3", "--float", "bf16", "-o", str(out),
                     "-q"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert any("mlx3" in k["uri"] for k in manifest["kernels"])
    outcomes = verify.verify_bundle(__import__("dqgen").bundle.Bundle.open(out))
    assert outcomes and all(o.status == verify.OK for o in outcomes), [str(o) for o in outcomes]


def test_oracle_catches_a_broken_formula(monkeypatch):
    """dqgen verify's MLX oracle is not the kernel: rounding the sum only (no rounding of
    the product) in the oracle makes verify report a mismatch."""
    from dqgen.layouts import mlx as layout
    kind = layout.MLX
    desc = MlxDequantizeDescriptor(3, 128, 64, 4, "f16")
    rng = np.random.default_rng(2)
    words, scales, biases = layer(rng, 3, 128, 4, 64, "f16", extreme=False)
    arrays = {"q": words.view(np.int32), "scales": scales * 3, "biases": biases, "y": None}
    good = kind.oracle(desc, arrays)

    def fused(desc, arrays):
        q = layout.unpack_mlx(arrays["q"], desc.bits, desc.cols).astype(np.float32)
        s = np.repeat(arrays["scales"].astype(np.float32), desc.group_size, axis=1)
        b = np.repeat(arrays["biases"].astype(np.float32), desc.group_size, axis=1)
        return (q * s + b).astype(np.float16)
    assert not np.array_equal(fused(desc, arrays).view(np.uint16), good.view(np.uint16))


def _mlx_checkpoint(path, dtype=None):
    """A small mlx_lm-style checkpoint in two shards: three quantized linears (one with its
    own bits and group size in the config), a float norm and a float layer the config
    leaves unquantized (false)."""
    dtype = dtype or mx.bfloat16
    rng = np.random.default_rng(21)
    path.mkdir()
    weights = {}
    for name, shape, bits, group in (("model.layers.0.self_attn.q_proj", (64, 256), 4, 64),
                                     ("model.layers.0.mlp.down_proj", (32, 512), 3, 32),
                                     ("lm_head", (48, 128), 6, 64)):
        w = mx.array(rng.standard_normal(shape).astype(np.float32)).astype(dtype)
        q, s, b = mx.quantize(w, group_size=group, bits=bits)
        weights.update({f"{name}.weight": q, f"{name}.scales": s, f"{name}.biases": b})
    weights["model.norm.weight"] = mx.array(rng.standard_normal(64).astype(np.float32)).astype(dtype)
    weights["model.layers.0.mlp.gate.weight"] = mx.zeros((8, 64), dtype=dtype)
    names = sorted(weights)
    mx.save_safetensors(str(path / "model-00001-of-00002.safetensors"),
                        {n: weights[n] for n in names[:4]})
    mx.save_safetensors(str(path / "model-00002-of-00002.safetensors"),
                        {n: weights[n] for n in names[4:]})
    index = {"metadata": {}, "weight_map": {n: f"model-0000{1 + (i >= 4)}-of-00002.safetensors"
                                            for i, n in enumerate(names)}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    quantization = {"group_size": 64, "bits": 4,
                    "model.layers.0.mlp.down_proj": {"group_size": 32, "bits": 3},
                    "lm_head": {"group_size": 64, "bits": 6},
                    "model.layers.0.mlp.gate": False}
    config = {"model_type": "llama", "quantization": quantization,
              "quantization_config": quantization}
    (path / "config.json").write_text(json.dumps(config))
    return weights


def test_convert_reads_an_mlx_lm_checkpoint_with_no_flags(tmp_path):
    """Per-layer bits and group sizes from the config, every quantized weight equal to
    mlx.core.dequantize, the other tensors copied, the config's quantization dropped."""
    safetensors = pytest.importorskip("safetensors.numpy")
    weights = _mlx_checkpoint(tmp_path / "in")
    out = tmp_path / "out"
    assert cli.main(["convert", str(tmp_path / "in"), str(out), "--dtype", "bf16", "--quiet"]) == 0
    got = {}
    for shard in sorted(out.glob("*.safetensors")):
        got.update(safetensors.load_file(str(shard)))
    for name, bits, group in (("model.layers.0.self_attn.q_proj", 4, 64),
                              ("model.layers.0.mlp.down_proj", 3, 32), ("lm_head", 6, 64)):
        want = mx.dequantize(weights[f"{name}.weight"], weights[f"{name}.scales"],
                             weights[f"{name}.biases"], group_size=group, bits=bits)
        want = np.array(want.astype(mx.float32))
        assert np.array_equal(got[f"{name}.weight"].astype(np.float32), want), name
        assert f"{name}.scales" not in got and f"{name}.biases" not in got
    assert got["model.layers.0.mlp.gate.weight"].shape == (8, 64)
    assert np.array_equal(got["model.norm.weight"].astype(np.float32),
                          np.array(weights["model.norm.weight"].astype(mx.float32)))
    config = json.loads((out / "config.json").read_text())
    assert "quantization" not in config and "quantization_config" not in config
    assert config["torch_dtype"] == "bfloat16"


def test_convert_names_a_bad_mlx_config(tmp_path, capsys):
    _mlx_checkpoint(tmp_path / "in")
    config = json.loads((tmp_path / "in" / "config.json").read_text())
    config["quantization"]["lm_head"] = {"group_size": 64, "bits": 7}
    (tmp_path / "in" / "config.json").write_text(json.dumps(config))
    assert cli.main(["convert", str(tmp_path / "in"), str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "config.json quantization: lm_head has bits=7" in err
    assert not (tmp_path / "out").exists()
