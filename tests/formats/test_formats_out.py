"""``out=`` on the checkpoint-format functions: the caller's buffer is written in place
(bit-exact with the oracles, every element overwritten) and returned; a buffer of the
wrong dtype, shape, layout, a read-only one or one overlapping an input is refused."""

from __future__ import annotations

import numpy as np
import pytest

from dqgen import InvalidProblemError
from dqgen.formats import awq, floatzp, ggml, gptq
from formats_util import FLOATS, assert_bits_equal, random_f16, random_words
from oracles import checkpoints as oracle

GARBAGE = 0xA5  # fills `out` first, so an element the kernel skips is caught


def garbage(shape, dtype) -> np.ndarray:
    return np.full(int(np.prod(shape)) * np.dtype(dtype).itemsize, GARBAGE,
                   np.uint8).view(dtype).reshape(shape)


def gptq_layer(rng, rows=64, cols=32, group=16):
    return dict(qweight=random_words(rng, (rows // 8, cols)),
                qzeros=random_words(rng, (rows // group, cols // 8)),
                scales=random_f16(rng, (rows // group, cols)),
                g_idx=(rng.permutation(rows) // group).astype(np.int32))


@pytest.mark.parametrize("dtype", ["f16", "bf16", "f32"])
def test_gptq_writes_out(dtype):
    layer = gptq_layer(np.random.default_rng(1))
    out = garbage((64, 32), FLOATS[dtype])
    got = gptq.dequantize(**layer, dtype=dtype, out=out)
    assert got is out
    want = oracle.gptq_dequantize(layer["qweight"], layer["qzeros"], layer["scales"],
                                  layer["g_idx"], 4, "gptq", FLOATS[dtype], 16)
    assert_bits_equal(out, want)


def test_awq_writes_out():
    rng = np.random.default_rng(2)
    layer = dict(qweight=random_words(rng, (64, 4)), qzeros=random_words(rng, (4, 4)),
                 scales=random_f16(rng, (4, 32)))
    out = garbage((64, 32), np.float16)
    assert awq.dequantize(**layer, out=out) is out
    assert_bits_equal(out, oracle.awq_dequantize(layer["qweight"], layer["qzeros"],
                                                 layer["scales"], 16, np.float16))


@pytest.mark.parametrize("qtype", ["Q4_0", "Q8_0"])
def test_ggml_writes_out_of_the_result_shape(qtype):
    gguf = pytest.importorskip("gguf")
    x = np.random.default_rng(3).standard_normal((3, 4, 64)).astype(np.float32)
    data = gguf.quants.quantize(x, getattr(gguf.GGMLQuantizationType, qtype))
    out = garbage((3, 4, 64), np.float32)
    assert ggml.dequantize(data, qtype, dtype="f32", out=out) is out
    assert_bits_equal(out, gguf.quants.dequantize(data, getattr(gguf.GGMLQuantizationType, qtype)))


def test_float_zero_writes_out():
    rng = np.random.default_rng(4)
    q = rng.integers(0, 256, (4, 64), dtype=np.uint8)
    scale, zero = random_f16(rng, (4, 2)), random_f16(rng, (4, 2))
    out = garbage((4, 64), np.float16)
    assert floatzp.dequantize(q, scale, zero, 32, out=out) is out
    assert_bits_equal(out, oracle.float_zero_dequantize(q, scale, zero, 32, 0, 255, np.float16))


def test_torch_out_is_returned():
    torch = pytest.importorskip("torch")
    layer = gptq_layer(np.random.default_rng(5))
    out = torch.empty((64, 32), dtype=torch.bfloat16)
    assert gptq.dequantize(**layer, dtype="bf16", out=out) is out
    want = gptq.dequantize(**layer, dtype="bf16")
    assert np.array_equal(out.view(torch.int16).numpy(), want.view(np.int16))


def test_bad_out_is_refused():
    layer = gptq_layer(np.random.default_rng(6))
    cases = [
        (np.empty((64, 33), np.float16), "shape"),
        (np.empty((32, 64), np.float16), "shape"),
        (np.empty((64, 32), np.float32), "dtype"),
        (np.empty((32, 64), np.float16).T, "C-contiguous"),
    ]
    read_only = np.empty((64, 32), np.float16)
    read_only.flags.writeable = False
    cases.append((read_only, "read-only"))
    for out, message in cases:
        with pytest.raises(InvalidProblemError, match=message):
            gptq.dequantize(**layer, out=out)


def test_out_overlapping_an_input_is_refused():
    gguf = pytest.importorskip("gguf")
    x = np.random.default_rng(7).standard_normal((4, 64)).astype(np.float32)
    data = gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0)
    arena = np.zeros(4 * 64 * 4, np.uint8)
    arena[:data.nbytes] = data.reshape(-1)
    blocks = arena[:data.nbytes].reshape(data.shape)
    with pytest.raises(InvalidProblemError, match="overlaps"):
        ggml.dequantize(blocks, "Q8_0", dtype="f32", out=arena.view(np.float32).reshape(4, 64))


@pytest.mark.parametrize("bad", [-1, 4, 2**31 - 1])
def test_plan_refuses_group_index_out_of_range(bad):
    """The Plan API takes g_idx as given, so it checks the range the kernel indexes with."""
    from dqgen.formats.plan import FormatPlan
    from dqgen.ir import GptqDequantizeDescriptor
    plan = FormatPlan.select(GptqDequantizeDescriptor(64, 32, 16, bits=4, act_order=True))
    args = {a.name: np.zeros(a.shape, a.dtype) for a in plan.arguments}
    args["g_idx"][37] = bad
    with pytest.raises(InvalidProblemError, match=rf"g_idx\[37\]={bad} is out of range \[0, 4\)"):
        plan.run(args)
    args["g_idx"][37] = 3
    plan.run(args)
