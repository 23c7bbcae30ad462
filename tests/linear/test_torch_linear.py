"""``dqgen.torch``'s fused linear: ``QuantLinear`` bit for bit ``reference.linear``, x's
gradient by the transposed kernel bit for bit ``reference.linear(dy, W.T)``, the op clean
under opcheck, ``torch.compile(fullgraph=True)`` and ``torch.export``; and end to end, a
small transformers Llama whose linears come from a GGUF file (Q8_0, Q4_0, Q5_0 by gguf-py;
Q4_K, Q6_K from valid random blocks; the Q/K rows permuted as llama.cpp's converter writes
them) through ``quantize_model``: logits
within the documented bound of the same model holding the dequantized weights in f32, the
same greedy tokens, and no float copy of any weight."""

from __future__ import annotations

import gc

import gguf
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="dqgen.torch needs torch")
transformers = pytest.importorskip("transformers", reason="the end-to-end model is a "
                                   "transformers Llama")

import dqgen.torch as dqt  # noqa: E402
import dqgen.torch_nn as dqt_nn  # noqa: E402
from dqgen import reference  # noqa: E402
from dqgen.formats.weight import QuantizedWeight  # noqa: E402
from formats_util import assert_bits_equal  # noqa: E402


def q8_weight(rng, n, k, qtype="Q8_0"):
    w = rng.standard_normal((n, k)).astype(np.float32)
    t = gguf.GGMLQuantizationType[qtype]
    return QuantizedWeight.ggml(gguf.quants.quantize(w, t), qtype, (n, k))


def _np(t):
    return t.detach().float().numpy() if t.dtype is torch.bfloat16 else t.detach().numpy()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_and_x_gradient_are_the_references(dtype):
    rng = np.random.default_rng(0)
    weight = q8_weight(rng, 40, 96)
    bias = torch.randn(40, dtype=dtype)
    layer = dqt.QuantLinear(weight, bias)
    x = torch.randn(2, 3, 96, dtype=dtype, requires_grad=True)
    y = layer(x)
    w = weight.dequantize("f32")
    np_dtype = {torch.float32: np.float32, torch.bfloat16: __import__("ml_dtypes").bfloat16}[dtype]
    want = reference.linear(_np(x).reshape(6, 96).astype(np_dtype), w,
                            _np(bias).astype(np_dtype), np_dtype)
    assert_bits_equal(dqt_nn.host_view(y.detach().reshape(6, 40)), want)
    dy = torch.randn(2, 3, 40, dtype=dtype)
    y.backward(dy)
    want_dx = reference.linear(_np(dy).reshape(6, 40).astype(np_dtype), w.T, None, np_dtype)
    assert_bits_equal(dqt_nn.host_view(x.grad.reshape(6, 96)), want_dx)
    assert torch.equal(layer.bias.grad, dy.reshape(6, 40).sum(0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_decode_step_path_follows_the_buffers(dtype):
    """Without autograd a 2-D contiguous CPU x takes the path that keeps the weight's numpy
    views: its bits are the op's (bias or not), and a load_state_dict (in place), a buffer
    replaced, a pickle and a copy all give the new weights' products."""
    import copy
    import pickle
    rng = np.random.default_rng(3)
    first, second = q8_weight(rng, 24, 64), q8_weight(rng, 24, 64)
    bias = torch.randn(24).to(dtype)

    def op(layer, x):   # the registered op: the path every traced or differentiated call takes
        return torch.ops.dqgen.linear(x, layer.weight_tensors, layer.format, 24, 64,
                                      layer.bias, None, None, "f32")
    def copied(w):   # a layer's buffers share the weight's memory: each layer its own
        return QuantizedWeight.ggml(w.arrays["data"].copy(), "Q8_0", (24, 64))
    with torch.no_grad():
        for b in (None, bias):
            layer = dqt.QuantLinear(copied(first), b)
            x = torch.randn(3, 64).to(dtype)
            assert torch.equal(layer(x), op(layer, x))
            assert torch.equal(layer(x[:1]), op(layer, x[:1]))
            layer.load_state_dict(dqt.QuantLinear(copied(second), b).state_dict())
            assert torch.equal(layer(x), op(dqt.QuantLinear(copied(second), b), x))
            layer.weight_data = torch.from_numpy(first.arrays["data"].copy())
            assert torch.equal(layer(x), op(dqt.QuantLinear(copied(first), b), x))
            assert not torch.equal(layer(x), op(dqt.QuantLinear(copied(second), b), x))
            for other in (pickle.loads(pickle.dumps(layer)), copy.deepcopy(layer)):
                assert torch.equal(other(x), layer(x))
            assert torch.equal(layer(x.t().contiguous().t()), op(layer, x))   # not contiguous
            # what .to() and .cuda() do: the old buffers are not kept alive by their views
            import weakref
            old = weakref.ref(layer.weight_data)
            layer._apply(lambda t: t.clone())
            gc.collect()
            assert old() is None
            assert torch.equal(layer(x), op(layer, x))


def test_quant_linear_on_a_gpu():
    """QuantLinear moved to a CUDA device runs there, bit for bit its CPU result."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    rng = np.random.default_rng(3)
    layer = dqt.QuantLinear(q8_weight(rng, 40, 96), torch.randn(40))
    x = torch.randn(3, 96)
    want = layer(x)
    got = layer.cuda()(x.cuda()).cpu()
    assert torch.equal(got, want)


def test_opcheck_compile_and_export():
    from torch.library import opcheck
    rng = np.random.default_rng(1)
    weight = q8_weight(rng, 24, 64)
    layer = dqt.QuantLinear(weight, torch.randn(24))
    x = torch.randn(3, 64)
    opcheck(torch.ops.dqgen.linear.default,
            (x, layer.weight_tensors, layer.format, 24, 64, layer.bias.detach()))
    opcheck(torch.ops.dqgen.linear_backward.default,
            (torch.randn(3, 24), layer.weight_tensors, layer.format, 24, 64))
    eager = layer(x)
    assert torch.equal(torch.compile(layer, fullgraph=True)(x), eager)
    exported = torch.export.export(layer, (x,))
    assert torch.equal(exported.module()(x), eager)


def test_bad_calls_are_named():
    from dqgen import InvalidProblemError
    rng = np.random.default_rng(2)
    layer = dqt.QuantLinear(q8_weight(rng, 8, 32))
    with pytest.raises(InvalidProblemError, match="last axis must be 32"):
        layer(torch.randn(2, 16))
    with pytest.raises(InvalidProblemError, match="float32, float16 or bfloat16"):
        layer(torch.randn(2, 32, dtype=torch.float64))
    with pytest.raises(InvalidProblemError, match="QuantizedWeight"):
        dqt.QuantLinear(torch.randn(8, 32))


# --- end to end: a transformers Llama from a GGUF file --------------------------------

CONFIG = dict(vocab_size=96, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
              rms_norm_eps=1e-5, tie_word_embeddings=False)
NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
         "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
         "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter's Q/K row permutation (convert_hf_to_gguf's ``permute``)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2) \
        .reshape(w.shape)


# K-quants gguf-py cannot write: random blocks, their f16 super-block scales (at these
# byte offsets) small and finite, so every block is valid.
K_HALVES = {"Q4_K": (0, 2), "Q6_K": (208,)}


def _k_quant_blocks(shape, qtype) -> np.ndarray:
    values, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(values + nbytes)
    data = rng.integers(0, 256, (shape[0], shape[1] // values * nbytes), dtype=np.uint8)
    blocks = data.reshape(-1, nbytes)
    for at in K_HALVES[qtype.name]:
        blocks[:, at:at + 2] = rng.uniform(0.001, 0.01, (blocks.shape[0], 1)).astype(
            np.float16).view(np.uint8)
    return data


def _write_gguf(model, path, qtypes):
    """The model's linears, quantized by gguf-py, under llama.cpp's names."""
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    for i, layer in enumerate(model.model.layers):
        for j, (module, short) in enumerate(NAMES.items()):
            w = layer.get_submodule(module).weight.detach().numpy().astype(np.float32)
            if short == "attn_q":
                w = _permute(w, cfg.num_attention_heads)
            elif short == "attn_k":
                w = _permute(w, cfg.num_key_value_heads)
            qtype = gguf.GGMLQuantizationType[qtypes[(i + j) % len(qtypes)]]
            data = _k_quant_blocks(w.shape, qtype) if qtype.name in K_HALVES else \
                gguf.quants.quantize(w, qtype)
            writer.add_tensor(f"blk.{i}.{short}.weight", data, raw_shape=data.shape,
                              raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _model(seed=0, **overrides):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**{**CONFIG, **overrides})
    return transformers.LlamaForCausalLM(config).eval()


def test_quantize_model_matches_the_dequantized_model(tmp_path):
    model = _model()
    path = tmp_path / "tiny.gguf"
    _write_gguf(model, path, ("Q8_0", "Q4_0", "Q5_0", "Q4_K", "Q6_K"))
    reference_model = _model()
    quantized = dqt.quantize_model(_model(), path)
    swapped = [name for name, m in quantized.named_modules() if isinstance(m, dqt.QuantLinear)]
    assert len(swapped) == 2 * len(NAMES)
    # the reference holds each QuantLinear's dequantized weight in f32
    for name in swapped:
        q = quantized.get_submodule(name)
        w = QuantizedWeight.from_tensors(q.format, q.weight_tensors, (q.out_features,
                                                                     q.in_features))
        reference_model.get_submodule(name).weight.data = torch.from_numpy(w.dequantize("f32"))
    # the Q rows match the model's own (the permutation undone), not llama.cpp's order
    q_proj = quantized.model.layers[0].self_attn.q_proj
    w = QuantizedWeight.from_tensors(q_proj.format, q_proj.weight_tensors, (256, 256))
    original = model.model.layers[0].self_attn.q_proj.weight.detach().numpy()
    assert np.abs(w.dequantize("f32") - original).max() < 0.05 * np.abs(original).max()
    assert_same_outputs(quantized, reference_model)


def assert_same_outputs(quantized, reference_model) -> None:
    """Logits within SPEC.md §8's bound propagated through the layers (far below the
    quantization error), and the same greedy tokens."""
    ids = torch.tensor([[1, 5, 9, 13, 2, 7]])
    with torch.no_grad():
        got = quantized(ids).logits
        want = reference_model(ids).logits
    assert (got - want).abs().max() < 1e-4 * want.abs().max()
    with torch.no_grad():
        a = quantized.generate(ids, max_new_tokens=8, do_sample=False)
        b = reference_model.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(a, b)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * __import__("os").sysconf("SC_PAGE_SIZE")


def test_quantize_model_holds_the_packed_weights_only(tmp_path):
    """Swapping a model's linears grows the process by about the packed bytes of the
    permuted Q/K rows (the rest are views of the mapped file), not by a float copy."""
    model = _model(hidden_size=512, intermediate_size=2048, num_attention_heads=8,
                   num_key_value_heads=8)
    path = tmp_path / "wide.gguf"
    _write_gguf(model, path, ("Q8_0",))
    float_bytes = sum(m.weight.numel() * 4 for m in model.modules()
                      if isinstance(m, torch.nn.Linear) and m is not model.lm_head)
    gc.collect()
    before = _rss_bytes()
    dqt.quantize_model(model, path)
    gc.collect()
    grown = _rss_bytes() - before
    assert grown < float_bytes / 4, (grown, float_bytes)
