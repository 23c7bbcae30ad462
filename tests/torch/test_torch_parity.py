"""Parity with an outside implementation: PyTorch's ``quantized_decomposed`` per-group ops.

``torch.ops.quantized_decomposed.dequantize_per_channel_group`` computes
``((q - zp) * scale).to(output_dtype)`` in the scale's precision, which is SPEC.md §3
exactly, so it is compared on every input (f32/f64 scales; f16/bf16 outputs with scales
that F holds exactly).

``quantize_per_channel_group`` computes ``round(x * (1 / scale) + zp)``. Two conventions
differ from SPEC.md §4, so the comparison is restricted to inputs where they agree:
  * torch multiplies by a rounded reciprocal where the spec divides: the scales are
    powers of two, whose reciprocals are exact, so ``x * (1/s) == x / s``;
  * torch rounds ``t + zp`` where the spec rounds ``t`` and then adds ``zp`` (the spec's
    **[decision]**, as GPTQ/AWQ/torchao and the reference library's docs do). At a tie
    ``t = k + 0.5`` with an odd zero point the two differ (t = 0.5, zp = 1: torch
    round(1.5) = 2, spec rint(0.5) + 1 = 1), so ties with odd zero points are excluded;
    ties with even zero points agree (k + zp keeps k's parity) and are kept. ``x`` is a
    short dyadic multiple of the scale, so ``t + zp`` is exact in f32 and no other
    rounding intervenes. NaN inputs are excluded (torch asserts on them).
``test_tie_with_odd_zero_point_is_where_the_conventions_differ`` pins that difference.

torch is an optional, test-only dependency; without it this module is skipped.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import dqgen
import strategies as S

torch = pytest.importorskip("torch", reason="torch (CPU build) is an optional test dependency; "
                            "`pip install torch` to run the parity tests")
import torch.ao.quantization.fx._decomposed  # noqa: E402,F401  (registers quantized_decomposed)

QD = torch.ops.quantized_decomposed
TORCH_INT = {"s8": torch.int8, "u8": torch.uint8}
TORCH_FLOAT = {"f32": torch.float32, "f64": torch.float64, "f16": torch.float16,
               "bf16": torch.bfloat16}
# torch asserts group_size > 1
TORCH_GROUP_SIZES = (3, 7, 32, 128)


def to_torch(a: np.ndarray):
    if a.dtype == S.NP_DTYPES["bf16"]:
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(a).copy())


def to_numpy(t) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(S.NP_DTYPES["bf16"])
    return t.contiguous().numpy()


@st.composite
def parity_shapes(draw):
    return draw(S.shapes(group_sizes=TORCH_GROUP_SIZES, outers=(1, 5, 300)).filter(
        lambda s: s[0] > 0 and s[1] > 0))


@pytest.mark.parametrize("int_name", S.INT_NAMES)
@pytest.mark.parametrize("float_name", S.FLOAT_NAMES)
@S.examples(0.25)
@given(data=st.data())
def test_dequantize_matches_torch(int_name, float_name, data):
    outer, axis, gs = data.draw(parity_shapes(), "shape")
    gshape = (outer, axis // gs)
    q = data.draw(S.int_values(int_name, (outer, axis)), "q")
    # torch subtracts in int32: keep q - zp inside it.
    zp = data.draw(S.zero_points(gshape, int_name), "zero_point")
    zp = np.clip(zp, -2**31 + 256, 2**31 - 256).astype(np.int32)
    scale = data.draw(S.scales(float_name, gshape), "scale")
    lo, hi = S.INT_RANGES[int_name]
    # torch computes in the scale's dtype (f32 for f16/bf16 outputs): pass F's scale
    # widened, which is exact.
    torch_scale = to_torch(scale).to(torch.float64 if float_name == "f64" else torch.float32)
    expected = QD.dequantize_per_channel_group(to_torch(q), torch_scale, to_torch(zp), lo, hi,
                                               TORCH_INT[int_name], gs, TORCH_FLOAT[float_name])
    ours = dqgen.dequantize_per_group(q, scale, zp, gs)
    S.assert_same_bits(ours, to_numpy(expected), "dqgen vs torch dequantize")


def _mantissa_limit(float_name: str) -> int:
    """|k| below this is exact in F (so x = k * 2^e is too)."""
    return {"f32": 2**20, "f64": 2**20, "f16": 2**11, "bf16": 2**8}[float_name]


@pytest.mark.parametrize("int_name", S.INT_NAMES)
@pytest.mark.parametrize("float_name", ["f32", "f16", "bf16"])
@S.examples(0.25)
@given(data=st.data())
def test_quantize_matches_torch_where_conventions_agree(int_name, float_name, data):
    outer, axis, gs = data.draw(parity_shapes(), "shape")
    gshape = (outer, axis // gs)
    q_min, q_max = data.draw(S.q_ranges(int_name), "q_range")
    rng = data.draw(S.seeds(), "seed")
    fdt = S.np_dtype(float_name)
    # Power-of-two scales: 1 / scale is exact, so torch's x * (1/scale) equals x / scale.
    lo_e, hi_e = (-6, 4) if float_name == "f16" else (-10, 8)  # t * s stays finite in F
    exp = rng.integers(lo_e, hi_e, size=gshape)
    scale = np.exp2(exp.astype(np.float64)).astype(fdt)
    zp = rng.integers(-200, 201, size=gshape).astype(np.int32)
    # t = k / 2^m: integers, ties (m = 1, k odd), and finer values; |t| up to ~2^11.
    m = rng.integers(0, 4, size=(outer, axis))
    limit = _mantissa_limit(float_name)
    k = rng.integers(-limit + 1, limit, size=(outer, axis))
    near = min(limit, 350)
    k = np.where(rng.random((outer, axis)) < 0.5, k % (2 * near) - near, k)  # many near the range
    t = k / np.exp2(m)
    s = np.repeat(scale.astype(np.float64), gs, axis=1)
    z = np.repeat(zp, gs, axis=1)
    x = (t * s).astype(fdt)
    assert (x.astype(np.float64) == t * s).all()  # exact by construction
    # Saturation and infinities (torch asserts on NaN, so no NaN here).
    extremes = np.array([math.inf, -math.inf, float(S.finfo(float_name).max),
                         -float(S.finfo(float_name).max)]).astype(fdt)
    pick = rng.random((outer, axis)) < 0.02
    x = np.where(pick, extremes[rng.integers(0, 4, size=(outer, axis))], x).astype(fdt)
    # Excluded: exact ties with an odd zero point (the documented convention difference).
    tie = (np.abs(t - np.floor(t)) == 0.5) & ~pick
    x = np.where(tie & (z % 2 == 1), (np.floor(t) * s).astype(fdt), x).astype(fdt)

    torch_scale = to_torch(scale).to(torch.float32)
    expected = QD.quantize_per_channel_group(to_torch(x), torch_scale, to_torch(zp), q_min, q_max,
                                             TORCH_INT[int_name], gs)
    ours = dqgen.quantize_per_group(x, scale, zp, gs, dtype=int_name, q_min=q_min, q_max=q_max)
    S.assert_same_bits(ours, to_numpy(expected.to(TORCH_INT[int_name])), "dqgen vs torch quantize")


def test_parity_inputs_include_even_ties():
    """The agreeing-convention inputs above do contain exact ties (with even zero points)."""
    x = np.array([[0.5, 1.5, 2.5, -0.5, -1.5, -2.5]], np.float32)
    scale = np.ones((1, 2), np.float32)
    zp = np.array([[2, -4]], np.int32)
    expected = QD.quantize_per_channel_group(to_torch(x), to_torch(scale), to_torch(zp), -128, 127,
                                             torch.int8, 3)
    ours = dqgen.quantize_per_group(x, scale, zp, 3)
    assert ours.tolist() == [[2, 4, 4, -4, -6, -6]]
    assert ours.tolist() == expected.tolist()


def test_tie_with_odd_zero_point_is_where_the_conventions_differ():
    """SPEC.md §4 [decision]: round t, then add zp. torch rounds t + zp. With t = 0.5 and
    zp = 1 the spec gives 1 and torch gives 2; this is why the parity test skips them."""
    x = np.array([[0.5, 1.5, 2.5]], np.float32)
    scale = np.ones((1, 1), np.float32)
    zp = np.ones((1, 1), np.int32)
    theirs = QD.quantize_per_channel_group(to_torch(x), to_torch(scale), to_torch(zp), -128, 127,
                                           torch.int8, 3)
    ours = dqgen.quantize_per_group(x, scale, zp, 3)
    assert ours.tolist() == [[1, 3, 3]]      # rint(0.5, 1.5, 2.5) = 0, 2, 2; + 1
    assert theirs.tolist() == [[2, 2, 4]]    # rint(1.5, 2.5, 3.5) = 2, 2, 4


def test_round_trip_through_both_libraries():
    """dqgen quantizes, torch dequantizes (and the other way round): same values."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((8, 256)).astype(np.float32)
    scale, zp = dqgen.choose_qparams_per_group(x, 64, dtype="u8")
    q = dqgen.quantize_per_group(x, scale, zp, 64, dtype="u8")
    theirs = QD.dequantize_per_channel_group(to_torch(q), to_torch(scale), to_torch(zp), 0, 255,
                                             torch.uint8, 64, torch.float32)
    S.assert_same_bits(dqgen.dequantize_per_group(q, scale, zp, 64), to_numpy(theirs))
