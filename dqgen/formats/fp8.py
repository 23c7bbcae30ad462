"""FP8 weights with block scales (DeepSeek-V3/R1, Qwen3-FP8; compressed-tensors'
float-quantized): ``W = F(f32(w) * s[i / block_rows, j / block_cols])``, bit for bit what
``weight.float() * scale`` then ``.to(dtype)`` gives (FORMATS.md)."""

from __future__ import annotations

import numpy as np

from ..errors import InvalidProblemError
from ..ir import FLOAT_DTYPES, parse_dtype
from ..layouts.fp8 import FP8_TYPES, Fp8BlockDescriptor
from . import _inputs
from .plan import FormatPlan

_ENCODING = {np.dtype(t).name: name for name, t in FP8_TYPES.items()}


def codes(weight, fp8):
    """``weight`` as its uint8 codes and the encoding (ml_dtypes or torch float8 arrays
    say theirs; uint8 codes take ``fp8``)."""
    w = _inputs.array(weight, "weight", 2)
    dtype = _inputs.dtype_of(w)
    said = _ENCODING.get(dtype.name)
    if said is None:
        if dtype != np.uint8:
            raise InvalidProblemError(f"weight has dtype {dtype}; FP8 weights are float8_e4m3fn "
                                      "or float8_e5m2 (or their uint8 codes with fp8=)")
        if fp8 is None:
            raise InvalidProblemError("weight holds uint8 codes: pass fp8='e4m3' or 'e5m2'")
        said = str(fp8)
    elif fp8 is not None and str(fp8) != said:
        raise InvalidProblemError(f"weight is {dtype.name} but fp8={fp8!r}")
    if said not in FP8_TYPES:
        raise InvalidProblemError(f"fp8={said!r} is not an FP8 encoding; expected one of: "
                                  f"{', '.join(FP8_TYPES)}")
    return _inputs.view_as(w, np.dtype(np.uint8), "weight"), said


def dequantize(weight, scale, block_size=(128, 128), dtype="bf16", fp8=None, device=None,
               out=None):
    """Dequantize an FP8 ``weight`` ``[N, K]`` with one ``scale`` a block of ``block_size``
    (rows, columns; DeepSeek-V3's ``weight_scale_inv`` is ``[ceil(N / 128), ceil(K /
    128)]``) to ``dtype`` (bf16 default; f16, f32).

    ``block_size=None`` reads the scale's shape: one value (per tensor) or ``[N]``/``[N,
    1]`` (per row, compressed-tensors' channel strategy). ``weight`` is float8_e4m3fn or
    float8_e5m2 (numpy via ml_dtypes, torch) or uint8 codes with ``fp8="e4m3"|"e5m2"``;
    shapes need not be multiples of the block. ``out``: an array of the result's dtype and
    shape to write instead of allocating one.
    """
    w, encoding = codes(weight, fp8)
    n, k = w.shape
    out_dtype = parse_dtype(dtype, "dtype", (d for d in FLOAT_DTYPES if d.value != "f64"))
    given = tuple(_inputs.shape_of(scale))
    if block_size is None:
        if int(np.prod(given)) == 1 and len(given) <= 2:
            block_size = (0, 0)
        elif given in ((n,), (n, 1)):
            block_size = (1, 0)
        else:
            raise InvalidProblemError(f"scale has shape {given}: with block_size=None it is one "
                                      f"value (per tensor) or [{n}] / [{n}, 1] (per row)")
    try:
        rows, cols = (int(b) for b in block_size)
    except (TypeError, ValueError):
        raise InvalidProblemError(f"block_size={block_size!r} is not (rows, columns)") from None
    desc = Fp8BlockDescriptor(n, k, rows, cols, encoding, scale_dtype(scale), out_dtype)
    if int(np.prod(given)) != int(np.prod(desc.scale_shape)) or (
            len(given) == 2 and given != desc.scale_shape):
        raise InvalidProblemError(f"scale has shape {given}, expected {desc.scale_shape}: one "
                                  f"a {rows or n} x {cols or k} block of weight {(n, k)}")
    s = _inputs.reshaped(_inputs.array(scale, "scale", len(given)), desc.scale_shape)
    y, result = _inputs.output((n, k), out_dtype, weight, out)
    _inputs.run(FormatPlan, desc, {"w": w, "scales": s, "y": y}, weight, device,
                caller={"w": ("weight", weight)})
    return result()


def scale_dtype(scale):
    return parse_dtype(_inputs.dtype_of(_inputs.array(scale, "scale", len(_inputs.shape_of(scale)))),
                       "scale.dtype", FLOAT_DTYPES)
