"""GGML / GGUF blocks (llama.cpp): Q4_0, Q4_1, Q5_0, Q8_0 bytes -> floats.

Shapes follow the gguf package: ``data`` is uint8 ``[..., bytes_per_row]`` and the result
``[..., bytes_per_row // block_bytes * 32]``. The blocks' math is f32 (FORMATS.md); f16
and bf16 results are the f32 values rounded once.
"""

from __future__ import annotations

import numpy as np

from ..errors import InvalidProblemError
from ..ir import (GGML_BLOCK_BYTES, GGML_BLOCK_VALUES, GGML_FLOAT_DTYPES,
                  GgmlDequantizeDescriptor, parse_dtype, parse_ggml_type)
from ..arrays import to_numpy
from . import _inputs
from .plan import FormatPlan


def block_bytes(qtype) -> int:
    """Bytes of one 32-value block of ``qtype``."""
    return GGML_BLOCK_BYTES[parse_ggml_type(qtype)]


def dequantize(data, qtype, dtype="f32", device: str = "cpu", out=None):
    """Dequantize GGML blocks of ``qtype`` ("Q4_0", "Q4_1", "Q5_0", "Q8_0" or a gguf
    ``GGMLQuantizationType``) to ``dtype`` (f32 default, f16 or bf16), into ``out`` when
    given (an array of that dtype and the result's shape, reused instead of allocated)."""
    layout = parse_ggml_type(qtype)
    out_dtype = parse_dtype(dtype, "dtype", GGML_FLOAT_DTYPES)
    raw = to_numpy(data, "data")
    if raw.ndim == 0:
        raise InvalidProblemError("data must have at least one dimension")
    if raw.dtype != np.uint8:
        if raw.dtype.kind in "iu" and raw.dtype.itemsize == 1:
            raw = raw.view(np.uint8)
        else:
            raise InvalidProblemError(f"data has dtype {raw.dtype}, expected uint8 block bytes")
    bb = GGML_BLOCK_BYTES[layout]
    row_bytes = raw.shape[-1]
    if row_bytes % bb:
        raise InvalidProblemError(
            f"data rows have {row_bytes} bytes, not a multiple of the {bb}-byte "
            f"{layout.value[5:].upper()} block")
    blocks = raw.size // bb
    desc = GgmlDequantizeDescriptor(blocks, layout, out_dtype)
    flat = np.ascontiguousarray(raw).reshape(blocks, bb)
    shape = (*raw.shape[:-1], row_bytes // bb * GGML_BLOCK_VALUES)
    y, result = _inputs.output((blocks, GGML_BLOCK_VALUES), out_dtype, data, out,
                               result_shape=shape)
    FormatPlan.select(desc, device=device).run({"data": flat, "y": y})
    return result() if out is not None else result().reshape(shape)
