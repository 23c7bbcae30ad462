"""Refusals in the caller's terms: a plan run for a plain function names the arguments
and shows the shapes its caller passed; a torch dtype numpy lacks is refused naming the
argument and the dtype; big-endian arrays follow one rule (read by their values in the
plain and format functions, refused by plans), and a big-endian zero point is never
misread (dqgen/arrays.py states the rule)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import dqgen
from dqgen import InvalidProblemError, UnsupportedError, plans, reference
from dqgen.arrays import rows
from dqgen.formats import floatzp, ggml, gptq, hqq, packed
from dqgen.formats.plan import FormatPlan
from dqgen.ir import DequantizePerGroupDescriptor
from formats_util import assert_bits_equal, random_f16, random_words
from oracles import checkpoints as oracle

G = 32


def _problem(seed=0, outer=1, axis=64):
    rng = np.random.default_rng(seed)
    q = rng.integers(-128, 128, (outer, axis), dtype=np.int8)
    scale = rng.uniform(0.5, 2, (outer, axis // G)).astype(np.float32)
    zp = rng.integers(-5, 6, (outer, axis // G)).astype(np.int32)
    return q, scale, zp


def _plan(outer=1, axis=64):
    return plans.DequantizePerGroupPlan.select(
        DequantizePerGroupDescriptor(outer, axis, G, "f32", "s8"))


def _callers(q, scale, zp, out=None):
    return {"input": ("q", q), "scale": ("scale", scale), "zero_point": ("zero_point", zp),
            "output": ("out", out)}


# ------------------------------------------------------------------ names and shapes


def test_a_plan_names_the_callers_arguments_and_shapes():
    """A 1-D q and a 1-D scale of the wrong length, reshaped to rows by a plain function:
    the refusal shows the scale the caller passed, not the [1, 64] rows it became."""
    q, _, zp = _problem()
    q1, scale1, zp1 = q[0], np.ones(64, np.float32), zp[0]
    y = np.empty((1, 64), np.float32)
    args = plans.DequantizePerGroupArgs(rows(q1, "q"), rows(scale1, "scale"), rows(zp1, "zp"), y)
    plan = _plan()
    for check in (plan.run, plan.can_implement):
        with pytest.raises(InvalidProblemError,
                           match=r"^scale has shape \(64,\), expected \(2,\)$"):
            check(args, caller=_callers(q1, scale1, zp1))
    with pytest.raises(InvalidProblemError,
                       match=r"^scale has shape \(1, 64\), expected \(1, 2\)$"):
        plan.run(args)  # the Plan API's own arguments: the shapes as given to it


def test_a_plan_names_out_and_q_in_an_overlap_and_a_read_only_out():
    q, scale, zp = _problem()
    arena = np.zeros(64 * 4, np.uint8)
    q_alias = arena[:64].view(np.int8).reshape(1, 64)
    y_alias = arena.view(np.float32).reshape(1, 64)
    plan = _plan()
    args = plans.DequantizePerGroupArgs(q_alias, scale, zp, y_alias)
    with pytest.raises(InvalidProblemError, match="^out overlaps q in memory"):
        plan.run(args, caller=_callers(q_alias, scale, zp, y_alias))
    with pytest.raises(InvalidProblemError, match="^output overlaps input in memory"):
        plan.run(args)
    read_only = np.empty((1, 64), np.float32)
    read_only.flags.writeable = False
    args = plans.DequantizePerGroupArgs(q, scale, zp, read_only)
    with pytest.raises(InvalidProblemError, match="^out is read-only"):
        plan.run(args, caller=_callers(q, scale, zp, read_only))
    with pytest.raises(InvalidProblemError, match="^output is read-only"):
        plan.run(args)


def test_format_functions_name_out_and_show_the_callers_shapes():
    """The kernels' ``y`` is the caller's ``out``; HQQ's ``q`` is ``W_q``; a 1-D scale is
    shown as passed."""
    rng = np.random.default_rng(1)
    blocks = np.zeros((2, 34), np.uint8)
    blocks[:, :2] = np.frombuffer(np.float16(0.5).tobytes(), np.uint8)
    arena = np.zeros(2 * 32 * 4, np.uint8)
    arena[:blocks.size] = blocks.reshape(-1)
    with pytest.raises(InvalidProblemError, match="^out overlaps data in memory"):
        ggml.dequantize(arena[:blocks.size].reshape(2, 34), "Q8_0", dtype="f32",
                        out=arena.view(np.float32).reshape(2, 32))
    values = rng.integers(0, 16, (64,))
    with pytest.raises(InvalidProblemError, match=r"^scale has shape \(3,\), expected \(2,\)$"):
        packed.dequantize(oracle.pack_int4(values[None])[0], np.ones(3, np.float32),
                          np.zeros(2, np.int32), G)
    W_q = rng.integers(0, 256, (4, 64), dtype=np.uint8)
    scale, zero = random_f16(rng, (8, 1), extreme=False), random_f16(rng, (8, 1), extreme=False)
    arena = np.zeros(8 * 64 * 2, np.uint8)
    arena[:W_q.size] = W_q.reshape(-1)
    with pytest.raises(InvalidProblemError, match="^out overlaps W_q in memory"):
        hqq.dequantize(arena[:W_q.size].reshape(4, 64), scale, zero, 4, (8, 64), 64,
                       out=arena.view(np.float16).reshape(8, 64))


# ------------------------------------------------------------------ torch dtypes numpy lacks


def test_a_float8_scale_is_refused_naming_the_argument_and_dtype():
    torch = pytest.importorskip("torch")
    q, scale, zp = _problem()
    fp8 = torch.from_numpy(scale).to(torch.float8_e4m3fn)
    with pytest.raises(UnsupportedError, match="scale.*float8_e4m3fn"):
        dqgen.dequantize_per_group(q, fp8, zp, G)
    with pytest.raises(InvalidProblemError,
                       match="^scale has dtype float8_e4m3fn, expected float32"):
        _plan().run(plans.DequantizePerGroupArgs(q, fp8, zp, np.empty((1, 64), np.float32)))
    with pytest.raises(UnsupportedError, match="scale.*float8_e4m3fn"):
        packed.dequantize(np.zeros((1, 32), np.uint8), fp8, zp, G)
    with pytest.raises(UnsupportedError, match="scales.*float8_e4m3fn"):
        gptq.dequantize(np.zeros((8, 32), np.int32), np.zeros((2, 4), np.int32),
                        torch.ones((2, 32), dtype=torch.float8_e5m2).view(torch.float8_e4m3fn))


@pytest.mark.parametrize("dtype_name", ["complex32", "uint4", "int4"])
def test_a_torch_dtype_without_a_numpy_twin_is_refused_by_name(dtype_name):
    torch = pytest.importorskip("torch")
    if not hasattr(torch, dtype_name):
        pytest.skip(f"this torch has no {dtype_name}")
    q, _, zp = _problem()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that complex32 is experimental
        odd = torch.zeros((1, 2), dtype=getattr(torch, dtype_name))
    with pytest.raises(UnsupportedError, match=f"^scale has dtype torch.{dtype_name}"):
        dqgen.dequantize_per_group(q, odd, zp, G)
    with pytest.raises(UnsupportedError, match=f"^zero_point has dtype torch.{dtype_name}"):
        packed.dequantize(np.zeros((1, 32), np.uint8), np.ones((1, 2), np.float32), odd, G)


# ------------------------------------------------------------------ big-endian arrays


def test_plain_functions_read_big_endian_values():
    """A big-endian scale and zero point read their true values: zero points of 3 would
    read 3 << 24 if the bytes were taken as they lie."""
    q, scale, zp = _problem(2, outer=2)
    zp[:] = 3
    want = reference.dequantize_per_group(q, scale, zp, G)
    got = dqgen.dequantize_per_group(q, scale.astype(">f4"), zp.astype(">i4"), G)
    assert_bits_equal(got, want)
    assert_bits_equal(dqgen.dequantize_per_group(q, scale, zp.astype(">i8"), G), want)
    x = want.astype(">f4")
    assert np.array_equal(dqgen.quantize_per_group(x, scale.astype(">f4"), zp.astype(">i4"), G),
                          dqgen.quantize_per_group(want, scale, zp, G))


def test_format_functions_read_big_endian_values():
    rng = np.random.default_rng(3)
    values = rng.integers(0, 16, (2, 64))
    scale = rng.uniform(0.5, 2, (2, 2)).astype(np.float32)
    zp = np.full((2, 2), 3, np.int32)
    qp = oracle.pack_int4(values)
    want = packed.dequantize(qp, scale, zp, G)
    assert_bits_equal(packed.dequantize(qp, scale.astype(">f4"), zp.astype(">i4"), G), want)
    assert_bits_equal(want, reference.dequantize_per_group(values, scale, zp, G))

    qweight, qzeros = random_words(rng, (8, 32)), random_words(rng, (2, 4))
    scales = random_f16(rng, (2, 32), extreme=False)
    g_idx = (np.arange(64) // 32).astype(np.int32)
    want = gptq.dequantize(qweight, qzeros, scales, bits=4)
    got = gptq.dequantize(qweight.astype(">i4"), qzeros.astype(">i4"), scales.astype(">f2"),
                          g_idx=g_idx.astype(">i4"), bits=4)
    assert_bits_equal(got, want)

    W_q = rng.integers(0, 256, (4, 64), dtype=np.uint8)
    hs, hz = random_f16(rng, (8, 1), extreme=False), random_f16(rng, (8, 1), extreme=False)
    assert_bits_equal(hqq.dequantize(W_q, hs.astype(">f2"), hz.astype(">f2"), 4, (8, 64), 64),
                      hqq.dequantize(W_q, hs, hz, 4, (8, 64), 64))

    q8 = rng.integers(0, 256, (2, 64), dtype=np.uint8)
    fs, fz = random_f16(rng, (2, 2), extreme=False), random_f16(rng, (2, 2), extreme=False)
    assert_bits_equal(floatzp.dequantize(q8, fs.astype(">f2"), fz.astype(">f2"), G),
                      floatzp.dequantize(q8, fs, fz, G))


def test_plans_refuse_big_endian_arrays_by_name():
    q, scale, zp = _problem()
    y = np.empty((1, 64), np.float32)
    plan = _plan()
    with pytest.raises(InvalidProblemError, match=r"^zero_point has dtype >i4 \(big-endian"):
        plan.run(plans.DequantizePerGroupArgs(q, scale, zp.astype(">i4"), y))
    with pytest.raises(InvalidProblemError, match=r"^scale has dtype >f4 \(big-endian"):
        plan.can_implement(plans.DequantizePerGroupArgs(q, scale.astype(">f4"), zp, y))
    desc = DequantizePerGroupDescriptor(1, 64, G, "f32", "u4")
    with pytest.raises(InvalidProblemError, match="zero_point has dtype >i4"):
        FormatPlan.select(desc).run({"q": np.zeros((1, 32), np.uint8), "scale": scale,
                                     "zero_point": zp.astype(">i4"), "y": y})


def test_a_big_endian_out_is_refused_not_written_as_native():
    q, scale, zp = _problem()
    with pytest.raises(InvalidProblemError, match="^out has dtype >f4"):
        dqgen.dequantize_per_group(q, scale, zp, G, out=np.empty((1, 64), ">f4"))
    with pytest.raises(InvalidProblemError, match="^out has dtype >f2"):
        ggml.dequantize(np.zeros((1, 34), np.uint8), "Q8_0", out=np.empty((1, 32), ">f2"))
