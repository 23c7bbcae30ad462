"""AWQ GEMM checkpoints (AutoAWQ): int32 words packed along N in the interleaved order.

``W[k, n] = (q[k, n] - z[k // G, n]) * scales[k // G, n]`` (FORMATS.md); nibble ``i`` of
a word holds column ``[0, 2, 4, 6, 1, 3, 5, 7][i]`` of its eight.
"""

from __future__ import annotations

from ..errors import InvalidProblemError
from ..ir import FLOAT_DTYPES, AwqDequantizeDescriptor, parse_dtype
from . import _inputs
from .gptq import infer_group_size
from .plan import FormatPlan

#: Nibble i of a word holds column ORDER[i]; column c sits in nibble INVERSE[c].
ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
INVERSE = (0, 4, 1, 5, 2, 6, 3, 7)


def _check_not_gptq(qweight: tuple, qzeros: tuple, scales: tuple) -> None:
    """A clear error for GPTQ arrays handed to AWQ: scales of ``[groups, N]`` against a
    ``qweight`` of ``[K * bits / 32, N]`` (packed along K) rather than ``[K, N / 8]``."""
    if scales[1] == qweight[1] * 8:
        return
    if scales[1] == qweight[1] and tuple(qzeros) == (scales[0], scales[1] // 8):
        raise InvalidProblemError(
            f"scales has shape {tuple(scales)}, expected (groups, {qweight[1] * 8}) for AWQ, "
            f"whose qweight {tuple(qweight)} is [K, N / 8]; these arrays are in GPTQ's layout "
            "(qweight [K * bits / 32, N], packed along K): use gptq.dequantize")


def dequantize(qweight, qzeros, scales, dtype="f16", group_size=None, device=None,
               out=None):
    """Unpack and scale an AWQ layer to a ``[K, N]`` float weight (``dtype``, f16 default).

    ``qweight`` int32 ``[K, N / 8]``, ``qzeros`` int32 ``[K / G, N / 8]``, ``scales``
    ``[K / G, N]``; ``group_size`` is inferred from the shapes when not given. ``out``: a
    ``[K, N]`` array of ``dtype`` to write instead of allocating one.
    """
    out_dtype = parse_dtype(dtype, "dtype", FLOAT_DTYPES)
    qw = _inputs.words(qweight, "qweight")
    qz = _inputs.words(qzeros, "qzeros")
    sc, scale_dtype = _inputs.float_array(scales, "scales")
    rows, cols = qw.shape[0], qw.shape[1] * 8
    _check_not_gptq(_inputs.shape_of(qw), _inputs.shape_of(qz), _inputs.shape_of(sc))
    size = infer_group_size(rows, sc.shape[0], group_size, act_order=False)
    if rows % size:
        raise InvalidProblemError(f"K={rows} is not a multiple of group_size={size}")
    desc = AwqDequantizeDescriptor(rows, cols, size, out_dtype, scale_dtype)
    y, result = _inputs.output((rows, cols), out_dtype, qweight, out)
    _inputs.run(FormatPlan, desc, {"qweight": qw, "qzeros": qz, "scales": sc, "y": y},
                qweight, device)
    return result()
