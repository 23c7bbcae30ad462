"""GPTQ and AWQ layers, bit for bit against numpy unpackers written from FORMATS.md."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, strategies as st

from dqgen import InvalidProblemError, UnsupportedError
from dqgen.formats import awq, gptq, pack
from dqgen.formats.plan import FormatPlan
from dqgen.ir import AwqDequantizeDescriptor, GptqDequantizeDescriptor
from formats_util import FLOATS, assert_bits_equal, random_f16, random_words
from oracles import checkpoints as oracle


def gptq_layer(rng, rows, cols, bits, group_size, act_order, scale_dtype="f16", extreme=True):
    per = 32 // bits
    groups = -(-rows // group_size)
    scales = random_f16(rng, (groups, cols), extreme).astype(FLOATS[scale_dtype])
    g_idx = None
    if act_order:
        g_idx = (rng.permutation(rows) // group_size).astype(np.int32)
    return dict(qweight=random_words(rng, (rows // per, cols)),
                qzeros=random_words(rng, (groups, cols // per)), scales=scales, g_idx=g_idx)


GPTQ_CASES = [  # bits, checkpoint format, act-order, output dtype, scale dtype
    (4, "gptq", False, "f16", "f16"), (4, "gptq", True, "f16", "f16"),
    (4, "gptq_v2", True, "bf16", "f16"), (2, "gptq", True, "f32", "f16"),
    (8, "gptq_v2", False, "f32", "f16"), (8, "gptq", True, "f16", "f16"),
    (2, "gptq_v2", False, "f64", "f16"), (4, "gptq_v2", False, "f16", "f32"),
]


@pytest.mark.parametrize("bits,fmt,act_order,out,scale", GPTQ_CASES)
def test_gptq_matches_oracle(bits, fmt, act_order, out, scale):
    rng = np.random.default_rng(bits * 7 + act_order)
    rows, cols, group = 128, 64, 32
    layer = gptq_layer(rng, rows, cols, bits, group, act_order, scale)
    got = gptq.dequantize(**layer, bits=bits, checkpoint_format=fmt, dtype=out)
    want = oracle.gptq_dequantize(layer["qweight"], layer["qzeros"], layer["scales"],
                                  layer["g_idx"], bits, fmt, FLOATS[out], group)
    assert_bits_equal(got, want)


@given(rows_words=st.integers(1, 6), col_words=st.integers(1, 5), group=st.sampled_from([8, 16, 32]),
       act_order=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_gptq_shapes(rows_words, col_words, group, act_order, seed):
    """Any K and N (multiples of 8), a partial last group included."""
    rng = np.random.default_rng(seed)
    rows, cols = rows_words * 8, col_words * 8
    layer = gptq_layer(rng, rows, cols, 4, group, act_order)
    got = gptq.dequantize(**layer, group_size=group, dtype="f32")
    want = oracle.gptq_dequantize(layer["qweight"], layer["qzeros"], layer["scales"],
                                  layer["g_idx"], 4, "gptq", np.float32, group)
    assert_bits_equal(got, want)


def test_gptq_matches_torch_formula():
    """The f16 result equals GPTQModel/AutoGPTQ's torch dequant, v1 (both zero rules) and v2."""
    pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    for fmt, rule in (("gptq", "gptqmodel"), ("gptq", "autogptq"), ("gptq", "exllama"),
                      ("gptq_v2", "gptqmodel")):
        layer = gptq_layer(rng, 64, 32, 4, 16, act_order=True, extreme=False)
        got = gptq.dequantize(**layer, checkpoint_format=fmt, v1_zeros=rule)
        want = oracle.gptq_dequantize_torch(layer["qweight"], layer["qzeros"], layer["scales"],
                                            layer["g_idx"], 4, fmt, rule)
        assert_bits_equal(got, want)


def test_gptq_parallel_rows():
    """Large enough for the multithreaded path; act-order groups all over the rows."""
    rng = np.random.default_rng(5)
    layer = gptq_layer(rng, 512, 256, 4, 128, act_order=True)
    got = gptq.dequantize(**layer)
    want = oracle.gptq_dequantize(layer["qweight"], layer["qzeros"], layer["scales"],
                                  layer["g_idx"], 4, "gptq", np.float16)
    assert_bits_equal(got, want)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_gptq_round_trip(bits, fmt):
    """quantize -> pack -> dequantize: the oracle agrees and the error is a quantization step."""
    rng = np.random.default_rng(bits)
    w = rng.standard_normal((64, 48)).astype(np.float32)
    perm = rng.permutation(64)
    layer = pack.quantize_gptq(w, 16, bits, perm=perm, checkpoint_format=fmt)
    assert sorted(np.unique(layer["g_idx"][perm[:16]])) == [0]
    got = gptq.dequantize(**layer, bits=bits, checkpoint_format=fmt, dtype="f32")
    want = oracle.gptq_dequantize(layer["qweight"], layer["qzeros"], layer["scales"],
                                  layer["g_idx"], bits, fmt, np.float32)
    assert_bits_equal(got, want)
    step = layer["scales"].astype(np.float32)[layer["g_idx"]]
    assert np.all(np.abs(got - w) <= step * 0.5 + 1e-3)


def test_gptq_v1_and_v2_differ_by_one_zero_step():
    """exllama's v1 rule: every zero point one above v2's reading of the same words."""
    rng = np.random.default_rng(9)
    layer = gptq_layer(rng, 32, 16, 4, 16, act_order=False, extreme=False)
    v1 = gptq.dequantize(**layer, checkpoint_format="gptq", v1_zeros="exllama", dtype="f64")
    v2 = gptq.dequantize(**layer, checkpoint_format="gptq_v2", dtype="f64")
    scale = np.repeat(layer["scales"].astype(np.float64), 16, axis=0)
    np.testing.assert_allclose(v2 - v1, scale, rtol=1e-12, atol=0)


AWQ_CASES = [("f16", "f16"), ("bf16", "f16"), ("f32", "f32"), ("f16", "bf16")]


@pytest.mark.parametrize("out,scale", AWQ_CASES)
def test_awq_matches_oracle(out, scale):
    rng = np.random.default_rng(11)
    rows, cols, group = 128, 64, 32
    layer = dict(qweight=random_words(rng, (rows, cols // 8)),
                 qzeros=random_words(rng, (rows // group, cols // 8)),
                 scales=random_f16(rng, (rows // group, cols)).astype(FLOATS[scale]))
    got = awq.dequantize(**layer, dtype=out)
    want = oracle.awq_dequantize(layer["qweight"], layer["qzeros"], layer["scales"], group,
                                 FLOATS[out])
    assert_bits_equal(got, want)


@pytest.mark.parametrize("act_order", [False, True])
def test_f64_scales_keep_every_bit(act_order):
    """f64 scales into an f64 weight: the compute type is f64, so no scale may pass through
    a float on the way (f16-valued scales would not notice; these use all 53 bits)."""
    rng = np.random.default_rng(21)
    rows, cols, group = 64, 32, 16
    layer = gptq_layer(rng, rows, cols, 4, group, act_order)
    layer["scales"] = rng.standard_normal(layer["scales"].shape) * 1e-3
    got = gptq.dequantize(**layer, dtype="f64")
    want = oracle.gptq_dequantize(layer["qweight"], layer["qzeros"], layer["scales"],
                                  layer["g_idx"], 4, "gptq", np.float64, group)
    assert_bits_equal(got, want)
    awq_layer = dict(qweight=random_words(rng, (rows, cols // 8)),
                     qzeros=random_words(rng, (rows // group, cols // 8)),
                     scales=rng.standard_normal((rows // group, cols)) * 1e-3)
    assert_bits_equal(awq.dequantize(**awq_layer, dtype="f64"),
                      oracle.awq_dequantize(awq_layer["qweight"], awq_layer["qzeros"],
                                            awq_layer["scales"], group, np.float64))


def test_awq_interleaved_order():
    """A word holding nibbles 0..7 in order reads back as columns 0 4 1 5 2 6 3 7."""
    word = sum(i << (4 * i) for i in range(8))
    qweight = np.array([[word]], dtype=np.int64).astype(np.uint32).view(np.int32)
    qzeros = np.zeros((1, 1), dtype=np.int32)
    got = awq.dequantize(qweight, qzeros, np.ones((1, 8), np.float16), dtype="f32")
    assert got.tolist() == [[0, 4, 1, 5, 2, 6, 3, 7]]


def test_awq_round_trip():
    rng = np.random.default_rng(12)
    w = rng.standard_normal((64, 32)).astype(np.float32)
    layer = pack.quantize_awq(w, 32)
    got = awq.dequantize(**layer, dtype="f32")
    want = oracle.awq_dequantize(layer["qweight"], layer["qzeros"], layer["scales"], 32,
                                 np.float32)
    assert_bits_equal(got, want)
    step = np.repeat(layer["scales"].astype(np.float32), 32, axis=0)
    assert np.all(np.abs(got - w) <= step * 0.5 + 1e-3)


def test_torch_tensors_in_and_out():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(13)
    layer = gptq_layer(rng, 32, 16, 4, 16, act_order=True, extreme=False)
    got = gptq.dequantize(*(torch.from_numpy(layer[k]) for k in ("qweight", "qzeros", "scales")),
                          g_idx=torch.from_numpy(layer["g_idx"]).long(), dtype="bf16")
    assert isinstance(got, torch.Tensor) and got.dtype == torch.bfloat16
    want = gptq.dequantize(**layer, dtype="bf16")
    assert np.array_equal(got.view(torch.int16).numpy(), want.view(np.int16))


def test_plan_api_for_formats():
    desc = GptqDequantizeDescriptor(64, 32, 16, bits=4, act_order=True)
    plan = FormatPlan.select(desc)
    assert "dequant_gptq4_v1_f16_f16_gidx" in str(plan.sku())
    assert plan.precision_guarantee().bit_stable and plan.workspace_size() == 0
    assert "g_idx[k]" in plan.source()
    args = {a.name: np.zeros(a.shape, a.dtype) for a in plan.arguments}
    plan.can_implement(args)
    args["qzeros"] = np.zeros((4, 5), np.int32)
    with pytest.raises(InvalidProblemError, match="qzeros has shape"):
        plan.can_implement(args)


def test_format_plans_on_cuda_without_a_device_say_why():
    """CUDA format plans are tested in test_formats_cuda.py (emulated and on a GPU)."""
    from dqgen.runtime import cuda as rt
    if rt.cuda_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(UnsupportedError, match="cuda:0.*unavailable"):
        FormatPlan.select(GptqDequantizeDescriptor(64, 32, 16, bits=4), device="cuda")
    with pytest.raises(UnsupportedError, match="cuda:0.*unavailable"):
        gptq.dequantize(**gptq_layer(np.random.default_rng(0), 64, 32, 4, 16, False),
                        device="cuda")


# --- bad inputs ---------------------------------------------------------------------------

def _good(rng):
    return gptq_layer(rng, 64, 32, 4, 16, act_order=True, extreme=False)


def test_bad_gptq_inputs():
    rng = np.random.default_rng(0)
    layer = _good(rng)
    bad = dict(layer, qzeros=layer["qzeros"][:, :3])
    with pytest.raises(InvalidProblemError, match="qzeros has shape"):
        gptq.dequantize(**bad)
    bad_g = layer["g_idx"].copy()
    bad_g[5] = 4
    with pytest.raises(InvalidProblemError, match=r"g_idx\[5\]=4 is out of range \[0, 4\)"):
        gptq.dequantize(**dict(layer, g_idx=bad_g))
    bad_g[5] = -1
    with pytest.raises(InvalidProblemError, match="out of range"):
        gptq.dequantize(**dict(layer, g_idx=bad_g))
    with pytest.raises(InvalidProblemError, match="g_idx has shape"):
        gptq.dequantize(**dict(layer, g_idx=layer["g_idx"][:-1]))
    with pytest.raises(InvalidProblemError, match="bits=5"):
        gptq.dequantize(**layer, bits=5)
    with pytest.raises(UnsupportedError, match="checkpoint_format='gptq_v3'"):
        gptq.dequantize(**layer, checkpoint_format="gptq_v3")
    with pytest.raises(InvalidProblemError, match="qweight has dtype float32"):
        gptq.dequantize(**dict(layer, qweight=layer["qweight"].astype(np.float32)))
    with pytest.raises(InvalidProblemError, match="scales has shape"):
        gptq.dequantize(**dict(layer, scales=layer["scales"][:, :-1]))
    with pytest.raises(InvalidProblemError, match="group_size=32 gives 2 groups"):
        gptq.dequantize(**layer, group_size=32)
    with pytest.raises(InvalidProblemError, match="qweight must have 2 dimensions"):
        gptq.dequantize(**dict(layer, qweight=layer["qweight"].ravel()))
    with pytest.raises(UnsupportedError, match="dtype='int8'"):
        gptq.dequantize(**layer, dtype="int8")


def test_bad_awq_inputs():
    rng = np.random.default_rng(1)
    layer = dict(qweight=random_words(rng, (64, 4)), qzeros=random_words(rng, (2, 4)),
                 scales=np.ones((2, 32), np.float16))
    with pytest.raises(InvalidProblemError, match="qzeros has shape"):
        awq.dequantize(**dict(layer, qzeros=layer["qzeros"][:, :2]))
    with pytest.raises(InvalidProblemError, match="scales has shape"):
        awq.dequantize(**dict(layer, scales=np.ones((2, 24), np.float16)))
    with pytest.raises(InvalidProblemError, match="cannot infer group_size"):
        awq.dequantize(**dict(layer, scales=np.ones((3, 32), np.float16)))


def test_bad_descriptors():
    with pytest.raises(InvalidProblemError, match="rows \\(K\\)=12 is not a multiple of 8"):
        GptqDequantizeDescriptor(12, 8, 4)
    with pytest.raises(InvalidProblemError, match="cols \\(N\\)=12 is not a multiple of 8"):
        AwqDequantizeDescriptor(16, 12, 4)
    with pytest.raises(InvalidProblemError, match="group_size"):
        GptqDequantizeDescriptor(16, 8, 0)
    with pytest.raises(InvalidProblemError,
                       match="v1_zeros=.autogptq. stores zero - 1 in each field and cannot hold"):
        pack.pack_gptq(np.zeros((8, 8), np.uint8), np.zeros((1, 8), np.int32), 4, "gptq",
                       "autogptq")
    with pytest.raises(InvalidProblemError, match="v1_zeros='vllm' is not one of"):
        pack.pack_gptq(np.zeros((8, 8), np.uint8), np.zeros((1, 8), np.int32), 4, "gptq", "vllm")
    with pytest.raises(UnsupportedError, match="v1_zeros='vllm' is not supported"):
        GptqDequantizeDescriptor(16, 8, 4, v1_zeros="vllm")


@pytest.mark.parametrize("threads", ["1", "2", "3"])
@pytest.mark.parametrize("act_order", [False, True])
def test_wide_layers_on_several_threads(threads, act_order, monkeypatch):
    """Rows long enough for whole column tiles and a partial last one (200 = 3 * 64 + 8),
    enough elements to go parallel, and thread splits that fall inside a group."""
    monkeypatch.setenv("DQGEN_NUM_THREADS", threads)
    rng = np.random.default_rng(int(threads) * 2 + act_order)
    rows, cols, group = 520, 200, 40
    layer = gptq_layer(rng, rows, cols, 4, group, act_order)
    got = gptq.dequantize(**layer, group_size=group, dtype="f16")
    want = oracle.gptq_dequantize(layer["qweight"], layer["qzeros"], layer["scales"],
                                  layer["g_idx"], 4, "gptq", np.float16, group)
    assert_bits_equal(got, want)
    awq_layer = dict(qweight=random_words(rng, (rows, cols // 8)),
                     qzeros=random_words(rng, (rows // group, cols // 8)),
                     scales=random_f16(rng, (rows // group, cols)))
    got = awq.dequantize(**awq_layer, dtype="f16")
    want = oracle.awq_dequantize(awq_layer["qweight"], awq_layer["qzeros"], awq_layer["scales"],
                                 group, np.float16)
    assert_bits_equal(got, want)


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_row_order_g_idx_takes_the_plain_kernel(fmt, monkeypatch):
    """Checkpoints store g_idx even without act-order; g_idx[k] == k // group_size is the
    plain layout, and runs its kernel with the same bits. A permuted g_idx stays act-order."""
    rng = np.random.default_rng(5)
    rows, cols, group = 256, 128, 64
    layer = gptq_layer(rng, rows, cols, 4, group, False)
    chosen = []
    select = FormatPlan.select

    def spy(desc, *args, **kwargs):
        chosen.append(desc.act_order)
        return select(desc, *args, **kwargs)
    monkeypatch.setattr(FormatPlan, "select", spy)
    in_order = (np.arange(rows) // group).astype(np.int32)
    got = gptq.dequantize(**{**layer, "g_idx": in_order}, checkpoint_format=fmt)
    want = oracle.gptq_dequantize(layer["qweight"], layer["qzeros"], layer["scales"], in_order,
                                  4, fmt, np.float16, group)
    assert_bits_equal(got, want)
    assert_bits_equal(gptq.dequantize(**layer, checkpoint_format=fmt), want)
    permuted = rng.permutation(in_order)
    got = gptq.dequantize(**{**layer, "g_idx": permuted}, checkpoint_format=fmt)
    assert_bits_equal(got, oracle.gptq_dequantize(layer["qweight"], layer["qzeros"], layer["scales"],
                                                  permuted, 4, fmt, np.float16, group))
    assert chosen == [False, False, True]


def test_act_order_goes_tile_by_tile_when_the_whole_table_is_too_large(monkeypatch):
    """Past MATRIX_TABLE_MAX_BYTES an act-order kernel unpacks a table a column tile
    instead of one for whole rows; same bits. (Empty kernel and plan memos for the test,
    so the kernel is lowered under the lowered limit.)"""
    from dqgen import jit, plans
    from dqgen.layouts import matrix
    monkeypatch.setattr(matrix, "MATRIX_TABLE_MAX_BYTES", 1)
    monkeypatch.setattr(jit, "_memo", {})
    monkeypatch.setattr(plans, "_plan_memo", {})
    monkeypatch.setenv("DQGEN_NUM_THREADS", "2")
    rng = np.random.default_rng(8)
    rows, cols, group = 264, 136, 24
    layer = gptq_layer(rng, rows, cols, 4, group, True)
    got = gptq.dequantize(**layer, group_size=group, dtype="f16")
    want = oracle.gptq_dequantize(layer["qweight"], layer["qzeros"], layer["scales"],
                                  layer["g_idx"], 4, "gptq", np.float16, group)
    assert_bits_equal(got, want)
    desc = GptqDequantizeDescriptor(rows, cols, group, 4, "f16", "f16", "gptq", True)
    assert FormatPlan.select(desc)._kernel.spec.table_max_bytes == 1
