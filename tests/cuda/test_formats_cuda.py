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

TESTS = Path(__file__).resolve().parents[1]


def _load_emu():
    spec = importlib.util.spec_from_file_location("formats_cuda_emu", TESTS / "cuda_emu" / "emu.py")
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


def run_emulated(desc, arrays: list[np.ndarray], scalars: list[int], n: int, tmp_path,
                 built=None):
    """Run ``desc``'s CUDA text in emulation; returns what ``built=`` takes to run the same
    build again (a kernel whose sizes are run-time arguments)."""
    spec = lower(desc, "cuda", "sm_90")
    if built is None:
        decls = [f"{p.c_type}{'' if p.c_type.endswith('*') else ' '}{p.name}" for p in spec.params]
        built = emu.build_emulated(render(spec).text, {spec.entry: decls}, tmp_path / desc.uri)
    block = 64
    grid = max(1, min(4, -(-n // block)))  # fewer threads than elements: grid-stride
    getattr(built, f"emu_{spec.entry}")(grid, block, *[a.ctypes.data for a in arrays], *scalars)
    return built


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


# --- FormatPlan on CUDA: select(device="cuda"), checks on device views, the caller's
# stream; the launch runs the emulated build of the same text (as tests/cuda/test_cuda_plans) --

import re  # noqa: E402
import types  # noqa: E402

from dqgen import verify  # noqa: E402
from dqgen.errors import InvalidProblemError, UnsupportedError  # noqa: E402
from dqgen.formats.plan import FormatPlan  # noqa: E402
from dqgen.ir import DequantizePerGroupDescriptor, QuantizePerGroupDescriptor  # noqa: E402
from dqgen.runtime import cuda as rt  # noqa: E402

PLAN_DESCS = {
    "gptq4-act-f16": GptqDequantizeDescriptor(64, 32, 16, act_order=True),
    "gptq8-v2-bf16": GptqDequantizeDescriptor(64, 32, 16, bits=8, checkpoint_format="gptq_v2",
                                              float_dtype="bf16"),
    "awq-f32-bf16s": AwqDequantizeDescriptor(64, 32, 16, float_dtype="f32", scale_dtype="bf16"),
    "awq-f16": AwqDequantizeDescriptor(64, 32, 16),
    "ggml-q4_1-f16": GgmlDequantizeDescriptor(5, "Q4_1", "f16"),
    "floatzp-u4-bf16": DequantizeFloatZeroDescriptor(4, 64, 32, "bf16", "u4"),
    "packed-dequant-s4-f32": DequantizePerGroupDescriptor(3, 64, 16, "f32", "s4"),
    "packed-quant-u4-f16": QuantizePerGroupDescriptor(3, 64, 16, "f16", "u4"),
}
RESIDENT_BLOCKS = 2  # a tiny GPU: every thread strides several times


class CaiArray:
    """Host memory presented as a CUDA array through ``__cuda_array_interface__``."""

    def __init__(self, arr: np.ndarray, device: int = 0):
        self.arr = arr
        self.device = types.SimpleNamespace(id=device)

    @property
    def __cuda_array_interface__(self):
        a = self.arr
        return {"data": (a.__array_interface__["data"][0], False), "shape": a.shape,
                "typestr": a.dtype.str, "version": 3,
                "strides": None if a.flags.c_contiguous else a.strides}


class TorchLikeCuda:
    """Host memory presented as a torch CUDA tensor (how bfloat16 travels)."""

    __module__ = "torch.fake"
    is_cuda = True

    def __init__(self, arr: np.ndarray):
        self.arr = arr
        self.dtype = "torch." + arr.dtype.name  # str() is what dqgen reads
        self.shape = arr.shape
        self.device = types.SimpleNamespace(index=0, type="cuda")

    def stride(self):
        return tuple(s // self.arr.itemsize for s in self.arr.strides)

    def data_ptr(self):
        return self.arr.__array_interface__["data"][0]


def _device(arr: np.ndarray):
    # CAI cannot name bfloat16; torch's accessors can
    return TorchLikeCuda(arr) if arr.dtype.name == "bfloat16" else CaiArray(arr)


class _Module:
    def __init__(self, fn, launches):
        self.fn, self.launches = fn, launches

    def launch(self, func, grid, block, args, stream=0, shared_mem=0):
        self.launches.append((func, grid, block, rt.stream_handle(stream)))
        self.fn(grid, block, *[value for _, value in args])


@pytest.fixture(scope="module")
def emulated_formats(tmp_path_factory):
    from cuda_emu import kernels as K
    specs = [lower(d, "cuda", "sm_90") for d in PLAN_DESCS.values()]
    # one library a kernel: the layout templates' macros would collide in one unit
    libs = K.build_emulation(specs, tmp_path_factory.mktemp("fplans"), parts=len(specs))
    return K.load_emulation(libs, specs)


@pytest.fixture
def launches(emulated_formats, monkeypatch):
    """cuda:0 is an sm_90 whose launches run the emulated kernels and are recorded; its
    memory is this process's (so a host copy reads it directly)."""
    import ctypes
    import dqgen.plans
    record: list = []
    monkeypatch.setattr(rt, "device_arch", lambda ordinal=0: "sm_90")
    monkeypatch.setattr(dqgen.plans, "_plan_memo", {})

    def loaded(self, device):
        return _Module(emulated_formats[self.spec.entry], record), self.spec.entry, RESIDENT_BLOCKS

    def copy_to_host(view):
        raw = (ctypes.c_uint8 * view.nbytes).from_address(view.ptr)
        return np.frombuffer(raw, np.uint8).view(view.dtype).reshape(view.shape).copy()
    monkeypatch.setattr(rt.CudaKernel, "_loaded", loaded)
    monkeypatch.setattr(rt, "copy_to_host", copy_to_host)
    return record


class Stream:
    cuda_stream = 0x5EED


@needs_gxx
@pytest.mark.parametrize("name", list(PLAN_DESCS))
def test_format_plan_runs_on_cuda_on_the_callers_stream(launches, name):
    pytest.importorskip("dqgen.build.nvrtc").nvrtc_available() or pytest.skip("no NVRTC")
    desc = PLAN_DESCS[name]
    plan = FormatPlan.select(desc, device="cuda")
    assert plan.device == "cuda:0" and FormatPlan.select(desc, device="cuda") is plan
    sku = plan.sku()
    assert (sku.target, sku.arch) == ("cuda", "sm_90") and "__global__" in plan.source()
    arrays = verify.random_inputs(desc, plan.arguments, np.random.default_rng(11))
    want = verify.expected(desc, arrays)
    args = {k: _device(v) for k, v in arrays.items()}
    plan.can_implement(args)
    plan.run(args, stream=Stream())
    spec, n = plan._kernel.spec, plan._elements
    assert launches == [(spec.entry, rt.launch_grid(spec, n, RESIDENT_BLOCKS),
                         spec.threads_per_block, 0x5EED)]
    # the grid fills the device (grid_waves), not one block striding over everything
    assert spec.grid_waves > 0 and n == arrays[next(a.name for a in plan.arguments
                                                    if a.is_out)].size * (
        2 if isinstance(desc, QuantizePerGroupDescriptor) else 1)
    out = next(a.name for a in plan.arguments if a.is_out)
    assert verify.first_difference(arrays[out], want) == ""
    plan.run(args)  # stream=None: the legacy default stream
    assert launches[-1][3] == 0


@needs_gxx
def test_format_plan_on_cuda_names_each_bad_argument(launches):
    desc = PLAN_DESCS["gptq4-act-f16"]
    plan = FormatPlan.select(desc, device="cuda")
    arrays = verify.random_inputs(desc, plan.arguments, np.random.default_rng(2))
    good = {k: _device(v) for k, v in arrays.items()}
    bad_g = arrays["g_idx"].copy()
    bad_g[5] = desc.num_groups  # the kernel would read past the scales
    cases = [
        ({"qzeros": CaiArray(arrays["qzeros"][:, :2].copy())}, InvalidProblemError,
         "qzeros has shape (4, 2)"),
        ({"y": CaiArray(np.zeros((64, 32), np.float32))}, InvalidProblemError,
         "y has dtype float32"),
        ({"g_idx": CaiArray(bad_g)}, InvalidProblemError, "g_idx[5]=4 is out of range [0, 4)"),
        ({"scales": arrays["scales"]}, UnsupportedError, "scales is a numpy.ndarray in host memory"),
        ({"y": CaiArray(arrays["y"], device=1)}, InvalidProblemError, "y lives on cuda:1"),
    ]
    for override, error, message in cases:
        with pytest.raises(error, match=re.escape(message)):
            plan.run({**good, **override})
        with pytest.raises(error, match=re.escape(message)):
            plan.can_implement({**good, **override})
    with pytest.raises(InvalidProblemError, match="missing arguments: g_idx"):
        plan.run({k: v for k, v in good.items() if k != "g_idx"})
    with pytest.raises(UnsupportedError, match="stream="):
        plan.run(good, stream="default")
    shared = np.zeros(64 * 32, np.float16)
    with pytest.raises(InvalidProblemError, match="y overlaps qweight"):
        plan.run({**good, "qweight": CaiArray(shared.view(np.int32)[:256].reshape(8, 32)),
                  "y": CaiArray(shared.reshape(64, 32))})
    assert launches == []


@needs_gxx
def test_format_functions_keep_cuda_arrays_on_their_device(launches):
    """gptq/awq/ggml.dequantize on CUDA arrays: the plan follows the data to cuda:0 (no
    device= needed), g_idx is checked and its row order tested on a host copy, the result
    is written into out= on the device; bit-exact against the oracles."""
    from dqgen.formats import awq, ggml, gptq
    from formats_util import random_f16, random_words
    rng = np.random.default_rng(21)
    qweight, scales = random_words(rng, (8, 32)), random_f16(rng, (4, 32))
    fields = rng.integers(0, 15, (4, 4, 8)).astype(np.uint64)  # no field at 15: v1 rules agree
    qzeros = sum(fields[..., j] << (4 * j) for j in range(8)).astype(np.uint32).view(np.int32)
    g_idx = (rng.permutation(64) // 16).astype(np.int32)
    y = np.zeros((64, 32), np.float16)
    got = gptq.dequantize(CaiArray(qweight), CaiArray(qzeros), CaiArray(scales),
                          g_idx=CaiArray(g_idx), out=CaiArray(y))
    assert isinstance(got, CaiArray) and got.arr is y
    assert_bits_equal(y, oracle.gptq_dequantize(qweight, qzeros, scales, g_idx, 4, "gptq",
                                                np.float16))
    assert launches[-1][0] == "dqgen_dequant_gptq4_v1_f16_f16_gidx"
    bad = g_idx.copy()
    bad[3] = 9
    with pytest.raises(InvalidProblemError, match=re.escape("g_idx[3]=9 is out of range")):
        gptq.dequantize(CaiArray(qweight), CaiArray(qzeros), CaiArray(scales),
                        g_idx=CaiArray(bad), out=CaiArray(y))
    aw, az = random_words(rng, (64, 4)), random_words(rng, (4, 4))
    y = np.zeros((64, 32), np.float16)
    awq.dequantize(CaiArray(aw), CaiArray(az), CaiArray(scales), out=CaiArray(y))
    assert_bits_equal(y, oracle.awq_dequantize(aw, az, scales, 16, np.float16))
    gguf = pytest.importorskip("gguf")
    from test_formats_ggml import random_blocks
    data = random_blocks(rng, "Q4_1", (1, 5))
    y = np.zeros((1, 160), np.float16)
    ggml.dequantize(CaiArray(data), "Q4_1", dtype="f16", out=CaiArray(y))
    with np.errstate(all="ignore"):
        want = gguf.quants.dequantize(data, gguf.GGMLQuantizationType.Q4_1).astype(np.float16)
    assert_bits_equal(y, want)
    assert [entry for entry, *_ in launches][-2:] == ["dqgen_dequant_awq4_f16_f16_g16",
                                                      "dqgen_dequant_ggml_q4_1_f16"]
    with pytest.raises(UnsupportedError, match="pass out="):  # no allocator for raw CAI
        awq.dequantize(CaiArray(aw), CaiArray(az), CaiArray(scales))
    with pytest.raises(UnsupportedError, match="host memory"):  # one array left on the host
        awq.dequantize(CaiArray(aw), az, CaiArray(scales),
                       out=CaiArray(np.zeros((64, 32), np.float16)))


def test_cpu_format_plan_refuses_a_stream():
    plan = FormatPlan.select(GgmlDequantizeDescriptor(1, "Q8_0"))
    with pytest.raises(UnsupportedError, match="stream= applies to CUDA plans"):
        plan.run({}, stream=0)


@pytest.mark.skipif(rt.cuda_available(), reason="a CUDA device is present")
def test_cuda_format_plan_without_a_device_says_why():
    with pytest.raises(UnsupportedError, match="cuda:0.*unavailable") as info:
        FormatPlan.select(GptqDequantizeDescriptor(64, 32, 16), device="cuda")
    assert rt.cuda_unavailable_reason() in str(info.value)


@pytest.mark.skipif(not rt.cuda_available(),
                    reason=f"no CUDA device: {rt.cuda_unavailable_reason() or 'none'}")
@pytest.mark.parametrize("name", list(PLAN_DESCS))
def test_format_plan_on_the_gpu_with_torch_tensors(name):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    desc = PLAN_DESCS[name]
    plan = FormatPlan.select(desc, device="cuda")
    arrays = verify.random_inputs(desc, plan.arguments, np.random.default_rng(3))
    want = verify.expected(desc, arrays)

    def to_gpu(a):
        t = torch.from_numpy(a.view(np.int16) if a.dtype.name == "bfloat16" else a).cuda()
        return t.view(torch.bfloat16) if a.dtype.name == "bfloat16" else t
    args = {k: to_gpu(v) for k, v in arrays.items()}
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        plan.run(args, stream=stream)
    stream.synchronize()
    out = next(a for a in plan.arguments if a.is_out)
    got = args[out.name].cpu()
    got = got.view(torch.int16).numpy().view(out.dtype) if out.dtype.name == "bfloat16" \
        else got.numpy()
    assert verify.first_difference(got, want) == ""


def host_copy(tensor, dtype) -> np.ndarray:
    """A torch (CUDA) tensor's bytes on the host as a numpy array of ``dtype`` (bf16 too)."""
    raw = tensor.detach().cpu().contiguous().view(-1).view(__import__("torch").uint8).numpy()
    return raw.view(dtype).reshape(tuple(tensor.shape))


@pytest.mark.skipif(not rt.cuda_available(),
                    reason=f"no CUDA device: {rt.cuda_unavailable_reason() or 'none'}")
def test_format_functions_on_the_gpu_match_the_cpu():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    from dqgen.formats import awq, ggml, gptq
    from formats_util import random_f16, random_words
    from test_formats_ggml import random_blocks
    rng = np.random.default_rng(8)
    qweight, qzeros = random_words(rng, (64, 512)), random_words(rng, (4, 64))
    scales = random_f16(rng, (4, 512))
    g_idx = torch.from_numpy((rng.permutation(512) // 128).astype(np.int64))
    cpu = gptq.dequantize(qweight, qzeros, scales, g_idx=g_idx, dtype="bf16")
    gpu = gptq.dequantize(*(torch.from_numpy(a).cuda() for a in (qweight, qzeros, scales)),
                          g_idx=g_idx.cuda(), dtype="bf16")
    assert gpu.is_cuda
    assert_bits_equal(host_copy(gpu, cpu.dtype), cpu)  # any NaN equals any NaN (SPEC.md)
    aw, az = random_words(rng, (512, 64)), random_words(rng, (4, 64))
    cpu = awq.dequantize(aw, az, scales)
    gpu = awq.dequantize(*(torch.from_numpy(a).cuda() for a in (aw, az, scales)))
    assert_bits_equal(host_copy(gpu, cpu.dtype), cpu)
    data = random_blocks(rng, "Q4_K", (3, 2)) if "Q4_K" in ggml.TYPES else \
        random_blocks(rng, "Q4_0", (3, 8))
    qtype = "Q4_K" if "Q4_K" in ggml.TYPES else "Q4_0"
    cpu = ggml.dequantize(data, qtype, dtype="f32")
    gpu = ggml.dequantize(torch.from_numpy(data).cuda(), qtype, dtype="f32")
    assert gpu.shape == cpu.shape
    assert_bits_equal(host_copy(gpu, cpu.dtype), cpu)
