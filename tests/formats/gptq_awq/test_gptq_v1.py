"""GPTQ v1 zero points, bit for bit with the tools that write and read them: GPTQModel's
word-wise conversion (the default), AutoGPTQ's torch dequant, the exllama/vLLM rule.

The rules differ only where a stored field is all ones, so every strategy here forces
such fields (0xF nibbles, 0b11 pairs, 0xFF bytes) into the words."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from dqgen.formats import gptq, pack
from formats_util import assert_bits_equal, random_f16
from oracles import checkpoints as oracle
from oracles import peers

torch = pytest.importorskip("torch", reason="the peers' dequant formulas are torch code")


def as_i32(*words: int) -> np.ndarray:
    return np.array(words, dtype=np.uint32).view(np.int32)


def zero_points(qzeros: np.ndarray, bits: int, **kwargs) -> np.ndarray:
    """Each column's zero point as dqgen reads it: -W for q = 0 and scale 1."""
    rows, cols = 32 // bits, qzeros.shape[1] * 32 // bits
    w = gptq.dequantize(np.zeros((1, cols), np.int32), qzeros, np.ones((1, cols), np.float16),
                        bits=bits, dtype="f32", **kwargs)
    assert w.shape == (rows, cols) and (w == w[0]).all()
    return -w[0].astype(np.int64)


def test_the_issue_word():
    """GPTQModel exports zeros [0, 8, 8, ...] as 0x7777776F; each tool reads it back its way."""
    v2_to_v1, v1_to_v2 = peers.gptqmodel_zero_conversions()
    v2 = torch.from_numpy(as_i32(0x88888880).reshape(1, 1))
    exported = v2_to_v1(v2, 4).numpy()
    assert exported.view(np.uint32).tolist() == [[0x7777776F]]
    assert v1_to_v2(torch.from_numpy(exported), 4).numpy().view(np.uint32).tolist() == [[0x88888880]]
    assert zero_points(exported, 4).tolist() == [0, 8, 8, 8, 8, 8, 8, 8]
    assert zero_points(exported, 4, v1_zeros="gptqmodel").tolist() == [0, 8, 8, 8, 8, 8, 8, 8]
    assert zero_points(exported, 4, v1_zeros="autogptq").tolist() == [0, 7, 8, 8, 8, 8, 8, 8]
    assert zero_points(exported, 4, v1_zeros="exllama").tolist() == [16, 7, 8, 8, 8, 8, 8, 8]
    packed = pack.pack_gptq(np.zeros((8, 8), np.uint8), [[0, 8, 8, 8, 8, 8, 8, 8]], 4, "gptq")[1]
    assert packed.view(np.uint32).tolist() == [[0x7777776F]]


def words_with_all_ones_fields(bits: int):
    """int32 words, about a third of whose fields are all ones."""
    fields = 32 // bits
    top = (1 << bits) - 1
    field = st.one_of(st.just(top), st.just(0), st.integers(0, top))
    return st.lists(field, min_size=fields, max_size=fields).map(
        lambda fs: int(np.uint32(sum(f << (bits * j) for j, f in enumerate(fs))).view(np.int32)))


@st.composite
def v1_layers(draw):
    bits = draw(st.sampled_from([2, 4, 8]))
    per = 32 // bits
    cols = per * draw(st.integers(1, 3))
    groups = draw(st.integers(1, 3))
    group = per * draw(st.integers(1, 2))
    words = draw(st.lists(words_with_all_ones_fields(bits), min_size=groups * cols // per,
                          max_size=groups * cols // per))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    qweight = rng.integers(-(1 << 31), 1 << 31, size=(groups * group // per, cols)).astype(np.int32)
    qzeros = np.array(words, dtype=np.int32).reshape(groups, cols // per)
    scales = random_f16(rng, (groups, cols), extreme=False)
    g_idx = (np.arange(groups * group) // group).astype(np.int32)
    if draw(st.booleans()):
        g_idx = rng.permutation(g_idx).astype(np.int32)
    return bits, group, dict(qweight=qweight, qzeros=qzeros, scales=scales, g_idx=g_idx)


@settings(max_examples=40, deadline=None)
@given(v1_layers())
def test_default_v1_is_gptqmodels_load(case):
    """dqgen's default v1 decode = GPTQModel's own v1 -> v2 conversion, then its dequant
    formula (scales[g_idx] * (q - zeros[g_idx]), f16)."""
    bits, group, layer = case
    _, v1_to_v2 = peers.gptqmodel_zero_conversions()
    v2 = v1_to_v2(torch.from_numpy(layer["qzeros"]), bits).numpy()
    want = oracle.gptq_dequantize_torch(layer["qweight"], v2, layer["scales"], layer["g_idx"],
                                        bits, "gptq_v2")
    assert_bits_equal(gptq.dequantize(**layer, bits=bits, group_size=group), want)


@settings(max_examples=30, deadline=None)
@given(bits=st.sampled_from([2, 4, 8]), groups=st.integers(1, 4), seed=st.integers(0, 2**32 - 1))
def test_v1_pack_is_gptqmodels_export(bits, groups, seed):
    """pack_gptq's v1 = GPTQModel's v2 -> v1 export of the v2 words, zero points of 0 and of
    2^bits - 1 included, and it reads back as the same weight as v2."""
    rng = np.random.default_rng(seed)
    per, top = 32 // bits, (1 << bits) - 1
    cols = 2 * per
    zeros = rng.choice([0, 0, top, 1, rng.integers(0, top + 1)], size=(groups, cols))
    q = rng.integers(0, top + 1, size=(groups * per, cols))
    v2_to_v1, _ = peers.gptqmodel_zero_conversions()
    qweight, v2 = pack.pack_gptq(q, zeros, bits, "gptq_v2")
    _, v1 = pack.pack_gptq(q, zeros, bits, "gptq")
    assert np.array_equal(v1, v2_to_v1(torch.from_numpy(v2), bits).numpy())
    scales = random_f16(rng, (groups, cols), extreme=False)
    assert_bits_equal(gptq.dequantize(qweight, v1, scales, bits=bits, group_size=per),
                      gptq.dequantize(qweight, v2, scales, bits=bits, group_size=per,
                                      checkpoint_format="gptq_v2"))


def autogptq_dequant(qweight, qzeros, scales, bits, group_size):
    """AutoGPTQ's torch dequant (QuantLinear.forward without its CUDA extension): [K, N] f16."""
    k, n = qweight.shape[0] * 32 // bits, qweight.shape[1]
    layer = peers.autogptq_quant_linear()(bits, group_size, k, n, False)
    layer.qweight.copy_(torch.from_numpy(qweight))
    layer.qzeros.copy_(torch.from_numpy(qzeros))
    layer.scales.copy_(torch.from_numpy(scales))
    return peers.autogptq_weight(layer).numpy()


@settings(max_examples=15, deadline=None)
@given(bits=st.sampled_from([2, 4, 8]), data=st.data())
def test_autogptq_rule_is_autogptqs_torch_dequant(bits, data):
    """v1_zeros="autogptq" = AutoGPTQ's own forward: each field plus 1, modulo 2^bits."""
    per = 32 // bits
    cols, groups, group = 32, 2, 32  # AutoGPTQ packs 32 columns into bits words
    words = data.draw(st.lists(words_with_all_ones_fields(bits), min_size=groups * cols // per,
                               max_size=groups * cols // per))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    qweight = rng.integers(-(1 << 31), 1 << 31, size=(groups * group // per, cols)).astype(np.int32)
    qzeros = np.array(words, dtype=np.int32).reshape(groups, cols // per)
    scales = random_f16(rng, (groups, cols), extreme=False)
    want = autogptq_dequant(qweight, qzeros, scales, bits, group)
    got = gptq.dequantize(qweight, qzeros, scales, bits=bits, group_size=group, v1_zeros="autogptq")
    assert_bits_equal(got, want)


@settings(max_examples=20, deadline=None)
@given(v1_layers())
def test_exllama_rule_adds_one_to_each_field(case):
    """v1_zeros="exllama": the exllama/vLLM kernels' item4(...) + 1, so all ones reads 2^bits."""
    bits, group, layer = case
    want = oracle.gptq_dequantize(layer["qweight"], layer["qzeros"], layer["scales"],
                                  layer["g_idx"], bits, "gptq", np.float16, group, "exllama")
    got = gptq.dequantize(**layer, bits=bits, group_size=group, v1_zeros="exllama")
    assert_bits_equal(got, want)
