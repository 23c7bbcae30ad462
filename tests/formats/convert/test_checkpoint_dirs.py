"""``dqgen convert`` on checkpoints as they are published: a directory of shards, an
index and a config, packed by the peers' own packers from small random nn.Linear layers
(GPTQModel, AutoGPTQ, AutoAWQ), converted without flags and checked bit for bit against
each packer's own dequant."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from dqgen import InvalidProblemError, UnsupportedError
from dqgen.formats import convert
from oracles import checkpoints as oracle
from oracles import peers

torch = pytest.importorskip("torch", reason="the peers' packers are torch code")
st = pytest.importorskip("safetensors.numpy", reason="checkpoints are written with safetensors")

LAYERS = {"model.layers.0.self_attn.q_proj": (64, 32), "model.layers.0.mlp.down_proj": (128, 64),
          "model.layers.1.self_attn.o_proj": (64, 64)}  # prefix: (in_features, out_features)


def run_convert(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    convert.add_arguments(parser)
    return convert.run(parser.parse_args(list(argv)))


def minmax_params(w: torch.Tensor, group: int, bits: int, zero_zero: bool):
    """Per output row and group: asymmetric min/max scales and zero points [out, groups],
    as GPTQ's quantizer finds them; ``zero_zero`` makes the first groups all positive, so
    their zero point is 0 (which GPTQModel's v1 export stores with a borrow)."""
    maxq = (1 << bits) - 1
    if zero_zero:
        w[:4, :group] = w[:4, :group].abs() + 0.01
    g = w.reshape(w.shape[0], -1, group)
    lo = torch.clamp(g.amin(-1), max=0)
    hi = torch.clamp(g.amax(-1), min=0)
    scale = ((hi - lo) / maxq).to(torch.float16).to(torch.float32)
    zero = torch.clamp(torch.round(-lo / scale), 0, maxq)
    return scale, zero


def write_checkpoint(path, tensors: dict, shards: list[list[str]], quant_config: dict,
                     in_config_json: bool = True):
    """Shards + model.safetensors.index.json + config (config.json's quantization_config
    or a quantize_config.json), plus a tokenizer file to be copied."""
    path.mkdir()
    weight_map = {}
    count = len(shards)
    for i, names in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{count:05d}.safetensors"
        st.save_file({k: tensors[k] for k in names}, str(path / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in names})
    assert sorted(weight_map) == sorted(tensors)
    total = sum(v.nbytes for v in tensors.values())
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}))
    config = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "torch_dtype": "float16"}
    if in_config_json:
        config["quantization_config"] = quant_config
    else:
        (path / "quantize_config.json").write_text(json.dumps(quant_config))
    (path / "config.json").write_text(json.dumps(config))
    (path / "tokenizer.json").write_text('{"model": "test"}')


def split(tensors: dict) -> list[list[str]]:
    """Two shards, a layer's parts straddling them (its scales in the second)."""
    names = list(tensors)
    cut = len(names) // 2
    first = [n for n in names[:cut] if not n.endswith("q_proj.scales")]
    return [first, [n for n in names if n not in first]]


def check_output(out_dir, want: dict, extra: dict, dtype="float16"):
    """Every shard readable, the index names each tensor's file, weights bit-exact, other
    tensors as they were, the config without its quantization part."""
    index = json.loads((out_dir / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) == 2 and all((out_dir / s).is_file() for s in shards)
    got = {}
    for shard in shards:
        tensors = st.load_file(str(out_dir / shard))
        assert {k for k, v in index["weight_map"].items() if v == shard} == set(tensors)
        got.update(tensors)
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in got.values())
    for prefix, weight in want.items():
        assert got[f"{prefix}.weight"].dtype == weight.dtype
        assert np.array_equal(got[f"{prefix}.weight"].view(np.uint16), weight.view(np.uint16)), prefix
        assert not any(k.startswith(prefix + ".q") or k == prefix + ".scales" for k in got)
    for name, arr in extra.items():
        assert np.array_equal(got[name], arr)
    config = json.loads((out_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["torch_dtype"] == dtype
    assert (out_dir / "tokenizer.json").read_text() == '{"model": "test"}'
    assert not (out_dir / "quantize_config.json").exists()
    assert not [p for p in out_dir.iterdir() if p.name.startswith(".")], "temporary files left"


def extra_tensors():
    return {"model.embed_tokens.weight": np.arange(40, dtype=np.float16).reshape(5, 8),
            "model.layers.0.self_attn.q_proj.bias": np.ones(32, np.float16)}


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_gptqmodel_directory(tmp_path, capsys, fmt):
    """GPTQModel's pack (v2, act-order g_idx, zero points of 0 included) and its v1 export
    (word-wise) or the v2 words as they are, config.json saying which; dqgen reads it as
    GPTQModel loads it (v1 -> v2, then its torch formula)."""
    pack = peers.gptqmodel_pack()
    v2_to_v1, v1_to_v2 = peers.gptqmodel_zero_conversions()
    torch.manual_seed(0)
    tensors, want, bits, group = extra_tensors(), {}, 4, 32
    for prefix, (k, n) in LAYERS.items():
        linear = torch.nn.Linear(k, n, bias=False)
        w = linear.weight.data
        scale, zero = minmax_params(w, group, bits, zero_zero=True)
        # desc_act: a permuted g_idx (the values' groups, so the row-order min/max scales
        # fit them loosely; the packer clamps, and only bit-exactness is checked)
        g_idx = (torch.randperm(k) // group).int()
        qweight, v2, scales, g_idx = pack(linear, scale, zero, g_idx, bits)
        qzeros = v2_to_v1(v2, bits) if fmt == "gptq" else v2
        tensors.update({f"{prefix}.qweight": qweight.numpy(), f"{prefix}.qzeros": qzeros.numpy(),
                        f"{prefix}.scales": scales.numpy(), f"{prefix}.g_idx": g_idx.numpy()})
        loaded = v1_to_v2(qzeros, bits).numpy() if fmt == "gptq" else v2.numpy()  # its load
        want[prefix] = np.ascontiguousarray(oracle.gptq_dequantize_torch(
            qweight.numpy(), loaded, scales.numpy(), g_idx.numpy(), bits, "gptq_v2").T)
    stored = np.concatenate([tensors[f"{p}.qzeros"].reshape(-1) for p in LAYERS]).view(np.uint32)
    top = 0xF if fmt == "gptq" else 0  # a zero point of 0 as each stores it
    assert any(((stored >> (4 * j)) & 0xF == top).any() for j in range(8)), "no zero point of 0"
    src, dst = tmp_path / "gptqmodel", tmp_path / "out"
    write_checkpoint(src, tensors, split(tensors), {
        "quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": True,
        "sym": False, "checkpoint_format": fmt,
        "meta": {"quantizer": ["gptqmodel:7.7.0"]}})
    assert run_convert(str(src), str(dst)) == 0
    captured = capsys.readouterr()
    assert "3/3 layers" in captured.err and captured.err.count("/3 layers") == 3
    assert "quantization_config" in captured.out
    check_output(dst, want, extra_tensors())
    # the index file as IN gives the same result
    dst2 = tmp_path / "out2"
    assert run_convert(str(src / "model.safetensors.index.json"), str(dst2), "--quiet") == 0
    check_output(dst2, want, extra_tensors())


def autogptq_layers(bits, group, zero_zero):
    quant_linear = peers.autogptq_quant_linear()
    torch.manual_seed(1)
    tensors, modules = extra_tensors(), {}
    for prefix, (k, n) in LAYERS.items():
        linear = torch.nn.Linear(k, n, bias=False).half()
        scale, zero = minmax_params(linear.weight.data.float(), group, bits, zero_zero)
        if not zero_zero:
            zero = torch.clamp(zero, min=1)  # AutoGPTQ stores z - 1 and cannot hold 0
        layer = quant_linear(bits, group, k, n, False)
        g_idx = torch.arange(k, dtype=torch.int32) // group
        layer.pack(linear, scale, zero, g_idx)
        modules[prefix] = layer
        tensors.update({f"{prefix}.{part}": getattr(layer, part).numpy()
                        for part in ("qweight", "qzeros", "scales", "g_idx")})
    want = {p: np.ascontiguousarray(peers.autogptq_weight(m).numpy().T) for p, m in modules.items()}
    return tensors, want


@pytest.mark.parametrize("bits", [4, 8])
def test_autogptq_directory(tmp_path, bits):
    """AutoGPTQ's QuantLinear.pack, quantize_config.json as AutoGPTQ writes it; converted
    without flags, equal to AutoGPTQ's own torch dequant."""
    group = 32
    tensors, want = autogptq_layers(bits, group, zero_zero=False)
    src, dst = tmp_path / "autogptq", tmp_path / "out"
    write_checkpoint(src, tensors, split(tensors), {
        "bits": bits, "group_size": group, "damp_percent": 0.01, "desc_act": False,
        "static_groups": False, "sym": False, "true_sequential": True,
        "model_name_or_path": None, "model_file_base_name": None, "is_marlin_format": False,
        "quant_method": "gptq"}, in_config_json=False)
    assert run_convert(str(src), str(dst), "--quiet") == 0
    check_output(dst, want, extra_tensors())


def test_autogptq_zero_point_of_zero_needs_its_rule(tmp_path):
    """AutoGPTQ packs a zero point of 0 as -1, all ones over the fields above it; its own
    dequant reads that modulo 16: --v1-zeros autogptq is bit-exact, the default is not."""
    tensors, want = autogptq_layers(4, 32, zero_zero=True)
    src = tmp_path / "autogptq"
    write_checkpoint(src, tensors, split(tensors), {"bits": 4, "group_size": 32,
                                                    "quant_method": "gptq"})
    assert run_convert(str(src), str(tmp_path / "a"), "--quiet", "--v1-zeros", "autogptq") == 0
    check_output(tmp_path / "a", want, extra_tensors())
    assert run_convert(str(src), str(tmp_path / "b"), "--quiet") == 0
    with pytest.raises(AssertionError):
        check_output(tmp_path / "b", want, extra_tensors())


def awq_checkpoint(tmp_path):
    wq_linear, dequantize_gemm = peers.autoawq_gemm()
    torch.manual_seed(2)
    tensors, want, group = extra_tensors(), {}, 32
    for prefix, (k, n) in LAYERS.items():
        linear = torch.nn.Linear(k, n, bias=False)
        scale, zero = minmax_params(linear.weight.data, group, 4, zero_zero=True)
        layer = wq_linear.from_linear(linear, 4, group, scales=scale.T.contiguous(),
                                      zeros=zero.T.contiguous())
        tensors.update({f"{prefix}.{part}": getattr(layer, part).numpy()
                        for part in ("qweight", "qzeros", "scales")})
        want[prefix] = np.ascontiguousarray(
            dequantize_gemm(layer.qweight, layer.qzeros, layer.scales, 4, group).numpy().T)
    src = tmp_path / "awq"
    write_checkpoint(src, tensors, split(tensors), {"quant_method": "awq", "bits": 4,
                                                    "group_size": group, "zero_point": True,
                                                    "version": "gemm"})
    return src, want


def test_autoawq_directory(tmp_path):
    """AutoAWQ's WQLinear_GEMM.from_linear, config.json; equal to its dequantize_gemm."""
    src, want = awq_checkpoint(tmp_path)
    assert run_convert(str(src), str(tmp_path / "out"), "--quiet") == 0
    check_output(tmp_path / "out", want, extra_tensors())


def test_gptq_flags_on_an_awq_checkpoint_name_the_tensor(tmp_path):
    src, _ = awq_checkpoint(tmp_path)
    with pytest.raises(InvalidProblemError, match=r"--format gptq, but model\.layers\.0\."
                       r"self_attn\.q_proj\.qweight \[64, 4\] and model\.layers\.0\.self_attn\."
                       r"q_proj\.scales \[2, 32\] .*the file looks like AWQ \(--format awq\)"):
        run_convert(str(src), str(tmp_path / "out"), "--format", "gptq")
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"]["quant_method"] = "gptq"
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(InvalidProblemError, match=r"quant_method gptq, but .*looks like AWQ"):
        run_convert(str(src), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_bad_directories(tmp_path):
    src, _ = awq_checkpoint(tmp_path)
    with pytest.raises(InvalidProblemError, match="must differ from IN"):
        run_convert(str(src), str(src), "--quiet")
    config = json.loads((src / "config.json").read_text())
    for bad, match, error in [({"quant_method": "eetq"}, "quant_method='eetq'",
                               UnsupportedError),
                              ({"quant_method": "awq", "version": "gemv"}, "not the GEMM layout",
                               UnsupportedError),
                              ({"quant_method": "gptq", "checkpoint_format": "marlin"},
                               "checkpoint_format='marlin'", UnsupportedError),
                              ({"quant_method": "gptq", "bits": "4"}, "bits='4' is not an integer",
                               InvalidProblemError)]:
        (src / "config.json").write_text(json.dumps(dict(config, quantization_config=bad)))
        with pytest.raises(error, match=match):
            run_convert(str(src), str(tmp_path / "out"), "--quiet")
    (src / "config.json").write_text(json.dumps(config))
    (src / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(InvalidProblemError, match="model-00002-of-00002.safetensors is missing"):
        run_convert(str(src), str(tmp_path / "out"), "--quiet")
    (src / "model.safetensors.index.json").unlink()
    (src / "other.safetensors").write_bytes((src / "model-00001-of-00002.safetensors").read_bytes())
    with pytest.raises(InvalidProblemError, match="2 .safetensors files .* and no "
                       "model.safetensors.index.json"):
        run_convert(str(src), str(tmp_path / "out"), "--quiet")
    assert not (tmp_path / "out").exists()


def test_a_failing_layer_leaves_no_output(tmp_path):
    """The second shard's layer fails while converting: nothing appears in OUT."""
    tensors, _ = autogptq_layers(4, 32, zero_zero=False)
    tensors["model.layers.1.self_attn.o_proj.g_idx"] = np.full(64, 7, np.int32)
    src, dst = tmp_path / "bad", tmp_path / "out"
    write_checkpoint(src, tensors, split(tensors), {"bits": 4, "group_size": 32,
                                                    "quant_method": "gptq"})
    with pytest.raises(InvalidProblemError, match=r"layer model\.layers\.1\.self_attn\.o_proj: "
                       r"g_idx\[0\]=7 is out of range"):
        run_convert(str(src), str(dst), "--quiet")
    assert not dst.exists() or not list(dst.iterdir())


def test_max_shard_size_reshards(tmp_path):
    """--max-shard-size writes new shards and an index, whatever the input's were."""
    src, want = awq_checkpoint(tmp_path)
    dst = tmp_path / "out"
    assert run_convert(str(src), str(dst), "--quiet", "--max-shard-size", "20KB", "-j", "1") == 0
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and all(f.startswith("model-0000") for f in files)
    got = {}
    for f in files:
        got.update(st.load_file(str(dst / f)))
    for prefix, weight in want.items():
        assert np.array_equal(got[f"{prefix}.weight"].view(np.uint16), weight.view(np.uint16))


def test_a_file_without_flags_and_in_shards(tmp_path, capsys):
    """A lone .safetensors file (no config): the format read from the shapes; with
    --max-shard-size, shards of it and an index beside OUT; through the CLI."""
    from dqgen import cli
    src, want = awq_checkpoint(tmp_path)
    single = tmp_path / "single.safetensors"
    tensors = {}
    for shard in sorted(src.glob("*.safetensors")):
        tensors.update(st.load_file(str(shard)))
    st.save_file(tensors, str(single))
    assert cli.main(["convert", str(single), str(tmp_path / "w.safetensors"), "--quiet"]) == 0
    got = st.load_file(str(tmp_path / "w.safetensors"))
    for prefix, weight in want.items():
        assert np.array_equal(got[f"{prefix}.weight"].view(np.uint16), weight.view(np.uint16))
    assert run_convert(str(single), str(tmp_path / "s.safetensors"), "--quiet",
                       "--max-shard-size", "10000") == 0
    index = json.loads((tmp_path / "s.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files[0] == f"s-00001-of-{len(files):05d}.safetensors" and len(files) > 2
    assert cli.main(["convert", str(src), str(tmp_path / "cli-out")]) == 0
    assert "3/3 layers" in capsys.readouterr().err
    with pytest.raises(InvalidProblemError, match="--max-shard-size='big' is not a size"):
        run_convert(str(single), str(tmp_path / "x.safetensors"), "--max-shard-size", "big")


@pytest.mark.parametrize("packing", ["auto_round:auto_awq", "auto_awq"])
def test_auto_round_awq_packing_needs_no_flags(tmp_path, packing):
    """AutoRound's config names its layout by packing_format: AutoAWQ's GEMM words here."""
    src, want = awq_checkpoint(tmp_path)
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "intel/auto-round", "bits": 4,
                                     "group_size": 32, "sym": False, "packing_format": packing}
    (src / "config.json").write_text(json.dumps(config))
    assert run_convert(str(src), str(tmp_path / "out"), "--quiet") == 0
    check_output(tmp_path / "out", want, extra_tensors())


def test_auto_round_gptq_packings_name_v1_and_v2(tmp_path):
    """auto_round:auto_gptq is GPTQ v1 (zeros stored minus one), auto_round and
    auto_round:gptqmodel v2: the same words read both ways differ by one zero step."""
    from dqgen.formats import checkpoint
    for packing, fmt in (("auto_round:auto_gptq", "gptq"), ("auto_round", "gptq_v2"),
                         ("auto_round:gptqmodel", "gptq_v2")):
        q = checkpoint.parse_quant_config({"quant_method": "auto-round", "bits": 4,
                                           "group_size": 128, "packing_format": packing}, "c")
        assert (q.method, q.checkpoint_format, q.bits, q.group_size) == ("gptq", fmt, 4, 128)
    with pytest.raises(UnsupportedError, match="packing_format='auto_round:llm_compressor'"):
        checkpoint.parse_quant_config({"quant_method": "auto-round",
                                       "packing_format": "auto_round:llm_compressor"}, "c")
