"""``dqgen convert`` on bitsandbytes checkpoints with no flags: NF4/FP4 (plain and double
quantized) and LLM.int8 layers quantized by bitsandbytes itself on the CPU, saved as
transformers saves them (the modules' state dict, BitsAndBytesConfig in config.json),
in several shards; each weight bit for bit what bitsandbytes' own dequantization gives
(``dequantize_4bit`` with the layer's QuantState, ``int8_vectorwise_dequant``), every
quant-state tensor dropped, the config without its quantization; contradicting configs
fail in one line naming the file and key."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from dqgen import cli
from formats_util import assert_bits_equal
from test_convert_fp4 import converted

torch = pytest.importorskip("torch")
bnb = pytest.importorskip("bitsandbytes", reason="the checkpoints are bitsandbytes' own")
st = pytest.importorskip("safetensors.torch", reason="checkpoints are written with safetensors")

TORCH_DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}
LAYERS = {"model.layers.0.self_attn.q_proj": (64, 32), "model.layers.0.mlp.down_proj": (128, 64),
          "model.layers.1.self_attn.o_proj": (64, 48)}  # prefix: (in_features, out_features)
QUANT_STATE_PARTS = ("weight.absmax", "weight.quant_map", "weight.nested_absmax",
                     "weight.nested_quant_map", "weight.quant_state.", "SCB", "weight_format")


def bnb_config(mode: str) -> dict:
    """config.json's quantization_config as transformers writes BitsAndBytesConfig."""
    from transformers import BitsAndBytesConfig
    if mode == "int8":
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=mode.split("-")[0],
                                    bnb_4bit_use_double_quant=mode.endswith("nested"),
                                    bnb_4bit_compute_dtype=torch.bfloat16)
    return json.loads(config.to_json_string(use_diff=False))


def quantized_layer(mode: str, k: int, n: int, dtype) -> torch.nn.Module:
    """A Linear4bit / Linear8bitLt quantized by bitsandbytes on the CPU from a random
    float layer of ``dtype``."""
    linear = torch.nn.Linear(k, n, bias=True).to(dtype)
    if mode == "int8":
        layer = bnb.nn.Linear8bitLt(k, n, bias=True, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(k, n, bias=True, compute_dtype=dtype,
                                  quant_type=mode.split("-")[0],
                                  compress_statistics=mode.endswith("nested"))
    layer.load_state_dict(linear.state_dict())
    return layer.to("cpu")  # quantizes


def bnb_checkpoint(path: Path, mode: str, model_dtype=torch.bfloat16) -> dict:
    """Three quantized layers, an embedding and a norm, the state dict in three shards
    (a layer's quant state in a shard other than its weight), config.json as
    transformers writes it; returns the state dict."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    torch.manual_seed(5)
    tensors = {"model.embed_tokens.weight": torch.randn(16, 64).to(model_dtype),
               "model.norm.weight": torch.ones(64, dtype=model_dtype)}
    for prefix, (k, n) in LAYERS.items():
        layer = quantized_layer(mode, k, n, model_dtype)
        tensors.update({f"{prefix}.{key}": value.detach().clone()
                        for key, value in layer.state_dict().items()})
    path.mkdir()
    names = sorted(tensors)
    weight_map = {}
    for i in range(3):
        file = f"model-{i + 1:05d}-of-00003.safetensors"
        st.save_file({n: tensors[n].contiguous() for n in names[i::3]}, str(path / file),
                     metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names[i::3], file))
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": 0}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"],
        "torch_dtype": "bfloat16", "quantization_config": bnb_config(mode)}))
    (path / "tokenizer.json").write_text('{"model": "test"}')
    return tensors


def bitsandbytes_weight(tensors: dict, prefix: str, dtype: str) -> torch.Tensor:
    """The layer's weight as bitsandbytes dequantizes it: the QuantState its loader
    builds from the saved tensors (its dtype set to ``dtype``), or LLM.int8's vectorwise
    dequant then ``.to(dtype)``."""
    from bitsandbytes import functional
    if f"{prefix}.SCB" in tensors:
        return functional.int8_vectorwise_dequant(
            tensors[f"{prefix}.weight"], tensors[f"{prefix}.SCB"]).to(TORCH_DTYPES[dtype])
    stats = {k[len(prefix) + len(".weight."):]: v for k, v in tensors.items()
             if k.startswith(f"{prefix}.weight.")}
    state = functional.QuantState.from_dict(stats, device=torch.device("cpu"))
    state.dtype = TORCH_DTYPES[dtype]
    return functional.dequantize_4bit(tensors[f"{prefix}.weight"], state)


def same_bits(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and tuple(got.shape) == tuple(want.shape)
    view = {2: torch.int16, 4: torch.int32}[got.element_size()]
    assert_bits_equal(got.contiguous().view(view).numpy(), want.contiguous().view(view).numpy())


@pytest.mark.parametrize("mode, dtype", [("nf4-nested", "bf16"), ("nf4", "f16"),
                                         ("fp4-nested", "f32"), ("fp4", "bf16"),
                                         ("int8", "bf16"), ("int8", "f16")])
def test_bitsandbytes_with_no_flags(tmp_path, mode, dtype):
    tensors = bnb_checkpoint(tmp_path / "in", mode)
    got = converted(tmp_path / "in", tmp_path / "out", "--dtype", dtype)
    for prefix, (k, n) in LAYERS.items():
        want = bitsandbytes_weight(tensors, prefix, dtype)
        assert tuple(want.shape) == (n, k)
        same_bits(got[f"{prefix}.weight"], want)
        assert torch.equal(got[f"{prefix}.bias"], tensors[f"{prefix}.bias"])
    assert not [n for n in got if any(part in n for part in QUANT_STATE_PARTS)]
    assert torch.equal(got["model.embed_tokens.weight"], tensors["model.embed_tokens.weight"])
    assert len(got) == 2 * len(LAYERS) + 2
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["torch_dtype"] == {"bf16": "bfloat16", "f16": "float16", "f32": "float32"}[dtype]
    assert (tmp_path / "out" / "tokenizer.json").read_text() == '{"model": "test"}'


def test_bitsandbytes_quant_storage_and_flag_without_config(tmp_path):
    """bnb_4bit_quant_storage=bfloat16 (FSDP's): the packed bytes stored as bf16 words
    read as the bytes they are; --format bitsandbytes on a checkpoint whose config was
    lost."""
    tensors = bnb_checkpoint(tmp_path / "in", "nf4-nested")
    src = tmp_path / "in"
    prefix = "model.layers.0.mlp.down_proj"
    index = json.loads((src / "model.safetensors.index.json").read_text())
    shard = index["weight_map"][f"{prefix}.weight"]
    held = st.load_file(str(src / shard))
    held[f"{prefix}.weight"] = held[f"{prefix}.weight"].reshape(-1, 2).view(torch.bfloat16)
    st.save_file(held, str(src / shard))
    config = json.loads((src / "config.json").read_text())
    del config["quantization_config"]
    (src / "config.json").write_text(json.dumps(config))
    got = converted(src, tmp_path / "out", "--format", "bitsandbytes", "--dtype", "bf16")
    for name in LAYERS:
        same_bits(got[f"{name}.weight"], bitsandbytes_weight(tensors, name, "bf16"))


def rewrite_config(src: Path, **changes) -> None:
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"].update(changes)
    (src / "config.json").write_text(json.dumps(config))


def convert_error(capsys, src: Path, out: Path) -> str:
    capsys.readouterr()
    assert cli.main(["convert", str(src), str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dqgen: error: ") and err.count("\n") == 1, err
    assert not out.exists()
    return err


def test_contradicting_configs_are_named(tmp_path, capsys):
    src = tmp_path / "in"
    bnb_checkpoint(src, "nf4-nested")
    config = f"{src / 'config.json'} quantization_config"
    state = ".weight.quant_state.bitsandbytes__nf4"  # of the first layer found
    rewrite_config(src, bnb_4bit_quant_type="fp4")
    err = convert_error(capsys, src, tmp_path / "out")
    assert f"{state} says quant_type 'nf4' but {config} says bnb_4bit_quant_type='fp4'" in err
    rewrite_config(src, bnb_4bit_quant_type="nf4", load_in_4bit=False, load_in_8bit=True)
    err = convert_error(capsys, src, tmp_path / "out")
    assert f"{state} is a bitsandbytes 4-bit layer, but {config} says load_in_8bit" in err
    rewrite_config(src, load_in_4bit=True)
    err = convert_error(capsys, src, tmp_path / "out")
    assert f"{config}: load_in_4bit and load_in_8bit are both true" in err
    rewrite_config(src, load_in_4bit=False, load_in_8bit=False)
    err = convert_error(capsys, src, tmp_path / "out")
    assert f"{config}: quant_method='bitsandbytes' but neither load_in_4bit nor" in err
    rewrite_config(src, load_in_4bit=True, bnb_4bit_quant_type="int4")
    err = convert_error(capsys, src, tmp_path / "out")
    assert f"{config}: bnb_4bit_quant_type='int4' is not one bitsandbytes writes" in err


def test_an_int8_checkpoint_said_to_be_4bit(tmp_path, capsys):
    src = tmp_path / "in"
    bnb_checkpoint(src, "int8")
    rewrite_config(src, load_in_4bit=True, load_in_8bit=False)
    err = convert_error(capsys, src, tmp_path / "out")
    assert (f".SCB is a bitsandbytes 8-bit layer, but "
            f"{src / 'config.json'} quantization_config says load_in_4bit") in err


def test_damaged_layers_are_named(tmp_path, capsys):
    """A quant state that is gone (its absmax left alone), a weight of the wrong size."""
    src = tmp_path / "in"
    bnb_checkpoint(src, "nf4")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    prefix = "model.layers.1.self_attn.o_proj"
    state = f"{prefix}.weight.quant_state.bitsandbytes__nf4"
    shard = index["weight_map"][f"{prefix}.weight"]
    held = st.load_file(str(src / shard))
    held[f"{prefix}.weight"] = held[f"{prefix}.weight"][:-1].contiguous()
    st.save_file(held, str(src / shard))
    err = convert_error(capsys, src, tmp_path / "out")
    assert f"{prefix}.weight has 1535 bytes, expected 1536" in err
    shard = index["weight_map"].pop(state)
    held = st.load_file(str(src / shard))
    del held[state]
    st.save_file(held, str(src / shard))
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    err = convert_error(capsys, src, tmp_path / "out")
    assert f"{prefix}.weight.absmax has no {state[:-3]}nf4 (or fp4) beside it" in err


def test_an_older_config_without_quant_method():
    """Configs written before transformers named quant_method say load_in_4bit alone."""
    from dqgen.formats import checkpoint
    q = checkpoint.parse_quant_config({"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}, "c")
    assert (q.method, q.bits, q.extra["quant_type"]) == ("bitsandbytes", 4, "nf4")
    assert checkpoint.parse_quant_config({"bits": 4}, "c").method == "gptq"
