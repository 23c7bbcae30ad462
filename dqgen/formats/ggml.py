"""GGML / GGUF blocks (llama.cpp): every block type's bytes -> floats.

Shapes follow the gguf package: ``data`` is uint8 ``[..., bytes_per_row]`` and the result
``[..., bytes_per_row // block_bytes * block_values]``. The blocks' math is f32
(FORMATS.md); f16 and bf16 results are the f32 values rounded once. The result is f16
unless asked otherwise, as ``GGUFFile.dequantize`` and ``convert`` make it (the GGUF
convention), so one bundle serves all three. The layouts
themselves are data (``ggml_layouts.py``) run by one kernel template.
"""

from __future__ import annotations

import math

import numpy as np

from .. import call_memo, output_pool
from ..arrays import refuse_unpacked, to_numpy
from ..errors import DqgenError, InvalidProblemError
from ..ir import (GGML_BLOCK_BYTES, GGML_BLOCK_VALUES, GGML_FLOAT_DTYPES,
                  GgmlDequantizeDescriptor, ggml_type_name, parse_dtype, parse_ggml_type)
from ..runtime import cuda as cuda_runtime
from . import _inputs
from .plan import FormatPlan

#: gguf's names of every type ``dequantize`` reads.
TYPES = tuple(ggml_type_name(layout) for layout in GGML_BLOCK_BYTES)


def block_bytes(qtype) -> int:
    """Bytes of one block of ``qtype``."""
    return GGML_BLOCK_BYTES[parse_ggml_type(qtype)]


def block_values(qtype) -> int:
    """Values of one block of ``qtype`` (32, 256, or 1 for F32/F16/BF16)."""
    return GGML_BLOCK_VALUES[parse_ggml_type(qtype)]


def _bytes(data) -> np.ndarray:
    """The block bytes as a uint8 array of ``data``'s shape, without a copy where they are
    contiguous (a read-only memoryview or an np.memmap of a file stays a view of it;
    ``bytes`` are one row)."""
    if cuda_runtime.is_cuda_array(data):  # stays on its device
        ndim = len(cuda_runtime.device_pointer(data).shape)
        raw = _inputs.array(data, "data", ndim) if ndim else data
    else:
        raw = to_numpy(data, "data")
    if len(raw.shape) == 0:
        raise InvalidProblemError("data must have at least one dimension")
    dtype = _inputs.dtype_of(raw)
    refuse_unpacked(dtype, "data", "uint8 block bytes")
    if dtype != np.uint8:
        if dtype.kind in "iu" and dtype.itemsize == 1:
            raw = raw.view(np.uint8) if isinstance(raw, np.ndarray) else \
                _inputs.device_cast(raw, np.dtype(np.uint8), "data", convert=False)
        else:
            raise InvalidProblemError(f"data has dtype {dtype}, expected uint8 block bytes")
    return raw


_CALLS = call_memo.CallMemo()


def dequantize(data, qtype, dtype="f16", device=None, out=None):
    """Dequantize GGML blocks of ``qtype`` (a name in ``TYPES`` such as "Q4_K", or a gguf
    ``GGMLQuantizationType``) to ``dtype`` (f16 default, as ``GGUFFile.dequantize`` and
    ``convert``; f32 is the blocks' own math, gguf-py's result; or bf16), into ``out`` when
    given (an array of that dtype and the result's shape, reused instead of allocated).

    ``data`` is uint8 ``[..., row_bytes]`` (numpy, a CPU tensor, bytes or a memoryview,
    read-only is fine), or a CUDA array, which runs on its device and the current stream;
    the result is ``[..., row_bytes // block_bytes * block_values]``.
    """
    key = call_memo.signature((data, out), (qtype, dtype, device))
    known = _CALLS.get(key)
    if known is not None:
        plan, flat_shape, y_shape, result_shape, out_dtype = known
        result = out if out is not None else output_pool.empty(result_shape, out_dtype)
        try:
            plan.run({"data": data if data.shape == flat_shape else data.reshape(flat_shape),
                      "y": result if result.shape == y_shape else result.reshape(y_shape)})
            return result
        except DqgenError:
            pass  # not as remembered (strides, alignment, overlap): the full path says why
    layout = parse_ggml_type(qtype)
    out_dtype = parse_dtype(dtype, "dtype", GGML_FLOAT_DTYPES)
    raw = _bytes(data)
    bb, bv = GGML_BLOCK_BYTES[layout], GGML_BLOCK_VALUES[layout]
    row_bytes = raw.shape[-1]
    if row_bytes % bb:
        raise InvalidProblemError(
            f"data rows have {row_bytes} bytes, not a multiple of the {bb}-byte "
            f"{ggml_type_name(layout)} block")
    blocks = math.prod(raw.shape) // bb
    desc = GgmlDequantizeDescriptor(blocks, layout, out_dtype)
    flat = _inputs.reshaped(raw, (blocks, bb))
    shape = (*raw.shape[:-1], row_bytes // bb * bv)
    y, result = _inputs.output((blocks, bv), out_dtype, data, out, result_shape=shape)
    plan = _inputs.run(FormatPlan, desc, {"data": flat, "y": y}, data, device)
    if plan.device == "cpu" and raw is data and (out is None or out.shape == shape):
        _CALLS.remember(key, (plan, flat.shape, y.shape, shape, y.dtype))  # nothing converted
    return result() if out is not None else result().reshape(shape)
