"""torchao's ``Int4Tensor``: ``Int4WeightOnlyConfig()`` with the plain packing format,
torchao's default int4 weight-only format: ``W = F(F(q * scale) + zero)`` per group of
``group_size`` along K (FORMATS.md).

``qdata`` int8 ``[N, K / 2]`` (``[E, N, K / 2]``: a MoE layer's experts): two signed
4-bit values a byte, column ``2k`` in the low nibble, two's complement in [-8, 7];
``scale`` and ``zero_point`` have the weight's dtype F and are stored transposed,
``[K / group_size, N]`` (``[E, K / group_size, N]``). torchao has no dequantize of its own
for the tensor (``Int4Tensor.dequantize`` raises): its linear runs mslk's CUTLASS kernel,
which converts ``q`` to F and computes ``q * scale + zero`` as two F operations, the
product rounded to F, then the sum. That is the float zero point kernel
(``formats.floatzp``) with packed s4 storage and ``mid`` 0; the transposed scales and
zeros (one value a group: small) are copied into rows here.
"""

from __future__ import annotations

import numpy as np

from ..arrays import is_torch, shape_of, to_numpy
from ..errors import InvalidProblemError, UnsupportedError
from ..ir import (DequantizeFloatZeroDescriptor, DType, check_int, dtype_from_any,
                  parse_dtype)
from ..runtime import cuda as cuda_runtime
from . import floatzp
from .weight import QuantizedWeight

#: The scale dtypes mslk's kernel takes (``zero_point`` has the same one).
SCALE_DTYPES = (DType.BF16, DType.F16, DType.F32)

#: torchao's other int4 tensors: other packings, not this layout.
_OTHER_PACKINGS = {"Int4PreshuffledTensor": "PRESHUFFLED", "Int4PlainInt32Tensor": "PLAIN_INT32",
                   "Int4TilePackedTo4dTensor": "TILE_PACKED_TO_4D"}


def is_int4_tensor(obj) -> bool:
    """Whether ``obj`` is torchao's ``Int4Tensor`` (torchao itself is not imported)."""
    return type(obj).__name__ == "Int4Tensor" and all(
        hasattr(obj, a) for a in ("qdata", "scale", "zero_point", "block_size"))


def _from_tensor(tensor, scale, zero_point, group_size):
    """``(qdata, scale, zero_point, group_size)`` of an ``Int4Tensor``: its group size is
    its ``block_size``'s last entry (a ``group_size`` given must agree)."""
    if scale is not None or zero_point is not None:
        raise InvalidProblemError("an Int4Tensor carries its scale and zero_point: pass the "
                                  "tensor alone, or its qdata, scale and zero_point")
    block = [int(b) for b in tensor.block_size]
    if any(b != 1 for b in block[:-1]):
        raise UnsupportedError(f"the Int4Tensor has block_size={block}; only groups along "
                               "the last axis (block_size [1, ..., group_size]) are read")
    if group_size is not None and check_int(group_size, "group_size", minimum=1) != block[-1]:
        raise InvalidProblemError(f"group_size={group_size}, but the Int4Tensor's block_size "
                                  f"{block} says {block[-1]}")
    return tensor.qdata, tensor.scale, tensor.zero_point, block[-1]


def _parts(qdata, scale, zero_point, group_size):
    """The four parts the caller handed over, read from an ``Int4Tensor`` if it is one."""
    if is_int4_tensor(qdata):
        return _from_tensor(qdata, scale, zero_point, group_size)
    name = type(qdata).__name__
    if name in _OTHER_PACKINGS:
        raise UnsupportedError(f"qdata is torchao's {name} (int4_packing_format="
                               f"{_OTHER_PACKINGS[name]}); this reads Int4Tensor, the plain "
                               "packing (Int4WeightOnlyConfig's default)")
    if scale is None or zero_point is None:
        raise InvalidProblemError("pass qdata, scale and zero_point (or an Int4Tensor alone)")
    return qdata, scale, zero_point, group_size


def _dtype(obj, name: str) -> np.dtype:
    """The numpy dtype of a host array, CPU tensor or CUDA array (read, not copied)."""
    if cuda_runtime.is_cuda_array(obj):
        return cuda_runtime.device_pointer(obj).dtype
    return to_numpy(obj, name).dtype


def check(qdata, scale, zero_point, group_size=None) -> tuple[int, DType]:
    """``(group_size, F)`` once the arrays are checked to be an ``Int4Tensor``'s: int8
    (or uint8) ``qdata [..., N, K / 2]``, ``scale`` and ``zero_point [..., K / group_size,
    N]`` of one float dtype; ``group_size`` (None: from scale's shape) divides K."""
    q_dtype = _dtype(qdata, "qdata")
    if q_dtype not in (np.int8, np.uint8):
        raise InvalidProblemError(f"qdata has dtype {q_dtype}; an Int4Tensor's qdata is int8 "
                                  "[N, K / 2], two 4-bit values a byte")
    q_shape = shape_of(qdata)
    if len(q_shape) < 2:
        raise InvalidProblemError(f"qdata has shape {q_shape}; expected [N, K / 2] (or "
                                  "[E, N, K / 2])")
    *lead, n, half = q_shape
    k = 2 * half
    s_dtype = _dtype(scale, "scale")
    float_dtype = dtype_from_any(s_dtype)
    if float_dtype not in SCALE_DTYPES:
        raise UnsupportedError(f"scale has dtype {s_dtype}; an Int4Tensor's scale is "
                               "bfloat16, float16 or float32 (the weight's dtype)")
    if _dtype(zero_point, "zero_point") != s_dtype:
        raise InvalidProblemError(f"zero_point has dtype {_dtype(zero_point, 'zero_point')}; "
                                  f"an Int4Tensor keeps it in scale's dtype ({s_dtype})")
    s_shape = shape_of(scale)
    if len(s_shape) != len(q_shape) or tuple(s_shape[:-2]) != tuple(lead) or s_shape[-1] != n:
        raise InvalidProblemError(
            f"scale has shape {s_shape}; for qdata {q_shape} it is stored transposed, "
            f"{(*lead, 'K / group_size', n)}")
    groups = s_shape[-2]
    if group_size is None:
        if not groups or k % groups:
            raise InvalidProblemError(f"scale's {groups} groups do not divide K={k} (qdata "
                                      f"{q_shape}): pass group_size")
        group_size = k // groups
    group_size = check_int(group_size, "group_size", minimum=1, maximum=2**31 - 1)
    if k % group_size or groups != k // group_size:
        raise InvalidProblemError(
            f"scale has shape {s_shape}: {groups} groups, but K={k} (qdata {q_shape}) in "
            f"groups of group_size={group_size} is {k / group_size:g}")
    if tuple(shape_of(zero_point)) != tuple(s_shape):
        raise InvalidProblemError(f"zero_point has shape {shape_of(zero_point)}, expected "
                                  f"scale's {s_shape}")
    return group_size, float_dtype


def transposed(arr, name: str):
    """``arr [..., a, b]`` as a C-contiguous ``[..., b, a]`` of the same kind, on the host
    or on its CUDA device (torch and CuPy arrays)."""
    if is_torch(arr):
        return arr.detach().transpose(-1, -2).contiguous()
    if cuda_runtime.is_cuda_array(arr):
        if type(arr).__module__.startswith("cupy"):
            import cupy
            return cupy.ascontiguousarray(arr.swapaxes(-1, -2))
        raise UnsupportedError(f"{name} is a CUDA array that is neither torch nor CuPy; it is "
                               "stored transposed and is transposed here: pass it as a torch "
                               "or CuPy array")
    return np.ascontiguousarray(np.swapaxes(to_numpy(arr, name), -1, -2))


def _as_dtype(result, dtype: DType):
    """The F result converted to ``dtype`` (widening to f32 is exact; a narrower dtype
    rounds once), same kind as the result."""
    if is_torch(result):
        import torch
        target = {DType.F32: torch.float32, DType.F16: torch.float16,
                  DType.BF16: torch.bfloat16}[dtype]
        return result.to(target)
    if isinstance(result, np.ndarray):
        return result.astype(dtype.np_dtype)
    raise UnsupportedError(f"dtype={dtype.value} differs from scale's: the conversion runs on "
                           "numpy arrays and torch tensors; pass one, or leave dtype out")


def _write(out, value):
    """``value`` written into the caller's ``out`` (a host array, or a torch tensor where
    the result is one: on its device)."""
    if is_torch(out) and is_torch(value):
        if out.dtype != value.dtype or tuple(out.shape) != tuple(value.shape):
            raise InvalidProblemError(f"out has dtype {out.dtype} and shape "
                                      f"{tuple(out.shape)}, expected {value.dtype} "
                                      f"{tuple(value.shape)}")
        return out.copy_(value)
    target = to_numpy(out, "out")
    got = to_numpy(value, "result")
    if target.dtype != got.dtype or target.shape != got.shape:
        raise InvalidProblemError(f"out has dtype {target.dtype} and shape {target.shape}, "
                                  f"expected {got.dtype} {got.shape}")
    if not target.flags.writeable:
        raise InvalidProblemError("out is read-only")
    np.copyto(target, got)
    return out


def dequantize(qdata, scale=None, zero_point=None, group_size=None, dtype=None, device=None,
               out=None):
    """``W = F(F(q * scale) + zero_point)`` ``[..., N, K]``: an ``Int4Tensor``'s weight
    as the CUTLASS source of mslk's kernel behind its linear computes it.

    ``qdata``: an ``Int4Tensor`` (alone), or its int8 ``qdata [..., N, K / 2]`` with
    ``scale`` and ``zero_point [..., K / group_size, N]`` (transposed, of the weight's
    dtype F: bf16, f16 or f32). ``group_size`` defaults to the tensor's ``block_size`` (to
    K over scale's groups for plain arrays). The values are computed in F; ``dtype``
    (default F) converts the result (exactly, to f32). ``act_pre_scale`` (a scale of the
    layer's input) is not part of the weight. ``out``: an array of the result's dtype and
    shape to write. CUDA arrays (torch, CuPy) run on their device.
    """
    qdata, scale, zero_point, group_size = _parts(qdata, scale, zero_point, group_size)
    group_size, float_dtype = check(qdata, scale, zero_point, group_size)
    target = float_dtype if dtype is None else parse_dtype(dtype, "dtype", SCALE_DTYPES)
    s_rows, z_rows = transposed(scale, "scale"), transposed(zero_point, "zero_point")
    if target is float_dtype:
        return floatzp.dequantize(qdata, s_rows, z_rows, group_size, int_dtype="s4",
                                  device=device, out=out)
    values = floatzp.dequantize(qdata, s_rows, z_rows, group_size, int_dtype="s4",
                                device=device)
    converted = _as_dtype(values, target)
    return converted if out is None else _write(out, converted)


def weight(qdata, scale=None, zero_point=None, group_size=None) -> QuantizedWeight:
    """The ``Int4Tensor`` (or its 2-D ``qdata``, ``scale``, ``zero_point``) as a
    ``QuantizedWeight`` ``[N, K]`` for the fused linear (on the CPU): the floatzp kernel's
    values in F, widened exactly. A tensor with ``act_pre_scale`` (the input scaled before
    the product) is refused: the linear would drop it."""
    if is_int4_tensor(qdata) and getattr(qdata, "act_pre_scale", None) is not None:
        raise UnsupportedError("the Int4Tensor has an act_pre_scale (its layer scales the "
                               "input before the product); the fused linear does not apply "
                               "it: dequantize the weight and scale x yourself")
    qdata, scale, zero_point, group_size = _parts(qdata, scale, zero_point, group_size)
    for name, arr in (("qdata", qdata), ("scale", scale), ("zero_point", zero_point)):
        if cuda_runtime.is_cuda_array(arr):
            raise UnsupportedError(f"{name} is a CUDA array; the fused linear runs on the "
                                   "CPU: pass host arrays (e.g. tensor.cpu())")
    group_size, float_dtype = check(qdata, scale, zero_point, group_size)
    q = np.ascontiguousarray(to_numpy(qdata, "qdata"))
    if q.ndim != 2:
        raise InvalidProblemError(f"qdata has shape {q.shape}; the linear reads a weight "
                                  "[N, K / 2] (one expert at a time)")
    n, k = q.shape[0], 2 * q.shape[1]
    decode = DequantizeFloatZeroDescriptor(0, 0, group_size, float_dtype, DType.S4)
    arrays = {"q": q.view(np.uint8), "scale": transposed(to_numpy(scale, "scale"), "scale"),
              "zero_point": transposed(to_numpy(zero_point, "zero_point"), "zero_point")}
    return QuantizedWeight(decode, arrays, (n, k))
