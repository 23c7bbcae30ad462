"""Turning caller arrays into checked views the kernels can take.

One rule for every entry point: the family's plain functions (``dequantize_per_group``
...), the format functions (``gptq``, ``awq``, ``ggml``, ``hqq``, ``floatzp``,
``packed``) and the plans.

What counts as an array:

- a numpy array (``np.memmap`` too);
- a CPU torch tensor, viewed through ``.numpy()``; the dtypes numpy lacks are viewed
  through ml_dtypes (bfloat16, the float8 types), so an entry point refuses them by
  name like any other dtype it does not take; one neither has (torch's ``int4``,
  ``complex32`` ...) is refused naming the argument and its dtype;
- any object exposing the buffer protocol (``bytes``, ``bytearray``, ``memoryview``,
  ``array.array``), viewed without a copy through its format and shape: ``bytes`` are
  uint8 ``[n]``, a memoryview of a ``[4, 144]`` uint8 array is uint8 ``[4, 144]``;
- a CUDA array (torch, CuPy, ``__cuda_array_interface__``, DLPack), on its device.

Lists, scalars and other objects are refused with ``UnsupportedError`` naming the
argument.

How an array is read:

- Plain and format functions read their inputs as values: a strided, unaligned or
  big-endian (non-native byte order) input is copied into a C-contiguous, aligned,
  native array (``readable``), and only then; a big-endian ``>f4`` scale and a ``>i4``
  zero point both read their true values. An output (``out=``) is written in place, so
  it must be C-contiguous, aligned, of the result's dtype in native byte order and
  writable already: anything else is refused, naming it.
- Plans copy nothing: every array must have the exact dtype (native byte order), shape,
  C-contiguity and alignment, else ``can_implement``/``run`` refuse it, naming it.
- An ml_dtypes ``int4``/``uint4`` array holds one value a byte: the unpacked reading.
  Where a function takes an s4/u4 ``q`` (``dequantize_per_group``, ``floatzp``,
  ``packed``) it is read as s4/u4 values, packed two a byte for the kernel (a copy,
  ``q_rows``); where packed storage is expected (HQQ ``W_q``, GGML ``data``, GPTQ/AWQ
  words) and for any other argument it is refused, naming it.

Errors a plan raises for a plain function name the arguments as its caller passed them
(``q``, ``out``) and show the shapes the caller gave (``caller`` of ``check_array``).
Checks raise ``InvalidProblemError``/``UnsupportedError`` naming the argument.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from .errors import InvalidProblemError, UnsupportedError
from .ir import DType, parse_dtype
from .runtime import cuda as cuda_runtime

#: ml_dtypes' unpacked 4-bit integer dtypes (one value a byte) and the storage they hold.
FOUR_BIT = {"int4": DType.S4, "uint4": DType.U4}

#: ml_dtypes' sub-byte integer dtypes, one value a byte: never packed storage.
UNPACKED_INTS = ("int1", "uint1", "int2", "uint2", "int4", "uint4")


def is_torch(obj) -> bool:
    return type(obj).__module__.startswith("torch")


@functools.cache
def _torch():
    """torch, imported on the first tensor (an import statement a call costs ~0.3 us)."""
    import torch
    return torch


@functools.cache
def _ml_views() -> dict:
    """torch dtypes numpy lacks -> (torch dtype of the same size, ml_dtypes dtype)."""
    import ml_dtypes
    torch = _torch()
    views = {torch.bfloat16: (torch.int16, np.dtype(ml_dtypes.bfloat16))}
    for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
                 "float8_e8m0fnu"):
        if hasattr(torch, name) and hasattr(ml_dtypes, name):
            views[getattr(torch, name)] = (torch.uint8, np.dtype(getattr(ml_dtypes, name)))
    return views


def _tensor_numpy(obj, name: str) -> np.ndarray:
    """A CPU torch tensor's numpy view (ml_dtypes for the dtypes numpy lacks)."""
    tensor = obj.detach() if obj.requires_grad else obj
    view = _ml_views().get(tensor.dtype)
    try:
        if view is not None:
            return tensor.view(view[0]).numpy().view(view[1])
        return tensor.numpy()
    except (TypeError, RuntimeError):
        raise UnsupportedError(f"{name} has dtype {tensor.dtype}, which dqgen cannot read "
                               "(no numpy or ml_dtypes equivalent)") from None


def _buffer_numpy(obj, name: str) -> np.ndarray:
    """A buffer-protocol object as a numpy view of its format and shape (bytes: uint8)."""
    try:
        if isinstance(obj, np.generic):  # a numpy scalar is a buffer too, but not an array
            raise TypeError
        view = memoryview(obj)
    except TypeError:
        raise UnsupportedError(
            f"{name} must be an array: a numpy array, a CPU torch tensor, a buffer (bytes, "
            f"bytearray, memoryview) or a CUDA array, got {type(obj).__name__}") from None
    try:
        return np.asarray(view)
    except (TypeError, ValueError, NotImplementedError) as exc:
        raise UnsupportedError(f"{name} is a buffer of format {view.format!r}, which numpy "
                               f"cannot read ({exc})") from None


def to_numpy(obj, name: str) -> np.ndarray:
    """A numpy view of ``obj`` (numpy array, CPU torch tensor or buffer), never a copy."""
    if isinstance(obj, np.ndarray):
        return obj
    if is_torch(obj) and hasattr(obj, "device"):
        if not obj.is_cpu:
            raise UnsupportedError(
                f"{name} lives on {obj.device}; this plan runs on the CPU (select device='cuda' "
                "for CUDA tensors)")
        return _tensor_numpy(obj, name)
    if hasattr(obj, "__cuda_array_interface__"):
        raise UnsupportedError(f"{name} is a CUDA array; this plan runs on the CPU")
    return _buffer_numpy(obj, name)


def from_numpy_like(result: np.ndarray, like):
    """Return ``result`` as the same kind of object as ``like`` (torch in, torch out)."""
    if not is_torch(like):
        return result
    import torch
    if result.dtype == DType.BF16.np_dtype:
        return torch.from_numpy(result.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(result)


def readable(arr: np.ndarray) -> np.ndarray:
    """An input as a kernel reads it: C-contiguous, aligned, in native byte order; ``arr``
    itself when it is, else a copy of its values."""
    if not arr.dtype.isnative:
        return arr.astype(arr.dtype.newbyteorder("="), order="C")
    if arr.flags.c_contiguous and arr.flags.aligned:
        return arr
    return np.array(arr, order="C", copy=True)


def shape_of(obj) -> tuple[int, ...]:
    """The shape of a host array, a buffer or a CUDA array (one known only by its CUDA
    array interface too), as its caller sees it."""
    shape = getattr(obj, "shape", None)
    if isinstance(shape, tuple) and not isinstance(obj, memoryview):
        return tuple(shape)
    if cuda_runtime.is_cuda_array(obj):
        return tuple(cuda_runtime.device_pointer(obj).shape)
    try:
        return tuple(memoryview(obj).shape)
    except TypeError:
        return tuple(np.shape(obj))


def _shown_shape(shape: tuple[int, ...], caller_lead: tuple[int, ...] | None) -> tuple:
    """``shape`` (a plan's ``[outer, n]``) in the caller's terms: ``(*lead, n)`` where the
    caller's leading dimensions make ``outer``, else ``shape`` as it is."""
    if caller_lead is None or len(shape) != 2 or math.prod(caller_lead) != shape[0]:
        return tuple(shape)
    return (*caller_lead, shape[1])


def check_array(arr: np.ndarray, name: str, dtype: np.dtype, shape: tuple[int, ...], *,
                writable: bool = False, caller: tuple | None = None) -> None:
    """dtype, shape (or flat length), C-contiguity, alignment and, for outputs, writability.

    ``caller``: ``(shape the caller passed, caller's leading dimensions)`` when ``arr``
    comes from a plain function's reshaping, so the message shows the caller's shapes."""
    if arr.dtype != dtype:
        order = " (big-endian; plans read native byte order)" if not arr.dtype.isnative else ""
        raise InvalidProblemError(f"{name} has dtype {arr.dtype}{order}, expected {dtype}")
    if arr.shape != shape:
        if caller is not None:
            raise InvalidProblemError(f"{name} has shape {tuple(caller[0])}, expected "
                                      f"{_shown_shape(shape, caller[1])}")
        need = math.prod(shape)
        if arr.ndim == 1:
            raise InvalidProblemError(f"{name} is a buffer of {arr.shape[0]} elements, "
                                      f"expected {need} (shape {shape})")
        raise InvalidProblemError(f"{name} has shape {arr.shape}, expected {shape}")
    if not arr.flags.c_contiguous:
        raise InvalidProblemError(f"{name} is not C-contiguous (strides {arr.strides}); pass "
                                  "np.ascontiguousarray(...) or use the plain functions, which copy")
    if not arr.flags.aligned:
        raise InvalidProblemError(f"{name} is not aligned to its {arr.itemsize}-byte elements")
    if writable and not arr.flags.writeable:
        raise InvalidProblemError(f"{name} is read-only; the output must be writable")


def check_no_overlap(out: np.ndarray, out_name: str, inputs: dict[str, np.ndarray]) -> None:
    """The output must not share memory with any input (the kernels are not in-place).
    numpy's bounds test: the arrays' extents overlap (cheaper than reading addresses)."""
    for name, arr in inputs.items():
        if out.nbytes and arr.nbytes and np.may_share_memory(out, arr):
            raise InvalidProblemError(f"{out_name} overlaps {name} in memory; the output must "
                                      "not alias an input")


def rows(obj, name: str):
    """``obj`` as C-contiguous ``[outer, last axis]`` rows: a numpy view (a copy only when
    strided, unaligned or big-endian: ``readable``) or, for a CUDA array, rows on its
    device (``runtime.cuda.rows``). The plain functions of the family and of the formats
    read their inputs through it."""
    if cuda_runtime.is_cuda_array(obj):
        return cuda_runtime.rows(obj, name)
    arr = to_numpy(obj, name)
    if arr.ndim == 0:
        raise InvalidProblemError(f"{name} must have at least one dimension")
    arr = readable(arr)
    if arr.ndim == 2:
        return arr
    return arr.reshape(math.prod(arr.shape[:-1]), arr.shape[-1])


def four_bit_storage(dtype) -> DType | None:
    """S4/U4 for an ml_dtypes ``int4``/``uint4`` dtype, else None."""
    return FOUR_BIT.get(getattr(dtype, "name", None)) if isinstance(dtype, np.dtype) else None


def pack_four_bit(arr: np.ndarray, name: str) -> np.ndarray:
    """``[outer, axis]`` int4/uint4 values packed two a byte, element ``2k`` in the low
    nibble of byte ``k`` (FORMATS.md): uint8 ``[outer, axis / 2]``, a new array."""
    if arr.shape[-1] % 2:
        raise InvalidProblemError(f"{name} has {arr.shape[-1]} values along its last axis; 4-bit "
                                  "values pack two a byte, so it must be even")
    nibbles = arr.view(np.uint8) & np.uint8(0x0F)  # ml_dtypes reads the low nibble only
    return np.ascontiguousarray(nibbles[:, 0::2] | (nibbles[:, 1::2] << np.uint8(4)))


def q_rows(obj, name: str, int_dtype=None):
    """``(rows, int_dtype)`` of a quantized ``q``: ``rows(obj)`` and ``int_dtype`` as given,
    or, for an ml_dtypes int4/uint4 array (one value a byte), its values packed two a byte
    and ``DType.S4``/``DType.U4``; an ``int_dtype`` naming other storage is refused."""
    q2 = rows(obj, name)
    storage = four_bit_storage(getattr(q2, "dtype", None)) if isinstance(q2, np.ndarray) \
        else None
    if storage is None:
        return q2, int_dtype
    if int_dtype is not None and parse_dtype(int_dtype, "int_dtype", tuple(DType)) is not storage:
        raise InvalidProblemError(f"{name} is an ml_dtypes {q2.dtype} array ({storage.value} "
                                  f"values, one a byte), but int_dtype={int_dtype!r}; pass "
                                  f"int_dtype={storage.value!r} or leave it out")
    return pack_four_bit(q2, name), storage


def refuse_unpacked(dtype, name: str, storage: str) -> None:
    """Refuse an ml_dtypes sub-byte integer array where packed ``storage`` is expected
    (its bytes would be misread as packed fields)."""
    if isinstance(dtype, np.dtype) and dtype.name in UNPACKED_INTS:
        raise InvalidProblemError(f"{name} is an ml_dtypes {dtype} array (one value a byte, "
                                  f"unpacked); {name} must be {storage}")
