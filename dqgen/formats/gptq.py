"""GPTQ checkpoints (AutoGPTQ / GPTQModel / transformers): int32-packed weights -> [K, N].

``W[k, n] = scales[g, n] * (q[k, n] - z[g, n])`` with ``g = g_idx[k]`` (FORMATS.md).
``"gptq_v2"`` stores ``z``. The legacy ``"gptq"`` (v1) stores ``z - 1``, written two ways:

- ``v1_zeros="gptqmodel"`` (default): GPTQModel, which transformers and optimum load GPTQ
  through, exports v1 by subtracting a 1 in every field (``0x11111111`` for 4 bits) from
  each whole int32 word, borrows crossing fields, and adds it back on load. A zero point
  of 0 is stored (as 0xF with a borrow from the next field).
- ``v1_zeros="autogptq"``: AutoGPTQ packs ``z - 1`` in each field; its torch dequant adds
  1 to each field modulo ``2**bits`` (a stored 0xF reads 0). GPTQModel's safetensors
  dequantizer (``gptqmodel.utils.model_dequant``) reads v1 this way too.
- ``v1_zeros="exllama"``: the exllama/exllamav2 and vLLM GPTQ kernels add 1 to each field
  without the modulo (a stored 0xF reads 16).

3 bits packs 32 values in three int32 words (value j at bit 3 j of the three read as one
little-endian integer; values 10 and 21 straddle two words), qweight along K and qzeros
along N. There every tool's v1 is field by field: GPTQModel adds 1 modulo 8 (a stored 7
reads 0), AutoGPTQ's torch dequant and exllama add 1 without it (a stored 7 reads 8).

All agree unless a stored field is all ones (zero points of 0, or AutoGPTQ's packing of
a 0, which overflows into the fields above it).
"""

from __future__ import annotations

import numpy as np

from ..errors import InvalidProblemError
from ..ir import (FLOAT_DTYPES, GPTQ_BITS, GPTQ_V1_ZEROS, GptqDequantizeDescriptor, check_int,
                  parse_dtype)
from . import _inputs
from .plan import FormatPlan


def infer_group_size(rows: int, groups: int, group_size, act_order: bool) -> int:
    """The group size of a ``rows``-row weight whose scales have ``groups`` rows."""
    if groups < 1:
        raise InvalidProblemError("scales has no rows; expected one row per group")
    if group_size is not None:
        group_size = check_int(group_size, "group_size", minimum=1)
        if -(-rows // group_size) != groups:
            raise InvalidProblemError(
                f"group_size={group_size} gives {-(-rows // group_size)} groups for {rows} "
                f"rows, but scales has {groups} rows")
        return group_size
    if act_order:  # the kernel reads g_idx; any size giving `groups` groups will do
        size = -(-rows // groups)
        if -(-rows // size) == groups:
            return size
    elif rows % groups == 0:
        return rows // groups
    raise InvalidProblemError(f"cannot infer group_size from {rows} rows and {groups} groups; "
                              "pass group_size=")


def rows_of(words: int, bits: int) -> int:
    """K of a qweight of ``words`` rows: ``words * 32 / bits``, whole runs of words (3 bits
    packs 32 values of K in 3 words, so only a multiple of 3 rows is a layer)."""
    if words * 32 % bits:
        raise InvalidProblemError(
            f"bits={bits} is not supported for a qweight of {words} rows: {bits}-bit GPTQ "
            f"packs 32 values of K in {bits} int32 words, so qweight has a multiple of "
            f"{bits} rows")
    return words * 32 // bits


def _in_row_order(g_idx: np.ndarray, group_size: int) -> bool:
    """Whether ``g_idx`` is ``k // group_size`` for every row k (no act-order)."""
    g_idx = _inputs.host(g_idx)
    return bool(np.array_equal(g_idx, np.arange(g_idx.size, dtype=np.int64) // group_size))


def _check_not_awq(qweight: tuple, qzeros: tuple, scales: tuple) -> None:
    """A clear error for AWQ arrays handed to GPTQ: scales of ``[groups, N]`` against a
    ``qweight`` of ``[K, N / 8]`` (packed along N) rather than ``[K * bits / 32, N]``."""
    if scales[1] == qweight[1]:
        return
    if scales[1] == qweight[1] * 8 and tuple(qzeros) == (scales[0], qweight[1]):
        raise InvalidProblemError(
            f"scales has shape {tuple(scales)}, expected (groups, {qweight[1]}) for GPTQ, "
            f"whose qweight {tuple(qweight)} is [K * bits / 32, N]; these arrays are in AWQ's "
            "layout (qweight [K, N / 8], packed along N): use awq.dequantize")


def dequantize(qweight, qzeros, scales, g_idx=None, bits: int = 4,
               checkpoint_format: str = "gptq", dtype="f16", group_size=None,
               device=None, out=None, v1_zeros: str = GPTQ_V1_ZEROS[0]):
    """Unpack and scale a GPTQ layer to a ``[K, N]`` float weight (``dtype``, f16 default).

    ``bits``: 2, 3, 4 or 8 (3 bits: 32 values in three int32 words, K and N multiples of
    32). ``qweight`` int32 ``[K * bits / 32, N]``, ``qzeros`` int32 ``[groups, N * bits / 32]``,
    ``scales`` ``[groups, N]`` (any float dtype), ``g_idx`` optional int ``[K]`` (act-order
    permutations allowed). ``group_size`` is inferred from the shapes when not given.
    ``out``: a ``[K, N]`` array of ``dtype`` to write instead of allocating one.
    CUDA tensors run on their device and the current stream (``device``: where, when the
    tensors do not say it; default: where they live).
    ``v1_zeros``: how v1 zeros decode, ``"gptqmodel"`` (word-wise), ``"autogptq"`` or
    ``"exllama"`` (field-wise), as the module docstring says; ignored for v2.
    """
    bits = check_int(bits, "bits", minimum=0)
    if bits not in GPTQ_BITS:
        raise InvalidProblemError(f"bits={bits} is not supported for GPTQ; expected one of "
                                  f"{', '.join(map(str, GPTQ_BITS))}")
    out_dtype = parse_dtype(dtype, "dtype", FLOAT_DTYPES)
    qw = _inputs.words(qweight, "qweight")
    qz = _inputs.words(qzeros, "qzeros")
    sc, scale_dtype = _inputs.float_array(scales, "scales")
    rows, cols = rows_of(qw.shape[0], bits), qw.shape[1]
    _check_not_awq(_inputs.shape_of(qw), _inputs.shape_of(qz), _inputs.shape_of(sc))
    groups = sc.shape[0]
    act_order = g_idx is not None
    size = infer_group_size(rows, groups, group_size, act_order)
    arrays = {"qweight": qw, "qzeros": qz, "scales": sc}
    if act_order:
        arrays["g_idx"] = _inputs.group_index(g_idx, rows, groups)
        if _in_row_order(arrays["g_idx"], size):
            # GPTQ checkpoints store g_idx even without act-order: row k in group
            # k // size is the plain layout, whose kernel walks whole rows (faster)
            act_order = False
            del arrays["g_idx"]
    desc = GptqDequantizeDescriptor(rows, cols, size, bits, out_dtype, scale_dtype,
                                    checkpoint_format, act_order, v1_zeros)
    arrays["y"], result = _inputs.output((rows, cols), out_dtype, qweight, out)
    _inputs.run(FormatPlan, desc, arrays, qweight, device)
    return result()
