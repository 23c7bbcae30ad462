"""The plain functions' memo of calls already served (dqgen/call_memo.py): a repeat runs
the remembered plan, bit for bit what the full path gives, and anything the signature
does not say (strides, overlap, a dead array's view) still takes the full path, which
names the problem as the caller passed it."""

from __future__ import annotations

import gc

import numpy as np
import pytest

import dqgen
from dqgen import InvalidProblemError, api, call_memo, reference
from dqgen.formats import ggml
from formats_util import assert_bits_equal


def _family(rng, rows=3, axis=256, group=64):
    q = rng.integers(-128, 128, (rows, axis), dtype=np.int8)
    scale = rng.standard_normal((rows, axis // group)).astype(np.float32)
    zp = rng.integers(-8, 8, (rows, axis // group), dtype=np.int32)
    return q, scale, zp


def test_a_repeat_runs_the_remembered_plan_and_gives_the_same_bits(monkeypatch):
    rng = np.random.default_rng(0)
    monkeypatch.setattr(api, "_DEQUANTIZE_CALLS", call_memo.CallMemo())
    q, scale, zp = _family(rng)
    out = np.empty((3, 256), np.float32)
    dqgen.dequantize_per_group(q, scale, zp, 64, out=out)
    assert len(api._DEQUANTIZE_CALLS._plans) == 1
    q2, scale2, zp2 = _family(rng)  # other values, same signature: the memo's path
    got = dqgen.dequantize_per_group(q2, scale2, zp2, 64, out=out)
    assert got is out
    assert_bits_equal(out, reference.dequantize_per_group(q2, scale2, zp2, 64))
    fresh = dqgen.dequantize_per_group(q2, scale2, zp2, 64)
    assert fresh is not out and np.array_equal(fresh, out)


def test_a_call_that_converts_is_not_remembered(monkeypatch):
    monkeypatch.setattr(api, "_DEQUANTIZE_CALLS", call_memo.CallMemo())
    q, scale, zp = _family(np.random.default_rng(1))
    dqgen.dequantize_per_group(q, scale, zp.astype(np.int64), 64)  # zero points converted
    dqgen.dequantize_per_group(q[:, ::-1], scale, zp, 64)           # a strided copy
    assert not api._DEQUANTIZE_CALLS._plans


def test_what_the_signature_does_not_say_takes_the_full_path(monkeypatch):
    monkeypatch.setattr(api, "_DEQUANTIZE_CALLS", call_memo.CallMemo())
    q, scale, zp = _family(np.random.default_rng(2))
    out = np.empty((3, 256), np.float32)
    dqgen.dequantize_per_group(q, scale, zp, 64, out=out)
    strided = np.empty((3, 512), np.float32)[:, ::2]  # same dtype and shape, not contiguous
    with pytest.raises(InvalidProblemError, match="^out must be C-contiguous"):
        dqgen.dequantize_per_group(q, scale, zp, 64, out=strided)


def test_ggml_repeat_and_overlap(monkeypatch):
    monkeypatch.setattr(ggml, "_CALLS", call_memo.CallMemo())
    rng = np.random.default_rng(3)
    blocks = rng.integers(0, 256, 34 * 4, dtype=np.uint8)
    blocks.reshape(4, 34)[:, 1] = 0x3C  # f16 d = 1.0-ish, finite
    want = ggml.dequantize(blocks, "Q8_0", "f32")
    out = np.empty(128, np.float32)
    ggml.dequantize(blocks, "Q8_0", "f32", out=out)
    assert len(ggml._CALLS._plans) == 2 and np.array_equal(out, want)  # fresh and out=
    again = np.empty(128, np.float32)
    assert ggml.dequantize(blocks, "Q8_0", "f32", out=again) is again
    assert np.array_equal(again, want)
    # an output that shares the input's memory, same dtypes and shapes as remembered
    buffer = np.zeros(34 * 4 + 128 * 4, np.uint8)
    data = buffer[:34 * 4]
    data[:] = blocks
    alias = buffer[8:8 + 512].view(np.float32)
    with pytest.raises(InvalidProblemError, match="^out overlaps data"):
        ggml.dequantize(data, "Q8_0", "f32", out=alias)


def test_the_memo_keeps_no_array_alive(monkeypatch):
    """Neither the arrays of a remembered call nor its results are kept: a loop's results
    die when the caller drops them."""
    import weakref
    monkeypatch.setattr(ggml, "_CALLS", call_memo.CallMemo())
    data = np.zeros(34, np.uint8)
    for _ in range(3):
        result = ggml.dequantize(data, "Q8_0", "f32")
        gone, data_ref = weakref.ref(result), weakref.ref(data)
        del result
        gc.collect()
        assert gone() is None
    del data
    gc.collect()
    assert data_ref() is None
