"""CUDA driver-API runtime: probe devices, load a cubin/PTX module, launch on a stream.

Uses ``cuda.bindings.driver`` (pip ``cuda-bindings``), imported lazily so this module
imports on machines with no CUDA at all. The probe functions never raise: a machine
without a driver simply has 0 devices, and ``cuda_unavailable_reason()`` says why.
Every binding call returns a tuple whose first item is a ``CUresult``; ``_call`` checks it.

Sections: the driver probe; ``CudaModule`` (load, occupancy, launch); device views of
caller arrays (torch, ``__cuda_array_interface__``, DLPack) and the checks CUDA plans run
on them; ``CudaKernel``, a generated kernel loaded per device with its launch shape; and
the array interop the plain functions use to keep CUDA arrays on their device.
"""

from __future__ import annotations

import ctypes
import functools
import threading
from contextlib import contextmanager
from typing import Any, NamedTuple

import numpy as np

from ..errors import CudaDriverError, InvalidProblemError, UnsupportedError

INSTALL_HINT = "install dqgen[cuda] (pip install 'cuda-bindings>=13')"

#: Kernel argument kinds accepted by ``CudaModule.launch``, as C types.
ARG_KINDS: dict[str, Any] = {
    "ptr": ctypes.c_void_p,
    "i8": ctypes.c_int8, "u8": ctypes.c_uint8,
    "i16": ctypes.c_int16, "u16": ctypes.c_uint16,
    "i32": ctypes.c_int32, "u32": ctypes.c_uint32,
    "i64": ctypes.c_int64, "u64": ctypes.c_uint64,
    "f32": ctypes.c_float, "f64": ctypes.c_double,
}

_DLPACK_CUDA = (2, 13)  # kDLCUDA, kDLCUDAManaged


def _driver():
    """Import the driver bindings late, turning absence into an error naming the fix."""
    try:
        from cuda.bindings import driver
    except ImportError as exc:
        raise UnsupportedError(f"CUDA execution needs cuda-bindings: {INSTALL_HINT}") from exc
    return driver


def _error_text(drv, err) -> str:
    """``CUDA_ERROR_X: description`` for a CUresult, as readable as the driver allows."""
    try:
        name = drv.cuGetErrorName(err)[1].decode()
        text = drv.cuGetErrorString(err)[1].decode()
        return f"{name}: {text}"
    except Exception:  # noqa: BLE001 - describing an error must not raise another
        return str(err)


def _call(fn, *args):
    """Call a driver binding and check its CUresult; return the remaining outputs."""
    drv = _driver()
    err, *rest = fn(*args)
    if err != drv.CUresult.CUDA_SUCCESS:
        raise CudaDriverError(f"{fn.__name__} failed: {_error_text(drv, err)}")
    return rest[0] if len(rest) == 1 else tuple(rest)


@functools.cache
def _probe() -> tuple[int, str]:
    """Initialise the driver once: (device count, reason when 0). Never raises."""
    try:
        drv = _driver()
    except UnsupportedError:
        return 0, f"cuda-bindings is not installed ({INSTALL_HINT})"
    except Exception as exc:  # noqa: BLE001
        return 0, f"cuda-bindings could not be imported: {exc}"
    try:
        (err,) = drv.cuInit(0)
    except Exception as exc:  # noqa: BLE001 - cuda.pathfinder raises when libcuda is absent
        if "not found" in str(exc).lower() or "NotFound" in type(exc).__name__:
            return 0, "no CUDA driver (libcuda.so not found)"
        return 0, f"the CUDA driver could not be loaded: {exc}"
    if err != drv.CUresult.CUDA_SUCCESS:
        return 0, f"cuInit failed: {_error_text(drv, err)}"
    err, count = drv.cuDeviceGetCount()
    if err != drv.CUresult.CUDA_SUCCESS:
        return 0, f"cuDeviceGetCount failed: {_error_text(drv, err)}"
    if count == 0:
        return 0, "the CUDA driver reports no device (check CUDA_VISIBLE_DEVICES)"
    return count, ""


def cuda_device_count() -> int:
    """Number of usable CUDA devices; 0 on any machine that cannot run CUDA."""
    return _probe()[0]


def cuda_available() -> bool:
    """True when at least one CUDA device can be used."""
    return cuda_device_count() > 0


def cuda_unavailable_reason() -> str:
    """Why CUDA cannot be used here; empty when it can."""
    return _probe()[1]


def _device(ordinal: int):
    """The CUdevice for ``ordinal``, with a clear error for a missing one."""
    count, reason = _probe()
    if count == 0:
        raise UnsupportedError(f"device='cuda:{ordinal}': CUDA is unavailable: {reason}")
    if not 0 <= ordinal < count:
        raise UnsupportedError(f"device='cuda:{ordinal}' does not exist ({count} device(s))")
    return _call(_driver().cuDeviceGet, ordinal)


@functools.cache
def device_arch(ordinal: int = 0) -> str:
    """``sm_XY`` of a device, from its compute capability (picks the cubin to build)."""
    dev = _device(ordinal)
    drv = _driver()
    attr = drv.CUdevice_attribute
    major = _call(drv.cuDeviceGetAttribute,
                  attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev)
    minor = _call(drv.cuDeviceGetAttribute,
                  attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev)
    return f"sm_{major}{minor}"


@functools.cache
def multiprocessor_count(ordinal: int = 0) -> int:
    """Number of SMs of a device (sizes the grid of a grid-stride kernel)."""
    drv = _driver()
    return int(_call(drv.cuDeviceGetAttribute,
                     drv.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
                     _device(ordinal)))


_ctx_lock = threading.Lock()
_primary: dict[int, Any] = {}


def _primary_context(ordinal: int):
    """Retain the device's primary context once (the one torch and CuPy use too)."""
    with _ctx_lock:
        if ordinal not in _primary:
            _primary[ordinal] = _call(_driver().cuDevicePrimaryCtxRetain, _device(ordinal))
        return _primary[ordinal]


@contextmanager
def _current(ctx):
    """Make ``ctx`` current for a block, restoring the caller's context afterwards."""
    drv = _driver()
    _call(drv.cuCtxPushCurrent, ctx)
    try:
        yield
    finally:
        _call(drv.cuCtxPopCurrent)


def _kernel_params(args) -> tuple[int, list]:
    """Build a ``void*[]`` of pointers to C-typed copies of ``args``.

    Passing the array's address as an int is the one ``kernelParams`` form every
    cuda-bindings version reads the same way (the (values, types) tuple form changed
    meaning for ``None`` types between releases). Returns the address and the objects
    that must stay alive until cuLaunchKernel returns (it copies the values).
    """
    values = []
    for kind, value in args:
        ctype = ARG_KINDS.get(kind, kind) if isinstance(kind, str) else kind
        if isinstance(kind, str) and kind not in ARG_KINDS:
            raise UnsupportedError(f"kernel argument kind {kind!r}: expected one of "
                                   f"{', '.join(ARG_KINDS)}")
        values.append(value if isinstance(value, ctype) else ctype(value))
    array = (ctypes.c_void_p * max(len(values), 1))(
        *[ctypes.addressof(v) for v in values])
    return ctypes.addressof(array), [array, *values]


class CudaModule:
    """A cubin or PTX image loaded on one device's primary context."""

    def __init__(self, image: bytes, device: int = 0) -> None:
        self.device = device
        self._ctx = _primary_context(device)
        if image[:4] != b"\x7fELF" and not image.endswith(b"\0"):
            image = image + b"\0"  # PTX text must be NUL-terminated for the driver
        self._image = image
        with _current(self._ctx):
            self._module = _call(_driver().cuModuleLoadData, image)
        self._functions: dict[str, Any] = {}

    def get_function(self, name: str):
        """The CUfunction of an ``extern "C"`` kernel, looked up once."""
        if name not in self._functions:
            with _current(self._ctx):
                self._functions[name] = _call(_driver().cuModuleGetFunction,
                                              self._module, name.encode())
        return self._functions[name]

    def occupancy(self, func, block: int, shared_mem: int = 0) -> int:
        """Blocks of ``block`` threads of ``func`` that fit on one SM at once."""
        if isinstance(func, str):
            func = self.get_function(func)
        with _current(self._ctx):
            return int(_call(_driver().cuOccupancyMaxActiveBlocksPerMultiprocessor,
                             func, block, shared_mem))

    def launch(self, func, grid: int, block: int, args, stream: Any = 0,
               shared_mem: int = 0) -> None:
        """Launch ``func`` (a CUfunction or kernel name) on a 1-D grid, asynchronously.

        ``args`` is a list of ``(kind, value)`` with kind in ``ARG_KINDS`` (or a ctypes
        type); pointers are ints. ``stream`` is anything ``stream_handle`` accepts.
        """
        drv = _driver()
        if isinstance(func, str):
            func = self.get_function(func)
        params, keepalive = _kernel_params(args)
        hstream = drv.CUstream(stream_handle(stream))
        with _current(self._ctx):
            _call(drv.cuLaunchKernel, func, grid, 1, 1, block, 1, 1, shared_mem,
                  hstream, params, 0)
        del keepalive

    def close(self) -> None:
        """Unload the module (its functions become invalid)."""
        if getattr(self, "_module", None) is not None:
            with _current(self._ctx):
                _call(_driver().cuModuleUnload, self._module)
            self._module = None
            self._functions.clear()


def synchronize(device: int = 0) -> None:
    """Wait for all work on the device's primary context (tests and benchmarks)."""
    with _current(_primary_context(device)):
        _call(_driver().cuCtxSynchronize)


class DevicePointer(NamedTuple):
    """A CUDA array's raw view: strides are in bytes, like numpy's."""

    ptr: int
    device: int
    nbytes: int
    dtype: Any
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    readonly: bool = False


def _extent(shape, strides, itemsize: int) -> int:
    """Bytes spanned by an array view (0 when empty)."""
    if any(s == 0 for s in shape):
        return 0
    return itemsize + sum((n - 1) * abs(st) for n, st in zip(shape, strides))


def _c_strides(shape, itemsize: int) -> tuple[int, ...]:
    """C-contiguous byte strides (what a missing ``strides`` entry means)."""
    out, step = [], itemsize
    for n in reversed(shape):
        out.append(step)
        step *= max(n, 1)
    return tuple(reversed(out))


def _device_of(obj, ptr: int) -> int:
    """The device ordinal of an array: from torch/CuPy attributes, else the driver."""
    dev = getattr(obj, "device", None)
    for attr in ("index", "id"):
        val = getattr(dev, attr, None)
        if isinstance(val, int):
            return val
    if ptr and cuda_available():
        drv = _driver()
        attr = drv.CUpointer_attribute.CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL
        return int(_call(drv.cuPointerGetAttribute, attr, ptr))
    return 0


def _from_cai(obj, cai: dict) -> DevicePointer:
    """Read ``__cuda_array_interface__`` (v2/v3)."""
    dtype = np.dtype(cai["typestr"])
    shape = tuple(int(n) for n in cai["shape"])
    strides = tuple(cai.get("strides") or _c_strides(shape, dtype.itemsize))
    ptr = int(cai["data"][0] or 0)
    return DevicePointer(ptr, _device_of(obj, ptr), _extent(shape, strides, dtype.itemsize),
                         dtype, shape, strides, bool(cai["data"][1]))


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", _DLDevice), ("ndim", ctypes.c_int32),
                ("dtype", _DLDataType), ("shape", ctypes.POINTER(ctypes.c_int64)),
                ("strides", ctypes.POINTER(ctypes.c_int64)), ("byte_offset", ctypes.c_uint64)]


def _dl_dtype(dt: _DLDataType):
    """numpy dtype for a DLPack dtype (bfloat16 through ml_dtypes)."""
    if dt.lanes != 1:
        raise UnsupportedError(f"DLPack dtype with {dt.lanes} lanes is not supported")
    if dt.code == 4 and dt.bits == 16:
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    kinds = {0: "i", 1: "u", 2: "f"}
    if dt.code not in kinds:
        raise UnsupportedError(f"DLPack dtype code {dt.code} is not supported")
    return np.dtype(f"{kinds[dt.code]}{dt.bits // 8}")


def _from_dlpack(obj) -> DevicePointer:
    """Read a legacy DLPack capsule without consuming it (its destructor frees it)."""
    capsule = obj.__dlpack__(stream=-1)  # -1: no synchronisation; we only read metadata
    get = ctypes.pythonapi.PyCapsule_GetPointer
    get.restype, get.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    t = _DLTensor.from_address(get(capsule, b"dltensor"))  # DLManagedTensor starts with it
    dtype = _dl_dtype(t.dtype)
    shape = tuple(t.shape[i] for i in range(t.ndim))
    strides = (tuple(t.strides[i] * dtype.itemsize for i in range(t.ndim)) if t.strides
               else _c_strides(shape, dtype.itemsize))
    ptr = int(t.data or 0) + int(t.byte_offset)
    return DevicePointer(ptr, int(t.device.device_id), _extent(shape, strides, dtype.itemsize),
                         dtype, shape, strides)


_TORCH_DTYPES = {
    "torch.int8": "i1", "torch.uint8": "u1", "torch.int16": "i2", "torch.int32": "i4",
    "torch.int64": "i8", "torch.float16": "f2", "torch.float32": "f4", "torch.float64": "f8",
}

#: torch dtypes numpy lacks, read through ml_dtypes (torch's CAI refuses them).
_TORCH_ML_DTYPES = {
    "torch.bfloat16": "bfloat16", "torch.float8_e4m3fn": "float8_e4m3fn",
    "torch.float8_e5m2": "float8_e5m2", "torch.float8_e4m3fnuz": "float8_e4m3fnuz",
    "torch.float8_e5m2fnuz": "float8_e5m2fnuz", "torch.float8_e8m0fnu": "float8_e8m0fnu",
}


def is_torch_cuda(obj) -> bool:
    """A torch tensor that lives on a CUDA device (checked without importing torch)."""
    return type(obj).__module__.startswith("torch") and getattr(obj, "is_cuda", False) is True


def _torch_numpy_dtype(torch_dtype) -> np.dtype | None:
    """The numpy (or ml_dtypes) dtype of a torch dtype; None where neither has it."""
    name = str(torch_dtype)
    code = _TORCH_DTYPES.get(name)
    if code is not None:
        return np.dtype(code)
    ml_name = _TORCH_ML_DTYPES.get(name)
    if ml_name is None:
        return None
    import ml_dtypes
    return np.dtype(getattr(ml_dtypes, ml_name)) if hasattr(ml_dtypes, ml_name) else None


def _from_torch(t) -> DevicePointer | None:
    """A torch CUDA tensor's view from its own accessors: faster than the CAI property,
    and it covers bfloat16 and the float8 types, which torch's CAI refuses. None for other
    dtypes."""
    dtype = _torch_numpy_dtype(t.dtype)
    if dtype is None:
        return None
    shape = tuple(t.shape)
    strides = tuple(st * dtype.itemsize for st in t.stride())
    return DevicePointer(int(t.data_ptr()), int(t.device.index), _extent(shape, strides, dtype.itemsize),
                         dtype, shape, strides)


class DeviceArray:
    """A CUDA array known only by its ``DevicePointer`` (one that is neither torch nor
    CuPy), with the ``shape``/``dtype`` the plain functions read; it keeps its owner alive."""

    def __init__(self, view: DevicePointer, owner) -> None:
        self.view, self.owner = view, owner

    shape = property(lambda self: self.view.shape)
    dtype = property(lambda self: self.view.dtype)
    ndim = property(lambda self: len(self.view.shape))

    @property
    def __cuda_array_interface__(self) -> dict:
        v = self.view
        return {"data": (v.ptr, v.readonly), "shape": v.shape, "typestr": v.dtype.str,
                "strides": v.strides, "version": 3}


def device_pointer(obj) -> DevicePointer:
    """The raw device view of a CUDA array (torch, CuPy, anything with CAI or DLPack).

    torch CUDA tensors through their accessors; else ``__cuda_array_interface__``; DLPack
    when that is missing or refuses the dtype. Non-CUDA objects raise ``UnsupportedError``.
    """
    if isinstance(obj, DeviceArray):
        return obj.view
    if is_torch_cuda(obj):
        view = _from_torch(obj)
        if view is not None:
            return view
    try:
        cai = obj.__cuda_array_interface__
    except (AttributeError, TypeError, ValueError, KeyError):  # torch: KeyError for complex32
        cai = None
    if cai is not None:
        return _from_cai(obj, cai)
    dl_device = getattr(obj, "__dlpack_device__", None)
    if dl_device is not None:
        kind, _ = dl_device()
        if int(kind) in _DLPACK_CUDA:
            try:
                return _from_dlpack(obj)
            except (BufferError, RuntimeError, TypeError, ValueError) as exc:
                raise UnsupportedError(f"its DLPack export failed: {exc}") from None
    raise UnsupportedError(f"{type(obj).__name__} is not a CUDA array (it exposes neither "
                           "__cuda_array_interface__ nor a CUDA __dlpack_device__)")


def stream_handle(stream: Any) -> int:
    """The raw CUstream of None (default stream), an int, a torch or CuPy stream."""
    if stream is None:
        return 0
    if isinstance(stream, bool):
        raise UnsupportedError("stream=True/False is not a CUDA stream")
    if isinstance(stream, int):
        return stream
    for attr in ("cuda_stream", "ptr", "handle"):  # torch, CuPy, cuda.core
        val = getattr(stream, attr, None)
        if isinstance(val, int) and not isinstance(val, bool):
            return val
    proto = getattr(stream, "__cuda_stream__", None)  # cuda.core stream protocol
    if callable(proto):
        return int(proto()[1])
    raise UnsupportedError(f"stream={stream!r}: expected None, an int handle, a "
                           "torch.cuda.Stream or a CuPy stream")


# ---- argument checks for CUDA plans ------------------------------------------------

def is_cuda_array(obj) -> bool:
    """True for an object whose memory is on a CUDA device (torch, CuPy, CAI, DLPack)."""
    if type(obj) is np.ndarray:  # the common case, answered before any attribute lookup
        return False
    if is_torch_cuda(obj) or isinstance(obj, DeviceArray):
        return True
    if type(obj).__module__.startswith("torch"):
        return False  # a CPU tensor: its __dlpack_device__ says CPU, but skip the call
    if hasattr(obj, "__cuda_array_interface__"):
        return True
    dl_device = getattr(obj, "__dlpack_device__", None)
    if dl_device is None or type(obj).__module__ == "numpy":
        return False
    try:
        return int(dl_device()[0]) in _DLPACK_CUDA
    except Exception:  # noqa: BLE001 - a broken protocol means "not a CUDA array"
        return False


def device_view(obj, name: str, ordinal: int) -> DevicePointer:
    """``device_pointer(obj)``, with a host array, or a CUDA array of a dtype dqgen cannot
    read, named as the argument that is wrong."""
    try:
        return device_pointer(obj)
    except UnsupportedError as exc:
        if is_cuda_array(obj):
            dtype = getattr(obj, "dtype", None)
            raise UnsupportedError(f"{name} has dtype {dtype}, which dqgen cannot read ({exc})"
                                   ) from None
        raise UnsupportedError(
            f"{name} is a {type(obj).__module__}.{type(obj).__name__} in host memory; this "
            f"plan runs on cuda:{ordinal} and needs a CUDA array (torch CUDA tensor, CuPy "
            "array, or anything with __cuda_array_interface__ or DLPack)") from None


def check_device_array(view: DevicePointer, name: str, dtype, shape: tuple[int, ...],
                       ordinal: int, *, writable: bool = False) -> None:
    """Device, dtype, shape (or flat length), C-contiguity, element alignment and, for an
    output, writability of one CUDA argument; raises ``InvalidProblemError`` naming it."""
    if view.device != ordinal:
        raise InvalidProblemError(f"{name} lives on cuda:{view.device}; this plan runs on "
                                  f"cuda:{ordinal}")
    if view.dtype != dtype:
        raise InvalidProblemError(f"{name} has dtype {view.dtype}, expected {dtype}")
    if view.shape != tuple(shape):
        need = 1
        for n in shape:
            need *= n
        if len(view.shape) == 1:
            raise InvalidProblemError(f"{name} is a buffer of {view.shape[0]} elements, "
                                      f"expected {need} (shape {tuple(shape)})")
        raise InvalidProblemError(f"{name} has shape {view.shape}, expected {tuple(shape)}")
    itemsize = view.dtype.itemsize
    c_strides = _c_strides(view.shape, itemsize)
    if any(n > 1 and st != c for n, st, c in zip(view.shape, view.strides, c_strides)):
        raise InvalidProblemError(f"{name} is not C-contiguous (byte strides {view.strides}); "
                                  "pass a contiguous copy (.contiguous()) or use the plain "
                                  "functions, which copy")
    if view.nbytes and view.ptr % itemsize:
        raise InvalidProblemError(f"{name} (address 0x{view.ptr:x}) is not aligned to its "
                                  f"{itemsize}-byte elements")
    if writable and view.readonly:
        raise InvalidProblemError(f"{name} is read-only; the output must be writable")


@functools.cache
def _torch_dtypes_for(dtypes: tuple) -> tuple:
    """The torch dtype objects matching numpy dtypes (None where torch has none)."""
    import torch
    names = {"int8": torch.int8, "uint8": torch.uint8, "int32": torch.int32,
             "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
             "float64": torch.float64}
    return tuple(names.get(d.name) for d in dtypes)


def torch_pointers(objs, layout, ordinal: int) -> list[int] | None:
    """Device addresses of ``objs`` when every one is a torch CUDA tensor that plainly
    fits ``layout`` (``(name, dtype, shape, is_output)`` each, one output) on device
    ``ordinal`` and the output overlaps no input; None otherwise, and the caller then
    runs the full checks (``check_device_array``), which name what is wrong. The cheap
    path of a reused plan: a few attribute reads per tensor."""
    if not all(type(t).__module__.startswith("torch") for t in objs):
        return None
    try:
        torch_dtypes = _torch_dtypes_for(tuple(item[1] for item in layout))
        ptrs, spans, out_span = [], [], None
        for t, (_, dtype, shape, is_out), tdt in zip(objs, layout, torch_dtypes):
            if not (t.is_cuda and t.dtype is tdt and t.shape == shape and t.is_contiguous()
                    and t.get_device() == ordinal):
                return None
            ptr = t.data_ptr()
            span = (ptr, ptr + t.numel() * dtype.itemsize)
            ptrs.append(ptr)
            if is_out:
                out_span = span
            else:
                spans.append(span)
    except (AttributeError, TypeError, ImportError):
        return None
    lo, hi = out_span
    if lo != hi and any(a < hi and lo < b for a, b in spans if a != b):
        return None
    return ptrs


def check_device_no_overlap(out: DevicePointer, out_name: str,
                            inputs: dict[str, DevicePointer]) -> None:
    """The output's bytes must not share memory with any input (kernels are not in-place)."""
    lo, hi = out.ptr, out.ptr + out.nbytes
    for name, view in inputs.items():
        if out.nbytes and view.nbytes and view.ptr < hi and lo < view.ptr + view.nbytes:
            raise InvalidProblemError(f"{out_name} overlaps {name} in device memory; the "
                                      "output must not alias an input")


def copy_to_host(view: DevicePointer) -> np.ndarray:
    """A host copy of a C-contiguous device array (synchronous: it waits for work already
    queued on the legacy default stream). For the few values a plan must check on the
    host before a launch, such as a ``g_idx`` the kernel indexes by."""
    out = np.empty(view.shape, view.dtype)
    if view.nbytes:
        with _current(_primary_context(view.device)):
            _call(_driver().cuMemcpyDtoH, out.ctypes.data, view.ptr, view.nbytes)
    return out


# ---- a generated kernel, loaded per device -------------------------------------------

_PARAM_KINDS = {"int64_t": "i64", "int32_t": "i32"}


def launch_grid(spec, n: int, resident_blocks: int) -> int:
    """Blocks for ``n`` elements: one thread a vector, at most ``spec.grid_waves`` waves
    of the device's ``resident_blocks`` (SMs x blocks an SM holds at the kernel's
    occupancy; the kernel strides over the rest), at least 1."""
    vectors = -(-n // spec.vector_elems)
    needed = -(-vectors // spec.threads_per_block)
    cap = max(1, resident_blocks * spec.grid_waves)
    return max(1, min(needed, cap, 2**31 - 1))


class CudaKernel:
    """A generated CUDA kernel: its image (cubin, or PTX the driver JIT-compiles), loaded
    lazily on each device it is launched on, with the launch shape its spec decides.

    ``asm`` holds the texts behind it (``cu``, ``ptx``, ``cubin`` where present) for audit.
    """

    def __init__(self, spec, image: bytes, *, asm: dict | None = None) -> None:
        if not image:
            raise UnsupportedError(f"kernel {spec.uri}: empty CUDA image")
        self.spec = spec
        self.image = image
        self.asm = dict(asm or {})
        self.kinds = tuple("ptr" if p.role != "scalar" else _PARAM_KINDS[p.c_type]
                           for p in spec.params)
        self._per_device: dict[int, tuple[CudaModule, Any, int]] = {}
        self._lock = threading.Lock()

    def _loaded(self, device: int) -> tuple[CudaModule, Any, int]:
        """(module, function, grid cap) on ``device``, loading the image the first time."""
        hit = self._per_device.get(device)
        if hit is None:
            with self._lock:
                hit = self._per_device.get(device)
                if hit is None:
                    module = CudaModule(self.image, device=device)
                    func = module.get_function(self.spec.entry)
                    per_sm = module.occupancy(func, self.spec.threads_per_block)
                    hit = (module, func, multiprocessor_count(device) * max(per_sm, 1))
                    self._per_device[device] = hit
        return hit

    def grid(self, n: int, device: int = 0) -> int:
        """The number of blocks a launch over ``n`` elements uses on ``device``."""
        _, _, resident = self._loaded(device)
        return launch_grid(self.spec, n, resident)

    def launch(self, args, n: int, device: int = 0, stream: Any = None) -> None:
        """Launch over ``n`` elements with ``args`` (the spec's parameters in order:
        pointers as ints, then the scalars) on ``stream``; asynchronous. ``n == 0`` is a
        no-op."""
        if n <= 0:
            return
        module, func, resident = self._loaded(device)
        grid = launch_grid(self.spec, n, resident)
        module.launch(func, grid, self.spec.threads_per_block, list(zip(self.kinds, args)),
                      stream=stream)


# ---- array interop for the plain functions ---------------------------------------------

def _is_cupy(obj) -> bool:
    return type(obj).__module__.startswith("cupy")


def rows(obj, name: str):
    """A C-contiguous ``[outer, axis]`` view of a CUDA array: torch and CuPy arrays are
    copied on the device when strided; other CUDA arrays must be contiguous already (their
    view is reshaped, never copied)."""
    if is_torch_cuda(obj):
        arr = obj.detach().contiguous()
    elif _is_cupy(obj):
        import cupy
        arr = cupy.ascontiguousarray(obj)
    else:
        view = device_pointer(obj)
        if not view.shape:
            raise InvalidProblemError(f"{name} must have at least one dimension")
        if len(view.shape) != 2:
            c_strides = _c_strides(view.shape, view.dtype.itemsize)
            if any(n > 1 and st != c for n, st, c in zip(view.shape, view.strides, c_strides)):
                raise InvalidProblemError(f"{name} is not C-contiguous (byte strides "
                                          f"{view.strides}); pass a contiguous array")
            outer = 1
            for n in view.shape[:-1]:
                outer *= n
            shape = (outer, view.shape[-1])
            view = view._replace(shape=shape, strides=_c_strides(shape, view.dtype.itemsize))
        return DeviceArray(view, obj)
    if arr.ndim == 0:
        raise InvalidProblemError(f"{name} must have at least one dimension")
    if arr.ndim == 2:
        return arr
    outer = 1
    for n in arr.shape[:-1]:  # not -1: that is ambiguous for an empty last axis
        outer *= n
    return arr.reshape(outer, arr.shape[-1])


def int32_zero_point(zp):
    """``zp`` as int32 on its device; other integer dtypes are accepted when every value
    fits (checked on the device: one synchronisation, only for a non-int32 input)."""
    lo, hi = -2**31, 2**31 - 1
    if is_torch_cuda(zp):
        import torch
        if zp.dtype == torch.int32:
            return zp
        if zp.dtype.is_floating_point or zp.dtype.is_complex or zp.dtype == torch.bool:
            raise InvalidProblemError(f"zero_point has dtype {zp.dtype}, expected an integer dtype")
        if zp.numel() and (int(zp.min()) < lo or int(zp.max()) > hi):
            raise InvalidProblemError("zero_point has values outside int32")
        return zp.to(torch.int32)
    if _is_cupy(zp) and str(zp.dtype) != "int32":
        if zp.dtype.kind not in "iu":
            raise InvalidProblemError(f"zero_point has dtype {zp.dtype}, expected an integer dtype")
        if zp.size and (int(zp.min()) < lo or int(zp.max()) > hi):
            raise InvalidProblemError("zero_point has values outside int32")
        return zp.astype("int32")
    return zp


def _torch_dtype(dtype):
    import torch
    name = dtype.name
    return {"int8": torch.int8, "uint8": torch.uint8, "int32": torch.int32,
            "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
            "float64": torch.float64}[name]


def output_like(out, shape: tuple[int, int], dtype, like_shape, like):
    """``(rows view, object to return)`` of the output of a CUDA call: ``out`` checked and
    viewed as ``shape``, or a new array of ``like``'s kind on ``like``'s device."""
    if out is None:
        if is_torch_cuda(like):
            import torch
            arr = torch.empty(shape, dtype=_torch_dtype(dtype), device=like.device)
        elif _is_cupy(like):
            import cupy
            with cupy.cuda.Device(device_pointer(like).device):
                arr = cupy.empty(shape, dtype=dtype)
        else:
            raise UnsupportedError(f"cannot allocate an output like {type(like).__name__}; "
                                   "pass out= (a CUDA array of the result's shape)")
        return arr, None
    view = device_pointer(out)
    need = shape[0] * shape[1]
    count = 1
    for n in view.shape:
        count *= n
    if view.dtype != dtype:
        raise InvalidProblemError(f"out has dtype {view.dtype}, expected {dtype}")
    if count != need or tuple(view.shape[-1:]) != tuple(like_shape[-1:]):
        raise InvalidProblemError(f"out has shape {view.shape}, expected {tuple(like_shape)}")
    if is_torch_cuda(out) or _is_cupy(out):
        if not (out.is_contiguous() if is_torch_cuda(out) else out.flags.c_contiguous):
            raise InvalidProblemError("out must be C-contiguous")
        return out.reshape(shape), out
    return rows(out, "out"), out


def current_stream(obj):
    """The stream a torch or CuPy caller is working on (torch's/CuPy's current stream for
    the array's device); None (the legacy default stream) for other arrays."""
    if is_torch_cuda(obj):
        import torch
        return torch.cuda.current_stream(obj.device).cuda_stream
    if _is_cupy(obj):
        import cupy
        return cupy.cuda.get_current_stream().ptr
    return None
