"""``dqgen convert`` on FP4 checkpoints with no flags: gpt-oss MXFP4 experts (bit for bit
transformers' own ``convert_moe_packed_tensors``), ModelOpt NVFP4 (``hf_quant_config.json``
or config.json's ``quant_method: "modelopt"``; ModelOpt's ``NVFP4QTensor.dequantize``) and
compressed-tensors' ``nvfp4-``/``mxfp4-pack-quantized`` (the library's own decompress).
Each checkpoint is written as its exporter writes it, in several shards; the float
output drops the scales and the quantization config; contradicting configs fail in one
line naming the file and key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dqgen import cli
from formats_util import assert_bits_equal

torch = pytest.importorskip("torch")
st = pytest.importorskip("safetensors.torch", reason="checkpoints are written with safetensors")

TORCH_DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}
INT_VIEWS = {2: torch.int16, 4: torch.int32}


def write_checkpoint(path: Path, tensors: dict, config: dict, shards: int = 3,
                     extra_files: dict | None = None) -> None:
    """``tensors`` in ``shards`` shards (names dealt round-robin, so a layer's parts fall
    in different shards) with their index, config.json, a tokenizer file and
    ``extra_files``."""
    path.mkdir()
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = names[i::shards]
        st.save_file({n: tensors[n].contiguous() for n in part}, str(path / file),
                     metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": 0}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(config))
    (path / "tokenizer.json").write_text('{"model": "test"}')
    for name, value in (extra_files or {}).items():
        (path / name).write_text(json.dumps(value))


def converted(src: Path, out: Path, *flags: str) -> dict:
    assert cli.main(["convert", str(src), str(out), "--quiet", *flags]) == 0
    got = {}
    for shard in sorted(out.glob("*.safetensors")):
        got.update(st.load_file(str(shard)))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(got)
    return got


def same_bits(got, want) -> None:
    assert got.dtype == want.dtype and tuple(got.shape) == tuple(want.shape)
    view = INT_VIEWS[got.element_size()]
    assert_bits_equal(got.contiguous().view(view).numpy(), want.contiguous().view(view).numpy())


def fp4_codes(gen, *shape) -> torch.Tensor:
    """Random bytes of e2m1 pairs: every code, both nibbles."""
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)


def e4m3_scales(gen, *shape) -> torch.Tensor:
    """Positive finite E4M3 scales, subnormals included."""
    codes = torch.randint(1, 0x7F, shape, dtype=torch.uint8, generator=gen)
    return codes.view(torch.float8_e4m3fn)


def check_float_config(out: Path, dtype: str) -> None:
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["torch_dtype"] == {"bf16": "bfloat16", "f16": "float16", "f32": "float32"}[dtype]
    assert not (out / "hf_quant_config.json").exists()
    assert (out / "tokenizer.json").read_text() == '{"model": "test"}'
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def convert_error(capsys, src: Path, out: Path) -> str:
    capsys.readouterr()
    assert cli.main(["convert", str(src), str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dqgen: error: ") and err.count("\n") == 1, err
    assert not out.exists()
    return err


# --- gpt-oss MXFP4 -------------------------------------------------------------------

GPT_OSS_CONFIG = {"model_type": "gpt_oss", "architectures": ["GptOssForCausalLM"],
                  "torch_dtype": "bfloat16", "quantization_config": {
                      "quant_method": "mxfp4", "modules_to_not_convert": [
                          "model.layers.*.self_attn", "model.layers.*.mlp.router",
                          "model.embed_tokens", "lm_head"]}}


def gpt_oss_checkpoint(path: Path) -> dict:
    """Two layers of gpt-oss experts (E=2, hidden 64, intermediate 32) as its checkpoint
    holds them: ``*_blocks`` [E, N, K / 32, 16], ``*_scales`` [E, N, K / 32] and float
    biases, routers and attention left in bf16."""
    gen = torch.Generator().manual_seed(7)
    experts, hidden, inter = 2, 64, 32
    tensors = {}
    for layer in range(2):
        p = f"model.layers.{layer}.mlp"
        for proj, (n, k) in (("gate_up_proj", (2 * inter, hidden)), ("down_proj", (hidden, inter))):
            tensors[f"{p}.experts.{proj}_blocks"] = fp4_codes(gen, experts, n, k // 32, 16)
            tensors[f"{p}.experts.{proj}_scales"] = torch.randint(
                112, 140, (experts, n, k // 32), dtype=torch.uint8, generator=gen)
            tensors[f"{p}.experts.{proj}_bias"] = torch.randn(experts, n, generator=gen).bfloat16()
        tensors[f"{p}.router.weight"] = torch.randn(experts, hidden, generator=gen).bfloat16()
        tensors[f"model.layers.{layer}.self_attn.q_proj.weight"] = torch.randn(
            hidden, hidden, generator=gen).bfloat16()
    write_checkpoint(path, tensors, GPT_OSS_CONFIG)
    return tensors


@pytest.mark.parametrize("dtype", ["bf16", "f16"])
def test_gpt_oss_mxfp4_with_no_flags(tmp_path, dtype):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors
    tensors = gpt_oss_checkpoint(tmp_path / "in")
    got = converted(tmp_path / "in", tmp_path / "out", "--dtype", dtype)
    blocks = [n for n in tensors if n.endswith("_blocks")]
    assert len(blocks) == 4
    for name in blocks:
        base = name[:-len("_blocks")]
        want = convert_moe_packed_tensors(tensors[name], tensors[f"{base}_scales"],
                                          dtype=TORCH_DTYPES[dtype])
        same_bits(got[base], want)  # named as transformers names it: no _blocks
    assert not [n for n in got if n.endswith(("_blocks", "_scales"))]
    for name, value in tensors.items():
        if not name.endswith(("_blocks", "_scales")):
            assert torch.equal(got[name], value), name
    check_float_config(tmp_path / "out", dtype)


def test_gpt_oss_damaged_tensors_are_named(tmp_path, capsys):
    gpt_oss_checkpoint(tmp_path / "in")
    src = tmp_path / "in"
    name = "model.layers.1.mlp.experts.down_proj_scales"
    shard = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"][name]
    held = st.load_file(str(src / shard))
    held[name] = held[name][:, :, :0].contiguous()
    st.save_file(held, str(src / shard))
    err = convert_error(capsys, src, tmp_path / "out")
    assert f"{name} is U8 [2, 64, 0], expected uint8 [2, 64, 1]" in err
    del held[name]
    st.save_file(held, str(src / shard))
    index = json.loads((src / "model.safetensors.index.json").read_text())
    del index["weight_map"][name]
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    err = convert_error(capsys, src, tmp_path / "out")
    assert f"model.layers.1.mlp.experts.down_proj_blocks has no {name} beside it" in err


# --- ModelOpt NVFP4 ------------------------------------------------------------------

E2M1 = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, 0, -0.5, -1, -1.5, -2, -3, -4, -6])


def modelopt_dequantize(weight, weight_scale, weight_scale_2, dtype):
    """ModelOpt's ``NVFP4QTensor.dequantize`` (its torch path, block 16), as written
    there: the f32 e2m1 table (code 8 is +0), the f32 block scale times the per-tensor
    one, the product in f32, then ``.to(dtype)``."""
    n, half = weight.shape
    unpacked = torch.empty(n, 2 * half, dtype=dtype)
    unpacked[..., 1::2] = weight >> 4
    unpacked[..., 0::2] = weight & 0x0F
    values = E2M1[unpacked.reshape(-1).long()].reshape(n, 2 * half)
    per_block = weight_scale.to(torch.float32) * weight_scale_2
    return (values.view(n, -1, 16) * per_block.unsqueeze(-1)).reshape(n, 2 * half).to(dtype)


HF_QUANT_CONFIG = {"producer": {"name": "modelopt", "version": "0.29.0"},
                   "quantization": {"quant_algo": "NVFP4", "kv_cache_quant_algo": None,
                                    "group_size": 16, "exclude_modules": ["lm_head"]}}
LLAMA_CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                "torch_dtype": "bfloat16"}


def modelopt_checkpoint(path: Path, in_config_json: bool) -> dict:
    """Three NVFP4 linear layers as ModelOpt's export writes them: uint8 ``weight``
    [N, K / 2], E4M3 ``weight_scale`` [N, K / 16], 0-d f32 ``weight_scale_2`` and
    ``input_scale``; lm_head and norms in bf16; ``hf_quant_config.json`` (and, as newer
    exports do, config.json's quantization_config)."""
    gen = torch.Generator().manual_seed(11)
    tensors = {}
    for name, (n, k) in {"model.layers.0.self_attn.q_proj": (32, 64),
                         "model.layers.0.mlp.down_proj": (64, 96),
                         "model.layers.1.mlp.up_proj": (48, 32)}.items():
        tensors[f"{name}.weight"] = fp4_codes(gen, n, k // 2)
        tensors[f"{name}.weight_scale"] = e4m3_scales(gen, n, k // 16)
        tensors[f"{name}.weight_scale_2"] = torch.tensor(0.0123, dtype=torch.float32)
        tensors[f"{name}.input_scale"] = torch.tensor(0.5, dtype=torch.float32)
    tensors["lm_head.weight"] = torch.randn(16, 64, generator=gen).bfloat16()
    tensors["model.norm.weight"] = torch.ones(64, dtype=torch.bfloat16)
    config = dict(LLAMA_CONFIG)
    if in_config_json:
        config["quantization_config"] = {"quant_method": "modelopt", "quant_algo": "NVFP4",
                                         "group_size": 16, "ignore": ["lm_head"],
                                         "kv_cache_quant_algo": None}
    write_checkpoint(path, tensors, config, extra_files={"hf_quant_config.json": HF_QUANT_CONFIG})
    return tensors


@pytest.mark.parametrize("dtype", ["bf16", "f16", "f32"])
@pytest.mark.parametrize("in_config_json", [False, True])
def test_modelopt_nvfp4_with_no_flags(tmp_path, dtype, in_config_json):
    tensors = modelopt_checkpoint(tmp_path / "in", in_config_json)
    got = converted(tmp_path / "in", tmp_path / "out", "--dtype", dtype)
    layers = [n[:-len(".weight_scale_2")] for n in tensors if n.endswith(".weight_scale_2")]
    for prefix in layers:
        want = modelopt_dequantize(tensors[f"{prefix}.weight"], tensors[f"{prefix}.weight_scale"],
                                   tensors[f"{prefix}.weight_scale_2"], TORCH_DTYPES[dtype])
        same_bits(got[f"{prefix}.weight"], want)
    assert not [n for n in got if n.endswith(("weight_scale", "weight_scale_2", "input_scale"))]
    assert torch.equal(got["lm_head.weight"], tensors["lm_head.weight"])
    assert len(got) == len(layers) + 2
    check_float_config(tmp_path / "out", dtype)


def test_modelopt_contradicting_configs_are_named(tmp_path, capsys):
    modelopt_checkpoint(tmp_path / "in", in_config_json=True)
    src = tmp_path / "in"
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (src / "config.json").write_text(json.dumps(config))
    err = convert_error(capsys, src, tmp_path / "out")
    assert (f"{src / 'hf_quant_config.json'} says quant_algo='NVFP4' but {src / 'config.json'} "
            "quantization_config says quant_method='fp8'") in err
    config["quantization_config"] = {"quant_method": "modelopt", "quant_algo": "FP8"}
    (src / "config.json").write_text(json.dumps(config))
    err = convert_error(capsys, src, tmp_path / "out")
    assert "quantization_config: quant_algo='FP8' is not a ModelOpt algorithm" in err
    del config["quantization_config"]
    (src / "config.json").write_text(json.dumps(config))
    hf = json.loads(json.dumps(HF_QUANT_CONFIG))
    hf["quantization"]["quant_algo"] = "W4A8_AWQ"
    (src / "hf_quant_config.json").write_text(json.dumps(hf))
    err = convert_error(capsys, src, tmp_path / "out")
    assert (f"{src / 'hf_quant_config.json'}: quantization.quant_algo='W4A8_AWQ' is not a "
            "ModelOpt algorithm dqgen converts (NVFP4)") in err
    hf["quantization"] = {"quant_algo": "NVFP4", "group_size": 32}
    (src / "hf_quant_config.json").write_text(json.dumps(hf))
    err = convert_error(capsys, src, tmp_path / "out")
    assert f"{src / 'hf_quant_config.json'}: NVFP4 group_size=32" in err


def test_modelopt_missing_scale_is_named(tmp_path, capsys):
    modelopt_checkpoint(tmp_path / "in", in_config_json=False)
    src = tmp_path / "in"
    index = json.loads((src / "model.safetensors.index.json").read_text())
    name = "model.layers.0.mlp.down_proj.weight_scale_2"
    shard = index["weight_map"].pop(name)
    held = st.load_file(str(src / shard))
    del held[name]
    st.save_file(held, str(src / shard))
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    err = convert_error(capsys, src, tmp_path / "out")
    assert f"model.layers.0.mlp.down_proj.weight is U8 (NVFP4) but has no {name} beside it" in err


# --- compressed-tensors nvfp4-/mxfp4-pack-quantized -----------------------------------

def ct_fp4_checkpoint(path: Path, top_format: str = "mixed-precision") -> dict:
    """An NVFP4 and an MXFP4 layer as compressed-tensors stores them (``weight_packed``,
    ``weight_scale``, NVFP4's ``weight_global_scale`` and ``input_global_scale``), in
    their config groups; returns each layer's weight as the library decompresses it."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES
    gen = torch.Generator().manual_seed(13)
    tensors, want = {}, {}
    nv = "model.layers.0.self_attn.q_proj"
    tensors[f"{nv}.weight_packed"] = fp4_codes(gen, 32, 32)
    tensors[f"{nv}.weight_scale"] = e4m3_scales(gen, 32, 4)
    tensors[f"{nv}.weight_global_scale"] = torch.tensor([81.5], dtype=torch.float32)
    tensors[f"{nv}.input_global_scale"] = torch.tensor([3.0], dtype=torch.float32)
    mx = "model.layers.0.mlp.down_proj"
    tensors[f"{mx}.weight_packed"] = fp4_codes(gen, 48, 64)
    tensors[f"{mx}.weight_scale"] = torch.randint(110, 140, (48, 4), dtype=torch.uint8,
                                                  generator=gen)
    for prefix, preset, fmt in ((nv, "NVFP4", "nvfp4-pack-quantized"),
                                (mx, "MXFP4A16", "mxfp4-pack-quantized")):
        scheme = QuantizationScheme(targets=["Linear"], weights=PRESET_SCHEMES[preset]["weights"])
        state = {k.rpartition(".")[2]: v for k, v in tensors.items() if k.startswith(prefix)}
        want[f"{prefix}.weight"] = BaseCompressor.get_value_from_registry(fmt).decompress(
            state, scheme)["weight"]
    tensors["lm_head.weight"] = torch.randn(8, 64, generator=gen).bfloat16()
    groups = {"group_0": {"targets": ["re:.*q_proj"], "format": "nvfp4-pack-quantized",
                          "weights": {"num_bits": 4, "type": "float", "symmetric": True,
                                      "strategy": "tensor_group", "group_size": 16}},
              "group_1": {"targets": ["re:.*down_proj"], "format": "mxfp4-pack-quantized",
                          "weights": {"num_bits": 4, "type": "float", "symmetric": True,
                                      "strategy": "group", "group_size": 32}}}
    write_checkpoint(path, tensors, dict(LLAMA_CONFIG, quantization_config={
        "quant_method": "compressed-tensors", "format": top_format, "ignore": ["lm_head"],
        "quantization_status": "compressed", "config_groups": groups}), shards=2)
    return tensors, want


def test_compressed_tensors_fp4_with_no_flags(tmp_path):
    tensors, want = ct_fp4_checkpoint(tmp_path / "in")
    got = converted(tmp_path / "in", tmp_path / "out", "--dtype", "bf16")
    for name, weight in want.items():
        same_bits(got[name], weight)
    assert sorted(got) == sorted([*want, "lm_head.weight"])
    check_float_config(tmp_path / "out", "bf16")


def test_compressed_tensors_fp4_layer_its_config_does_not_name(tmp_path, capsys):
    ct_fp4_checkpoint(tmp_path / "in")
    src = tmp_path / "in"
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["format"] = "pack-quantized"
    (src / "config.json").write_text(json.dumps(config))
    err = convert_error(capsys, src, tmp_path / "out")
    assert ("model.layers.0.self_attn.q_proj.weight_packed is NVFP4 "
            "(model.layers.0.self_attn.q_proj.weight_scale is F8_E4M3), but "
            f"{src / 'config.json'} quantization_config names no nvfp4-pack-quantized "
            "format") in err


def test_nothing_of_the_named_format(tmp_path, capsys):
    """A ModelOpt config over MXFP4 tensors: no NVFP4 layer, said in one line."""
    gpt_oss_checkpoint(tmp_path / "in")
    (tmp_path / "in" / "hf_quant_config.json").write_text(json.dumps(HF_QUANT_CONFIG))
    config = json.loads((tmp_path / "in" / "config.json").read_text())
    del config["quantization_config"]
    (tmp_path / "in" / "config.json").write_text(json.dumps(config))
    err = convert_error(capsys, tmp_path / "in", tmp_path / "out")
    assert "no NVFP4 layers" in err
