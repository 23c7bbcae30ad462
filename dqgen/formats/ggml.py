"""GGML / GGUF blocks (llama.cpp): every block type's bytes -> floats.

Shapes follow the gguf package: ``data`` is uint8 ``[..., bytes_per_row]`` and the result
``[..., bytes_per_row // block_bytes * block_values]``. The blocks' math is f32
(FORMATS.md); f16 and bf16 results are the f32 values rounded once. The layouts
themselves are data (``ggml_layouts.py``) run by one kernel template.
"""

from __future__ import annotations

import numpy as np

from ..arrays import to_numpy
from ..errors import InvalidProblemError
from ..ir import (GGML_BLOCK_BYTES, GGML_BLOCK_VALUES, GGML_FLOAT_DTYPES,
                  GgmlDequantizeDescriptor, ggml_type_name, parse_dtype, parse_ggml_type)
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
    """The block bytes as a uint8 array, without a copy where they are contiguous (a
    read-only memoryview or an np.memmap of a file stays a view of it)."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        raw = np.frombuffer(data, np.uint8)
    else:
        raw = to_numpy(data, "data")
    if raw.ndim == 0:
        raise InvalidProblemError("data must have at least one dimension")
    if raw.dtype != np.uint8:
        if raw.dtype.kind in "iu" and raw.dtype.itemsize == 1:
            raw = raw.view(np.uint8)
        else:
            raise InvalidProblemError(f"data has dtype {raw.dtype}, expected uint8 block bytes")
    return raw


def dequantize(data, qtype, dtype="f32", device: str = "cpu", out=None):
    """Dequantize GGML blocks of ``qtype`` (a name in ``TYPES`` such as "Q4_K", or a gguf
    ``GGMLQuantizationType``) to ``dtype`` (f32 default, f16 or bf16), into ``out`` when
    given (an array of that dtype and the result's shape, reused instead of allocated).

    ``data`` is uint8 ``[..., row_bytes]`` (numpy, a CPU tensor, bytes or a memoryview,
    read-only is fine); the result is ``[..., row_bytes // block_bytes * block_values]``.
    """
    layout = parse_ggml_type(qtype)
    out_dtype = parse_dtype(dtype, "dtype", GGML_FLOAT_DTYPES)
    raw = _bytes(data)
    bb, bv = GGML_BLOCK_BYTES[layout], GGML_BLOCK_VALUES[layout]
    row_bytes = raw.shape[-1]
    if row_bytes % bb:
        raise InvalidProblemError(
            f"data rows have {row_bytes} bytes, not a multiple of the {bb}-byte "
            f"{ggml_type_name(layout)} block")
    blocks = raw.size // bb
    desc = GgmlDequantizeDescriptor(blocks, layout, out_dtype)
    flat = np.ascontiguousarray(raw).reshape(blocks, bb)
    shape = (*raw.shape[:-1], row_bytes // bb * bv)
    y, result = _inputs.output((blocks, bv), out_dtype, data, out, result_shape=shape)
    FormatPlan.select(desc, device=device).run({"data": flat, "y": y})
    return result() if out is not None else result().reshape(shape)
