"""Shared test helpers: hypothesis strategies for per-group problems, guarded arrays
whose last byte sits against an unmapped page (so a kernel that reads or writes past the
end faults instead of passing by luck), and a bit-pattern comparison that treats any
NaN as equal to any NaN (SPEC.md: NaN sign and payload are unspecified).

Bulk data comes from a numpy generator seeded by hypothesis; the values that matter
(extremes, ties, NaN, Inf, subnormals) are injected at hypothesis-chosen positions, so
shrinking still reports a small, readable counterexample.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import os
from concurrent.futures import ThreadPoolExecutor

import ml_dtypes
import numpy as np
from hypothesis import settings
from hypothesis import strategies as st

import dqgen
from dqgen.isa import supported_isas

INT_NAMES = ("s8", "u8")
FLOAT_NAMES = ("f32", "f64", "f16", "bf16")
NP_DTYPES = {
    "s8": np.dtype(np.int8), "u8": np.dtype(np.uint8), "f32": np.dtype(np.float32),
    "f64": np.dtype(np.float64), "f16": np.dtype(np.float16),
    "bf16": np.dtype(ml_dtypes.bfloat16),
}
INT_RANGES = {"s8": (-128, 127), "u8": (0, 255)}
ISAS = supported_isas()
# Group sizes are compile-time constants (one build each), so draw them from a fixed list:
# 1, 3, 7 have no SIMD block; 12 has a SIMD block and a scalar tail; 32 and 128 only blocks.
GROUP_SIZES = (1, 3, 7, 12, 32, 128)
OUTERS = (0, 1, 5, 300)
INT32_MIN, INT32_MAX = -2**31, 2**31 - 1
# Zero points around the limits a C kernel may switch paths at (|zp| < 2^24 keeps
# q - zp exact in f32 for 8-bit q; |zp| <= 32512 keeps it in int16 for bf16's sixteen-lane
# path; |zp| <= 8196 (f16) and 65793 (bf16) keep zp * scale exact for the fused path),
# plus the ends of int32.
ZP_EDGES = (0, 1, -1, 32512, 32513, -32512, -32513, 32767, -32768, 65535,
            8196, 8197, -8196, -8197, 65793, 65794, -65793, -65794,
            2**24 - 256, 2**24 - 255, 2**24 - 1, 2**24, 2**24 + 1,
            -(2**24 - 256), -(2**24 - 255), -2**24, -(2**24 + 1), INT32_MIN, INT32_MAX,
            INT32_MIN + 1, INT32_MAX - 1)


def np_dtype(name: str) -> np.dtype:
    return NP_DTYPES[name]


def compute_dtype(float_name: str) -> np.dtype:
    return np.dtype(np.float64) if float_name == "f64" else np.dtype(np.float32)


def finfo(float_name: str):
    return ml_dtypes.finfo(np_dtype(float_name))


def examples(fraction: float, minimum: int = 5) -> settings:
    """A share of the loaded profile's example budget (keeps "thorough" thorough)."""
    return settings(max_examples=max(minimum, int(settings().max_examples * fraction)))


def prebuild(selections, isa: str) -> None:
    """Select ``(plan type, descriptor)`` pairs on ``isa`` in parallel threads, so the
    kernels a hypothesis test may draw are compiled on all cores before it starts.
    Failures are left for the test itself to hit and report."""
    pref = dqgen.PlanPreference(isa=isa)
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        futures = [pool.submit(plan.select, desc, preference=pref) for plan, desc in selections]
        for future in futures:
            try:
                future.result()
            except Exception:  # noqa: BLE001
                pass


# ---------------------------------------------------------------------------- bits

def _bits(arr: np.ndarray) -> np.ndarray:
    return arr.view(np.dtype(f"u{arr.dtype.itemsize}"))


def isnan(arr: np.ndarray) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.dtype.kind in "iub":
        return np.zeros(arr.shape, dtype=bool)
    return np.isnan(arr.astype(np.float64))


def assert_same_bits(actual, expected, what: str = "result") -> None:
    """Equal dtype, shape and bit patterns; NaN matches any NaN (and only a NaN)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    if actual.dtype.kind in "iub":
        bad = actual != expected
    else:
        nan_a, nan_e = isnan(actual), isnan(expected)
        bad = (nan_a != nan_e) | (~nan_e & (_bits(actual) != _bits(expected)))
    if bad.any():
        idx = np.argwhere(bad)[:5]
        lines = []
        for i in idx:
            i = tuple(int(v) for v in i)
            a, e = actual[i], expected[i]
            if actual.dtype.kind == "f" or actual.dtype == NP_DTYPES["bf16"]:
                lines.append(f"  at {i}: got {a!r} (0x{int(_bits(actual)[i]):x}), "
                             f"expected {e!r} (0x{int(_bits(expected)[i]):x})")
            else:
                lines.append(f"  at {i}: got {a!r}, expected {e!r}")
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.size} elements differ\n"
                             + "\n".join(lines))


# ---------------------------------------------------------------- guarded arrays

PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
CANARY = 0xA5


def guarded_empty(shape, dtype) -> np.ndarray:
    """An uninitialised C-contiguous array whose end touches an inaccessible page.

    The bytes before the array (in its first page) hold a canary, checked by
    ``canary_intact``: an out-of-bounds access past the end faults, one before the start
    of an output is caught by the canary.
    """
    dtype = np.dtype(dtype)
    shape = tuple(int(s) for s in shape)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes == 0:
        return np.empty(shape, dtype)
    data_pages = -(-nbytes // PAGE)
    mem = mmap.mmap(-1, (data_pages + 1) * PAGE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    raw = np.frombuffer(mem, dtype=np.uint8)
    raw[: data_pages * PAGE] = CANARY
    guard = raw.ctypes.data + data_pages * PAGE
    if _libc.mprotect(ctypes.c_void_p(guard), PAGE, 0) != 0:  # PROT_NONE
        raise OSError(ctypes.get_errno(), "mprotect failed")
    offset = data_pages * PAGE - nbytes
    return np.frombuffer(mem, dtype=dtype, count=math.prod(shape), offset=offset).reshape(shape)


def guarded(arr) -> np.ndarray:
    """A guarded copy of ``arr`` (see ``guarded_empty``)."""
    arr = np.asarray(arr)
    out = guarded_empty(arr.shape, arr.dtype)
    out[...] = arr
    return out


def _mapping(arr):
    """The mmap under a guarded array (through numpy views and memoryviews), else None."""
    base = arr
    while not isinstance(base, mmap.mmap):
        if isinstance(base, np.ndarray) and base.base is not None:
            base = base.base
        elif isinstance(base, memoryview):
            base = base.obj
        else:
            return None
    return base


def canary_intact(arr: np.ndarray) -> bool:
    """True when the bytes between the page start and ``arr`` are untouched."""
    base = _mapping(arr)
    if base is None:
        return True  # not a guarded array (e.g. empty)
    raw = np.frombuffer(base, dtype=np.uint8)
    start = arr.__array_interface__["data"][0] - raw.ctypes.data
    return bool((raw[:start] == CANARY).all())


# ---------------------------------------------------------------- special values

def float_specials(float_name: str) -> list[float]:
    """Edge values of dtype F (as Python floats, each exactly representable in F)."""
    fi = finfo(float_name)
    tiny = float(fi.smallest_normal)
    sub = float(fi.smallest_subnormal)
    big = float(fi.max)
    return [0.0, -0.0, sub, -sub, tiny, -tiny, tiny - sub, big, -big, math.inf, -math.inf,
            math.nan, 1.0, -1.0, 0.5, float(fi.eps)]


def scale_pool(float_name: str) -> list[float]:
    """Scales of every kind the spec names: 0, negative, subnormal, huge, NaN, Inf."""
    fi = finfo(float_name)
    return float_specials(float_name) + [float(fi.smallest_subnormal) * 3, 2.0**-20, 1e-3,
                                         0.0625, 3.0, 1234.5, float(fi.max) / 7]


@st.composite
def shapes(draw, group_sizes=GROUP_SIZES, outers=OUTERS, max_groups=3):
    """``(outer, axis, group_size)``; one group a row (group_size == axis) is common."""
    group_size = draw(st.sampled_from(group_sizes))
    outer = draw(st.sampled_from(outers) | st.integers(0, 4))
    groups = draw(st.sampled_from((1, 1, 2, 0) + tuple(range(3, max_groups + 1))))
    if outer == 0 and groups == 0:
        groups = 1
    return outer, groups * group_size, group_size


def _inject(draw, arr: np.ndarray, pool, max_count: int = 8) -> None:
    """Write hypothesis-chosen values from ``pool`` at hypothesis-chosen flat positions."""
    if arr.size == 0:
        return
    flat = arr.reshape(-1)
    picks = draw(st.lists(st.tuples(st.integers(0, arr.size - 1), st.sampled_from(pool)),
                          max_size=max_count))
    with np.errstate(over="ignore"):  # e.g. 1e30 into f16 is meant to become Inf
        for pos, value in picks:
            flat[pos] = value


@st.composite
def seeds(draw):
    return np.random.default_rng(draw(st.integers(0, 2**32 - 1)))


@st.composite
def int_values(draw, int_name: str, shape) -> np.ndarray:
    """Storage values over the full range of the int dtype, extremes injected."""
    rng = draw(seeds())
    lo, hi = INT_RANGES[int_name]
    arr = rng.integers(lo, hi + 1, size=shape).astype(np_dtype(int_name))
    _inject(draw, arr, [lo, hi, 0, lo + 1, hi - 1])
    return arr


@st.composite
def zero_points(draw, shape, int_name: str | None = None) -> np.ndarray:
    """int32 zero points: inside the q range, small, or anywhere in int32."""
    rng = draw(seeds())
    kind = draw(st.sampled_from(("in-range", "small", "int32")))
    lo, hi = INT_RANGES[int_name] if int_name else (-128, 255)
    if kind == "in-range":
        arr = rng.integers(lo, hi + 1, size=shape)
    elif kind == "small":
        arr = rng.integers(-300, 301, size=shape)
    else:
        arr = rng.integers(INT32_MIN, INT32_MAX, size=shape, endpoint=True)
    arr = arr.astype(np.int32)
    _inject(draw, arr, list(ZP_EDGES) + [lo, hi])
    return arr


@st.composite
def float_values(draw, float_name: str, shape, magnitude: int = 20) -> np.ndarray:
    """Floats of dtype F spread over ~2^-magnitude .. 2^magnitude, edge values injected."""
    rng = draw(seeds())
    c = compute_dtype(float_name)
    mant = rng.standard_normal(shape)
    exp = rng.integers(-magnitude, magnitude + 1, size=shape)
    with np.errstate(over="ignore"):  # beyond F's range becomes Inf, on purpose
        arr = (mant * np.exp2(exp)).astype(c).astype(np_dtype(float_name))
    _inject(draw, arr, float_specials(float_name))
    return arr


@st.composite
def scales(draw, float_name: str, shape, wild: bool | None = None) -> np.ndarray:
    """Per-group scales: positive "plain" ones, or a wild mix of every edge kind."""
    rng = draw(seeds())
    if wild is None:
        wild = draw(st.booleans())
    plain = np.exp2(rng.integers(-12, 8, size=shape)) * rng.uniform(1, 2, size=shape)
    arr = plain.astype(compute_dtype(float_name)).astype(np_dtype(float_name))
    if wild:
        pool = scale_pool(float_name)
        mask = rng.random(shape) < draw(st.sampled_from((0.1, 0.5)))
        picks = np.array(pool, dtype=np.float64)[rng.integers(0, len(pool), size=shape)]
        arr = np.where(mask, picks.astype(np_dtype(float_name)), arr)
        _inject(draw, arr, pool)
    return np.ascontiguousarray(arr.astype(np_dtype(float_name)))


@st.composite
def q_ranges(draw, int_name: str):
    """``(q_min, q_max)``: full, 4-bit ranges, a single value, or any ordered sub-range."""
    lo, hi = INT_RANGES[int_name]
    fixed = [(lo, hi), (0, 15), (lo, lo), (hi, hi)]
    if int_name == "s8":
        fixed.append((-8, 7))
    pair = draw(st.sampled_from(fixed) | st.tuples(st.integers(lo, hi), st.integers(lo, hi)))
    return min(pair), max(pair)


@st.composite
def quantize_inputs(draw, float_name: str, scale: np.ndarray, zero_point: np.ndarray,
                    group_size: int, q_range: tuple[int, int]) -> np.ndarray:
    """x near and beyond the q range for each group's scale: exact ties (k + 0.5 steps),
    integers, values that saturate at both ends, and NaN/Inf/subnormal edge values."""
    rng = draw(seeds())
    c = compute_dtype(float_name)
    outer, groups = scale.shape
    shape = (outer, groups * group_size)
    q_lo, q_hi = q_range
    s = np.repeat(scale.astype(c), group_size, axis=1)
    zp = np.repeat(zero_point.astype(np.float64), group_size, axis=1)
    # Steps t such that x = t * s lands around [q_min - zp, q_max - zp] and beyond it.
    centre = np.clip(-zp, -1e6, 1e6) + (q_lo + q_hi) / 2
    half_width = (q_hi - q_lo) / 2 + 4
    t = centre + rng.uniform(-1.3, 1.3, size=shape) * half_width
    kind = rng.integers(0, 3, size=shape)  # 0: continuous, 1: integer, 2: half-integer tie
    t = np.where(kind == 1, np.round(t), np.where(kind == 2, np.floor(t) + 0.5, t))
    with np.errstate(all="ignore"):
        x = (t.astype(c) * s).astype(np_dtype(float_name))
        x = np.where(np.isfinite(x), x, np.asarray(t, dtype=c).astype(np_dtype(float_name)))
    x = np.ascontiguousarray(x.astype(np_dtype(float_name)))
    _inject(draw, x, float_specials(float_name) + [1e30, -1e30, 2.5, -2.5, 0.5, -0.5])
    return x


@st.composite
def tie_scales(draw, float_name: str, shape) -> np.ndarray:
    """Scales m * 2^e (m in 1, 3, 5) so k + 0.5 steps of them are exact ties when the
    product fits the mantissa; e reaches into the subnormals of F."""
    rng = draw(seeds())
    fi = finfo(float_name)
    min_exp = int(np.log2(float(fi.smallest_subnormal)))
    exp = rng.integers(max(min_exp, -30), 6, size=shape)
    m = np.array([1, 3, 5])[rng.integers(0, 3, size=shape)]
    arr = (m * np.exp2(exp.astype(np.float64))).astype(np_dtype(float_name))
    return np.ascontiguousarray(arr)
