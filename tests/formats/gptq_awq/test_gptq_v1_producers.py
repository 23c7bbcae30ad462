"""GPTQ v1 zero points read as the checkpoint's producer reads them.

The v1 rules differ only where a stored zero field is all ones, which is how a zero
point of 0 is stored, so every checkpoint here has some. GPTQModel writes
``meta.quantizer = ["gptqmodel:<version>"]`` and reads v1 word-wise; AutoGPTQ writes its
``BaseQuantizeConfig.to_dict()`` (no ``meta``) and loads ``qlinear_cuda_old`` (each field
+ 1, modulo 2^bits) or, for act-order layers in groups, ``qlinear_cuda`` (each field + 1).
Both facts come from the installed packages' own code: AutoGPTQ's config class, its
kernel choice (``dynamically_import_QuantLinear``, run as this CPU-only machine runs it)
and both QuantLinear classes' ``pack`` and torch dequant."""

from __future__ import annotations

import argparse
import ast
import builtins
import dataclasses
import json
import logging
import types
import typing
from functools import lru_cache

import numpy as np
import pytest

from dqgen import InvalidProblemError
from dqgen.formats import checkpoint, convert, gptq
from dqgen.formats.checkpoint import open_checkpoint, parse_quant_config, v1_zeros_rule
from formats_util import assert_bits_equal
from oracles import peers

torch = pytest.importorskip("torch", reason="the peers' packers are torch code")
st = pytest.importorskip("safetensors.numpy", reason="checkpoints are written with safetensors")

# The dqgen rule of each AutoGPTQ kernel, as FORMATS.md gives it.
KERNEL_RULE = {"qlinear_cuda_old": "autogptq", "qlinear_cuda": "exllama",
               "qlinear_exllama": "exllama", "qlinear_exllamav2": "exllama"}


# --- the installed AutoGPTQ, taken out file by file (its package imports transformers) --

@lru_cache(maxsize=None)
def autogptq_quantize_config():
    """AutoGPTQ's ``BaseQuantizeConfig``: what it saves as quantize_config.json and as
    config.json's quantization_config (``to_dict``)."""
    path = peers._package_dir("auto_gptq") / "modeling" / "_base.py"
    tree = ast.parse(path.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef)
               and n.name == "BaseQuantizeConfig")
    cls.bases = []  # PushToHubMixin: only for uploads
    namespace = {"dataclass": dataclasses.dataclass, "field": dataclasses.field,
                 "fields": dataclasses.fields, "Optional": typing.Optional,
                 "Dict": typing.Dict, "List": typing.List, "Union": typing.Union,
                 "Any": typing.Any}
    exec(compile(ast.Module(body=[cls], type_ignores=[]), str(path), "exec"), namespace)
    return namespace["BaseQuantizeConfig"]


@lru_cache(maxsize=None)
def autogptq_kernel_choice():
    """``(desc_act, group_size, bits) -> kernel module name``: AutoGPTQ's own
    ``dynamically_import_QuantLinear`` with ``from_quantized``'s defaults, on a machine
    without its exllama, Marlin, triton or QiGen kernels (the imports it makes are
    recorded, not run)."""
    path = peers._package_dir("auto_gptq") / "utils" / "import_utils.py"
    (function,) = peers._functions(path, {"dynamically_import_QuantLinear"})

    def record_import(name, globals=None, locals=None, fromlist=(), level=0):
        return types.SimpleNamespace(QuantLinear=name.rpartition(".")[2])
    namespace = {"__builtins__": {**vars(builtins), "__import__": record_import},
                 "Optional": typing.Optional, "logger": logging.getLogger(__name__),
                 "torch": types.SimpleNamespace(version=types.SimpleNamespace(hip=None)),
                 "QIGEN_AVAILABLE": False, "QIGEN_EXCEPTION": None,
                 "EXLLAMA_KERNELS_AVAILABLE": False, "EXLLAMAV2_KERNELS_AVAILABLE": False,
                 "MARLIN_AVAILABLE": False, "MARLIN_EXCEPTION": None,
                 "TRITON_AVAILABLE": False}
    exec(compile(ast.Module(body=[function], type_ignores=[]), str(path), "exec"), namespace)
    choose = namespace["dynamically_import_QuantLinear"]
    return lambda desc_act, group_size, bits: choose(
        use_triton=False, desc_act=desc_act, group_size=group_size, bits=bits,
        disable_exllama=None, disable_exllamav2=False, disable_marlin=True, use_qigen=False)


@lru_cache(maxsize=None)
def autogptq_quant_linear(kernel: str):
    """AutoGPTQ's ``QuantLinear`` of ``nn_modules/qlinear/<kernel>.py`` (its ``pack``,
    and its torch dequant in ``forward`` without the CUDA extension)."""
    if kernel == "qlinear_cuda_old":
        return peers.autogptq_quant_linear()
    path = peers._package_dir("auto_gptq") / "nn_modules" / "qlinear" / f"{kernel}.py"
    logging.getLogger(f"peer_auto_gptq_{kernel}").disabled = True
    with peers._placeholders({"transformers": peers._transformers_placeholder()}):
        return peers._load(path, f"peer_auto_gptq_{kernel}").QuantLinear


# --- checkpoints packed by the installed AutoGPTQ -------------------------------------

LAYERS = {"model.layers.0.self_attn.q_proj": (64, 32), "model.layers.0.mlp.down_proj": (128, 64)}


def minmax(w: torch.Tensor, g_idx: torch.Tensor, bits: int):
    """Asymmetric min/max scale and zero point of each output row and group (the groups
    g_idx gives), [out, groups], as GPTQ's quantizer finds them."""
    groups = int(g_idx.max()) + 1
    lo = torch.stack([w[:, g_idx == g].amin(1) for g in range(groups)], 1).clamp(max=0)
    hi = torch.stack([w[:, g_idx == g].amax(1) for g in range(groups)], 1).clamp(min=0)
    scale = ((hi - lo) / ((1 << bits) - 1)).to(torch.float16).to(torch.float32)
    return scale, torch.clamp(torch.round(-lo / scale), 0, (1 << bits) - 1)


def autogptq_checkpoint(path, bits: int, group: int, desc_act: bool, seed: int = 0,
                        metadata: dict | None = None):
    """A checkpoint as AutoGPTQ saves one: the layers packed by the QuantLinear its loader
    picks for this config, quantize_config.json and config.json's quantization_config
    from its BaseQuantizeConfig. Returns the tensors and each layer's weight [K, N] as
    that QuantLinear's own dequant builds it."""
    kernel = autogptq_kernel_choice()(desc_act, group, bits)
    quant_linear = autogptq_quant_linear(kernel)
    torch.manual_seed(seed)
    tensors, want = {}, {}
    for prefix, (k, n) in LAYERS.items():
        linear = torch.nn.Linear(k, n, bias=False).half()
        g_idx = (torch.arange(k) // group).int()
        if desc_act:
            g_idx = g_idx[torch.randperm(k)].contiguous()
        # the first rows' first group all positive: a zero point of 0, which AutoGPTQ
        # stores as -1 over the fields above it
        w = linear.weight.data
        w[:4, g_idx == 0] = w[:4, g_idx == 0].abs() + 0.01
        scale, zero = minmax(w.float(), g_idx, bits)
        layer = quant_linear(bits, group, k, n, False)
        layer.pack(linear, scale, zero, g_idx)
        tensors.update({f"{prefix}.{part}": getattr(layer, part).numpy()
                        for part in ("qweight", "qzeros", "scales", "g_idx")})
        want[prefix] = peers.autogptq_weight(layer).numpy()
    stored = np.concatenate([tensors[f"{p}.qzeros"].reshape(-1) for p in LAYERS]).view(np.uint32)
    top = (1 << bits) - 1
    assert any(((stored >> (bits * j)) & top == top).any() for j in range(32 // bits)), \
        "no all-ones zero field: the rules would agree"
    config = autogptq_quantize_config()(bits=bits, group_size=group, desc_act=desc_act,
                                        sym=False).to_dict()
    path.mkdir()
    st.save_file(tensors, str(path / "model.safetensors"),
                 metadata={"format": "pt", **(metadata or {})})
    (path / "quantize_config.json").write_text(json.dumps(config))
    (path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"],
                                                  "quantization_config": config}))
    return kernel, tensors, want


def dequantize(tensors: dict, prefix: str, bits: int, group: int, rule: str) -> np.ndarray:
    get = {part: tensors[f"{prefix}.{part}"] for part in ("qweight", "qzeros", "scales", "g_idx")}
    return gptq.dequantize(**get, bits=bits, group_size=group, v1_zeros=rule)


# --- the rule convert picks ------------------------------------------------------------

@pytest.mark.parametrize("desc_act, group", [(False, 32), (True, 32), (True, -1), (False, -1)])
def test_autogptq_config_picks_the_kernel_autogptq_loads(desc_act, group):
    """The rule for AutoGPTQ's own config is the one of the kernel its loader imports."""
    config = autogptq_quantize_config()(bits=4, group_size=group, desc_act=desc_act).to_dict()
    assert "meta" not in config
    quant = parse_quant_config(config, "quantize_config.json")
    assert quant.producer == "autogptq"
    kernel = autogptq_kernel_choice()(desc_act, group, 4)
    assert v1_zeros_rule(quant)[0] == KERNEL_RULE[kernel]


def test_gptqmodel_names_itself_where_dqgen_looks():
    """GPTQModel's writer lists ``f"{META_QUANTIZER_GPTQMODEL}:{version}"`` under
    ``config[META_FIELD][META_FIELD_QUANTIZER]``: those constants, from its source."""
    path = peers._package_dir("gptqmodel") / "quantization" / "config.py"
    names = {"META_FIELD", "META_FIELD_QUANTIZER", "META_QUANTIZER_GPTQMODEL"}
    values = {node.targets[0].id: ast.literal_eval(node.value)
              for node in ast.parse(path.read_text()).body
              if isinstance(node, ast.Assign) and len(node.targets) == 1
              and getattr(node.targets[0], "id", None) in names}
    assert values == {"META_FIELD": "meta", "META_FIELD_QUANTIZER": "quantizer",
                      "META_QUANTIZER_GPTQMODEL": "gptqmodel"}
    config = {"bits": 4, "group_size": 32, "desc_act": True, "quant_method": "gptq",
              "checkpoint_format": "gptq", "meta": {"quantizer": ["gptqmodel:7.7.0"]}}
    quant = parse_quant_config(config, "config.json quantization_config")
    assert quant.producer == "gptqmodel" and v1_zeros_rule(quant)[0] == "gptqmodel"


@pytest.mark.parametrize("config, metadata, rule", [
    ({"bits": 4, "quant_method": "gptq"}, {}, "gptqmodel"),  # says nothing: the default
    ({"bits": 4, "meta": {"quantizer": "gptqmodel:2.0.0"}}, {}, "gptqmodel"),
    ({"bits": 4, "meta": {"quantizer": ["optimum:1.0"]}}, {}, "gptqmodel"),
    ({"bits": 4}, {"auto_gptq_version": "0.7.1"}, "autogptq"),  # AutoGPTQ's file metadata
    ({"bits": 4, "desc_act": True}, {"auto_gptq_version": "0.7.1"}, "exllama"),
    # GPTQModel re-saving an AutoGPTQ model names itself: its export is word-wise
    ({"bits": 4, "model_file_base_name": None, "meta": {"quantizer": ["gptqmodel:1.0"]}},
     {"auto_gptq_version": "0.7.1"}, "gptqmodel"),
])
def test_rule_by_what_the_config_and_file_say(config, metadata, rule):
    quant = parse_quant_config(config, "quantize_config.json")
    assert v1_zeros_rule(quant, metadata)[0] == rule


# --- checkpoints written by the installed packers, read bit for bit --------------------

@pytest.mark.parametrize("bits, group, desc_act", [(4, 32, False), (4, 32, True), (8, 32, True),
                                                   (2, 32, False)])
def test_autogptq_checkpoint_reads_as_autogptq_loads_it(tmp_path, bits, group, desc_act):
    """Packed by the QuantLinear AutoGPTQ's loader picks for the config (zero points of
    0 included): the checkpoint's rule gives that QuantLinear's own weights, bit for bit;
    the default rule does not."""
    kernel, tensors, want = autogptq_checkpoint(tmp_path / "ckpt", bits, group, desc_act)
    assert kernel == ("qlinear_cuda" if desc_act else "qlinear_cuda_old")
    ckpt = open_checkpoint(tmp_path / "ckpt")
    rule, why = v1_zeros_rule(ckpt.quant)
    assert rule == KERNEL_RULE[kernel] and "AutoGPTQ" in why and "config.json" in why
    for prefix in LAYERS:
        assert_bits_equal(dequantize(tensors, prefix, bits, group, rule), want[prefix])
    with pytest.raises(AssertionError):
        for prefix in LAYERS:
            assert_bits_equal(dequantize(tensors, prefix, bits, group, "gptqmodel"), want[prefix])


def _convert_picks_by_producer() -> bool:
    """Whether ``dqgen convert`` asks the checkpoint for its v1 rule (--v1-zeros has no
    fixed default)."""
    parser = argparse.ArgumentParser()
    convert.add_arguments(parser)
    return parser.get_default("v1_zeros") is None


needs_convert_plumbing = pytest.mark.skipif(
    not _convert_picks_by_producer(),
    reason="dqgen convert does not consult checkpoint.v1_zeros_rule yet (--v1-zeros "
    "defaults to gptqmodel)")


def run_convert(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    convert.add_arguments(parser)
    return convert.run(parser.parse_args(list(argv)))


def converted(out) -> dict:
    return {name[:-len(".weight")]: array.T
            for name, array in st.load_file(str(out)).items() if name.endswith(".weight")}


@needs_convert_plumbing
@pytest.mark.parametrize("desc_act", [False, True])
def test_convert_without_flags_reads_as_autogptq_loads(tmp_path, capsys, desc_act):
    _, tensors, want = autogptq_checkpoint(tmp_path / "ckpt", 4, 32, desc_act)
    assert run_convert(str(tmp_path / "ckpt"), str(tmp_path / "out"), "--quiet") == 0
    got = converted(tmp_path / "out" / "model.safetensors")
    for prefix in LAYERS:
        assert_bits_equal(got[prefix], want[prefix])
    rule = "exllama" if desc_act else "autogptq"
    assert f"--v1-zeros {rule}" in capsys.readouterr().err  # convert says what it chose


@needs_convert_plumbing
def test_v1_zeros_flag_overrides_the_producer(tmp_path):
    _, tensors, want = autogptq_checkpoint(tmp_path / "ckpt", 4, 32, False)
    assert run_convert(str(tmp_path / "ckpt"), str(tmp_path / "out"), "--quiet",
                       "--v1-zeros", "gptqmodel") == 0
    got = converted(tmp_path / "out" / "model.safetensors")
    for prefix in LAYERS:
        assert_bits_equal(got[prefix], dequantize(tensors, prefix, 4, 32, "gptqmodel"))
    assert any(not np.array_equal(got[p].view(np.uint16), want[p].view(np.uint16))
               for p in LAYERS)


def test_awq_method_over_a_gptq_layout_names_the_key(tmp_path):
    """quant_method "awq" with GPTQ's checkpoint_format: the config contradicts itself,
    said with the file and both keys (no AWQ "version" it does not have)."""
    _, tensors, _ = autogptq_checkpoint(tmp_path / "ckpt", 4, 32, False)
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    config["quantization_config"].update(quant_method="awq", checkpoint_format="gptq")
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    with pytest.raises(InvalidProblemError) as info:
        open_checkpoint(tmp_path / "ckpt")
    text = str(info.value)
    assert str(tmp_path / "ckpt" / "config.json") in text
    assert "quant_method='awq'" in text and "checkpoint_format='gptq'" in text
    assert "version='gptq'" not in text
    # GPTQModel writes the AWQ layout under format/checkpoint_format: still read
    quant = parse_quant_config({"quant_method": "awq", "bits": 4, "format": "gemm",
                                "checkpoint_format": "gemm"}, "x")
    assert quant.method == "awq"
    with pytest.raises(Exception, match="AWQ format='gemv' is not the GEMM layout"):
        parse_quant_config({"quant_method": "awq", "format": "gemv"}, "x")


def test_checkpoint_module_documents_the_producer_keys():
    assert checkpoint.AUTOGPTQ_CONFIG_KEY in autogptq_quantize_config()().to_dict()
