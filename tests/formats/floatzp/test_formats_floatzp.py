"""Float zero point (torchao ZeroPointDomain.FLOAT, tinygemm): ``F(F(F(q - mid) * s) + z)``
with ``mid = (q_max + q_min + 1) / 2``, bit-exact with torchao's own dequantize and with
the oracle on every ISA, float dtype, storage (s8/u8, packed s4/u4) and q range."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dqgen import PlanPreference
from dqgen.formats import floatzp
from dqgen.formats.plan import FormatPlan
from dqgen.ir import DequantizeFloatZeroDescriptor
from formats_util import FLOATS, assert_bits_equal, random_f16
from oracles import checkpoints as oracle
from strategies import ISAS

STORAGE_RANGES = {"u4": (0, 15), "s4": (-8, 7), "u8": (0, 255), "s8": (-128, 127)}
# Ranges whose mid is a half (7.5 for [0, 14]) and ones whose mid is not the storage's.
RANGES = [("u8", None), ("u8", (0, 14)), ("s8", None), ("s8", (-100, 27)), ("u4", None),
          ("u4", (0, 14)), ("s4", None), ("s4", (-8, 6))]
# Values where one rounding of the whole formula (or of the sum only) differs from three.
SPECIAL = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 6e-8, -6e-8, 1e-45, 65504.0, 3e38,
                    0.208984375, 0.34375, 1 / 3, -2.5], np.float64)


def _storage(values: np.ndarray, storage: str) -> np.ndarray:
    if storage in ("u4", "s4"):
        return oracle.pack_int4(values)
    return values.astype(np.uint8 if storage == "u8" else np.int8)


def _params(rng, shape, f):
    """Scales and zeros: f16-sized normal values, extreme bit patterns and SPECIAL ones."""
    a = random_f16(rng, shape).astype(np.float64)
    pick = rng.random(shape) < 0.2
    a = np.where(pick, rng.choice(SPECIAL, size=shape), a)
    with np.errstate(all="ignore"):
        return a.astype(f)


def _to_torch(a: np.ndarray):
    import torch
    if a.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(a.copy())


def _from_torch(t, f) -> np.ndarray:
    import torch
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy().astype(f)


def _torchao_dequantize(values, scale, zero, group, storage, q_range, f):
    torch = pytest.importorskip("torch", reason="torch is the oracle's runtime")
    qp = pytest.importorskip("torchao.quantization.quant_primitives",
                             reason="torchao (pip install torchao) is the oracle")
    lo, hi = q_range
    int_dtype = {"u4": torch.uint4, "s4": torch.int8, "u8": torch.uint8, "s8": torch.int8}[storage]
    q = torch.from_numpy(values.astype(np.int8 if storage in ("s4", "s8") else np.uint8))
    out = {np.dtype(np.float32): torch.float32, np.dtype(np.float16): torch.float16,
           np.dtype(ml_dtypes.bfloat16): torch.bfloat16}[np.dtype(f)]
    y = qp._dequantize_affine_tinygemm(q, (1, group), _to_torch(scale), _to_torch(zero),
                                       int_dtype, lo, hi, output_dtype=out)
    return _from_torch(y, f)


def test_torchao_reproducer():
    """u4 q=2 (mid 8), bf16 scale 0.208984375, zero 0.34375: the product rounds to bf16
    before the sum, as torchao's tinygemm dequantize does: -0.90625 (0xbf68)."""
    bf16 = ml_dtypes.bfloat16
    s, z = np.array([[0.208984375]], bf16), np.array([[0.34375]], bf16)
    y = floatzp.dequantize(np.array([[0x32]], np.uint8), s, z, 2, int_dtype="u4")
    assert y.view(np.uint16)[0, 0] == 0xbf68
    assert_bits_equal(y, _torchao_dequantize(np.array([[2, 3]]), s, z, 2, "u4", (0, 15), bf16))


@pytest.mark.parametrize("float_dtype", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("storage,q_range", RANGES)
def test_matches_torchao(storage, q_range, float_dtype):
    """Every value of the storage (also outside [q_min, q_max]), random and special scales
    and zeros (Inf, NaN, subnormal, huge): the kernel equals torchao bit for bit."""
    rng = np.random.default_rng(sum(map(ord, storage + float_dtype)) + (q_range or (0,))[0])
    lo, hi = STORAGE_RANGES[storage]
    q_min, q_max = q_range or (lo, hi)
    rows, axis, group = 8, 256, 32
    values = rng.integers(lo, hi + 1, size=(rows, axis))
    f = FLOATS[float_dtype]
    scale, zero = _params(rng, (rows, axis // group), f), _params(rng, (rows, axis // group), f)
    got = floatzp.dequantize(_storage(values, storage), scale, zero, group, int_dtype=storage,
                             q_min=q_min, q_max=q_max)
    want = _torchao_dequantize(values, scale, zero, group, storage, (q_min, q_max), f)
    assert_bits_equal(got, want)
    assert_bits_equal(got, oracle.float_zero_dequantize(values, scale, zero, group, q_min,
                                                        q_max, f))


def test_mid_is_a_true_division():
    desc = DequantizeFloatZeroDescriptor(1, 2, 2, "f32", "u8", 0, 14)
    assert desc.mid == 7.5 and desc.uri.endswith("_m7p5")
    assert DequantizeFloatZeroDescriptor(1, 2, 2, "f32", "s8", -8, -6).uri.endswith("_mn6p5")
    assert DequantizeFloatZeroDescriptor(1, 2, 2, "f32", "u4").uri.endswith("_m8")
    y = floatzp.dequantize(np.array([[0, 14]], np.uint8), np.ones((1, 1), np.float32),
                           np.zeros((1, 1), np.float32), 2, q_min=0, q_max=14)
    assert y.tolist() == [[-7.5, 6.5]]


def test_bf16_difference_rounds():
    """|q - mid| = 254.5 needs nine significant bits: bf16 rounds it (to 254, the even
    one) before the product, as torch's conversion to the output dtype does."""
    bf16 = ml_dtypes.bfloat16
    y = floatzp.dequantize(np.array([[255, 0]], np.uint8), np.ones((1, 1), bf16),
                           np.zeros((1, 1), bf16), 2, q_min=0, q_max=0)   # mid 0.5
    assert y.astype(np.float32).tolist() == [[254.0, -0.5]]


@st.composite
def problems(draw):
    storage = draw(st.sampled_from(sorted(STORAGE_RANGES)))
    lo, hi = STORAGE_RANGES[storage]
    q_min = draw(st.integers(lo, hi))
    q_max = draw(st.integers(q_min, hi))
    return (storage, q_min, q_max, draw(st.sampled_from(["f32", "f64", "f16", "bf16"])),
            draw(st.sampled_from((2, 12, 32))), draw(st.sampled_from(ISAS)),
            draw(st.integers(0, 2**32 - 1)))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_matches_oracle(problem):
    """Any storage, q range, float dtype (f64 too), group size and ISA against the oracle;
    scales and zeros with special values (Inf, NaN, subnormals, huge)."""
    storage, q_min, q_max, float_dtype, group, isa, seed = problem
    rng = np.random.default_rng(seed)
    lo, hi = STORAGE_RANGES[storage]
    rows, axis = 3, 4 * group
    values = rng.integers(lo, hi + 1, size=(rows, axis))
    f = FLOATS[float_dtype]
    scale, zero = _params(rng, (rows, axis // group), f), _params(rng, (rows, axis // group), f)
    desc = DequantizeFloatZeroDescriptor(rows, axis, group, float_dtype, storage, q_min, q_max)
    y = np.empty((rows, axis), f)
    FormatPlan.select(desc, preference=PlanPreference(isa=isa)).run(
        {"q": _storage(values, storage), "scale": scale, "zero_point": zero, "y": y})
    assert_bits_equal(y, oracle.float_zero_dequantize(values, scale, zero, group, q_min, q_max, f))


@pytest.mark.parametrize("storage,q_range,float_dtype", [
    ("u4", (0, 14), "bf16"), ("u8", (0, 0), "bf16"), ("s8", (-100, 27), "f16"),
    ("s4", (-8, 6), "f32")])
def test_cuda_emulated(storage, q_range, float_dtype, tmp_path):
    """The CUDA text, compiled for the host (tests/cuda_emu), rounds each step the same."""
    from test_formats_cuda import needs_gxx, run_emulated
    if needs_gxx.args[0]:
        pytest.skip(needs_gxx.kwargs["reason"])
    rng = np.random.default_rng(len(storage) * 7 + q_range[0] + 128)
    lo, hi = STORAGE_RANGES[storage]
    rows, axis, group = 4, 64, 32
    desc = DequantizeFloatZeroDescriptor(rows, axis, group, float_dtype, storage, *q_range)
    values = rng.integers(lo, hi + 1, size=(rows, axis))
    f = FLOATS[float_dtype]
    scale, zero = _params(rng, (rows, axis // group), f), _params(rng, (rows, axis // group), f)
    y = np.zeros((rows, axis), f)
    run_emulated(desc, [_storage(values, storage), scale, zero, y], [rows, axis], y.size,
                 tmp_path)
    assert_bits_equal(y, oracle.float_zero_dequantize(values, scale, zero, group, *q_range, f))
