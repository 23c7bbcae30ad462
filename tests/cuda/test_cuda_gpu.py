"""Generated CUDA kernels on a real device: bit-exact against dqgen.reference.

Skipped, with the reason, on machines without a CUDA device (or without NVRTC); the
torch tests also need a CUDA build of torch. Covers every op and dtype at group 128 plus
narrow-vector group sizes, misaligned views (the element-by-element path), the packed
4-bit layouts and the checkpoint formats (the emulation tests' own problems, run on the
device), a problem large enough for the grid-stride loop and one of more than 2^31
elements, torch CUDA tensors in and out (bfloat16 included) at odd offsets and
non-contiguous, and launches on non-default streams. ``tools/device_check.sh`` runs
this file on a GPU machine.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import dqgen
from dqgen import reference
from dqgen.build import nvrtc
from dqgen.runtime import cuda as rt
from tests import strategies as S
from tests.cuda_emu import kernels as K

pytestmark = [
    pytest.mark.skipif(not rt.cuda_available(),
                       reason=f"no CUDA device: {rt.cuda_unavailable_reason()}"),
    pytest.mark.skipif(not nvrtc.nvrtc_available(),
                       reason="NVRTC is not installed (pip install 'dqgen[cuda]')"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
]

GPU_SET = ([d for d in K.DEFAULT_SET if d.group_size == 128]
           + [d for d in K.DEFAULT_SET if d.group_size == 32][::3] + K.EXTRA_SET[::3])
PLANS = {
    "DequantizePerGroupDescriptor": (dqgen.DequantizePerGroupPlan, dqgen.DequantizePerGroupArgs),
    "QuantizePerGroupDescriptor": (dqgen.QuantizePerGroupPlan, dqgen.QuantizePerGroupArgs),
    "DequantizePerGroupBackwardDescriptor": (dqgen.DequantizePerGroupBackwardPlan,
                                             dqgen.DequantizePerGroupBackwardArgs),
    "QuantizePerGroupBackwardDescriptor": (dqgen.QuantizePerGroupBackwardPlan,
                                           dqgen.QuantizePerGroupBackwardArgs),
}


def _torch_cuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip(f"torch {torch.__version__} has no CUDA device")
    return torch


class DeviceBuffer:
    """Device memory from the driver holding a copy of a host array, ``shift`` elements
    into its allocation (shift 1 starts it off any 16-byte boundary)."""

    def __init__(self, host: np.ndarray, shift: int = 0) -> None:
        from cuda.bindings import driver as drv
        self.drv, self.host = drv, np.ascontiguousarray(host)
        item = self.host.itemsize
        with rt._current(rt._primary_context(0)):
            self.base = rt._call(drv.cuMemAlloc, max(self.host.nbytes + shift * item, 1))
            self.ptr = int(self.base) + shift * item
            if self.host.nbytes:
                rt._call(drv.cuMemcpyHtoD, drv.CUdeviceptr(self.ptr), self.host.ctypes.data,
                         self.host.nbytes)
        shape = self.host.shape
        self.array = rt.DeviceArray(rt.DevicePointer(
            self.ptr, 0, self.host.nbytes, self.host.dtype, shape,
            rt._c_strides(shape, item)), self)

    def get(self) -> np.ndarray:
        out = np.empty_like(self.host)
        rt.synchronize(0)
        if out.nbytes:
            with rt._current(rt._primary_context(0)):
                rt._call(self.drv.cuMemcpyDtoH, out.ctypes.data, self.drv.CUdeviceptr(self.ptr),
                         out.nbytes)
        return out

    def __del__(self):
        try:
            with rt._current(rt._primary_context(0)):
                rt._call(self.drv.cuMemFree, self.base)
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def _problem(desc, outer, axis, rng):
    """Host arrays by Args field (output last) and the reference result."""
    gs = desc.group_size
    f = desc.float_dtype.np_dtype
    gshape = (outer, axis // gs)
    scale = (rng.uniform(0.01, 4, gshape) * rng.choice([-1, 1], gshape)).astype(f)
    pool = np.array(S.scale_pool(desc.float_dtype.value))
    scale.flat[: min(scale.size, pool.size)] = pool[: scale.size].astype(f)
    zp = rng.integers(-5, 260, gshape).astype(np.int32)
    zp.flat[:3] = [-2**31, 2**31 - 1, 7][: zp.size]
    x = (rng.standard_normal((outer, axis)) * 150).astype(f)
    specials = np.array(S.float_specials(desc.float_dtype.value)).astype(f)
    x.flat[::101] = np.resize(specials, x.flat[::101].size)
    dy = rng.standard_normal((outer, axis)).astype(f)
    name = type(desc).__name__
    with np.errstate(all="ignore"):
        if name == "DequantizePerGroupDescriptor":
            i = desc.int_dtype
            q = rng.integers(*i.int_range, (outer, axis), endpoint=True).astype(i.np_dtype)
            want = reference.dequantize_per_group(q, scale, zp, gs)
            return {"input": q, "scale": scale, "zero_point": zp, "output": want}, want
        if name == "QuantizePerGroupDescriptor":
            want = reference.quantize_per_group(x, scale, zp, gs, desc.int_dtype.np_dtype,
                                                desc.q_min, desc.q_max)
            return {"input": x, "scale": scale, "zero_point": zp, "output": want}, want
        if name == "DequantizePerGroupBackwardDescriptor":
            want = reference.dequantize_per_group_backward(dy, scale, gs)
            return {"d_output": dy, "scale": scale, "d_input": want}, want
        want = reference.quantize_per_group_backward(dy, x, scale, zp, gs, desc.q_min, desc.q_max)
        return {"d_output": dy, "input": x, "scale": scale, "zero_point": zp, "d_input": want}, want


def _sized(desc, outer, axis):
    """``desc`` with the runtime sizes of one problem."""
    kw = {k: v for k, v in desc.__dict__.items() if k not in ("outer", "axis")}
    return type(desc)(outer=outer, axis=axis, **kw)


@pytest.mark.parametrize("desc", GPU_SET, ids=lambda d: d.uri)
@pytest.mark.parametrize("shift", [0, 1], ids=["aligned", "misaligned"])
def test_gpu_kernel_matches_reference(desc, shift):
    rng = np.random.default_rng(11)
    for outer, groups in ((37, 3), (1, 1), (0, 2), (613, 7)):
        d = _sized(desc, outer, groups * desc.group_size)
        host, want = _problem(d, d.outer, d.axis, rng)
        plan_type, args_type = PLANS[type(d).__name__]
        bufs = {k: DeviceBuffer(np.zeros_like(v) if k in ("output", "d_input") else v, shift)
                for k, v in host.items()}
        plan = plan_type.select(d, device="cuda:0")
        plan.run(args_type(**{k: b.array for k, b in bufs.items()}))
        out = bufs["output" if "output" in bufs else "d_input"].get()
        S.assert_same_bits(out, want, f"{d.uri} {outer}x{d.axis} shift={shift}")


def test_gpu_large_problem_strides_over_the_grid():
    """More vectors than the grid has threads: every thread loops."""
    desc = dqgen.DequantizePerGroupDescriptor(8192, 4096, 128, "bf16", "s8")
    rng = np.random.default_rng(2)
    q = rng.integers(-128, 128, (8192, 4096), dtype=np.int8)
    scale = rng.uniform(-1, 1, (8192, 32)).astype(ml_dtypes.bfloat16)
    zp = rng.integers(-200, 200, (8192, 32)).astype(np.int32)
    want = reference.dequantize_per_group(q, scale, zp, 128)
    host = {"input": q, "scale": scale, "zero_point": zp, "output": np.zeros_like(want)}
    plan = dqgen.DequantizePerGroupPlan.select(desc, device="cuda")
    kernel = plan._kernel
    assert kernel.runner.grid(desc.outer * desc.axis, 0) * 256 * 16 < desc.outer * desc.axis
    bufs = {k: DeviceBuffer(v) for k, v in host.items()}
    plan.run(dqgen.DequantizePerGroupArgs(**{k: b.array for k, b in bufs.items()}))
    S.assert_same_bits(bufs["output"].get(), want)


def _to_torch(torch, arr: np.ndarray):
    if arr.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16).cuda()
    return torch.from_numpy(arr).cuda()


def _from_torch(torch, t) -> np.ndarray:
    t = t.cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


@pytest.mark.parametrize("float_name", ["f32", "f16", "bf16", "f64"])
def test_torch_cuda_tensors_in_and_out_on_a_side_stream(float_name):
    torch = _torch_cuda()
    rng = np.random.default_rng(4)
    f = S.np_dtype(float_name)
    w = (rng.standard_normal((3, 64, 256)) * 3).astype(f)
    scale = rng.uniform(0.01, 0.1, (3, 64, 2)).astype(f)
    zp = rng.integers(-3, 4, (3, 64, 2)).astype(np.int32)
    tw, ts, tz = _to_torch(torch, w), _to_torch(torch, scale), _to_torch(torch, zp)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # the plain functions launch on the current stream
        q = dqgen.quantize_per_group(tw, ts, tz, 128, dtype="s8")
        y = dqgen.dequantize_per_group(q, ts, tz, 128)
    side.synchronize()
    assert q.is_cuda and q.dtype == torch.int8 and tuple(q.shape) == (3, 64, 256)
    assert y.is_cuda and y.dtype == tw.dtype and y.device == tw.device
    w2, s2, z2 = w.reshape(-1, 256), scale.reshape(-1, 2), zp.reshape(-1, 2)
    want_q = reference.quantize_per_group(w2, s2, z2, 128, np.int8, -128, 127)
    S.assert_same_bits(_from_torch(torch, q).reshape(-1, 256), want_q)
    S.assert_same_bits(_from_torch(torch, y).reshape(-1, 256),
                       reference.dequantize_per_group(want_q, s2, z2, 128))


def test_plan_runs_on_an_explicit_stream_with_torch_tensors():
    torch = _torch_cuda()
    rng = np.random.default_rng(6)
    desc = dqgen.DequantizePerGroupBackwardDescriptor(512, 1024, 64, "f16")
    dy = rng.standard_normal((512, 1024)).astype(np.float16)
    scale = rng.uniform(0.5, 2, (512, 16)).astype(np.float16)
    tdy, ts = _to_torch(torch, dy), _to_torch(torch, scale)
    out = torch.empty_like(tdy)
    plan = dqgen.DequantizePerGroupBackwardPlan.select(desc, device=tdy.device)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    plan.run(dqgen.DequantizePerGroupBackwardArgs(tdy, ts, out), stream=stream)
    stream.synchronize()
    S.assert_same_bits(_from_torch(torch, out), reference.dequantize_per_group_backward(
        dy, scale, 64))
    with pytest.raises(dqgen.InvalidProblemError, match="not C-contiguous"):
        plan.run(dqgen.DequantizePerGroupBackwardArgs(tdy.t().contiguous().t(), ts, out))
    with pytest.raises(dqgen.UnsupportedError, match="host memory"):
        plan.run(dqgen.DequantizePerGroupBackwardArgs(tdy.cpu(), ts, out))


def test_cupy_arrays_work_too():
    cupy = pytest.importorskip("cupy")
    rng = np.random.default_rng(8)
    q = rng.integers(-128, 128, (16, 256)).astype(np.int8)
    scale = rng.uniform(0.1, 1, (16, 2)).astype(np.float32)
    zp = rng.integers(-2, 3, (16, 2)).astype(np.int32)
    y = dqgen.dequantize_per_group(cupy.asarray(q), cupy.asarray(scale), cupy.asarray(zp), 128)
    assert isinstance(y, cupy.ndarray)
    S.assert_same_bits(cupy.asnumpy(y), reference.dequantize_per_group(q, scale, zp, 128))


# --- layouts beyond the plain one, launched as the emulation tests launch them -----------

def _launch_on_device(desc, arrays: list, scalars: list, n: int, shift: int = 0) -> None:
    """Run ``desc``'s CUDA kernel on the device over host ``arrays`` (the pointer
    parameters in order) and the scalar parameters; write the outputs back in place."""
    from dqgen.jit import get_kernel
    kernel = get_kernel(desc, "cuda", rt.device_arch(0))
    pointers = [p for p in kernel.spec.params if p.role != "scalar"]
    assert len(pointers) == len(arrays), kernel.spec.uri
    bufs = [DeviceBuffer(a, shift) for a in arrays]
    kernel.runner.launch([b.ptr for b in bufs] + list(scalars), n)
    rt.synchronize(0)
    for p, a, b in zip(pointers, arrays, bufs):
        if p.role == "out":
            a[...] = b.get()


def _packed_cases():
    from tests.cuda import test_packed_cuda as P
    return P, list(P.SPEC_BY_URI)


@pytest.mark.parametrize("shift", [0, 1], ids=["aligned", "misaligned"])
def test_gpu_packed_4bit_kernels_match_reference(shift):
    """Every packed s4/u4 kernel of the emulation set, on the emulation's edge values."""
    from tests.oracles import checkpoints as oracle
    P, uris = _packed_cases()
    for uri in uris:
        spec = P.SPEC_BY_URI[uri]
        gs = spec.group_size
        outer, axis = 9, 2 * gs * max(1, 40 // gs)
        inputs, values, q_range = P._fixed_problem(spec, outer, axis, np.random.default_rng(gs))
        desc = _packed_descriptor(P, uri)
        lo, hi = q_range or P.RANGES[spec.int_dtype.value]
        with np.errstate(all="ignore"):
            if values is None:  # quantize
                want = oracle.pack_int4(reference.quantize_per_group(
                    inputs["x"], inputs["scale"], inputs["zero_point"], gs, np.int8, lo, hi))
                out = np.zeros_like(want)
                arrays = [inputs["x"], inputs["scale"], inputs["zero_point"], out]
                scalars = [outer, axis, lo, hi]
            else:
                q = values.astype(np.int8)
                if spec.zero_kind == "float":
                    want = oracle.float_zero_dequantize(values, inputs["scale"], inputs["zero_point"],
                                                        gs, *P.RANGES[spec.int_dtype.value],
                                                        spec.float_dtype.np_dtype)
                else:
                    want = reference.dequantize_per_group(q, inputs["scale"], inputs["zero_point"], gs)
                out = np.zeros((outer, axis), spec.float_dtype.np_dtype)
                arrays = [inputs["q"], inputs["scale"], inputs["zero_point"], out]
                scalars = [outer, axis]
        _launch_on_device(desc, arrays, scalars, outer * axis, shift)
        S.assert_same_bits(out, want, f"{uri} shift={shift}")


def _packed_descriptor(P, uri):
    return next(d for d in P._descs() if K.spec_of(d).uri == uri)


def test_gpu_checkpoint_formats_match_their_oracles(monkeypatch, tmp_path):
    """GPTQ, AWQ, float zero points, HQQ, FP8 and every GGML type: each emulation test of
    tests/cuda/test_formats_cuda.py, formats/test_hqq.py, formats/test_fp8.py and
    formats/ggml/test_formats_gguf_types.py, with its kernel launched on the device instead."""
    import importlib
    on_device = lambda desc, arrays, scalars, n, _tmp: _launch_on_device(desc, arrays, scalars, n)  # noqa: E731
    # the emulation tests import run_emulated by either name of its module
    for name in ("tests.cuda.test_formats_cuda", "test_formats_cuda"):
        monkeypatch.setattr(importlib.import_module(name), "run_emulated", on_device)
    from tests.cuda import test_formats_cuda as F
    for kw in F.GPTQ:
        F.test_emulated_gptq(kw, tmp_path)
    for kw in F.AWQ:
        F.test_emulated_awq(kw, tmp_path)
    for storage, out in F.FLOAT_ZERO:
        F.test_emulated_float_zero_point(storage, out, tmp_path)
    from tests.formats import test_hqq as H
    for bits, dtype in ((4, "bf16"), (3, "f16"), (1, "f32"), (8, "bf16")):
        H.test_cuda_emulated(bits, dtype, tmp_path)  # its g++ check: the emulation's, moot here
    from tests.formats import test_fp8 as P  # FP8 blocks and rows; torch's float8 is the oracle
    P.test_cuda_text_in_emulation(tmp_path)
    try:
        import gguf  # noqa: F401
    except ImportError:
        return
    from tests.formats.ggml import test_formats_gguf_types as G
    for qtype, out in G._cuda_cases():
        G.test_emulated_cuda(qtype, out, tmp_path)


def test_gpu_more_than_2_31_elements():
    """A problem past int32 indexing: 2^31 + 2^15 elements of s8 -> f16, every element
    compared on the device with torch's formula (the reference's on these inputs), and the
    rows around element 2^31 on the host with dqgen.reference."""
    torch = _torch_cuda()
    rows, cols, gs = 65537, 32768, 128
    n = rows * cols
    free, _ = torch.cuda.mem_get_info()
    if free < n * 3 + (2 << 30):
        pytest.skip(f"needs about {(n * 3 + (2 << 30)) / 2**30:.0f} GiB free on the device, "
                    f"{free / 2**30:.1f} GiB are")
    gen = torch.Generator(device="cuda").manual_seed(3)
    q = torch.randint(-128, 128, (rows, cols), dtype=torch.int8, device="cuda", generator=gen)
    scale = (torch.rand((rows, cols // gs), device="cuda", generator=gen) * 0.02 + 1e-3).half()
    zp = torch.randint(-16, 16, (rows, cols // gs), dtype=torch.int32, device="cuda", generator=gen)
    y = dqgen.dequantize_per_group(q, scale, zp, gs)
    torch.cuda.synchronize()
    for r0 in range(0, rows, 4096):
        sl = slice(r0, min(rows, r0 + 4096))
        want = ((q[sl].view(-1, cols // gs, gs).to(torch.int32) - zp[sl].unsqueeze(-1)).to(torch.float32)
                * scale[sl].float().unsqueeze(-1)).view(-1, cols).half()
        assert torch.equal(y[sl].view(torch.int16), want.view(torch.int16)), f"rows {sl}"
        del want
    edge = slice(rows - 3, rows)  # element 2^31 starts row 65536
    host = [t[edge].cpu().numpy() for t in (q, scale, zp)]
    S.assert_same_bits(y[edge].cpu().numpy(), reference.dequantize_per_group(*host, gs))


@pytest.mark.parametrize("float_name", ["f32", "f16", "bf16"])
def test_torch_views_at_odd_offsets_and_non_contiguous(float_name):
    """Tensors one element into their storage (off every vector boundary: the element
    path) give exact results; a non-contiguous one is refused by name."""
    torch = _torch_cuda()
    rng = np.random.default_rng(12)
    f = S.np_dtype(float_name)
    q = rng.integers(-128, 128, (33, 256)).astype(np.int8)
    scale = rng.uniform(-2, 2, (33, 2)).astype(f)
    zp = rng.integers(-9, 9, (33, 2)).astype(np.int32)
    want = reference.dequantize_per_group(q, scale, zp, 128)

    def shifted(arr):
        t = _to_torch(torch, arr).reshape(-1)
        base = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
        base[1:] = t
        return base[1:].view(arr.shape)
    tq, ts, tz = shifted(q), shifted(scale), shifted(zp)
    out = shifted(np.zeros_like(want))
    plan = dqgen.DequantizePerGroupPlan.select(
        dqgen.DequantizePerGroupDescriptor(33, 256, 128, float_name, "s8"), device="cuda")
    plan.run(dqgen.DequantizePerGroupArgs(tq, ts, tz, out))
    torch.cuda.synchronize()
    S.assert_same_bits(_from_torch(torch, out), want)
    wide = _to_torch(torch, np.zeros((33, 512), np.int8))
    with pytest.raises(dqgen.InvalidProblemError, match="not C-contiguous"):
        plan.run(dqgen.DequantizePerGroupArgs(wide[:, ::2], ts, tz, out))
