"""floatzp.dequantize and hqq.dequantize on CUDA arrays: the plan follows the data to its
device (no device= needed), each plane of HQQ runs on a view of the words and of the
output, and out= is written on the device; bit-exact against the oracles. The launches
run the host emulation of the CUDA text (tests/cuda_emu), as tests/cuda/test_formats_cuda.py."""

from __future__ import annotations

import numpy as np
import pytest

from dqgen.errors import InvalidProblemError
from dqgen.formats import floatzp, hqq
from dqgen.ir import DequantizeFloatZeroDescriptor, HqqDequantizeDescriptor
from dqgen.lower import lower
from dqgen.runtime import cuda as rt
from formats_util import assert_bits_equal, random_f16
from oracles import checkpoints as oracle
from test_formats_cuda import CaiArray, _Module, needs_gxx

# The kernels the tests launch (sizes are run-time arguments; only the URIs matter).
DESCS = [DequantizeFloatZeroDescriptor(1, 64, 32, "f16", "u4"),
         HqqDequantizeDescriptor(1, 64, 64, "f16", 4),        # axis=1, groups of 64
         HqqDequantizeDescriptor(1, 64, 1, "f16", 3)]        # axis=0: a column a group


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    from cuda_emu import kernels as K
    specs = [lower(d, "cuda", "sm_90") for d in DESCS]
    libs = K.build_emulation(specs, tmp_path_factory.mktemp("fzhqq"), parts=len(specs))
    return K.load_emulation(libs, specs)


@pytest.fixture
def launches(emulated, monkeypatch):
    """cuda:0 is an sm_90 whose launches run the emulated kernels and are recorded."""
    import ctypes
    import dqgen.plans
    record: list = []
    monkeypatch.setattr(rt, "device_arch", lambda ordinal=0: "sm_90")
    monkeypatch.setattr(dqgen.plans, "_plan_memo", {})

    def loaded(self, device):
        return _Module(emulated[self.spec.entry], record), self.spec.entry, 2

    def copy_to_host(view):
        raw = (ctypes.c_uint8 * view.nbytes).from_address(view.ptr)
        return np.frombuffer(raw, np.uint8).view(view.dtype).reshape(view.shape).copy()
    monkeypatch.setattr(rt.CudaKernel, "_loaded", loaded)
    monkeypatch.setattr(rt, "copy_to_host", copy_to_host)
    return record


@needs_gxx
def test_floatzp_runs_where_the_arrays_live(launches):
    rng = np.random.default_rng(4)
    q = rng.integers(0, 256, (3, 32), dtype=np.uint8)     # packed u4: 64 values a row
    scale, zero = random_f16(rng, (3, 2)), random_f16(rng, (3, 2))
    y = np.zeros((3, 64), np.float16)
    got = floatzp.dequantize(CaiArray(q), CaiArray(scale), CaiArray(zero), 32, "u4",
                             out=CaiArray(y))
    assert isinstance(got, CaiArray) and got.arr is y
    values = np.stack([q & 15, q >> 4], axis=-1).reshape(3, 64)
    assert_bits_equal(y, oracle.float_zero_dequantize(values, scale, zero, 32, 0, 15,
                                                      np.float16))
    assert [entry for entry, *_ in launches] == ["dqgen_dequant_fz_u4_f16_g32_m8"]
    with pytest.raises(InvalidProblemError, match="zero_point has dtype float32"):
        floatzp.dequantize(CaiArray(q), CaiArray(scale), CaiArray(zero.astype(np.float32)),
                           32, "u4", out=CaiArray(y))


@needs_gxx
def test_hqq_planes_run_on_device_views(launches):
    """axis=1 (4 bits, two planes of rows) and axis=0 (3 bits, int32 words, a row of the
    plane at a time): each launch reads its rows of the words and writes its rows of y."""
    rng = np.random.default_rng(5)
    W_q = rng.integers(0, 256, (4, 64), dtype=np.uint8)
    scale, zero = random_f16(rng, (8, 1)), random_f16(rng, (8, 1))
    y = np.zeros((8, 64), np.float16)
    got = hqq.dequantize(CaiArray(W_q), CaiArray(scale), CaiArray(zero), 4, (8, 64), 64,
                         out=CaiArray(y))
    assert got.arr is y
    assert_bits_equal(y, oracle.hqq_dequantize(oracle.unpack_hqq(W_q, 4, 8), scale, zero,
                                               np.float16))
    assert [entry for entry, *_ in launches] == ["dqgen_dequant_hqq4_f16_g64"] * 2

    words = rng.integers(-2**31, 2**31, (2, 16), dtype=np.int64).astype(np.int32)
    s0, z0 = random_f16(rng, (1, 16)), random_f16(rng, (1, 16))
    y0 = np.zeros((12, 16), np.float16)   # [12, 16] in groups of 12: a column a group
    hqq.dequantize(CaiArray(words), CaiArray(s0), CaiArray(z0), 3, (12, 16), 12, axis=0,
                   out=CaiArray(y0))
    want = oracle.hqq_dequantize(oracle.unpack_hqq(words, 3, 12), s0, z0, np.float16)
    assert_bits_equal(y0, want.reshape(12, 16))
    assert launches[-1][0] == "dqgen_dequant_hqq3_f16_g1"


@pytest.mark.skipif(not rt.cuda_available(),
                    reason=f"no CUDA device: {rt.cuda_unavailable_reason() or 'none'}")
def test_on_the_gpu_match_the_cpu():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    rng = np.random.default_rng(9)
    q = rng.integers(0, 256, (64, 256), dtype=np.uint8)
    scale, zero = random_f16(rng, (64, 4)), random_f16(rng, (64, 4))
    cpu = floatzp.dequantize(q, scale, zero, 128, "u4")
    gpu = floatzp.dequantize(*(torch.from_numpy(a).cuda() for a in (q, scale, zero)), 128, "u4")
    assert gpu.is_cuda
    assert_bits_equal(gpu.cpu().numpy(), cpu)  # any NaN equals any NaN (SPEC.md)
    for bits, axis in ((4, 1), (3, 1), (2, 0)):
        planes = 10 if bits == 3 else 8 // bits
        rows, cols = (64 * 256 // 64, 64) if axis == 1 else (64, 64 * 256 // 64)
        step = -(-rows // planes)
        word = np.int32 if bits == 3 else np.uint8
        W = rng.integers(0, 2**31 if bits == 3 else 256, (step, cols)).astype(word)
        groups = (rows, 1) if axis == 1 else (1, cols)
        s, z = random_f16(rng, groups), random_f16(rng, groups)
        cpu = hqq.dequantize(W, s, z, bits, (64, 256), 64, axis)
        gpu = hqq.dequantize(*(torch.from_numpy(a).cuda() for a in (W, s, z)), bits,
                             (64, 256), 64, axis)
        assert gpu.is_cuda
        assert_bits_equal(gpu.cpu().numpy(), cpu)
