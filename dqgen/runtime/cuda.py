"""CUDA driver-API runtime: probe devices, load a cubin/PTX module, launch on a stream.

Uses ``cuda.bindings.driver`` (pip ``cuda-bindings``), imported lazily so this module
imports on machines with no CUDA at all. The probe functions never raise: a machine
without a driver simply has 0 devices, and ``cuda_unavailable_reason()`` says why.
Every binding call returns a tuple whose first item is a ``CUresult``; ``_call`` checks it.
"""

from __future__ import annotations

import ctypes
import functools
import threading
from contextlib import contextmanager
from typing import Any, NamedTuple

from ..errors import DqgenError, UnsupportedError

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


class CudaDriverError(DqgenError, RuntimeError):
    """A CUDA driver call failed (bad launch, out of memory, illegal address ...)."""


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
    drv = _driver()
    dev = _device(ordinal)
    attr = drv.CUdevice_attribute
    major = _call(drv.cuDeviceGetAttribute,
                  attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev)
    minor = _call(drv.cuDeviceGetAttribute,
                  attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev)
    return f"sm_{major}{minor}"


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
    import numpy as np
    dtype = np.dtype(cai["typestr"])
    shape = tuple(int(n) for n in cai["shape"])
    strides = tuple(cai.get("strides") or _c_strides(shape, dtype.itemsize))
    ptr = int(cai["data"][0] or 0)
    return DevicePointer(ptr, _device_of(obj, ptr), _extent(shape, strides, dtype.itemsize),
                         dtype, shape, strides)


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
    import numpy as np
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


def device_pointer(obj) -> DevicePointer:
    """The raw device view of a CUDA array (torch, CuPy, anything with CAI or DLPack).

    ``__cuda_array_interface__`` first; DLPack when it is missing or refuses the dtype
    (torch raises for bfloat16 there). Non-CUDA objects raise ``UnsupportedError``.
    """
    try:
        cai = obj.__cuda_array_interface__
    except (AttributeError, TypeError, ValueError):
        cai = None
    if cai is not None:
        return _from_cai(obj, cai)
    dl_device = getattr(obj, "__dlpack_device__", None)
    if dl_device is not None:
        kind, _ = dl_device()
        if int(kind) in _DLPACK_CUDA:
            return _from_dlpack(obj)
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
