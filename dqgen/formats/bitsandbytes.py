"""bitsandbytes' NF4/FP4 (``load_in_4bit``) and LLM.int8 (``load_in_8bit``) weights,
bit for bit what ``bitsandbytes.functional.dequantize_4bit`` and
``int8_vectorwise_dequant`` (then ``.to(dtype)``) return (FORMATS.md), from the tensors as
transformers saves them."""

from __future__ import annotations

import json
import math

import numpy as np

from ..arrays import shape_of, to_numpy
from ..errors import InvalidProblemError
from ..ir import check_int, parse_dtype
from ..layouts.bitsandbytes import (BNB_FLOAT_DTYPES, NESTED_BLOCKSIZE, Bnb4bitDescriptor,
                                    Bnb8bitDescriptor)
from ..runtime import cuda as cuda_runtime
from . import _inputs
from .plan import FormatPlan

QUANT_TYPES = ("nf4", "fp4")
# bitsandbytes.functional.get_4bit_type's tables, each divided by its largest magnitude
# in f32 as there (FP4's code 8 is +0: the table is built from the integer 0).
_NF4 = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0)
_FP4 = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0.0, -0.0625, -8.0, -12.0, -4.0, -6.0,
        -2.0, -3.0)
# QuantState's dtype names (str(torch dtype) less "torch.")
_DTYPE_NAMES = {"float16": "f16", "bfloat16": "bf16", "float32": "f32"}


def code_table(quant_type: str) -> np.ndarray:
    """The 16-entry f32 table bitsandbytes decodes ``quant_type`` (nf4 or fp4) with."""
    if quant_type not in QUANT_TYPES:
        raise InvalidProblemError(f"quant_type={quant_type!r} is not a bitsandbytes 4-bit type; "
                                  f"expected one of: {', '.join(QUANT_TYPES)}")
    data = np.array(_NF4 if quant_type == "nf4" else _FP4, np.float32)
    return data / np.abs(data).max()


def dequantize_4bit(weight, absmax, shape, blocksize=64, quant_type="nf4", quant_map=None,
                    nested_absmax=None, nested_quant_map=None, offset=None,
                    nested_blocksize=NESTED_BLOCKSIZE, dtype="bf16", device=None, out=None):
    """``bitsandbytes.functional.dequantize_4bit``: the tensor of ``shape`` (the logical
    ``[N, K]``, any number of dimensions) in ``dtype`` (bf16 default; f16, f32).

    ``weight``: the packed indices as stored (uint8 ``[ceil(numel / 2), 1]``, or any dtype
    and shape holding those bytes: ``quant_storage``), element ``2i`` in the high nibble of
    byte ``i`` of the flattened tensor. ``absmax``: f32, one a ``blocksize`` values of the
    flattened tensor; with double quantization (``compress_statistics``) uint8, decoded as
    ``nested_quant_map[absmax] * nested_absmax[block / nested_blocksize] + offset``.
    ``quant_map``: the 16-entry table (None: bitsandbytes' table of ``quant_type``).
    ``out``: an array of the result's dtype and shape to write instead of allocating one.
    """
    shape = _shape(shape)
    rows, cols = math.prod(shape[:-1]), shape[-1]   # leading dimensions are rows
    out_dtype = parse_dtype(dtype, "dtype", BNB_FLOAT_DTYPES)
    nested = nested_absmax is not None
    if nested and (nested_quant_map is None or offset is None):
        raise InvalidProblemError("nested_absmax is given: double quantization needs "
                                  "nested_quant_map and offset too")
    if not nested and (nested_quant_map is not None or offset is not None):
        raise InvalidProblemError("nested_quant_map and offset belong to double quantization: "
                                  "pass nested_absmax too")
    desc = Bnb4bitDescriptor(rows, cols, check_int(blocksize, "blocksize", minimum=1),
                             check_int(nested_blocksize, "nested_blocksize", minimum=1)
                             if nested else 0, out_dtype)
    w = _packed_bytes(weight, desc.packed_bytes, shape)
    code = code_table(quant_type) if quant_map is None else None
    arrays = {"w": w, "code": _small(quant_map if code is None else code, "quant_map", (16,),
                                     np.float32, weight),
              "absmax": _absmax(absmax, desc, nested, weight)}
    if nested:
        arrays["nested_code"] = _small(nested_quant_map, "nested_quant_map", (256,),
                                       np.float32, weight)
        arrays["nested_absmax"] = _small(nested_absmax, "nested_absmax",
                                         (desc.nested_blocks,), np.float32, weight)
        arrays["offset"] = _small(_offset(offset), "offset", (1,), np.float32, weight)
    y, result = _inputs.output((rows, cols), out_dtype, weight, out, result_shape=shape)
    arrays["y"] = y
    _inputs.run(FormatPlan, desc, arrays, weight, device, caller={"w": ("weight", weight)})
    return result() if out is not None else result().reshape(shape)


def dequantize_int8(weight, scb, dtype="bf16", device=None, out=None):
    """An LLM.int8 weight (``weight`` int8 ``[N, K]``, ``SCB`` f32 ``[N]``) as
    ``bitsandbytes.functional.int8_vectorwise_dequant(weight, SCB).to(dtype)``:
    ``F(f32(weight * SCB) * f32(1/127))`` in ``dtype`` (bf16 default; f16, f32)."""
    w = _inputs.array(weight, "weight", 2)
    if _inputs.dtype_of(w) != np.int8:
        raise InvalidProblemError(f"weight has dtype {_inputs.dtype_of(w)}; an LLM.int8 weight "
                                  "is int8")
    n, k = w.shape
    s = _inputs.array(scb, "SCB", len(shape_of(scb)))
    if _inputs.dtype_of(s) != np.float32:
        raise InvalidProblemError(f"SCB has dtype {_inputs.dtype_of(s)}; bitsandbytes keeps "
                                  "it f32 (one value a row)")
    if tuple(shape_of(scb)) not in ((n,), (n, 1)):
        raise InvalidProblemError(f"SCB has shape {tuple(shape_of(scb))}, expected ({n},): one "
                                  f"scale a row of weight {(n, k)}")
    out_dtype = parse_dtype(dtype, "dtype", BNB_FLOAT_DTYPES)
    desc = Bnb8bitDescriptor(n, k, out_dtype)
    y, result = _inputs.output((n, k), out_dtype, weight, out)
    _inputs.run(FormatPlan, desc, {"w": w, "scb": _inputs.reshaped(s, (n,)), "y": y}, weight,
                device, caller={"w": ("weight", weight), "scb": ("SCB", scb)})
    return result()


def from_state_dict(tensors, prefix: str) -> dict:
    """The keyword arguments of ``dequantize_4bit`` for the 4-bit layer ``prefix`` (e.g.
    ``model.layers.0.mlp.down_proj``) of a transformers/bitsandbytes state dict: its
    ``weight``, ``weight.absmax``, ``weight.quant_map``, the double-quantization tensors
    where present, and ``weight.quant_state.bitsandbytes__nf4|fp4`` (JSON bytes: shape,
    blocksize, dtype, quant_type, nested_blocksize, nested_offset).

    ``tensors`` is any mapping of names to arrays or tensors. The stored ``quant_map``
    must be bitsandbytes' own table of the type (bitsandbytes decodes with that and
    ignores the stored one), or the layer is refused.
    """
    p = prefix.rstrip(".") + ".weight"
    state_key, state = _quant_state(tensors, p)
    quant_type = state.get("quant_type")
    if quant_type not in QUANT_TYPES or state_key != f"{p}.quant_state.bitsandbytes__{quant_type}":
        raise InvalidProblemError(f"{state_key}: quant_type {quant_type!r} does not match "
                                  "the key (bitsandbytes__nf4 or bitsandbytes__fp4)")
    dtype = _DTYPE_NAMES.get(state.get("dtype"))
    if dtype is None:
        raise InvalidProblemError(f"{state_key}: dtype {state.get('dtype')!r} is not one of "
                                  f"{', '.join(_DTYPE_NAMES)}")
    shape = state.get("shape")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise InvalidProblemError(f"{state_key}: shape {shape!r} is not a list of sizes")
    blocksize = state.get("blocksize")
    if type(blocksize) is not int:
        raise InvalidProblemError(f"{state_key}: blocksize {blocksize!r} is not an integer")
    kwargs = {"weight": _tensor(tensors, p), "absmax": _tensor(tensors, f"{p}.absmax"),
              "shape": tuple(shape), "blocksize": blocksize, "quant_type": quant_type,
              "dtype": dtype}
    if f"{p}.quant_map" in tensors:
        _check_quant_map(tensors[f"{p}.quant_map"], f"{p}.quant_map", quant_type)
    if f"{p}.nested_absmax" in tensors:
        offset, nested = state.get("nested_offset"), state.get("nested_blocksize")
        if not isinstance(offset, (int, float)) or type(nested) is not int:
            raise InvalidProblemError(f"{state_key}: double quantization needs nested_offset (a "
                                      f"number) and nested_blocksize (an integer), got "
                                      f"{offset!r} and {nested!r}")
        kwargs.update(nested_absmax=_tensor(tensors, f"{p}.nested_absmax"),
                      nested_quant_map=_tensor(tensors, f"{p}.nested_quant_map"),
                      offset=float(offset), nested_blocksize=nested)
    return kwargs


def int8_from_state_dict(tensors, prefix: str) -> dict:
    """The keyword arguments of ``dequantize_int8`` for the LLM.int8 layer ``prefix``:
    its ``weight`` and ``SCB`` (``weight_format``, where stored, must be row-major: 0)."""
    p = prefix.rstrip(".")
    fmt = tensors.get(f"{p}.weight_format") if hasattr(tensors, "get") else None
    if fmt is not None and int(np.asarray(to_numpy(fmt, f"{p}.weight_format")).reshape(-1)[0]):
        raise InvalidProblemError(f"{p}.weight_format is not 0 (row-major), the only layout "
                                  "bitsandbytes loads")
    return {"weight": _tensor(tensors, f"{p}.weight"), "scb": _tensor(tensors, f"{p}.SCB")}


def is_4bit(tensors, prefix: str) -> bool:
    """Whether ``prefix`` names a bitsandbytes 4-bit layer of ``tensors``."""
    p = prefix.rstrip(".") + ".weight"
    return any(f"{p}.quant_state.bitsandbytes__{t}" in tensors for t in QUANT_TYPES)


def is_int8(tensors, prefix: str) -> bool:
    """Whether ``prefix`` names an LLM.int8 layer of ``tensors`` (a weight and its SCB)."""
    return f"{prefix.rstrip('.')}.SCB" in tensors


def dequantize_layer(tensors, prefix: str, dtype=None, device=None, out=None):
    """The weight of the bitsandbytes layer ``prefix`` (4-bit or LLM.int8), in ``dtype``;
    None: what bitsandbytes returns (4-bit: the dtype the layer was quantized from; int8:
    f32)."""
    if is_4bit(tensors, prefix):
        kwargs = from_state_dict(tensors, prefix)
        kwargs["dtype"] = kwargs["dtype"] if dtype is None else dtype
        return dequantize_4bit(**kwargs, device=device, out=out)
    if is_int8(tensors, prefix):
        return dequantize_int8(**int8_from_state_dict(tensors, prefix),
                               dtype="f32" if dtype is None else dtype, device=device, out=out)
    raise InvalidProblemError(f"{prefix} is not a bitsandbytes layer: no "
                              f"{prefix.rstrip('.')}.weight.quant_state.bitsandbytes__nf4|fp4 "
                              f"or {prefix.rstrip('.')}.SCB")


def _shape(shape) -> tuple[int, ...]:
    try:
        dims = tuple(shape)
    except TypeError:
        raise InvalidProblemError(f"shape={shape!r} is not a sequence of sizes") from None
    if not dims:
        raise InvalidProblemError("shape=() has no dimensions; pass the weight's [N, K]")
    return tuple(check_int(d, f"shape[{i}]") for i, d in enumerate(dims))


def _packed_bytes(weight, nbytes: int, shape):
    """``weight``'s bytes as uint8 ``[nbytes]`` (bitsandbytes stores them ``[nbytes, 1]``,
    or viewed as another ``quant_storage`` dtype)."""
    dims = shape_of(weight)
    arr = _inputs.array(weight, "weight", len(dims))
    size = math.prod(dims) * _inputs.dtype_of(arr).itemsize
    if size != nbytes:
        raise InvalidProblemError(f"weight has {size} bytes (shape {tuple(dims)}), expected "
                                  f"{nbytes}: two 4-bit values a byte for shape {shape}")
    return _inputs.view_as(_inputs.reshaped(arr, (size // _inputs.dtype_of(arr).itemsize,)),
                           np.dtype(np.uint8), "weight")


def _absmax(absmax, desc: Bnb4bitDescriptor, nested: bool, like):
    """One absmax a block: f32 (f16/bf16 widened, as bitsandbytes does), or uint8 codes of
    double quantization."""
    arr = _inputs.array(absmax, "absmax", len(shape_of(absmax)))
    dtype = _inputs.dtype_of(arr)
    if nested and dtype != np.uint8:
        raise InvalidProblemError(f"absmax has dtype {dtype}; with nested_absmax (double "
                                  "quantization) it holds uint8 codes")
    if not nested and dtype == np.uint8:
        raise InvalidProblemError("absmax is uint8 (double-quantized): pass nested_absmax, "
                                  "nested_quant_map and offset too")
    if math.prod(shape_of(absmax)) != desc.num_blocks:
        raise InvalidProblemError(f"absmax has shape {tuple(shape_of(absmax))}, expected "
                                  f"({desc.num_blocks},): one absmax a {desc.blocksize}-value "
                                  f"block of the {desc.elements} values")
    return _small(absmax, "absmax", (desc.num_blocks,), np.uint8 if nested else np.float32, like)


def _small(obj, name: str, shape: tuple[int, ...], dtype, like):
    """A table or per-block array as ``dtype`` ``shape``, where ``like`` lives: host values
    are converted (float16/bfloat16 widen exactly), CUDA arrays must have it already."""
    if cuda_runtime.is_cuda_array(like):
        if not cuda_runtime.is_cuda_array(obj):
            return _to_device(np.asarray(_host_values(obj, name, shape, dtype)), like)
        arr = _inputs.array(obj, name, len(shape_of(obj)))
        if _inputs.dtype_of(arr) != np.dtype(dtype) or math.prod(shape_of(obj)) != math.prod(shape):
            raise InvalidProblemError(f"{name} has dtype {_inputs.dtype_of(arr)} and shape "
                                      f"{tuple(shape_of(obj))}, expected {np.dtype(dtype)} {shape}")
        return _inputs.reshaped(arr, shape)
    return _host_values(obj, name, shape, dtype)


def _host_values(obj, name: str, shape, dtype) -> np.ndarray:
    arr = np.asarray(to_numpy(obj, name) if not isinstance(obj, np.ndarray) else obj)
    if arr.size != math.prod(shape):
        raise InvalidProblemError(f"{name} has shape {arr.shape}, expected {shape}")
    if np.dtype(dtype) == np.uint8 and arr.dtype != np.uint8:
        raise InvalidProblemError(f"{name} has dtype {arr.dtype}, expected uint8")
    if np.dtype(dtype) == np.float32 and arr.dtype.kind != "f" and \
            arr.dtype.name != "bfloat16":
        raise InvalidProblemError(f"{name} has dtype {arr.dtype}, expected a float dtype")
    return np.ascontiguousarray(arr.reshape(shape).astype(dtype, copy=False))


def _to_device(host: np.ndarray, like):
    """A small host array copied to ``like``'s CUDA device (torch or CuPy)."""
    if cuda_runtime.is_torch_cuda(like):
        import torch
        return torch.from_numpy(host.copy()).to(like.device)
    if type(like).__module__.startswith("cupy"):
        import cupy
        with cupy.cuda.Device(like.device.id):
            return cupy.asarray(host)
    raise InvalidProblemError("with a CUDA weight that is neither torch nor CuPy, pass "
                              "quant_map, absmax and the nested arrays as CUDA arrays too")


def _offset(offset):
    """Double quantization's offset as f32 (a Python float rounds once, as
    ``torch.tensor(float(offset))`` does)."""
    if isinstance(offset, (int, float, np.floating)):
        return np.array([offset], np.float32)
    return offset


def _tensor(tensors, key: str):
    if key not in tensors:
        raise InvalidProblemError(f"{key} is missing")
    return tensors[key]


def _quant_state(tensors, p: str) -> tuple[str, dict]:
    """The key and JSON object of the layer's packed quant state."""
    keys = [f"{p}.quant_state.bitsandbytes__{t}" for t in QUANT_TYPES if
            f"{p}.quant_state.bitsandbytes__{t}" in tensors]
    if len(keys) != 1:
        raise InvalidProblemError(f"{p}.quant_state.bitsandbytes__nf4 (or __fp4) is missing"
                                  if not keys else f"{p} has both {keys[0]} and {keys[1]}")
    raw = np.asarray(to_numpy(tensors[keys[0]], keys[0]))
    try:
        state = json.loads(bytes(raw.astype(np.uint8).reshape(-1)).decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise InvalidProblemError(f"{keys[0]} is not JSON text as bitsandbytes packs it") from None
    if not isinstance(state, dict):
        raise InvalidProblemError(f"{keys[0]} is not a JSON object")
    return keys[0], state


def _check_quant_map(quant_map, key: str, quant_type: str) -> None:
    """Refuse a stored table bitsandbytes would not decode with (it uses its own)."""
    stored = np.asarray(to_numpy(quant_map, key)).astype(np.float32).reshape(-1)
    want = code_table(quant_type)
    if stored.shape != want.shape or not np.array_equal(stored, want):
        raise InvalidProblemError(f"{key} is not bitsandbytes' {quant_type} table; bitsandbytes "
                                  f"decodes {quant_type} with its own table, so this layer is "
                                  "ambiguous (pass quant_map to dequantize_4bit to use the "
                                  "stored one)")
