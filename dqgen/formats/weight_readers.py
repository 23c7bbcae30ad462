"""bitsandbytes, FP4 and MLX layers as ``QuantizedWeight``s, for the fused linear.

Each reader takes the tensors the format's dequantize function takes (numpy arrays or CPU
torch tensors: the linear runs on the CPU) and returns a weight ``[N, K]`` whose values
are what that function computes before its rounding to the output dtype (SPEC.md §8),
read in place (only tables and scalars are converted):

- ``bnb4_weight`` (``bitsandbytes.dequantize_4bit``'s arguments, ``from_state_dict``'s
  output less ``dtype``): NF4/FP4 blocks run over the flattened tensor, so K must be a
  multiple of the block size. Double-quantized absmax stay uint8 where a row is whole
  nested blocks (K a multiple of ``blocksize * nested_blocksize``); elsewhere they are
  decoded once to f32 here, with the same two f32 roundings as the kernel.
- ``int8_weight``: LLM.int8 (``weight`` int8 ``[N, K]``, ``SCB`` f32 ``[N]``).
- ``nvfp4_weight`` (ModelOpt), ``ct_nvfp4_weight`` and ``ct_mxfp4_weight``
  (compressed-tensors ``nvfp4-pack-quantized`` / ``mxfp4-pack-quantized``),
  ``gptoss_mxfp4_weight`` (gpt-oss's experts, read as stored: ``x @ W_e`` of
  transformers' transposed expert is ``linear(x, W)``).
- ``mlx_weight``: MLX affine; each step rounds to the scales' dtype, so the values are
  that dtype's (the linear decodes a row in it and widens it exactly).
- ``hqq_weight`` (``hqq.dequantize``'s arguments, ``axis=1``): the planes of HQQ's
  ``BitPack`` words unpacked once to one byte a value (exact), read by HQQ's 8-bit kernel:
  ``F(F(q - zero) * scale)``, values of F.

``layer_weight`` reads a bitsandbytes layer of a state dict by its prefix.
"""

from __future__ import annotations

import math

import numpy as np

from ..arrays import to_numpy
from ..errors import InvalidProblemError, UnsupportedError
from ..ir import DType, check_int
from ..layouts.bitsandbytes import (NESTED_BLOCKSIZE, Bnb4bitDescriptor, Bnb8bitDescriptor,
                                    block_absmax)
from ..layouts.fp4 import PRODUCERS, Fp4DequantizeDescriptor
from ..layouts.mlx import MLX_BITS, MlxDequantizeDescriptor
from ..runtime import cuda as cuda_runtime
from . import bitsandbytes as bnb
from .weight import QuantizedWeight

# MLX scales' numpy dtype names and the dtype the weight's values are in
_MLX_FLOATS = {"float16": DType.F16, "bfloat16": DType.BF16, "float32": DType.F32}


# --- bitsandbytes ---------------------------------------------------------------------

def bnb4_weight(weight, absmax, shape, blocksize=64, quant_type="nf4", quant_map=None,
                nested_absmax=None, nested_quant_map=None, offset=None,
                nested_blocksize=NESTED_BLOCKSIZE) -> QuantizedWeight:
    """The NF4/FP4 weight ``dequantize_4bit`` reads with the same arguments, ``shape`` its
    ``[N, K]``: ``W = code[q] * absmax`` in f32."""
    n, k = _matrix_shape(shape)
    blocksize = check_int(blocksize, "blocksize", minimum=1)
    plain = Bnb4bitDescriptor(n, k, blocksize, 0, DType.F32)   # the block size is checked
    if k % blocksize:
        raise InvalidProblemError(
            f"shape {(n, k)}: K={k} is not a multiple of blocksize={blocksize}; bitsandbytes' "
            "blocks run over the flattened tensor, so a row of W is whole blocks only then "
            "(dequantize the weight and use a float matmul)")
    nested = nested_absmax is not None
    if nested != (nested_quant_map is not None) or nested != (offset is not None):
        raise InvalidProblemError("double quantization takes nested_absmax, nested_quant_map "
                                  "and offset together")
    code = bnb.code_table(quant_type) if quant_map is None else quant_map
    arrays = {"w": _packed(weight, plain.packed_bytes, (n, k)),
              "code": _floats(code, "quant_map", 16)}
    if not nested:
        arrays["absmax"] = _floats(absmax, "absmax", plain.num_blocks)
        return QuantizedWeight(_bnb4_decode(blocksize, 0), arrays, (n, k))
    nested_blocksize = check_int(nested_blocksize, "nested_blocksize", minimum=1)
    desc = Bnb4bitDescriptor(n, k, blocksize, nested_blocksize, DType.F32)
    arrays.update(absmax=_codes(absmax, "absmax", desc.num_blocks),
                  nested_code=_floats(nested_quant_map, "nested_quant_map", 256),
                  nested_absmax=_floats(nested_absmax, "nested_absmax", desc.nested_blocks),
                  offset=_floats(offset, "offset", 1))
    if k % (blocksize * nested_blocksize) == 0:   # a row is whole nested blocks
        return QuantizedWeight(_bnb4_decode(blocksize, nested_blocksize), arrays, (n, k))
    return QuantizedWeight(_bnb4_decode(blocksize, 0),
                           {"w": arrays["w"], "code": arrays["code"],
                            "absmax": block_absmax(desc, arrays)}, (n, k))


def int8_weight(weight, scb) -> QuantizedWeight:
    """The LLM.int8 weight ``dequantize_int8`` reads: ``f32(f32(q * SCB) * f32(1/127))``."""
    w = _host(weight, "weight")
    if w.dtype != np.int8 or w.ndim != 2:
        raise InvalidProblemError(f"weight has dtype {w.dtype} and shape {w.shape}; an "
                                  "LLM.int8 weight is int8 [N, K]")
    n, k = w.shape
    s = _host(scb, "SCB")
    if s.dtype != np.float32 or s.shape not in ((n,), (n, 1)):
        raise InvalidProblemError(f"SCB has dtype {s.dtype} and shape {s.shape}; expected "
                                  f"float32 ({n},), one scale a row of weight {(n, k)}")
    return QuantizedWeight(Bnb8bitDescriptor(0, 0, DType.F32),
                           {"w": w, "scb": s.reshape(n)}, (n, k))


def layer_weight(tensors, prefix: str) -> QuantizedWeight:
    """The bitsandbytes layer ``prefix`` of a state dict (4-bit or LLM.int8), as
    ``dequantize_layer`` reads it."""
    if bnb.is_4bit(tensors, prefix):
        kwargs = bnb.from_state_dict(tensors, prefix)
        kwargs.pop("dtype")   # the dtype it was quantized from: the linear's is x's
        return bnb4_weight(**kwargs)
    if bnb.is_int8(tensors, prefix):
        return int8_weight(**bnb.int8_from_state_dict(tensors, prefix))
    raise InvalidProblemError(f"{prefix} is not a bitsandbytes layer: no "
                              f"{prefix.rstrip('.')}.weight.quant_state.bitsandbytes__nf4|fp4 "
                              f"or {prefix.rstrip('.')}.SCB")


def _bnb4_decode(blocksize: int, nested_blocksize: int) -> Bnb4bitDescriptor:
    return Bnb4bitDescriptor(0, 0, blocksize, nested_blocksize, DType.F32)


def _packed(weight, nbytes: int, shape) -> np.ndarray:
    """The packed indices' bytes (stored ``[nbytes, 1]`` uint8, or as another
    ``quant_storage`` dtype), flat."""
    arr = np.ascontiguousarray(_host(weight, "weight"))
    if arr.nbytes != nbytes:
        raise InvalidProblemError(f"weight has {arr.nbytes} bytes (shape {arr.shape}), "
                                  f"expected {nbytes}: two 4-bit values a byte for shape {shape}")
    return arr.reshape(-1).view(np.uint8)


# --- FP4 --------------------------------------------------------------------------------

def nvfp4_weight(weight, weight_scale, weight_scale_2) -> QuantizedWeight:
    """A ModelOpt NVFP4 weight (``fp4.dequantize_nvfp4``'s arguments): ``e2m1 *
    (f32(weight_scale) * weight_scale_2)`` in f32."""
    return _fp4_weight("nvfp4", "modelopt", (weight, weight_scale, weight_scale_2),
                       ("weight", "weight_scale", "weight_scale_2"))


def ct_nvfp4_weight(weight_packed, weight_scale, weight_global_scale) -> QuantizedWeight:
    """A compressed-tensors ``nvfp4-pack-quantized`` weight: ``e2m1 * (f32(weight_scale) /
    weight_global_scale)`` in f32 (the library rounds that product to bf16)."""
    return _fp4_weight("nvfp4", "compressed-tensors",
                       (weight_packed, weight_scale, weight_global_scale),
                       ("weight_packed", "weight_scale", "weight_global_scale"))


def ct_mxfp4_weight(weight_packed, weight_scale) -> QuantizedWeight:
    """A compressed-tensors ``mxfp4-pack-quantized`` weight: ``e2m1 * 2^(s - 127)`` in f32
    (the library rounds it to bf16)."""
    return _fp4_weight("mxfp4", "compressed-tensors", (weight_packed, weight_scale, None),
                       ("weight_packed", "weight_scale", ""))


def gptoss_mxfp4_weight(blocks, scales) -> QuantizedWeight:
    """gpt-oss MXFP4 experts (``fp4.dequantize_mxfp4``'s arguments) as a weight ``[N, K]``
    (blocks ``[N, G, 16]`` and scales ``[N, G]``, one expert) or ``[E * N, K]`` (blocks
    ``[E, N, G, 16]``: the experts' rows one after another, every expert's outputs from one
    call). ``ldexp(e2m1, s - 127)`` in f32. transformers multiplies ``x @ W_e`` with each
    expert transposed to ``[K, N]``; ``linear(x, W)`` is that product."""
    w = _byte_codes(blocks, "blocks", "uint8 (two e2m1 codes a byte)")
    s = _byte_codes(scales, "scales", "uint8 (E8M0 codes)")
    if w.ndim not in (3, 4) or w.shape[-1] != 16:
        raise InvalidProblemError(f"blocks has shape {w.shape}; gpt-oss MXFP4 blocks are "
                                  "[N, G, 16] for one expert or [experts, N, G, 16]")
    if s.shape != w.shape[:-1]:
        raise InvalidProblemError(f"scales has shape {s.shape}, expected {w.shape[:-1]}: one "
                                  f"a block of blocks {w.shape}")
    n, groups = math.prod(w.shape[:-2]), w.shape[-2]
    decode = Fp4DequantizeDescriptor(0, 0, 1, "mxfp4", "gpt-oss", DType.F32, stored_rows=True)
    arrays = {"w": np.ascontiguousarray(w).reshape(n, groups * 16),
              "scales": np.ascontiguousarray(s).reshape(n, groups)}
    return QuantizedWeight(decode, arrays, (n, groups * 32))


def _fp4_weight(fp4: str, checkpoint_format: str, arrays: tuple, names: tuple) -> QuantizedWeight:
    """A ``[N, K / 2]`` FP4 weight with a scale a block along a row (and a per-tensor f32
    scale where the format has one), ``names`` the caller's names of the three."""
    producer = PRODUCERS[fp4][checkpoint_format]
    w = _byte_codes(arrays[0], names[0], "uint8 (two e2m1 codes a byte)")
    if w.ndim != 2:
        raise InvalidProblemError(f"{names[0]} has shape {w.shape}; expected [N, K / 2]")
    n, k = w.shape[0], 2 * w.shape[1]
    if k % producer.block:
        raise InvalidProblemError(f"{names[0]} has shape {w.shape}: {k} values a row are not "
                                  f"whole blocks of {producer.block}")
    scale_kind = "float8_e4m3fn (or its uint8 codes)" if producer.scale == "e4m3" else "uint8"
    s = _byte_codes(arrays[1], names[1], scale_kind, e4m3=producer.scale == "e4m3")
    if s.shape != (n, k // producer.block):
        raise InvalidProblemError(f"{names[1]} has shape {s.shape}, expected "
                                  f"{(n, k // producer.block)}: one a block of "
                                  f"{producer.block} values of {names[0]} {w.shape}")
    kernel_arrays = {"w": w, "scales": s}
    if producer.global_scale:
        kernel_arrays["global_scale"] = _global_scale(arrays[2], names[2])
    decode = Fp4DequantizeDescriptor(0, 0, 1, fp4, checkpoint_format, DType.F32)
    return QuantizedWeight(decode, kernel_arrays, (n, k))


def _byte_codes(obj, name: str, what: str, e4m3: bool = False) -> np.ndarray:
    """``obj`` as uint8 codes (int8 viewed; an E4M3 scale's float8 values as their codes)."""
    arr = _host(obj, name)
    if arr.dtype == np.int8 or (e4m3 and arr.dtype.name == "float8_e4m3fn"):
        return np.ascontiguousarray(arr).view(np.uint8)
    if arr.dtype != np.uint8:
        raise InvalidProblemError(f"{name} has dtype {arr.dtype}; expected {what}")
    return arr


def _global_scale(obj, name: str) -> np.ndarray:
    """The per-tensor f32 scale (a float, or one f32 value) as ``[1]``."""
    if isinstance(obj, float):
        return np.array([obj], np.float32)
    arr = _host(obj, name)
    if arr.size != 1 or arr.dtype != np.float32:
        raise InvalidProblemError(f"{name} has dtype {arr.dtype} and shape {arr.shape}; it is "
                                  "one float32 value for the tensor")
    return arr.reshape(1)


# --- MLX --------------------------------------------------------------------------------

def mlx_weight(w_q, scales, biases, group_size: int = 64, bits: int = 4) -> QuantizedWeight:
    """An MLX affine weight (``mlx.dequantize``'s arguments, 2-D): ``F(F(q * scale) +
    bias)``, F the scales' dtype (f16, bf16 or f32), so its values are F's."""
    bits = check_int(bits, "bits", minimum=1)
    group_size = check_int(group_size, "group_size", minimum=1)
    q = _host(w_q, "w_q")
    if q.ndim != 2 or q.dtype not in (np.uint32, np.int32):
        raise InvalidProblemError(f"w_q has dtype {q.dtype} and shape {q.shape}; expected "
                                  "uint32 words [N, K * bits / 32]")
    sc, bi = _host(scales, "scales"), _host(biases, "biases")
    float_dtype = _MLX_FLOATS.get(sc.dtype.name)
    if float_dtype is None:
        raise InvalidProblemError(f"scales have dtype {sc.dtype}; MLX's are float16, bfloat16 "
                                  "or float32")
    if bi.dtype != sc.dtype:
        raise InvalidProblemError(f"biases have dtype {bi.dtype}; MLX keeps them in scales' "
                                  f"dtype ({sc.dtype})")
    if bits not in MLX_BITS or (q.shape[1] * 32) % bits:
        raise InvalidProblemError(f"bits={bits}: w_q rows of {q.shape[1]} words are not a "
                                  f"whole number of values of an MLX width "
                                  f"({', '.join(map(str, MLX_BITS))})")
    n, k = q.shape[0], q.shape[1] * 32 // bits
    MlxDequantizeDescriptor(n, k, group_size, bits, float_dtype)   # the group size is checked
    for arr, name in ((sc, "scales"), (bi, "biases")):
        if arr.shape != (n, k // group_size):
            raise InvalidProblemError(f"{name} has shape {arr.shape}, expected "
                                      f"{(n, k // group_size)} for {k} values a row in groups "
                                      f"of {group_size}")
    decode = MlxDequantizeDescriptor(0, 0, group_size, bits, float_dtype)
    return QuantizedWeight(decode, {"q": q.view(np.int32), "scales": sc, "biases": bi}, (n, k))


# --- shared -----------------------------------------------------------------------------

def _host(obj, name: str) -> np.ndarray:
    """A numpy view of a host array, CPU tensor or numpy scalar."""
    if cuda_runtime.is_cuda_array(obj):
        raise UnsupportedError(f"{name} is a CUDA array; the fused linear runs on the CPU: "
                               "pass host arrays (e.g. tensor.cpu())")
    if isinstance(obj, np.generic):
        return np.asarray(obj)
    return to_numpy(obj, name)


def _floats(obj, name: str, size: int) -> np.ndarray:
    """``size`` float values as f32 ``[size]`` (f16/bf16 widened exactly; a Python float
    rounded once, as ``torch.tensor(value)`` does)."""
    if isinstance(obj, (int, float)) and not isinstance(obj, bool):
        obj = np.array([obj], np.float32)
    arr = _host(obj, name)
    if arr.dtype.kind != "f" and arr.dtype.name != "bfloat16" or arr.dtype.itemsize > 4:
        raise InvalidProblemError(f"{name} has dtype {arr.dtype}; expected float32 (or a "
                                  "16-bit float)")
    if arr.size != size:
        raise InvalidProblemError(f"{name} has shape {arr.shape}, expected ({size},)")
    return arr.reshape(size).astype(np.float32, copy=False)


def _codes(obj, name: str, size: int) -> np.ndarray:
    """``size`` uint8 codes (double quantization's absmax) as ``[size]``."""
    arr = _host(obj, name)
    if arr.dtype != np.uint8 or arr.size != size:
        raise InvalidProblemError(f"{name} has dtype {arr.dtype} and shape {arr.shape}; with "
                                  f"nested_absmax (double quantization) it holds {size} uint8 "
                                  "codes, one a block")
    return arr.reshape(size)


def _matrix_shape(shape) -> tuple[int, int]:
    try:
        dims = tuple(shape)
    except TypeError:
        raise InvalidProblemError(f"shape={shape!r} is not a sequence of sizes") from None
    if len(dims) != 2:
        raise InvalidProblemError(f"shape={dims}: the linear reads a weight [N, K]")
    n, k = (check_int(d, f"shape[{i}]") for i, d in enumerate(dims))
    if math.prod((n, k)) > 2**62:
        raise InvalidProblemError(f"shape={dims} does not fit int64")
    return n, k


# --- HQQ ------------------------------------------------------------------------------

def hqq_weight(W_q, scale, zero, nbits: int, shape, group_size=None,
               axis: int = 1) -> QuantizedWeight:
    """An HQQ weight (``hqq.dequantize``'s arguments) ``[N, K]``, groups of ``group_size``
    along K (``axis=1``, HQQLinear's default): its packed planes unpacked to bytes."""
    from ..ir import HqqDequantizeDescriptor
    from . import hqq
    if axis != 1:
        raise UnsupportedError(f"axis={axis!r}: the fused linear reads HQQ's axis=1 weights "
                               "(groups along a row); dequantize this one instead")
    n, k = (check_int(v, "shape", minimum=0) for v in shape)
    gs = k if group_size is None else check_int(group_size, "group_size", minimum=1)
    if k % gs:
        raise InvalidProblemError(f"shape={tuple(shape)}: K={k} is not whole groups of "
                                  f"group_size={gs}")
    bits = check_int(nbits, "nbits", minimum=0)
    words = hqq.plane_words(_host(W_q, "W_q"), bits)
    planes, top = hqq.plane_layout(bits)
    rows, step = n * k // gs, words.shape[0]
    values = np.empty((rows, gs), np.uint8)
    for j in range(planes):
        first, last = j * step, min(rows, (j + 1) * step)
        if first >= last:
            break
        shift = top - bits * j if bits != 8 else 0
        field = (words[:last - first].astype(np.uint32) >> shift) & ((1 << bits) - 1)
        values[first:last] = field.astype(np.uint8)
    s = _host(scale, "scale").reshape(n, k // gs)
    z = _host(zero, "zero").reshape(n, k // gs)
    if s.dtype != z.dtype or s.dtype.name not in _MLX_FLOATS:
        raise InvalidProblemError(f"scale and zero are {s.dtype} and {z.dtype}; HQQ's share "
                                  "one float dtype (f16, bf16 or f32)")
    desc = HqqDequantizeDescriptor(0, 0, gs, _MLX_FLOATS[s.dtype.name], 8)
    return QuantizedWeight(desc, {"q": values.reshape(n, k), "scale": s, "zero_point": z},
                           (n, k))
