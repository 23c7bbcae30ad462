"""The CUDA plumbing: NVRTC builds, the driver probe, pointer/stream helpers, and the
host emulation used to check CUDA kernels bit for bit on machines without a GPU."""

from __future__ import annotations

import ctypes
import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from dqgen.errors import CompileError, UnsupportedError
from dqgen.runtime import cuda as rt

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent


def _load_emu():
    """Import tests/cuda_emu/emu.py by path (tests/ is not a package)."""
    spec = importlib.util.spec_from_file_location("cuda_emu_emu", TESTS / "cuda_emu" / "emu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


emu = _load_emu()

# A small kernel in the dialect dqgen's CUDA templates use: fp16/bf16 conversions,
# 64-bit indexing, an int4 vector load, exact int64 arithmetic and _rn intrinsics.
KERNEL = textwrap.dedent("""\
    #include <cuda_fp16.h>
    #include <cuda_bf16.h>
    #include <stdint.h>

    extern "C" __global__ void cvt(const float* __restrict__ x, __half* __restrict__ h,
                                   __nv_bfloat16* __restrict__ b, float* __restrict__ hb,
                                   float* __restrict__ bb, long long n) {
      long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
      if (i >= n) return;
      __half hv = __float2half_rn(x[i]);
      __nv_bfloat16 bv = __float2bfloat16_rn(x[i]);
      h[i] = hv;
      b[i] = bv;
      hb[i] = __half2float(hv);
      bb[i] = __bfloat162float(bv);
    }

    extern "C" __global__ void dq16(const int8_t* __restrict__ q, const float* __restrict__ scale,
                                    const int32_t* __restrict__ zp, float* __restrict__ out,
                                    double* __restrict__ out64, long long n_vec) {
      long long v = (long long)blockIdx.x * blockDim.x + threadIdx.x;
      if (v >= n_vec) return;
      int4 raw = __ldg(reinterpret_cast<const int4*>(q) + v);
      const int8_t* vals = reinterpret_cast<const int8_t*>(&raw);
      for (int k = 0; k < 16; ++k) {
        long long d = (long long)vals[k] - (long long)zp[v];
        out[v * 16 + k] = __fmul_rn(__ll2float_rn(d), scale[v]);
        out64[v * 16 + k] = __dmul_rn(__ll2double_rn(d), (double)scale[v]);
      }
    }
    """)
KERNEL_PARAMS = {
    "cvt": ["const float* __restrict__ x", "__half* __restrict__ h",
            "__nv_bfloat16* __restrict__ b", "float* __restrict__ hb",
            "float* __restrict__ bb", "long long n"],
    "dq16": ["const int8_t* q", "const float* scale", "const int32_t* zp", "float* out",
             "double* out64", "long long n_vec"],
}

HAS_GXX = shutil.which("g++") is not None
needs_gxx = pytest.mark.skipif(not HAS_GXX, reason="g++ is needed for the CUDA host emulation")


def _nvrtc():
    """The NVRTC driver, or a skip naming what to install."""
    from dqgen.build import nvrtc
    if not nvrtc.nvrtc_available():
        pytest.skip("NVRTC is not installed (pip install cuda-bindings nvidia-cuda-nvrtc)")
    return nvrtc


def _special_floats() -> np.ndarray:
    """Values that stress float32 -> f16/bf16 rounding: ties, subnormals, limits, NaN."""
    f16_sub = [2.0 ** -24, 2.0 ** -25, 2.0 ** -25 * 1.5, 3 * 2.0 ** -25, 2.0 ** -14,
               2.0 ** -14 - 2.0 ** -25, 2.0 ** -26]
    ties = [1 + 2.0 ** -11, 1 + 3 * 2.0 ** -11, 1 + 2.0 ** -8, 1 + 3 * 2.0 ** -8,
            2049.0, 2051.0, 257.0, 259.0]
    limits = [65504.0, 65519.0, 65520.0, 65536.0, 3.3895314e38, 3.4028235e38, 1e-45,
              1.1754942e-38, 1.1754944e-38, 0.0, -0.0, np.inf, -np.inf, np.nan]
    vals = np.array(f16_sub + ties + limits, dtype=np.float32)
    nan_payloads = np.array([0x7FC00001, 0xFFC00000, 0x7F800001, 0x7FBFFFFF],
                            dtype=np.uint32).view(np.float32)
    # Every float32 just below/at/above each special, both signs.
    bits = np.concatenate([vals, nan_payloads]).view(np.uint32)
    around = np.concatenate([bits - 1, bits, bits + 1]).astype(np.uint32)
    around = np.concatenate([around, around ^ np.uint32(0x80000000)])
    rng = np.random.default_rng(1234)
    rand = rng.integers(0, 2 ** 32, size=200_000, dtype=np.uint64).astype(np.uint32)
    return np.concatenate([around, rand]).view(np.float32)


def _same_bits_or_both_nan(got: np.ndarray, want: np.ndarray) -> None:
    """Bit equality, except that NaN matches any NaN (SPEC: NaN payload unspecified)."""
    with np.errstate(all="ignore"):
        gf, wf = got.astype(np.float64), want.astype(np.float64)
    nan = np.isnan(wf)
    np.testing.assert_array_equal(np.isnan(gf), nan)
    width = {2: np.uint16, 4: np.uint32, 8: np.uint64}[got.dtype.itemsize]
    bad = np.flatnonzero(got.view(width)[~nan] != want.view(width)[~nan])
    assert bad.size == 0, f"{bad.size} mismatches, first at {bad[:5]}"


# ---- NVRTC -------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_nvrtc_builds_cubin_and_ptx(arch):
    nvrtc = _nvrtc()
    art = nvrtc.compile_cuda(KERNEL, name="infra", arch=arch)
    assert art.arch == arch and art.nvrtc_version == nvrtc.nvrtc_version()
    assert art.cubin and art.cubin[:4] == b"\x7fELF"
    assert b".entry cvt" in art.ptx and b".entry dq16" in art.ptx
    assert "--fmad=false" in art.options and f"-arch={arch}" in art.options


def test_nvrtc_compute_arch_gives_ptx_only():
    nvrtc = _nvrtc()
    art = nvrtc.compile_cuda(KERNEL, name="infra", arch="compute_90")
    assert art.cubin is None
    assert b".entry" in art.ptx and b".target sm_90" in art.ptx
    assert not art.ptx.endswith(b"\0")


def test_nvrtc_no_fma_contraction():
    nvrtc = _nvrtc()
    src = ('extern "C" __global__ void f(float* y, const float* a) '
           "{ y[0] = a[0] * a[1] + a[2]; }")
    art = nvrtc.compile_cuda(src, name="fma", arch="compute_90")
    assert b"fma.rn" not in art.ptx and b"mul.rn.f32" in art.ptx


def test_nvrtc_syntax_error_names_the_line():
    nvrtc = _nvrtc()
    bad = KERNEL + "\n__device__ int broken = ;\n"
    line = bad.splitlines().index("__device__ int broken = ;") + 1
    with pytest.raises(CompileError) as info:
        nvrtc.compile_cuda(bad, name="broken", arch="sm_90")
    err = info.value
    assert f"broken.cu({line})" in err.log
    assert err.source == bad and "--fmad=false" in err.command
    assert f"{line} | __device__ int broken = ;" in err.dump()


def test_nvrtc_rejects_unknown_arch():
    nvrtc = _nvrtc()
    for arch in ("sm_1", "gfx90a", "sm_91"):
        with pytest.raises(UnsupportedError, match="arch="):
            nvrtc.compile_cuda(KERNEL, name="infra", arch=arch)


def test_nvrtc_outputs_never_write_into_shared_bytes_objects():
    """An empty log is 1 byte (its NUL). Fetching it into ``b" " * 1`` (which is the
    interpreter's shared b" ") once turned every later b" " into b"\\0", and with it
    every " " literal Jinja parsed afterwards."""
    nvrtc = _nvrtc()
    src = 'extern "C" __global__ void quiet(float* y) { y[0] = 1.0f; }'
    for _ in range(2):
        art = nvrtc.compile_cuda(src, name="quiet", arch="sm_90")
    assert art.log == "" and art.ptx and art.cubin
    assert bytes([32]) == b" " and " ".encode("ascii") == b" "
    assert " ".encode("ascii", "backslashreplace").decode("unicode-escape") == " "


def test_nvrtc_default_options_are_stable():
    from dqgen.build import nvrtc
    assert nvrtc.default_options("sm_90") == ("--std=c++17", "--fmad=false", "--ftz=false",
                                              "--prec-div=true", "--prec-sqrt=true",
                                              "-arch=sm_90")
    assert nvrtc.default_options("sm_90") == nvrtc.default_options("sm_90")


def test_nvrtc_with_a_toolkit_include_dir(monkeypatch):
    """The fallback path: headers from a CUDA toolkit dir, stdint.h from the typedefs."""
    nvrtc = _nvrtc()
    inc = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include"
    if not (inc / "cuda_fp16.h").is_file():
        pytest.skip(f"no CUDA toolkit headers at {inc}")
    monkeypatch.setenv("DQGEN_CUDA_INCLUDE", str(inc))
    nvrtc.header_options.cache_clear()
    try:
        art = nvrtc.compile_cuda(KERNEL, name="infra", arch="sm_90")
        assert f"-I{inc}" in art.options and art.cubin
    finally:
        nvrtc.header_options.cache_clear()


def test_without_cuda_packages_everything_degrades_cleanly():
    """No cuda-bindings at all: imports work, the probe says why, compiling names the fix."""
    code = textwrap.dedent("""
        import sys
        sys.modules["cuda"] = None
        sys.modules["cuda.bindings"] = None
        from dqgen.build import nvrtc
        from dqgen.runtime import cuda
        from dqgen.errors import UnsupportedError
        assert not nvrtc.nvrtc_available()
        assert not cuda.cuda_available() and cuda.cuda_device_count() == 0
        assert "cuda-bindings" in cuda.cuda_unavailable_reason()
        try:
            nvrtc.compile_cuda("", name="x", arch="sm_90")
        except UnsupportedError as e:
            assert "dqgen[cuda]" in str(e), e
        else:
            raise AssertionError("no error")
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr


# ---- driver probe and helpers ------------------------------------------------------

def test_probe_without_a_driver_reports_a_reason():
    if rt.cuda_available():
        pytest.skip("a CUDA device is present")
    assert rt.cuda_device_count() == 0
    reason = rt.cuda_unavailable_reason()
    assert reason and any(w in reason for w in ("driver", "libcuda", "device", "cuda-bindings"))
    with pytest.raises(UnsupportedError, match="cuda:0"):
        rt.device_arch(0)


def test_stream_handle_accepts_common_stream_objects():
    class TorchLike:
        cuda_stream = 0x1234

    class CupyLike:
        ptr = 0x5678

    assert rt.stream_handle(None) == 0
    assert rt.stream_handle(7) == 7
    assert rt.stream_handle(TorchLike()) == 0x1234
    assert rt.stream_handle(CupyLike()) == 0x5678
    for bad in (True, "0", 1.5):
        with pytest.raises(UnsupportedError, match="stream"):
            rt.stream_handle(bad)


def test_device_pointer_reads_cuda_array_interface(monkeypatch):
    # the pointer is made up: with a driver present, it is not asked which device owns it
    monkeypatch.setattr(rt, "cuda_available", lambda: False)

    class FakeCuda:
        __cuda_array_interface__ = {"data": (0xABC000, False), "shape": (3, 4),
                                    "typestr": "<f2", "strides": None, "version": 3}

    p = rt.device_pointer(FakeCuda())
    assert (p.ptr, p.shape, p.strides, p.nbytes) == (0xABC000, (3, 4), (8, 2), 24)
    assert p.dtype == np.float16 and p.device == 0


def test_device_pointer_reads_dlpack_when_cai_is_missing():
    """Parse a real DLPack capsule (numpy's), presented as if it lived on cuda:0."""
    host = np.arange(24, dtype=np.float32).reshape(4, 6)[1:, ::2]

    class FakeCudaDLPack:
        def __dlpack_device__(self):
            return (2, 0)

        def __dlpack__(self, stream=None):
            return host.__dlpack__()

    p = rt.device_pointer(FakeCudaDLPack())
    assert p.ptr == host.ctypes.data and p.shape == (3, 3)
    assert p.strides == host.strides and p.dtype == np.float32
    assert p.nbytes == (2 * 24 + 2 * 8) + 4


def test_device_pointer_rejects_host_arrays():
    with pytest.raises(UnsupportedError, match="not a CUDA array"):
        rt.device_pointer(np.zeros(3))


def test_kernel_params_are_an_array_of_pointers_to_values():
    addr, keep = rt._kernel_params([("ptr", 0xDEAD0), ("i64", -5), ("f32", 1.5),
                                    ("u32", 7), (ctypes.c_double, 2.25)])
    slots = (ctypes.c_void_p * 5).from_address(addr)
    assert ctypes.c_void_p.from_address(slots[0]).value == 0xDEAD0
    assert ctypes.c_int64.from_address(slots[1]).value == -5
    assert ctypes.c_float.from_address(slots[2]).value == 1.5
    assert ctypes.c_uint32.from_address(slots[3]).value == 7
    assert ctypes.c_double.from_address(slots[4]).value == 2.25
    with pytest.raises(UnsupportedError, match="kind"):
        rt._kernel_params([("bf16", 1)])


# ---- host emulation ----------------------------------------------------------------

@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    if not HAS_GXX:
        pytest.skip("g++ is needed for the CUDA host emulation")
    return emu.build_emulated(KERNEL, KERNEL_PARAMS, tmp_path_factory.mktemp("emu"))


def _run_cvt(lib, x: np.ndarray, block: int = 128):
    n = x.size
    h = np.empty(n, np.uint16)
    b = np.empty(n, np.uint16)
    hb = np.empty(n, np.float32)
    bb = np.empty(n, np.float32)
    grid = (n + block - 1) // block
    lib.emu_cvt(grid, block, x.ctypes.data, h.ctypes.data, b.ctypes.data, hb.ctypes.data,
                bb.ctypes.data, n)
    return h.view(np.float16), b.view(ml_dtypes.bfloat16), hb, bb


@needs_gxx
def test_emulated_float_to_half_and_bfloat16_round_to_nearest_even(emulated):
    x = _special_floats()
    h, b, hb, bb = _run_cvt(emulated, x)
    with np.errstate(all="ignore"):
        want_h, want_b = x.astype(np.float16), x.astype(ml_dtypes.bfloat16)
    _same_bits_or_both_nan(h, want_h)
    _same_bits_or_both_nan(b, want_b)
    _same_bits_or_both_nan(hb, h.astype(np.float32))
    _same_bits_or_both_nan(bb, b.astype(np.float32))


@needs_gxx
def test_emulated_widening_is_exact_for_every_16_bit_pattern(emulated):
    """Round-trip all 65536 half and bfloat16 bit patterns through float32 and back."""
    pats = np.arange(2 ** 16, dtype=np.uint32)
    x_h = pats.astype(np.uint16).view(np.float16).astype(np.float32)
    h, _, hb, _ = _run_cvt(emulated, x_h)
    _same_bits_or_both_nan(h, x_h.astype(np.float16))
    _same_bits_or_both_nan(hb, x_h)
    x_b = (pats << 16).view(np.float32)
    _, b, _, bb = _run_cvt(emulated, x_b)
    with np.errstate(all="ignore"):
        _same_bits_or_both_nan(b, x_b.astype(ml_dtypes.bfloat16))
    _same_bits_or_both_nan(bb, x_b)


@needs_gxx
def test_emulated_vector_load_and_exact_products(emulated):
    rng = np.random.default_rng(7)
    n_vec = 37
    q = rng.integers(-128, 128, size=n_vec * 16, dtype=np.int8)
    zp = rng.integers(-200, 200, size=n_vec, dtype=np.int32)
    scale = rng.standard_normal(n_vec).astype(np.float32)
    scale[:3] = [np.float32(1e-40), np.inf, np.nan]
    out = np.empty(n_vec * 16, np.float32)
    out64 = np.empty(n_vec * 16, np.float64)
    emulated.emu_dq16(3, 16, q.ctypes.data, scale.ctypes.data, zp.ctypes.data,
                      out.ctypes.data, out64.ctypes.data, n_vec)
    d = q.astype(np.int64) - np.repeat(zp, 16).astype(np.int64)
    with np.errstate(invalid="ignore"):
        want = d.astype(np.float32) * np.repeat(scale, 16)
        want64 = d.astype(np.float64) * np.repeat(scale, 16).astype(np.float64)
    _same_bits_or_both_nan(out, want)
    _same_bits_or_both_nan(out64, want64)


def test_emulation_driver_takes_declared_parameters():
    src = emu.driver_source({"k": ["const int8_t* __restrict__ q", "long long n"]})
    assert 'extern "C" void emu_k(unsigned int grid, unsigned int block, ' in src
    assert "k(q, n);" in src
    with pytest.raises(ValueError):
        emu.driver_source({"k": ["int*"]})


@needs_gxx
def test_emulated_shuffles_meet_as_on_a_device(tmp_path):
    """__shfl_down_sync in emulation: lane l gets lane l + delta's value within its
    segment of `width` lanes and keeps its own past it; two half-warps shuffle apart."""
    src = ('extern "C" __global__ void shfl(int* y) {'
           " const int t = threadIdx.x;"
           " const unsigned half = 0xffffu << (t & 16);"
           " y[t] = __shfl_down_sync(0xffffffffu, t * 10, 3);"
           " y[64 + t] = __shfl_down_sync(half, t * 10, 5, 16); }")
    lib = emu.build_emulated(src, {"shfl": ["int* y"]}, tmp_path)
    y = np.zeros(128, np.int32)
    lib.emu_shfl(1, 64, y.ctypes.data)
    lanes = np.arange(64)
    full = np.where(lanes % 32 + 3 < 32, lanes + 3, lanes) * 10
    halves = np.where(lanes % 16 + 5 < 16, lanes + 5, lanes) * 10
    assert y[:64].tolist() == full.tolist()
    assert y[64:].tolist() == halves.tolist()


@needs_gxx
def test_emulation_with_address_sanitizer_catches_out_of_bounds(tmp_path):
    """A kernel without a bounds check, run over too many threads, must be caught."""
    src = ('extern "C" __global__ void oob(float* y, long long n) '
           "{ y[(long long)blockIdx.x * blockDim.x + threadIdx.x] = 1.0f; }")
    try:
        lib = emu.compile_emulated(src, {"oob": ["float* y", "long long n"]}, tmp_path,
                                   sanitize="address")
        runtime = emu.asan_runtime()
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"AddressSanitizer is not usable here: {exc}")
    code = textwrap.dedent(f"""
        import ctypes, sys, numpy as np
        lib = ctypes.CDLL({str(lib)!r})
        y = np.zeros(int(sys.argv[1]), np.float32)
        lib.emu_oob(ctypes.c_uint(2), ctypes.c_uint(8), ctypes.c_void_p(y.ctypes.data),
                    ctypes.c_longlong(y.size))
        print("sum", y.sum())
    """)
    env = {**os.environ, "LD_PRELOAD": runtime, "ASAN_OPTIONS": "detect_leaks=0"}
    fine = subprocess.run([sys.executable, "-c", code, "16"], capture_output=True,
                          text=True, env=env)
    assert fine.returncode == 0 and "sum 16.0" in fine.stdout, fine.stderr
    overflow = subprocess.run([sys.executable, "-c", code, "15"], capture_output=True,
                              text=True, env=env)
    assert overflow.returncode != 0 and "heap-buffer-overflow" in overflow.stderr


# ---- on a GPU ------------------------------------------------------------------------

@pytest.mark.skipif(not rt.cuda_available(),
                    reason=f"no CUDA device: {rt.cuda_unavailable_reason()}")
def test_gpu_cvt_matches_numpy():
    nvrtc = _nvrtc()
    from cuda.bindings import driver as drv
    arch = rt.device_arch(0)
    art = nvrtc.compile_cuda(KERNEL, name="infra", arch=arch)
    mod = rt.CudaModule(art.cubin, device=0)
    x = _special_floats()
    n = x.size
    outs = {"h": np.empty(n, np.uint16), "b": np.empty(n, np.uint16),
            "hb": np.empty(n, np.float32), "bb": np.empty(n, np.float32)}
    with rt._current(rt._primary_context(0)):
        dx = rt._call(drv.cuMemAlloc, x.nbytes)
        dev = {k: rt._call(drv.cuMemAlloc, v.nbytes) for k, v in outs.items()}
        rt._call(drv.cuMemcpyHtoD, dx, x.ctypes.data, x.nbytes)
    args = [("ptr", int(dx))] + [("ptr", int(dev[k])) for k in ("h", "b", "hb", "bb")]
    mod.launch("cvt", (n + 255) // 256, 256, args + [("i64", n)], stream=None)
    rt.synchronize(0)
    with rt._current(rt._primary_context(0)):
        for k, v in outs.items():
            rt._call(drv.cuMemcpyDtoH, v.ctypes.data, dev[k], v.nbytes)
            rt._call(drv.cuMemFree, dev[k])
        rt._call(drv.cuMemFree, dx)
    mod.close()
    with np.errstate(all="ignore"):
        want_h, want_b = x.astype(np.float16), x.astype(ml_dtypes.bfloat16)
    _same_bits_or_both_nan(outs["h"].view(np.float16), want_h)
    _same_bits_or_both_nan(outs["b"].view(ml_dtypes.bfloat16), want_b)
    _same_bits_or_both_nan(outs["hb"], outs["h"].view(np.float16).astype(np.float32))
    _same_bits_or_both_nan(outs["bb"], outs["b"].view(ml_dtypes.bfloat16).astype(np.float32))
