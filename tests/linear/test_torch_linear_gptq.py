"""End to end: a small transformers Llama whose linears are written as a GPTQ v1 4-bit
checkpoint directory (round to nearest in groups of 32, packed by GPTQModel's own packer
and exported to v1 as it does; once with act-order) and loaded by ``quantize_model``:
each weight is what GPTQModel loads (bit for bit, f16), the logits are within 1e-4 of the
max logit of the same model holding the dequantized weights in f32, greedy generation
gives the same tokens; checkpoints that do not fit the model are refused by name."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="dqgen.torch needs torch")
pytest.importorskip("transformers", reason="the end-to-end model is a transformers Llama")
st = pytest.importorskip("safetensors.numpy", reason="checkpoints are written with safetensors")

import dqgen.torch as dqt  # noqa: E402
from dqgen import InvalidProblemError  # noqa: E402
from dqgen.formats.weight import QuantizedWeight  # noqa: E402
from formats_util import assert_bits_equal  # noqa: E402
from oracles import checkpoints as oracle  # noqa: E402
from oracles import peers  # noqa: E402
from test_torch_linear import NAMES, _model, assert_same_outputs  # noqa: E402

BITS, GROUP = 4, 32


def rtn_params(w: torch.Tensor, g_idx: torch.Tensor):
    """Asymmetric min/max scales (f16) and zero points ``[out, groups]`` of each group's
    columns (``g_idx``), as GPTQ's quantizer finds them without its error feedback."""
    maxq = (1 << BITS) - 1
    groups = int(g_idx.max()) + 1
    scale = torch.empty(w.shape[0], groups)
    zero = torch.empty(w.shape[0], groups)
    for g in range(groups):
        cols = w[:, g_idx == g]
        lo = torch.clamp(cols.amin(-1), max=0)
        hi = torch.clamp(cols.amax(-1), min=0)
        scale[:, g] = ((hi - lo) / maxq).to(torch.float16).float()
        zero[:, g] = torch.clamp(torch.round(-lo / scale[:, g]), 0, maxq)
    return scale, zero


def write_gptq_checkpoint(model, path, act_order: bool):
    """The model's decoder linears as a GPTQModel v1 checkpoint directory; returns each
    layer's weight as GPTQModel loads it ([N, K] f16)."""
    pack = peers.gptqmodel_pack()
    v2_to_v1, v1_to_v2 = peers.gptqmodel_zero_conversions()
    tensors, loaded = {}, {}
    for i, layer in enumerate(model.model.layers):
        for module in NAMES:
            prefix = f"model.layers.{i}.{module}"
            linear = layer.get_submodule(module)
            k = linear.in_features
            g_idx = (torch.randperm(k) if act_order else torch.arange(k)) // GROUP
            g_idx = g_idx.int()
            scale, zero = rtn_params(linear.weight.data, g_idx)
            qweight, v2, scales, g_idx = pack(linear, scale, zero, g_idx, BITS)
            qzeros = v2_to_v1(v2, BITS)
            tensors.update({f"{prefix}.qweight": qweight.numpy(),
                            f"{prefix}.qzeros": qzeros.numpy(),
                            f"{prefix}.scales": scales.numpy(), f"{prefix}.g_idx": g_idx.numpy()})
            loaded[prefix] = np.ascontiguousarray(oracle.gptq_dequantize_torch(
                qweight.numpy(), v1_to_v2(qzeros, BITS).numpy(), scales.numpy(),
                g_idx.numpy(), BITS, "gptq_v2").T)
    path.mkdir()
    st.save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "quantization_config": {
            "quant_method": "gptq", "bits": BITS, "group_size": GROUP, "desc_act": act_order,
            "sym": False, "checkpoint_format": "gptq",
            "meta": {"quantizer": ["gptqmodel:2.2.0"]}}}))
    return loaded


@pytest.mark.parametrize("act_order", [False, True], ids=["groups", "act_order"])
def test_quantize_model_from_a_gptq_directory(tmp_path, act_order):
    src = tmp_path / "gptq"
    loaded = write_gptq_checkpoint(_model(), src, act_order)
    reference_model = _model()
    quantized = dqt.quantize_model(_model(), src)
    swapped = [name for name, m in quantized.named_modules() if isinstance(m, dqt.QuantLinear)]
    assert sorted(swapped) == sorted(loaded)
    for name in swapped:
        q = quantized.get_submodule(name)
        assert (q.column_order is not None) == act_order
        w = QuantizedWeight.from_tensors(q.format, q.weight_tensors,
                                         (q.out_features, q.in_features))
        w = QuantizedWeight(w.descriptor, w.arrays, w.shape, q.column_order)
        assert_bits_equal(w.dequantize("f16"), loaded[name])   # what GPTQModel loads
        reference_model.get_submodule(name).weight.data = torch.from_numpy(w.dequantize("f32"))
    assert_same_outputs(quantized, reference_model)


def test_a_checkpoint_that_does_not_fit_the_model_is_refused(tmp_path):
    src = tmp_path / "gptq"
    write_gptq_checkpoint(_model(num_hidden_layers=1), src, act_order=False)
    with pytest.raises(InvalidProblemError, match=r"gptq: model\.layers\.0\.\S+ is \(\d+, "
                       r"\d+\), the model's is \(128, \d+\)"):
        dqt.quantize_model(_model(hidden_size=128, num_hidden_layers=1), src)
    with pytest.raises(InvalidProblemError, match=r"gptq: layer model\.layers\.0\.\S+ is not a "
                       r"torch\.nn\.Linear of the model"):
        dqt.quantize_model(_model(num_hidden_layers=1).model, src)
