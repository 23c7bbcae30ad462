"""MLX checkpoints (``mlx.core.quantize``, mlx_lm): ``w = F(F(q * scale) + bias)`` per group
along a row, bit for bit what ``mlx.core.dequantize`` returns (FORMATS.md)."""

from __future__ import annotations

from ..arrays import rows, shape_of
from ..errors import InvalidProblemError
from ..layouts.mlx import MLX_BITS, MlxDequantizeDescriptor
from ..ir import check_int
from . import _inputs
from .plan import FormatPlan


def dequantize(w_q, scales, biases, group_size: int = 64, bits: int = 4, device=None,
               out=None):
    """``mlx.core.dequantize(w_q, scales, biases, group_size, bits)``: a ``[..., K]`` weight
    of ``scales``' dtype (f16, bf16 or f32).

    ``w_q`` uint32 ``[..., K * bits / 32]`` (int32 is viewed, not converted): a row's
    values are one bit stream, value ``j`` at bit ``bits * j``; ``scales`` and ``biases``
    ``[..., K / group_size]``. Leading dimensions (experts of a MoE layer) are rows.
    ``out``: an array of the result's dtype and shape to write instead of allocating one.
    """
    bits = check_int(bits, "bits", minimum=1)
    if bits not in MLX_BITS:
        raise InvalidProblemError(f"bits={bits} is not an MLX width; expected one of "
                                  f"{', '.join(map(str, MLX_BITS))}")
    q = _inputs.words(rows(w_q, "w_q"), "w_q")
    sc, float_dtype = _inputs.float_array(rows(scales, "scales"), "scales")
    bi, bias_dtype = _inputs.float_array(rows(biases, "biases"), "biases")
    if bias_dtype is not float_dtype:
        raise InvalidProblemError(f"biases have dtype {bias_dtype.value}; MLX keeps them in "
                                  f"scales' dtype ({float_dtype.value})")
    n, words = q.shape
    if (words * 32) % bits:
        raise InvalidProblemError(f"w_q rows have {words} words, not a whole number of "
                                  f"{bits}-bit values")
    cols = words * 32 // bits
    group_size = check_int(group_size, "group_size", minimum=1)
    if cols % group_size == 0 and tuple(sc.shape) != (n, cols // group_size):
        raise InvalidProblemError(
            f"scales has shape {tuple(shape_of(scales))}, expected "
            f"{(*shape_of(w_q)[:-1], cols // group_size)} for {cols} values a row in groups "
            f"of {group_size}")
    desc = MlxDequantizeDescriptor(n, cols, group_size, bits, float_dtype)
    shape = (*shape_of(w_q)[:-1], cols)
    y, result = _inputs.output((n, cols), float_dtype, w_q, out, result_shape=shape)
    _inputs.run(FormatPlan, desc, {"q": q, "scales": sc, "biases": bi, "y": y}, w_q, device,
                caller={"q": ("w_q", w_q)})
    return result() if out is not None else result().reshape(shape)

