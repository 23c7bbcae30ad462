"""Recycled result buffers (dqgen/output_pool.py): a dropped result's memory serves the next
result of its size, never while any array still views it; the cache is bounded, can be
turned off and released; results stay bit-exact and independent."""

from __future__ import annotations

import gc
import threading

import numpy as np
import pytest

import dqgen
from dqgen import InvalidProblemError, reference
from dqgen import output_pool as outputs

ROWS, COLS, GROUP = 256, 2048, 128      # 2 MiB of f32: above outputs.MIN_BYTES


@pytest.fixture(autouse=True)
def empty_cache(monkeypatch):
    monkeypatch.delenv("DQGEN_OUTPUT_CACHE_BYTES", raising=False)
    dqgen.release_cached_outputs()
    yield
    dqgen.release_cached_outputs()


def inputs(seed: int, dtype=np.float32):
    rng = np.random.default_rng(seed)
    q = rng.integers(-128, 128, (ROWS, COLS), dtype=np.int8)
    scale = rng.random((ROWS, COLS // GROUP)).astype(dtype)
    zp = rng.integers(-8, 8, (ROWS, COLS // GROUP)).astype(np.int32)
    return q, scale, zp


def address(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


def numpy_owned(a: np.ndarray) -> bool:
    """``a``'s memory is an ordinary numpy allocation (not a recycled buffer)."""
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a.flags.owndata


def test_dropped_result_is_reused_and_results_stay_exact():
    a = inputs(0)
    y = dqgen.dequantize_per_group(*a, GROUP)
    assert not numpy_owned(y)
    first = address(y)
    del y
    gc.collect()
    assert outputs.cached_bytes() >= ROWS * COLS * 4
    b = inputs(1)
    y2 = dqgen.dequantize_per_group(*b, GROUP)
    assert address(y2) == first                      # the recycled buffer
    assert outputs.cached_bytes() == 0
    assert np.array_equal(y2, reference.dequantize_per_group(*b, GROUP))


def test_a_live_view_keeps_its_buffer():
    a, b = inputs(2), inputs(3)
    y = dqgen.dequantize_per_group(*a, GROUP)
    want = y.copy()
    view = y.T[5:]                                  # a view outliving the result
    del y
    gc.collect()
    assert outputs.cached_bytes() == 0
    y2 = dqgen.dequantize_per_group(*b, GROUP)
    assert not np.shares_memory(y2, view)
    assert np.array_equal(view, want.T[5:])         # untouched by the second result
    del view
    gc.collect()
    assert outputs.cached_bytes() >= ROWS * COLS * 4


def test_torch_result_keeps_its_buffer():
    torch = pytest.importorskip("torch")
    a, b = inputs(4), inputs(5)
    t = dqgen.dequantize_per_group(torch.from_numpy(a[0]), *a[1:], GROUP)
    want = t.clone()
    gc.collect()
    assert outputs.cached_bytes() == 0
    y2 = dqgen.dequantize_per_group(*b, GROUP)
    assert torch.equal(t, want)
    assert address(y2) != t.data_ptr()


def test_results_are_independent_writable_arrays():
    y1 = dqgen.dequantize_per_group(*inputs(6), GROUP)
    y2 = dqgen.dequantize_per_group(*inputs(7), GROUP)
    assert not np.shares_memory(y1, y2)
    assert y1.flags.writeable and y1.flags.c_contiguous and y1.shape == (ROWS, COLS)
    y1[...] = 0
    assert np.array_equal(y2, reference.dequantize_per_group(*inputs(7), GROUP))


def test_size_classes_and_small_results():
    y = dqgen.dequantize_per_group(*inputs(8), GROUP)
    del y
    gc.collect()
    held = outputs.cached_bytes()
    assert held % outputs.SIZE_CLASS == 0
    small = dqgen.dequantize_per_group(*(x[:4] for x in inputs(9)), GROUP)  # 32 KiB: numpy's
    assert outputs.cached_bytes() == held and numpy_owned(small)


def test_limit_and_switch_off(monkeypatch):
    monkeypatch.setenv("DQGEN_OUTPUT_CACHE_BYTES", str(outputs.SIZE_CLASS))  # room for one
    ys = [dqgen.dequantize_per_group(*inputs(10), GROUP) for _ in range(3)]
    del ys
    gc.collect()
    assert outputs.cached_bytes() <= outputs.SIZE_CLASS
    monkeypatch.setenv("DQGEN_OUTPUT_CACHE_BYTES", "0")
    dqgen.release_cached_outputs()
    y = dqgen.dequantize_per_group(*inputs(11), GROUP)
    assert numpy_owned(y)
    del y
    gc.collect()
    assert outputs.cached_bytes() == 0
    monkeypatch.setenv("DQGEN_OUTPUT_CACHE_BYTES", "lots")
    with pytest.raises(InvalidProblemError, match="DQGEN_OUTPUT_CACHE_BYTES"):
        dqgen.dequantize_per_group(*inputs(12), GROUP)


def test_release_frees_everything():
    for seed in range(3):
        dqgen.dequantize_per_group(*inputs(seed), GROUP)
    gc.collect()
    held = outputs.cached_bytes()
    assert held > 0 and dqgen.release_cached_outputs() == held and outputs.cached_bytes() == 0


def test_threads_get_distinct_buffers():
    """Threads take and return buffers at once: every result is right and none is shared
    while held."""
    cases = [inputs(20 + i) for i in range(4)]
    wants = [reference.dequantize_per_group(*c, GROUP) for c in cases]
    errors = []

    def work(i: int) -> None:
        try:
            for _ in range(15):
                y = dqgen.dequantize_per_group(*cases[i], GROUP)
                if not np.array_equal(y, wants[i]):
                    errors.append(i)
                del y
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_recent_sizes_displace_old_ones(monkeypatch):
    """Past the limit the least recently returned buffers go, so sizes no longer used
    cannot keep the current one from being recycled."""
    two, four = outputs.SIZE_CLASS, 2 * outputs.SIZE_CLASS
    monkeypatch.setenv("DQGEN_OUTPUT_CACHE_BYTES", str(four))
    small = [outputs.empty((two // 4,), np.float32) for _ in range(2)]
    del small
    gc.collect()
    assert outputs.cached_bytes() == four                   # two 2 MiB buffers
    big = outputs.empty((four // 4,), np.float32)           # no 4 MiB one held: new
    a = address(big)
    del big
    gc.collect()
    assert outputs.cached_bytes() == four                   # the 4 MiB one displaced both
    again = outputs.empty((four // 4,), np.float32)
    assert address(again) == a and outputs.cached_bytes() == 0
