"""A quantized weight as one object: its arrays, its format and its logical shape
``[N, K]``, so readers (a GGUF tensor, checkpoint tensors, the per-format functions' inputs)
hand one thing to ``dequantize`` and to the fused ``linear``.

The arrays are kept as the format's dequantize kernel reads them (views of the caller's
arrays where they already are: nothing is copied but what must be converted, such as the
family's scales widened to f32 once, exactly). ``linear`` multiplies with the weight
without writing it out (``layouts/linear.py``); each weight keeps the plans of the row
counts it has seen, so a decode loop pays the plan's own check and launch only.
"""

from __future__ import annotations

import functools
import json
import math

import numpy as np

from ..aot_selection import descriptor_from_record
from ..arguments import arguments as kernel_arguments
from ..arrays import shape_of, to_numpy
from ..errors import InvalidProblemError, UnsupportedError
from ..ir import (GGML_BLOCK_BYTES, DequantizePerGroupDescriptor, DType,
                  GgmlDequantizeDescriptor, parse_dtype, parse_ggml_type)
from ..layouts.fp8 import Fp8BlockDescriptor
from ..layouts import linear_int8
from ..layouts.linear import COMPUTES, LINEAR_DTYPES, LinearDescriptor
from ..jit import descriptor_record
from ..lower import lower
from . import _inputs
from .plan import FormatPlan

_DTYPE_OF = {np.dtype(d.np_dtype): d for d in LINEAR_DTYPES}


class QuantizedWeight:
    """A weight ``[N, K]`` in a quantized format: ``descriptor`` (the format's f32 decode),
    ``arrays`` (by the decode kernel's argument names) and ``shape``. ``column_order``
    (act-order GPTQ): the stored column ``j`` is the weight's column ``column_order[j]``,
    so ``linear`` reads ``x[..., column_order]`` and sums in the stored order."""

    def __init__(self, descriptor, arrays: dict, shape, column_order=None) -> None:
        n, k = (int(v) for v in shape)
        self.shape = (n, k)
        self.column_order = None
        if column_order is not None:
            order = np.ascontiguousarray(to_numpy(column_order, "column_order"), np.int64)
            if order.shape != (k,) or not np.array_equal(np.sort(order), np.arange(k)):
                raise InvalidProblemError(f"column_order must be a permutation of the {k} "
                                          "columns")
            self.column_order = order
        self._base = LinearDescriptor(descriptor, 0, n, k)  # the format reads, k fits it
        self.descriptor = self._base.view.decode
        sized = self._base.view.sized(n, k)
        self._sized = sized
        expected, _ = kernel_arguments(sized, lower(sized, "c", "generic"))
        self.arrays = {}
        for arg in expected:
            if arg.is_out:
                continue
            if arg.name not in arrays:
                raise InvalidProblemError(f"a {self.format} weight needs {arg.name}")
            arr = to_numpy(arrays[arg.name], arg.name)
            if arr.shape != arg.shape:
                raise InvalidProblemError(f"{arg.name} has shape {arr.shape}; a {self.format} "
                                          f"weight {self.shape} needs {arg.shape}")
            if arr.dtype != arg.dtype:
                raise InvalidProblemError(f"{arg.name} has dtype {arr.dtype}; a {self.format} "
                                          f"weight needs {arg.dtype}")
            self.arrays[arg.name] = np.ascontiguousarray(arr)
        self._dequantize_plan = None
        self._plans: dict = {}

    # --- readers --------------------------------------------------------------------

    @classmethod
    def per_group(cls, q, scale, zero_point, group_size: int, int_dtype=None):
        """The family's ``W = C(q - zero_point) * C(scale)`` (groups along K): ``q [N, K]``
        s8/u8, or packed ``[N, K / 2]`` bytes with ``int_dtype="u4"|"s4"``; ``scale`` and
        ``zero_point`` ``[N, K / group_size]``."""
        q = to_numpy(q, "q")
        storage = parse_dtype(int_dtype or q.dtype.name.replace("int", "s").replace("us", "u"),
                              "int_dtype", (DType.S8, DType.U8, DType.U4, DType.S4))
        if q.ndim != 2:
            raise InvalidProblemError(f"q must be [N, K], got shape {q.shape}")
        n, k = q.shape[0], q.shape[1] * (2 if storage.is_packed else 1)
        if storage.is_packed:
            q = q.view(np.uint8)
        desc = DequantizePerGroupDescriptor(0, 0, group_size, DType.F32, storage)
        scale = to_numpy(scale, "scale").astype(np.float32)
        zp = to_numpy(zero_point, "zero_point")
        if zp.dtype.kind not in "iu":
            raise InvalidProblemError(f"zero_point has dtype {zp.dtype}; the family's zero "
                                      "points are integers")
        return cls(desc, {"q": q, "scale": scale, "zero_point": zp.astype(np.int32)}, (n, k))

    @classmethod
    def from_tensors(cls, format_json: str, tensors, shape):
        """The weight a ``format_json`` text and its arrays (in the decode kernel's order,
        as ``QuantLinear`` holds them) name."""
        descriptor, names = format_from_json(format_json)
        tensors = list(tensors)
        if len(tensors) != len(names):
            raise InvalidProblemError(f"{len(tensors)} arrays given; this format takes "
                                      f"{len(names)} ({', '.join(names)})")
        return cls(descriptor, dict(zip(names, tensors)), shape)

    @classmethod
    def ggml(cls, data, qtype, shape):
        """A GGML tensor of ``qtype`` ("Q4_0", ...) holding ``shape = (N, K)`` values (its
        raw bytes, as a GGUF file stores them)."""
        layout = parse_ggml_type(qtype)
        n, k = (int(v) for v in shape)
        desc = GgmlDequantizeDescriptor(0, layout, DType.F32)
        values = desc.group_size
        if k % values:
            raise InvalidProblemError(f"shape {tuple(shape)}: K={k} is not a multiple of "
                                      f"{values}, the values of a {qtype} block")
        raw = to_numpy(data, "data").reshape(-1).view(np.uint8)
        want = n * k // values * GGML_BLOCK_BYTES[layout]
        if raw.size != want:
            raise InvalidProblemError(f"data holds {raw.size} bytes; {qtype} {n} x {k} is "
                                      f"{want}")
        return cls(desc, {"data": raw.reshape(-1, GGML_BLOCK_BYTES[layout])}, (n, k))

    @classmethod
    def fp8(cls, weight, scale, block_size=(128, 128), fp8=None):
        """FP8 values ``[N, K]`` with a scale a ``block_size`` block (as
        ``dqgen.formats.fp8.dequantize`` takes them)."""
        from .fp8 import codes, scale_dtype
        w, encoding = codes(weight, fp8)
        n, k = w.shape
        rows, cols = (int(b) for b in block_size)
        desc = Fp8BlockDescriptor(0, 0, rows, cols, encoding, scale_dtype(scale), DType.F32)
        s = to_numpy(scale, "scale")
        sized = Fp8BlockDescriptor(n, k, rows, cols, encoding, desc.scale_dtype, DType.F32)
        return cls(desc, {"w": w, "scales": s.reshape(sized.scale_shape)}, (n, k))

    def rows(self, order) -> "QuantizedWeight":
        """The weight with its rows in ``order`` (row ``i`` of the result is row
        ``order[i]``): each row's bytes moved whole, for formats whose rows are their own."""
        order = np.asarray(order, np.int64)
        n, k = self.shape
        if order.shape != (n,) or not np.array_equal(np.sort(order), np.arange(n)):
            raise InvalidProblemError(f"order must be a permutation of the {n} rows")
        view = self._base.view
        arrays = {}
        for name, arr in self.arrays.items():
            s = view.slices[name]
            if s.row_block == 0:   # shared by every row (a code table, a tensor's scale)
                arrays[name] = arr
                continue
            if s.row_block != 1:
                raise UnsupportedError(f"the rows of a {self.format} weight share {name}: "
                                       "they cannot be reordered one by one")
            arrays[name] = arr.reshape(n, -1)[order].reshape(arr.shape)
        return QuantizedWeight(self.descriptor, arrays, self.shape, self.column_order)

    # --- what it is -----------------------------------------------------------------

    @property
    def format(self) -> str:
        return self._base.layout.value

    @property
    def nbytes(self) -> int:
        """Bytes of the quantized arrays."""
        return sum(a.nbytes for a in self.arrays.values())

    @property
    def format_json(self) -> str:
        """The format as text (the decode descriptor's record): what ``dqgen.torch.linear``
        and ``QuantLinear`` carry to name it."""
        return json.dumps(descriptor_record(self.descriptor), sort_keys=True)

    def __repr__(self) -> str:
        return f"QuantizedWeight({self.format}, shape={self.shape}, {self.nbytes} bytes)"

    # --- use ------------------------------------------------------------------------

    def dequantize(self, dtype="f32"):
        """The weight ``[N, K]`` in ``dtype`` (f32, f16, bf16): the format's f32 values,
        rounded once."""
        out_dtype = parse_dtype(dtype, "dtype", LINEAR_DTYPES)
        plan = self._dequantize_plan
        if plan is None:
            plan = self._dequantize_plan = FormatPlan.select(self._sized, device="cpu")
        out = next(a for a in plan.arguments if a.is_out)
        y = np.empty(out.shape, out.dtype)
        plan.run({**self.arrays, out.name: y})
        y = y.reshape(self.shape)
        if self.column_order is not None:
            stored, y = y, np.empty_like(y)
            y[:, self.column_order] = stored
        return y.astype(out_dtype.np_dtype)

    def linear(self, x, bias=None, out_dtype=None, out=None, compute="f32"):
        """``x @ W.T (+ bias)``: see ``dqgen.linear``."""
        return linear(x, self, bias, out_dtype, out, compute)


@functools.lru_cache(maxsize=512)
def linear_plan(descriptor, n: int, k: int, m: int, x_dtype: DType, y_dtype: DType,
                bias: bool, transpose: bool = False, device: str = "cpu",
                compute: str = "f32") -> FormatPlan:
    """The plan of one linear problem on ``device`` (kept: a decode loop asks for the
    same few)."""
    return FormatPlan.select(LinearDescriptor(descriptor, m, n, k, x_dtype, y_dtype, bias,
                                              transpose, compute), device=device)


def format_from_json(text: str):
    """The decode descriptor a ``format_json`` text names, and its input arrays' names in
    the kernel's order."""
    try:
        record = json.loads(text)
    except (TypeError, ValueError) as exc:
        raise InvalidProblemError(f"format {text!r} is not a weight format record: {exc}") \
            from None
    descriptor = descriptor_from_record(record)
    spec = lower(descriptor, "c", "generic")
    return descriptor, tuple(p.name for p in spec.params if p.role == "in")


def check_compute(weight: QuantizedWeight | None, compute: str) -> None:
    """``compute`` is one the linear knows and, for ``weight``, one it can run."""
    if compute not in COMPUTES:
        raise InvalidProblemError(f"compute={compute!r} is not one of "
                                  f"{', '.join(map(repr, COMPUTES))}")
    if weight is not None and compute == "int8":
        linear_int8.weight_view(weight.descriptor)   # names a format it does not read


def compute_for(weight: QuantizedWeight, compute: str) -> str:
    """``compute``, or "f32" where the int8 linear does not read ``weight``'s format."""
    return "f32" if compute == "int8" and not linear_int8.reads(weight.descriptor) else compute


def x_dtype_of(arr: np.ndarray, name: str = "x") -> DType:
    dtype = _DTYPE_OF.get(arr.dtype)
    if dtype is None:
        raise InvalidProblemError(f"{name} has dtype {arr.dtype}; the linear kernel takes f32, "
                                  "f16 or bf16")
    return dtype


def linear(x, weight: QuantizedWeight, bias=None, out_dtype=None, out=None, compute="f32"):
    """``y = x @ W.T (+ bias)`` with ``W`` the quantized ``weight [N, K]``, never written
    out: ``x [..., K]`` f32, f16 or bf16 (numpy, ml_dtypes or a CPU torch tensor), ``bias
    [N]`` of x's dtype, ``y [..., N]`` in ``out_dtype`` (default x's). Sums in f32 in the
    fixed order of SPEC.md §8, bit-identical on every thread count and ISA.

    ``compute="int8"`` (GGML weights, CPU) quantizes x to int8 in blocks of 32 and
    multiplies integers, as llama.cpp does (SPEC.md §9): several times faster at small M,
    x rounded to about 1/254 of its block's largest value."""
    if not isinstance(weight, QuantizedWeight):
        raise InvalidProblemError(f"weight must be a dqgen QuantizedWeight, got "
                                  f"{type(weight).__name__}")
    n, k = weight.shape
    arr = to_numpy(x, "x")
    x_dtype = x_dtype_of(arr)
    if arr.ndim < 1 or arr.shape[-1] != k:
        raise InvalidProblemError(f"x has shape {arr.shape}; its last axis must be K={k} "
                                  f"(the weight is {n} x {k})")
    lead = arr.shape[:-1]
    m = math.prod(lead)
    y_dtype = x_dtype if out_dtype is None else parse_dtype(out_dtype, "out_dtype", LINEAR_DTYPES)
    arrays = dict(weight.arrays)
    if weight.column_order is not None:
        arr = np.take(arr, weight.column_order, axis=-1)
    arrays["x"] = np.ascontiguousarray(arr).reshape(m, k)
    if bias is not None:
        b = to_numpy(bias, "bias")
        if b.shape != (n,):
            raise InvalidProblemError(f"bias has shape {b.shape}, expected ({n},)")
        arrays["bias"] = b.astype(arr.dtype, copy=False)
    y, result = _inputs.output((m, n), y_dtype, x, out, lead + (n,))
    arrays["y"] = y
    key = (m, x_dtype, y_dtype, bias is not None, compute)
    plan = weight._plans.get(key)   # a weight's own few: no descriptor hashed a call
    if plan is None:
        plan = weight._plans[key] = linear_plan(weight.descriptor, n, k, m, x_dtype, y_dtype,
                                                bias is not None, compute=compute)
    plan.run(arrays)
    out_value = result()
    return out_value if out is not None else _reshape(out_value, lead + (n,))


def _reshape(value, shape):
    return value.reshape(shape) if tuple(shape_of(value)) != tuple(shape) else value
