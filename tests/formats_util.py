"""Helpers shared by the checkpoint-format tests: bit-exact comparison, random inputs."""

from __future__ import annotations

import ml_dtypes
import numpy as np

FLOATS = {"f16": np.dtype(np.float16), "bf16": np.dtype(ml_dtypes.bfloat16),
          "f32": np.dtype(np.float32), "f64": np.dtype(np.float64)}
_UINT = {2: np.uint16, 4: np.uint32, 8: np.uint64}


def assert_bits_equal(got: np.ndarray, want: np.ndarray) -> None:
    """Equal bit patterns everywhere except where both are NaN (SPEC.md)."""
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    assert got.shape == want.shape, (got.shape, want.shape)
    view = _UINT[got.dtype.itemsize]
    g = got.astype(np.float64) if got.dtype.itemsize < 8 else got
    w = want.astype(np.float64) if want.dtype.itemsize < 8 else want
    nan_g, nan_w = np.isnan(g), np.isnan(w)
    assert np.array_equal(nan_g, nan_w), f"NaN positions differ at {np.argwhere(nan_g != nan_w)[:5]}"
    diff = (got.view(view) != want.view(view)) & ~nan_w
    if diff.any():
        idx = tuple(np.argwhere(diff)[0])
        raise AssertionError(f"{int(diff.sum())} values differ; first at {idx}: "
                             f"got {got[idx]!r}, want {want[idx]!r}")


def random_f16(rng, shape, extreme: bool = True) -> np.ndarray:
    """f16 values: mostly normal-sized, plus (if extreme) any non-NaN bit pattern:
    subnormals, zeros of both signs, the largest finite values and infinities."""
    normal = (rng.standard_normal(shape) * 0.05).astype(np.float16)
    if not extreme:
        return normal
    bits = rng.integers(0, 1 << 16, size=shape, dtype=np.uint32).astype(np.uint16)
    is_nan = (bits & 0x7C00) == 0x7C00
    bits = np.where(is_nan & ((bits & 0x3FF) != 0), bits & 0xFC00, bits)  # NaN -> +-Inf
    pick = rng.random(shape) < 0.3
    return np.where(pick, bits.view(np.float16), normal)


def random_words(rng, shape) -> np.ndarray:
    return rng.integers(-(1 << 31), 1 << 31, size=shape, dtype=np.int64).astype(np.int32)
