"""CUDA plans and plain functions, end to end without a GPU.

The runtime is replaced only at its lowest edge: the device reports ``sm_90``, and
``CudaKernel`` launches the host-emulated build of the very same kernel text instead of
calling the driver. Everything above it is real: descriptor, NVRTC build and cache,
``select(device="cuda")``, argument checks on device views (``__cuda_array_interface__``
and torch-style tensors, here host memory presented as device memory), pointer and scalar
order, launch shape, stream handling, and the plain functions' dispatch.
"""

from __future__ import annotations

import re
import shutil
import types

import ml_dtypes
import numpy as np
import pytest

import dqgen
from dqgen import reference
torch = pytest.importorskip("torch")  # CPU torch: its dtype objects and Size
from dqgen.build import nvrtc
from dqgen.runtime import cuda as rt
from tests import strategies as S
from tests.cuda_emu import kernels as K

pytestmark = [
    pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is needed for the emulation"),
    pytest.mark.skipif(not nvrtc.nvrtc_available(), reason="NVRTC is not installed"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
]

F32_S8 = dqgen.DequantizePerGroupDescriptor(6, 256, 64, "f32", "s8")
DESCS = {
    "dequant": F32_S8,
    "dequant_bf16": dqgen.DequantizePerGroupDescriptor(5, 384, 128, "bf16", "u8"),
    "quant": dqgen.QuantizePerGroupDescriptor(4, 128, 32, "f16", "s8", -8, 7),
    "dequant_bwd": dqgen.DequantizePerGroupBackwardDescriptor(3, 256, 128, "f64"),
    "quant_bwd": dqgen.QuantizePerGroupBackwardDescriptor(7, 96, 32, "bf16", 0, 15),
}
PLAN_TYPES = {
    dqgen.DequantizePerGroupDescriptor: (dqgen.DequantizePerGroupPlan, dqgen.DequantizePerGroupArgs),
    dqgen.QuantizePerGroupDescriptor: (dqgen.QuantizePerGroupPlan, dqgen.QuantizePerGroupArgs),
    dqgen.DequantizePerGroupBackwardDescriptor: (dqgen.DequantizePerGroupBackwardPlan,
                                                 dqgen.DequantizePerGroupBackwardArgs),
    dqgen.QuantizePerGroupBackwardDescriptor: (dqgen.QuantizePerGroupBackwardPlan,
                                               dqgen.QuantizePerGroupBackwardArgs),
}


class CaiArray:
    """Host memory presented as a CUDA array through ``__cuda_array_interface__``."""

    def __init__(self, arr: np.ndarray, device: int = 0, readonly: bool = False):
        self.arr, self.readonly = arr, readonly
        self.device = types.SimpleNamespace(id=device)
        self.shape, self.dtype, self.ndim = arr.shape, arr.dtype, arr.ndim

    @property
    def __cuda_array_interface__(self):
        a = self.arr
        return {"data": (a.__array_interface__["data"][0], self.readonly), "shape": a.shape,
                "typestr": a.dtype.str, "version": 3,
                "strides": None if a.flags.c_contiguous else a.strides}


class TorchLikeCuda:
    """Host memory presented as a torch CUDA tensor (the accessors dqgen reads), which is
    how bfloat16 travels (torch's own CAI refuses it)."""

    __module__ = "torch.fake"
    is_cuda = True

    def __init__(self, arr: np.ndarray, device: int = 0):
        self.arr = arr
        self.dtype = getattr(torch, arr.dtype.name)  # bfloat16 too: ml_dtypes' name
        self.shape = torch.Size(arr.shape)
        self.device = types.SimpleNamespace(index=device, type="cuda")

    def stride(self):
        return tuple(s // self.arr.itemsize for s in self.arr.strides)

    def data_ptr(self):
        return self.arr.__array_interface__["data"][0]

    def is_contiguous(self):
        return self.arr.flags.c_contiguous

    def get_device(self):
        return self.device.index

    def numel(self):
        return self.arr.size


def device_array(arr: np.ndarray, kind: str = "cai", **kw):
    """torch-like for bfloat16 (CAI cannot name it) or when asked, else CAI."""
    if kind == "torch" or arr.dtype == ml_dtypes.bfloat16:
        return TorchLikeCuda(arr, **kw)
    return CaiArray(arr, **kw)


class EmulatedModule:
    """Stands in for a loaded ``CudaModule``: launches run the emulated kernel."""

    def __init__(self, fn, launches: list):
        self.fn, self.launches = fn, launches

    def launch(self, func, grid, block, args, stream=0, shared_mem=0):
        self.launches.append((func, grid, block, rt.stream_handle(stream)))
        self.fn(grid, block, *[value for _, value in args])


RESIDENT_BLOCKS = 2  # a tiny GPU: every thread strides several times


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    specs = [K.spec_of(d) for d in DESCS.values()] + [K.spec_of(K.descriptor("dequant", "s8", "f32", 128))]
    return K.load_emulation(K.build_emulation(specs, tmp_path_factory.mktemp("plans")), specs)


@pytest.fixture
def launches(emulated, monkeypatch):
    """Pretend cuda:0 is an sm_90; launches go to the emulator and are recorded."""
    record: list = []
    monkeypatch.setattr(rt, "device_arch", lambda ordinal=0: "sm_90")
    monkeypatch.setattr(dqgen.plans, "_plan_memo", {})  # no pretend plan outlives the test

    def loaded(self, device):
        assert device == 0
        return EmulatedModule(emulated[self.spec.entry], record), self.spec.entry, RESIDENT_BLOCKS

    monkeypatch.setattr(rt.CudaKernel, "_loaded", loaded)
    return record


def _problem(desc, rng):
    """Host inputs (by args field) and the expected output of ``desc``."""
    f = desc.float_dtype.np_dtype
    outer, axis, gs = desc.outer, desc.axis, desc.group_size
    gshape = (outer, axis // gs)
    scale = rng.uniform(0.05, 3, gshape).astype(f)
    zp = rng.integers(-4, 9, gshape).astype(np.int32)
    x = (rng.standard_normal((outer, axis)) * 4).astype(f)
    dy = rng.standard_normal((outer, axis)).astype(f)
    if isinstance(desc, dqgen.DequantizePerGroupDescriptor):
        q = rng.integers(*desc.int_dtype.int_range, (outer, axis), endpoint=True).astype(
            desc.int_dtype.np_dtype)
        return ({"input": q, "scale": scale, "zero_point": zp}, "output",
                reference.dequantize_per_group(q, scale, zp, gs))
    if isinstance(desc, dqgen.QuantizePerGroupDescriptor):
        return ({"input": x, "scale": scale, "zero_point": zp}, "output",
                reference.quantize_per_group(x, scale, zp, gs, desc.int_dtype.np_dtype,
                                             desc.q_min, desc.q_max))
    if isinstance(desc, dqgen.DequantizePerGroupBackwardDescriptor):
        return ({"d_output": dy, "scale": scale}, "d_input",
                reference.dequantize_per_group_backward(dy, scale, gs))
    return ({"d_output": dy, "input": x, "scale": scale, "zero_point": zp}, "d_input",
            reference.quantize_per_group_backward(dy, x, scale, zp, gs, desc.q_min, desc.q_max))


def _args(desc, host: dict, out_name: str, expected, kind: str = "cai", **overrides):
    plan_type, args_type = PLAN_TYPES[type(desc)]
    # Filled with a byte pattern, so an element the kernel skips cannot pass.
    out = np.full(expected.nbytes, 0x5A, np.uint8).view(expected.dtype).reshape(expected.shape)
    fields = {name: device_array(arr, kind) for name, arr in host.items()}
    fields[out_name] = device_array(out, kind)
    fields.update(overrides)
    return plan_type, args_type(**fields), out


class TorchLikeStream:
    cuda_stream = 0x5EED


@pytest.mark.parametrize("kind", ["cai", "torch"])
@pytest.mark.parametrize("name", list(DESCS))
def test_cuda_plan_runs_the_kernel_on_the_callers_stream(launches, name, kind):
    desc = DESCS[name]
    host, out_name, expected = _problem(desc, np.random.default_rng(3))
    plan_type, args, out = _args(desc, host, out_name, expected, kind)
    plan = plan_type.select(desc, device="cuda")
    assert plan.device == "cuda:0" and plan_type.select(desc, device="cuda:0") is not None
    sku = plan.sku()
    assert (sku.target, sku.arch) == ("cuda", "sm_90") and "__global__" in plan.source()
    assert plan.workspace_size() == 0
    plan.can_implement(args)
    plan.run(args, stream=TorchLikeStream())
    spec = plan._kernel.spec
    n = desc.outer * desc.axis
    assert launches == [(spec.entry, rt.launch_grid(spec, n, RESIDENT_BLOCKS),
                         spec.threads_per_block, 0x5EED)]
    S.assert_same_bits(out, expected, name)
    plan.run(args)  # stream=None: the legacy default stream, handle 0
    assert launches[-1][3] == 0


def test_cuda_plan_with_nothing_to_do_launches_nothing(launches):
    desc = dqgen.DequantizePerGroupDescriptor(0, 128, 64, "f32", "s8")
    host, out_name, expected = _problem(desc, np.random.default_rng(0))
    plan_type, args, _ = _args(desc, host, out_name, expected)
    plan_type.select(desc, device="cuda").run(args)
    assert launches == []


def test_cuda_plan_names_each_bad_argument(launches):
    desc = F32_S8
    host, out_name, expected = _problem(desc, np.random.default_rng(1))
    plan_type, args, out = _args(desc, host, out_name, expected)
    plan = plan_type.select(desc, device="cuda")
    big = np.zeros((6, 512), np.float32)
    flat = np.zeros(6 * 256 + 1, np.float32)
    bad = {
        "dtype": (dict(output=CaiArray(np.zeros((6, 256), np.float64))), "output has dtype float64"),
        "shape": (dict(scale=CaiArray(np.zeros((6, 3), np.float32))), "scale has shape (6, 3)"),
        "buffer": (dict(output=CaiArray(np.zeros(100, np.float32))), "buffer of 100 elements"),
        "strided": (dict(output=CaiArray(big[:, ::2])), "not C-contiguous"),
        "misaligned": (dict(output=CaiArray(flat.view(np.uint8)[2:2 + out.nbytes].view(np.float32)
                                            .reshape(6, 256))), "not aligned"),
        "readonly": (dict(output=CaiArray(out, readonly=True)), "read-only"),
        "device": (dict(output=CaiArray(out, device=1)), "lives on cuda:1"),
    }
    for override, message in bad.values():
        fields = {**args.__dict__, **override}
        with pytest.raises(dqgen.InvalidProblemError, match=re.escape(message)):
            plan.run(type(args)(**fields))
        with pytest.raises(dqgen.InvalidProblemError, match=re.escape(message)):
            plan.can_implement(type(args)(**fields))
    # The output may not alias an input.
    alias = np.zeros(6 * 256 * 4, np.uint8)
    q_alias = CaiArray(alias[: 6 * 256].view(np.int8).reshape(6, 256))
    y_alias = CaiArray(alias.view(np.float32).reshape(6, 256))
    with pytest.raises(dqgen.InvalidProblemError, match="output overlaps input"):
        plan.run(type(args)(**{**args.__dict__, "input": q_alias, "output": y_alias}))
    # Host memory is not a CUDA array; the wrong Args type is named.
    with pytest.raises(dqgen.UnsupportedError, match="scale is a numpy.ndarray in host memory"):
        plan.run(type(args)(**{**args.__dict__, "scale": host["scale"]}))
    with pytest.raises(dqgen.UnsupportedError, match="DequantizePerGroupArgs"):
        plan.run(dqgen.QuantizePerGroupArgs(*args.__dict__.values()))
    with pytest.raises(dqgen.UnsupportedError, match="stream"):
        plan.run(args, stream="default")
    assert launches == []


def test_plain_functions_dispatch_cuda_arrays_to_their_device(launches):
    rng = np.random.default_rng(9)
    q = rng.integers(-128, 128, (4, 256)).astype(np.int8)
    scale = rng.uniform(0.1, 2, (4, 2)).astype(np.float32)
    zp = rng.integers(-3, 3, (4, 2)).astype(np.int32)
    out = np.zeros((4, 256), np.float32)
    # Leading dims flatten (the last axis is the quantization axis), without a copy.
    result = dqgen.dequantize_per_group(CaiArray(q.reshape(2, 2, 256)), CaiArray(scale),
                                        CaiArray(zp), 128, out=CaiArray(out))
    assert isinstance(result, CaiArray) and result.arr is out
    S.assert_same_bits(out, reference.dequantize_per_group(q, scale, zp, 128))
    assert len(launches) == 1 and launches[0][0] == "dqgen_dequant_pg_s8_f32_g128"
    with pytest.raises(dqgen.UnsupportedError, match="pass out="):
        dqgen.dequantize_per_group(CaiArray(q), CaiArray(scale), CaiArray(zp), 128)
    x = rng.standard_normal((4, 256)).astype(np.float32)
    qout = np.zeros((4, 256), np.int8)
    with pytest.raises(dqgen.UnsupportedError, match="host memory"):
        dqgen.quantize_per_group(CaiArray(x), scale, CaiArray(zp), 128, out=CaiArray(qout))
    with pytest.raises(dqgen.UnsupportedError, match="is a CUDA array; this plan runs on the CPU"):
        dqgen.dequantize_per_group(CaiArray(q), CaiArray(scale), CaiArray(zp), 128,
                                   out=CaiArray(out), device="cpu")


def test_select_cuda_validates_the_device_name():
    for bad in ("cuda:x", "cuda:-1", "gpu"):
        with pytest.raises(dqgen.UnsupportedError, match="device="):
            dqgen.DequantizePerGroupPlan.select(F32_S8, device=bad)


@pytest.mark.skipif(rt.cuda_available(), reason="a CUDA device is present")
def test_select_cuda_without_a_device_says_why():
    with pytest.raises(dqgen.UnsupportedError, match="cuda:0.*unavailable") as info:
        dqgen.DequantizePerGroupPlan.select(F32_S8, device="cuda")
    assert rt.cuda_unavailable_reason() in str(info.value)
    q = CaiArray(np.zeros((2, 128), np.int8))
    with pytest.raises(dqgen.UnsupportedError, match="unavailable"):
        dqgen.dequantize_per_group(q, CaiArray(np.ones((2, 1), np.float32)),
                                   CaiArray(np.zeros((2, 1), np.int32)), 128)


def test_torch_fast_path_takes_only_what_fits():
    """The cheap path of a torch CUDA run returns pointers only when every tensor fits;
    anything else is left to the full checks (None)."""
    layout = (("input", np.dtype(np.int8), (2, 64), False),
              ("scale", np.dtype(np.float32), (2, 1), False),
              ("output", np.dtype(np.float32), (2, 64), True))
    q, s, y = np.zeros((2, 64), np.int8), np.ones((2, 1), np.float32), np.zeros((2, 64), np.float32)
    fit = [TorchLikeCuda(q), TorchLikeCuda(s), TorchLikeCuda(y)]
    assert rt.torch_pointers(fit, layout, 0) == [K.address(a) for a in (q, s, y)]
    assert rt.torch_pointers(fit, layout, 1) is None                      # other device
    assert rt.torch_pointers([CaiArray(q)] + fit[1:], layout, 0) is None  # not torch
    wide = np.zeros((2, 128), np.float32)
    assert rt.torch_pointers(fit[:2] + [TorchLikeCuda(wide[:, ::2])], layout, 0) is None
    assert rt.torch_pointers(fit[:2] + [TorchLikeCuda(wide[:, :64])], layout, 0) is None
    alias = np.zeros(2 * 64 * 4, np.uint8)
    q_in_y = [TorchLikeCuda(alias[:128].view(np.int8).reshape(2, 64)), fit[1],
              TorchLikeCuda(alias.view(np.float32).reshape(2, 64))]
    assert rt.torch_pointers(q_in_y, layout, 0) is None                   # overlap
    assert rt.torch_pointers([fit[0], TorchLikeCuda(s.astype(np.float64)), fit[2]], layout,
                             0) is None                                   # dtype
