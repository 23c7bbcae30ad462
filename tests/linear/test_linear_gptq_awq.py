"""GPTQ and AWQ in the fused linear (``formats.weight_repack``): each layer repacked into
the family's ``QuantizedWeight`` dequantizes bit for bit to the transpose of
``gptq.dequantize`` / ``awq.dequantize`` in f32 (bits 2, 4, 8; v1 under each zero rule,
v2, act-order, a short last group, AWQ's interleaved order; random words, so all-ones
zero fields occur, and layers from GPTQModel's and AutoAWQ's own packers), and ``linear``
with it equals ``reference.linear`` on that weight (act-order: in the stored column
order, SPEC.md §8); a checkpoint directory reads as its producer's loader reads it."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest

from dqgen import InvalidProblemError, UnsupportedError, reference
from dqgen.formats import awq, gptq
from dqgen.formats.weight import linear
from dqgen.formats.weight_repack import awq_weight, checkpoint_weights, gptq_weight
from formats_util import assert_bits_equal, random_words
from oracles import peers

K, N, GROUP = 128, 48, 32
X_DTYPES = {"f32": np.float32, "bf16": ml_dtypes.bfloat16}


def gptq_layer(rng, bits, k=K, group=GROUP, scale_dtype=np.float16, act_order=False):
    groups = -(-k // group)
    layer = {"qweight": random_words(rng, (k * bits // 32, N)),
             "qzeros": random_words(rng, (groups, N * bits // 32)),
             "scales": (rng.random((groups, N)) * 0.02).astype(scale_dtype)}
    if act_order:
        layer["g_idx"] = (rng.permutation(k) // group).astype(np.int32)
    return layer


GPTQ_CASES = {  # name: (bits, checkpoint_format, v1_zeros, layer options)
    "2bit_v1": (2, "gptq", "gptqmodel", {}),
    "4bit_v1": (4, "gptq", "gptqmodel", {}),
    "4bit_v1_autogptq": (4, "gptq", "autogptq", {}),
    "4bit_v1_exllama": (4, "gptq", "exllama", {}),
    "4bit_v2_bf16_scales": (4, "gptq_v2", "gptqmodel", {"scale_dtype": ml_dtypes.bfloat16}),
    "8bit_v1_exllama": (8, "gptq", "exllama", {}),
    "4bit_act_order": (4, "gptq", "gptqmodel", {"act_order": True}),
    "8bit_act_order_v2": (8, "gptq_v2", "gptqmodel", {"act_order": True}),
    "4bit_short_last_group": (4, "gptq", "gptqmodel", {"k": 96, "group": 64}),
}


def check_linear(weight, w_f32: np.ndarray, rng) -> None:
    """``linear(x, weight)`` = ``reference.linear`` on the f32 weight, for x f32 and bf16
    and M 1 and 5, its columns in the weight's stored order."""
    order = weight.column_order
    stored = w_f32 if order is None else w_f32[:, order]
    for dtype in X_DTYPES.values():
        for m in (1, 5):
            x = rng.standard_normal((m, w_f32.shape[1])).astype(dtype)
            xs = x if order is None else x[:, order]
            want = reference.linear(xs, np.ascontiguousarray(stored), None, dtype)
            assert_bits_equal(linear(x, weight), want)


@pytest.mark.parametrize("case", GPTQ_CASES)
def test_gptq_weight_is_gptq_dequantize(case):
    bits, fmt, rule, options = GPTQ_CASES[case]
    rng = np.random.default_rng(len(case))
    group = options.get("group", GROUP)
    layer = gptq_layer(rng, bits, **options)
    kwargs = dict(bits=bits, checkpoint_format=fmt, v1_zeros=rule, group_size=group)
    weight = gptq_weight(**layer, **kwargs)
    want = np.ascontiguousarray(gptq.dequantize(**layer, **kwargs, dtype="f32").T)
    assert weight.shape == (N, layer["qweight"].shape[0] * 32 // bits)
    assert (weight.column_order is not None) == options.get("act_order", False)
    assert_bits_equal(weight.dequantize("f32"), want)
    check_linear(weight, want, rng)


def test_awq_weight_is_awq_dequantize():
    rng = np.random.default_rng(7)
    layer = {"qweight": random_words(rng, (K, N // 8)),
             "qzeros": random_words(rng, (K // GROUP, N // 8)),
             "scales": (rng.random((K // GROUP, N)) * 0.02).astype(np.float16)}
    weight = awq_weight(**layer)
    want = np.ascontiguousarray(awq.dequantize(**layer, dtype="f32").T)
    assert_bits_equal(weight.dequantize("f32"), want)
    check_linear(weight, want, rng)


def test_peers_packed_layers():
    """GPTQModel's own pack (act-order g_idx) and AutoAWQ's from_linear (its torch
    tensors as they are), read back as their own dequant formulas give them (f16)."""
    torch = pytest.importorskip("torch", reason="the peers' packers are torch code")
    from oracles import checkpoints as oracle
    torch.manual_seed(3)
    linear_layer = torch.nn.Linear(K, 64, bias=False)   # AutoAWQ packs 32 columns at once
    w = linear_layer.weight.data
    g = w.reshape(64, -1, GROUP)
    scale = ((g.amax(-1) - g.amin(-1)) / 15).half().float()
    zero = torch.clamp(torch.round(-g.amin(-1) / scale), 0, 15)
    g_idx = (torch.randperm(K) // GROUP).int()
    qweight, qzeros, scales, g_idx = peers.gptqmodel_pack()(linear_layer, scale, zero, g_idx, 4)
    layer = dict(qweight=qweight.numpy(), qzeros=qzeros.numpy(), scales=scales.numpy(),
                 g_idx=g_idx.numpy())
    weight = gptq_weight(**layer, checkpoint_format="gptq_v2")
    want = oracle.gptq_dequantize_torch(**layer, bits=4, checkpoint_format="gptq_v2")
    assert_bits_equal(weight.dequantize("f16"), np.ascontiguousarray(want.T))
    wq_linear, dequantize_gemm = peers.autoawq_gemm()
    awq_layer = wq_linear.from_linear(linear_layer, 4, GROUP, scales=scale.T.contiguous(),
                                      zeros=zero.T.contiguous())
    weight = awq_weight(awq_layer.qweight, awq_layer.qzeros, awq_layer.scales)  # CPU torch
    want = dequantize_gemm(awq_layer.qweight, awq_layer.qzeros, awq_layer.scales, 4, GROUP)
    assert_bits_equal(weight.dequantize("f16"), np.ascontiguousarray(want.numpy().T))


def test_bad_layers_are_named():
    rng = np.random.default_rng(9)
    g_idx = (np.arange(K) // GROUP).astype(np.int32)
    g_idx[GROUP] = 0   # group 0 gets 33 columns, group 1 31
    with pytest.raises(UnsupportedError, match="g_idx puts 33 columns in group 0; the fused "
                       "linear reads GPTQ whose groups are all group_size=32 columns long"):
        gptq_weight(**gptq_layer(rng, 4), g_idx=g_idx, group_size=GROUP)
    with pytest.raises(InvalidProblemError, match="bits=5 is not supported"):
        gptq_weight(**gptq_layer(rng, 4), bits=5)
    awq_layer = {"qweight": random_words(rng, (K, N // 8)),
                 "qzeros": random_words(rng, (K // GROUP, N // 8)),
                 "scales": np.ones((K // GROUP, N), np.float16)}
    with pytest.raises(InvalidProblemError, match="use awq_weight"):
        gptq_weight(**awq_layer)
    with pytest.raises(InvalidProblemError, match="use gptq_weight"):
        awq_weight(**{k: v for k, v in gptq_layer(rng, 4).items()})
    bad = gptq_layer(rng, 4)
    bad["qzeros"] = bad["qzeros"][:, :-1]
    with pytest.raises(InvalidProblemError, match=r"qzeros has shape \(4, 5\), expected "
                       r"\(4, 6\)"):
        gptq_weight(**bad)


# --- checkpoint directories, as their producers' loaders read them --------------------

def test_autogptq_directory_reads_with_its_rule(tmp_path):
    """AutoGPTQ's pack stores a zero point of 0 as -1; its config says AutoGPTQ, so the
    weights read with its own rule: equal to AutoGPTQ's own dequant (f16), bias kept."""
    from test_checkpoint_dirs import autogptq_layers, split, write_checkpoint
    tensors, want = autogptq_layers(4, 32, zero_zero=True)
    src = tmp_path / "autogptq"
    write_checkpoint(src, tensors, split(tensors), {
        "bits": 4, "group_size": 32, "desc_act": False, "sym": False,
        "model_file_base_name": None, "quant_method": "gptq"}, in_config_json=False)
    weights = checkpoint_weights(src)
    assert sorted(weights) == sorted(want)
    config = json.loads((src / "quantize_config.json").read_text())
    del config["bits"]   # read from the words a qzeros row holds
    (src / "quantize_config.json").write_text(json.dumps(config))
    for prefix, (weight, bias) in checkpoint_weights(src).items():
        assert_bits_equal(weights[prefix][0].dequantize("f16"), want[prefix])
        assert_bits_equal(weight.dequantize("f16"), want[prefix])
        if prefix.endswith("q_proj"):
            assert bias.dtype == np.float32 and (bias == 1).all()
        else:
            assert bias is None


def test_awq_directory_and_refusals(tmp_path):
    from test_checkpoint_dirs import awq_checkpoint
    src, want = awq_checkpoint(tmp_path)
    weights = checkpoint_weights(src)
    assert sorted(weights) == sorted(want)
    for prefix, (weight, _) in weights.items():
        assert_bits_equal(weight.dequantize("f16"), want[prefix])
    config = (src / "config.json").read_text()
    (src / "config.json").write_text(config.replace('"quant_method": "awq"',
                                                    '"quant_method": "fp8"'))
    with pytest.raises(UnsupportedError, match="quant_method='fp8'; quantize_model reads "
                       "GPTQ and AWQ"):
        checkpoint_weights(src)
