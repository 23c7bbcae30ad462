"""The array rule of dqgen/arrays.py on a CUDA device: a CUDA plan names the arguments
as a plain function's caller passed them, a torch float8 (or other unreadable) CUDA
tensor is refused naming the argument and dtype, and ``ggml.dequantize`` of CUDA blocks
returns f16 unless asked. Skipped without a CUDA device."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import dqgen
from dqgen import InvalidProblemError, UnsupportedError, plans
from dqgen.formats import ggml
from dqgen.ir import DequantizePerGroupDescriptor
from dqgen.runtime import cuda as rt

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not (rt.cuda_available() and torch.cuda.is_available()),
                                reason="no CUDA device")

G = 32


def _problem():
    rng = np.random.default_rng(0)
    q = torch.from_numpy(rng.integers(-128, 128, (1, 64), dtype=np.int8)).cuda()
    scale = torch.from_numpy(rng.uniform(0.5, 2, (1, 2)).astype(np.float32)).cuda()
    zp = torch.zeros((1, 2), dtype=torch.int32, device="cuda")
    return q, scale, zp


def _plan():
    return plans.DequantizePerGroupPlan.select(
        DequantizePerGroupDescriptor(1, 64, G, "f32", "s8"), device="cuda")


def test_a_cuda_plan_names_the_callers_arguments():
    _, scale, zp = _problem()
    arena = torch.zeros(64 * 4, dtype=torch.uint8, device="cuda")
    q_alias = arena[:64].view(torch.int8).reshape(1, 64)
    y_alias = arena.view(torch.float32).reshape(1, 64)
    args = plans.DequantizePerGroupArgs(q_alias, scale, zp, y_alias)
    caller = {"input": ("q", q_alias), "scale": ("scale", scale),
              "zero_point": ("zero_point", zp), "output": ("out", y_alias)}
    with pytest.raises(InvalidProblemError, match="^out overlaps q in device memory"):
        _plan().run(args, caller=caller)
    with pytest.raises(InvalidProblemError, match="^output overlaps input in device memory"):
        _plan().run(args)


def test_a_cuda_float8_scale_is_refused_naming_the_argument_and_dtype():
    q, scale, zp = _problem()
    fp8 = scale.to(torch.float8_e4m3fn)
    y = torch.empty((1, 64), dtype=torch.float32, device="cuda")
    with pytest.raises(InvalidProblemError,
                       match="^scale has dtype float8_e4m3fn, expected float32"):
        _plan().run(plans.DequantizePerGroupArgs(q, fp8, zp, y))
    with pytest.raises(UnsupportedError, match="scale.*float8_e4m3fn"):
        dqgen.dequantize_per_group(q, fp8, zp, G)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that complex32 is experimental
        odd = torch.zeros((1, 2), dtype=torch.complex32, device="cuda")
    with pytest.raises(UnsupportedError, match="^scale has dtype torch.complex32"):
        _plan().run(plans.DequantizePerGroupArgs(q, odd, zp, y))


def test_cuda_ggml_defaults_to_f16_and_names_out():
    rng = np.random.default_rng(1)
    blocks = np.zeros((2, 34), np.uint8)
    blocks[:, :2] = rng.uniform(0.01, 1, (2, 1)).astype(np.float16).view(np.uint8)
    blocks[:, 2:] = rng.integers(0, 256, (2, 32), dtype=np.uint8)
    got = ggml.dequantize(torch.from_numpy(blocks).cuda(), "Q8_0")
    assert got.is_cuda and got.dtype == torch.float16 and got.shape == (2, 32)
    assert np.array_equal(got.cpu().numpy(), ggml.dequantize(blocks, "Q8_0"))
    arena = torch.zeros(2 * 32 * 4, dtype=torch.uint8, device="cuda")
    arena[:68] = torch.from_numpy(blocks.reshape(-1)).cuda()
    with pytest.raises(InvalidProblemError, match="^out overlaps data in device memory"):
        ggml.dequantize(arena[:68].reshape(2, 34), "Q8_0", dtype="f32",
                        out=arena.view(torch.float32).reshape(2, 32))
