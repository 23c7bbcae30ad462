"""FP4 (e2m1) checkpoints with block scales: gpt-oss MXFP4 experts (``*_blocks``,
``*_scales``), bit for bit what transformers' ``convert_moe_packed_tensors`` returns, and
ModelOpt NVFP4 (``weight``, ``weight_scale``, ``weight_scale_2``), bit for bit what
ModelOpt's ``NVFP4QTensor.dequantize`` returns (FORMATS.md). compressed-tensors' packed
FP4 formats are in ``compressed_tensors``, on the same kernels."""

from __future__ import annotations

import numpy as np

from ..arrays import shape_of
from ..errors import InvalidProblemError, UnsupportedError
from ..ir import FLOAT_DTYPES, parse_dtype
from ..layouts.fp4 import PRODUCERS, Fp4DequantizeDescriptor
from ..runtime import cuda as cuda_runtime
from . import _inputs
from .plan import FormatPlan

_OUT_DTYPES = tuple(d for d in FLOAT_DTYPES if d.value != "f64")


def _codes(obj, name: str, ndim: int, scale_of: str | None = None):
    """``obj`` as a C-contiguous uint8 array of ``ndim`` dimensions (int8 is viewed, not
    converted; an FP8 E4M3 scale, ``scale_of`` naming the format, as its codes)."""
    arr = _inputs.array(obj, name, ndim)
    dtype = _inputs.dtype_of(arr)
    if dtype == np.int8 or (scale_of and dtype.name == "float8_e4m3fn"):
        return _inputs.view_as(arr, np.dtype(np.uint8), name)
    if dtype != np.uint8:
        what = (f"float8_e4m3fn (or its uint8 codes), as {scale_of} writes it" if scale_of
                else "uint8 (two e2m1 codes a byte)")
        raise InvalidProblemError(f"{name} has dtype {dtype}; expected {what}")
    return arr


def global_scale(obj, name: str, like):
    """A per-tensor f32 scale (one value: a Python float, a 0-d or one-element array) as
    a float32 ``[1]`` array where ``like`` lives."""
    if isinstance(obj, (float, int)) and not isinstance(obj, bool):
        obj = np.array([obj], np.float32)
    elif isinstance(obj, np.generic):  # a numpy scalar keeps its dtype
        obj = np.asarray(obj)
    shape = tuple(shape_of(obj))
    if int(np.prod(shape)) != 1:
        raise InvalidProblemError(f"{name} has shape {shape}; it is one value for the tensor")
    on_device = cuda_runtime.is_cuda_array(like)
    arr = _inputs.reshaped(_inputs.array(obj, name, len(shape)), (1,))
    if on_device and isinstance(arr, np.ndarray) and cuda_runtime.is_torch_cuda(like):
        import torch
        arr = torch.from_numpy(arr).to(like.device)  # a host value beside CUDA weights
    dtype = _inputs.dtype_of(arr)
    if dtype != np.float32:
        raise InvalidProblemError(f"{name} has dtype {dtype}; expected float32, as the "
                                  "checkpoint stores it")
    if on_device != cuda_runtime.is_cuda_array(arr):
        raise InvalidProblemError(f"{name} is not on the weight's device")
    return arr


def _run(desc, arrays: dict, like, device, out, caller: dict):
    y, result = _inputs.output(tuple(arrays.pop("y_shape")), desc.float_dtype, like, out)
    _inputs.run(FormatPlan, desc, {**arrays, "y": y}, like, device, caller=caller)
    return result()


def dequantize_mxfp4(blocks, scales, dtype="bf16", device=None, out=None):
    """gpt-oss MXFP4 experts to ``dtype`` (bf16 default; f16, f32), as transformers'
    ``convert_moe_packed_tensors(blocks, scales, dtype=...)`` returns them.

    ``blocks`` uint8 ``[E, N, G, 16]`` (32 e2m1 values a block, value ``2k`` in the low
    nibble of byte ``k``), ``scales`` uint8 ``[E, N, G]`` (E8M0: ``2^(s - 127)``). The
    result is ``[E, G * 32, N]``: each expert's ``[N, K]`` transposed, as the library
    returns it. ``out``: an array of that dtype and shape to write instead of allocating.
    """
    out_dtype = parse_dtype(dtype, "dtype", _OUT_DTYPES)
    given = tuple(shape_of(blocks))
    if len(given) != 4 or given[-1] != 16:
        raise InvalidProblemError(
            f"blocks has shape {given}; gpt-oss MXFP4 blocks are [experts, N, G, 16] "
            "(16 bytes, 32 values, a block; pass blocks[None] and scales[None] for one "
            "matrix)")
    experts, rows, groups, _ = given
    if tuple(shape_of(scales)) != given[:-1]:
        raise InvalidProblemError(f"scales has shape {tuple(shape_of(scales))}, expected "
                                  f"{given[:-1]}: one a block of blocks {given}")
    desc = Fp4DequantizeDescriptor(rows, groups * 32, experts, "mxfp4", "gpt-oss", out_dtype)
    w = _inputs.reshaped(_codes(blocks, "blocks", 4), (experts * rows, groups * 16))
    s = _inputs.reshaped(_codes(scales, "scales", 3), (experts * rows, groups))
    return _run(desc, {"w": w, "scales": s, "y_shape": (experts, groups * 32, rows)}, blocks,
                device, out, {"w": ("blocks", None), "scales": ("scales", None)})


def dequantize_nvfp4(weight, weight_scale, weight_scale_2, dtype="bf16", device=None,
                     out=None):
    """A ModelOpt NVFP4 ``weight`` to ``dtype`` (bf16 default; f16, f32), as
    ``NVFP4QTensor.dequantize`` computes it: ``F(e2m1 * (f32(weight_scale) *
    weight_scale_2))``.

    ``weight`` uint8 ``[N, K / 2]`` (value ``2k`` in the low nibble of byte ``k``),
    ``weight_scale`` float8_e4m3fn ``[N, K / 16]`` (or its uint8 codes), ``weight_scale_2``
    the f32 per-tensor scale. ``out``: an array of the result's dtype and shape ``[N, K]``.
    """
    return dequantize_fp4_rows(weight, weight_scale, weight_scale_2, "nvfp4", "modelopt",
                               dtype, device, out,
                               names=("weight", "weight_scale", "weight_scale_2"))


def dequantize_fp4_rows(weight, scale, global_scale_value, fp4: str, checkpoint_format: str,
                        dtype, device, out, names: tuple[str, str, str]):
    """A ``[N, K / 2]`` FP4 weight with one scale a block along a row (and a per-tensor
    scale where ``checkpoint_format`` has one) to ``[N, K]``; ``names`` are the caller's
    names of the three arrays."""
    out_dtype = parse_dtype(dtype, "dtype", _OUT_DTYPES)
    producer = PRODUCERS[fp4][checkpoint_format]
    w = _codes(weight, names[0], 2)
    n, half = tuple(shape_of(w))
    block = producer.block
    expected = (n, 2 * half // block)
    if (2 * half) % block:
        raise InvalidProblemError(f"{names[0]} has shape {(n, half)}: {2 * half} values a row "
                                  f"are not whole blocks of {block}")
    if tuple(shape_of(scale)) != expected:
        raise InvalidProblemError(f"{names[1]} has shape {tuple(shape_of(scale))}, expected "
                                  f"{expected}: one a block of {block} values of "
                                  f"{names[0]} {(n, half)} (two values a byte)")
    scale_of = f"{checkpoint_format} {fp4}" if producer.scale == "e4m3" else None
    s = _codes(scale, names[1], 2, scale_of)
    arrays = {"w": w, "scales": s, "y_shape": (n, 2 * half)}
    if producer.global_scale:
        arrays["global_scale"] = global_scale(global_scale_value, names[2], weight)
    elif global_scale_value is not None:
        raise UnsupportedError(f"{names[2]}: {checkpoint_format} {fp4} weights have no "
                               "per-tensor scale")
    desc = Fp4DequantizeDescriptor(n, 2 * half, 1, fp4, checkpoint_format, out_dtype)
    return _run(desc, arrays, weight, device, out,
                {"w": (names[0], weight), "scales": (names[1], scale),
                 "global_scale": (names[2], None)})
