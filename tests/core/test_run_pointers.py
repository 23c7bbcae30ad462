"""A CPU plan remembers the addresses of the arrays it last ran on (runtime.cpu
ArgumentPointers): runs on other arrays, on arrays freed and replaced, and from several
threads must each use their own arrays, and a plan must keep no array alive."""

from __future__ import annotations

import gc
import weakref
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import dqgen
from dqgen import reference
import strategies as S

ROWS, COLS, GS = 8, 256, 32


def _plan():
    desc = dqgen.DequantizePerGroupDescriptor(ROWS, COLS, GS, "f32", "s8")
    return dqgen.DequantizePerGroupPlan.select(desc, preference=dqgen.PlanPreference(num_threads=1))


def _inputs(seed):
    rng = np.random.default_rng(seed)
    q = rng.integers(-128, 128, (ROWS, COLS), dtype=np.int8)
    scale = (rng.random((ROWS, COLS // GS), dtype=np.float32) + 0.5)
    zp = rng.integers(-8, 8, (ROWS, COLS // GS)).astype(np.int32)
    return q, scale, zp


def _run(plan, q, scale, zp, out):
    plan.run(dqgen.DequantizePerGroupArgs(q, scale, zp, out))
    S.assert_same_bits(out, reference.dequantize_per_group(q, scale, zp, GS))


def test_each_run_reads_and_writes_its_own_arrays():
    plan = _plan()
    first, second = _inputs(1), _inputs(2)
    out1, out2 = np.empty((ROWS, COLS), np.float32), np.empty((ROWS, COLS), np.float32)
    _run(plan, *first, out1)
    kept = out1.copy()
    _run(plan, *second, out2)
    np.testing.assert_array_equal(out1, kept)  # the second run did not write the first output
    _run(plan, first[0], second[1], first[2], out1)  # some arrays the same, some not
    _run(plan, *first, out1)


def test_freed_arrays_are_not_kept_and_their_successors_are_used():
    plan = _plan()
    for seed in range(20):  # new arrays often land at a freed array's address and id
        q, scale, zp = _inputs(seed)
        out = np.empty((ROWS, COLS), np.float32)
        _run(plan, q, scale, zp, out)
        watch = [weakref.ref(a) for a in (q, scale, zp, out)]
        del q, scale, zp, out
        gc.collect()
        assert all(ref() is None for ref in watch), "the plan kept an array alive"


def test_a_remembered_array_cannot_be_resized_in_place():
    """The remembered address stays right only because numpy refuses to move the memory
    of an array that is weakly referenced; if numpy ever allows it, this fails."""
    plan = _plan()
    q, scale, zp = _inputs(3)
    out = np.empty((ROWS, COLS), np.float32)
    _run(plan, q, scale, zp, out)
    for refcheck in (True, False):
        with pytest.raises(ValueError):
            out.resize((ROWS * 4, COLS), refcheck=refcheck)


def test_threads_sharing_a_plan_use_their_own_arrays():
    plan = _plan()

    def work(seed):
        q, scale, zp = _inputs(seed)
        out = np.empty((ROWS, COLS), np.float32)
        for _ in range(200):
            out.fill(np.nan)
            plan.run(dqgen.DequantizePerGroupArgs(q, scale, zp, out))
            S.assert_same_bits(out, reference.dequantize_per_group(q, scale, zp, GS), f"thread {seed}")
        return seed

    with ThreadPoolExecutor(max_workers=4) as pool:
        assert sorted(pool.map(work, range(4))) == list(range(4))
