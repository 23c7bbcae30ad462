"""The checkpoint layouts on the CUDA target: NVRTC compiles every variant, and the host
emulation of the CUDA text (tests/cuda_emu) equals the oracles bit for bit."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest

from dqgen.ir import (AwqDequantizeDescriptor, DequantizeFloatZeroDescriptor,
                      GgmlDequantizeDescriptor, GptqDequantizeDescriptor)
from dqgen.lower import lower
from dqgen.render import render
from formats_util import FLOATS, assert_bits_equal, random_f16, random_words
from oracles import checkpoints as oracle

HERE = Path(__file__).resolve().parent


def _load_emu():
    spec = importlib.util.spec_from_file_location("formats_cuda_emu", HERE / "cuda_emu" / "emu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


emu = _load_emu()

GPTQ = [dict(bits=4, act_order=True, float_dtype="f16"),
        dict(bits=8, checkpoint_format="gptq_v2", float_dtype="bf16"),
        dict(bits=2, act_order=True, float_dtype="f64", scale_dtype="f32")]
AWQ = [dict(float_dtype="f16"), dict(float_dtype="f32", scale_dtype="bf16")]
GGML = [("Q4_0", "f32"), ("Q4_1", "bf16"), ("Q5_0", "f16"), ("Q8_0", "f32")]
FLOAT_ZERO = [("u8", "bf16"), ("s8", "f32"), ("u8", "f16")]


def descriptors():
    out = [GptqDequantizeDescriptor(64, 32, 16, **kw) for kw in GPTQ]
    out += [AwqDequantizeDescriptor(64, 32, 16, **kw) for kw in AWQ]
    out += [GgmlDequantizeDescriptor(5, q, f) for q, f in GGML]
    out += [DequantizeFloatZeroDescriptor(4, 64, 32, f, i) for i, f in FLOAT_ZERO]
    return out


def test_nvrtc_compiles_every_layout():
    nvrtc = pytest.importorskip("dqgen.build.nvrtc")
    if not nvrtc.nvrtc_available():
        pytest.skip("NVRTC is not installed (pip install dqgen[cuda])")
    for desc in descriptors():
        source = render(lower(desc, "cuda", "sm_90"))
        art = nvrtc.compile_cuda(source.text, name=desc.uri, arch="sm_90")
        assert source.entry.encode() in art.ptx and art.cubin
        assert b"fma.rn" not in art.ptx  # multiply and add are rounded one at a time


def run_emulated(desc, arrays: list[np.ndarray], scalars: list[int], n: int, tmp_path):
    spec = lower(desc, "cuda", "sm_90")
    source = render(spec).text
    decls = [f"{p.c_type}{'' if p.c_type.endswith('*') else ' '}{p.name}" for p in spec.params]
    dll = emu.build_emulated(source, {spec.entry: decls}, tmp_path / desc.uri)
    block = 64
    grid = max(1, min(4, -(-n // block)))  # fewer threads than elements: grid-stride
    getattr(dll, f"emu_{spec.entry}")(grid, block, *[a.ctypes.data for a in arrays], *scalars)


needs_gxx = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ runs the emulation")


@needs_gxx
@pytest.mark.parametrize("kw", GPTQ, ids=lambda kw: f"gptq{kw['bits']}-{kw['float_dtype']}")
def test_emulated_gptq(kw, tmp_path):
    rng = np.random.default_rng(kw["bits"])
    desc = GptqDequantizeDescriptor(64, 32, 16, **kw)
    per, groups = 32 // desc.bits, desc.num_groups
    qweight = random_words(rng, (64 // per, 32))
    qzeros = random_words(rng, (groups, 32 // per))
    scales = random_f16(rng, (groups, 32)).astype(FLOATS[desc.scale_dtype.value])
    g_idx = (rng.permutation(64) // 16).astype(np.int32) if desc.act_order else None
    y = np.zeros((64, 32), FLOATS[desc.float_dtype.value])
    arrays = [qweight, qzeros, scales] + ([g_idx] if desc.act_order else []) + [y]
    run_emulated(desc, arrays, [64, 32], y.size, tmp_path)
    want = oracle.gptq_dequantize(qweight, qzeros, scales, g_idx, desc.bits,
                                  desc.checkpoint_format, y.dtype, 16)
    assert_bits_equal(y, want)


@needs_gxx
@pytest.mark.parametrize("kw", AWQ, ids=lambda kw: f"awq-{kw['float_dtype']}")
def test_emulated_awq(kw, tmp_path):
    rng = np.random.default_rng(4)
    desc = AwqDequantizeDescriptor(64, 32, 16, **kw)
    qweight, qzeros = random_words(rng, (64, 4)), random_words(rng, (4, 4))
    scales = random_f16(rng, (4, 32)).astype(FLOATS[desc.scale_dtype.value])
    y = np.zeros((64, 32), FLOATS[desc.float_dtype.value])
    run_emulated(desc, [qweight, qzeros, scales, y], [64, 32], y.size, tmp_path)
    assert_bits_equal(y, oracle.awq_dequantize(qweight, qzeros, scales, 16, y.dtype))


@needs_gxx
@pytest.mark.parametrize("qtype,out", GGML)
def test_emulated_ggml(qtype, out, tmp_path):
    gguf = pytest.importorskip("gguf")
    from test_formats_ggml import random_blocks
    rng = np.random.default_rng(6)
    data = random_blocks(rng, qtype, (1, 5)).reshape(5, -1)
    y = np.zeros((5, 32), FLOATS[out])
    run_emulated(GgmlDequantizeDescriptor(5, qtype, out), [data, y], [5], y.size, tmp_path)
    with np.errstate(all="ignore"):
        want = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[qtype]).astype(FLOATS[out])
    assert_bits_equal(y, want)


@needs_gxx
@pytest.mark.parametrize("storage,out", FLOAT_ZERO)
def test_emulated_float_zero_point(storage, out, tmp_path):
    """The family's CUDA template with a float zero point (x = (q - mid) * s + z)."""
    rng = np.random.default_rng(8)
    desc = DequantizeFloatZeroDescriptor(4, 64, 32, out, storage)
    lo, hi = desc.int_dtype.int_range
    q = rng.integers(lo, hi + 1, size=(4, 64)).astype(desc.int_dtype.np_dtype)
    scale = random_f16(rng, (4, 2)).astype(FLOATS[out])
    zero = random_f16(rng, (4, 2)).astype(FLOATS[out])
    y = np.zeros((4, 64), FLOATS[out])
    run_emulated(desc, [q, scale, zero, y], [4, 64], y.size, tmp_path)
    assert_bits_equal(y, oracle.float_zero_dequantize(q, scale, zero, 32, lo, hi, y.dtype))
