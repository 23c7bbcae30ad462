"""The fused linear's kernel for the ``dqgen::linear`` op (``run_linear``: ``dqgen.torch``
registers it) and the modules on it: ``QuantLinear`` (an ``nn.Linear`` whose weight stays
quantized) and ``quantize_model`` (a transformers model's linears swapped for them, read
from a GGUF file without a float copy of any weight).

A ``QuantLinear`` holds the weight's arrays as buffers (``torch.from_numpy`` views of what
the reader returned: no copy) and its format as text; ``forward`` is one ``dqgen::linear``
call, so ``torch.compile(fullgraph=True)`` and ``torch.export`` trace it, and autograd
gives x's gradient by the transposed fused kernel (the weight is frozen, as in QLoRA).
"""

from __future__ import annotations

import functools
import re
import warnings
from typing import List, Optional

import ml_dtypes
from pathlib import Path

import numpy as np
import torch

from .errors import InvalidProblemError, UnsupportedError
from .formats import weight as weight_mod
from .formats.weight import QuantizedWeight
from .ir import DType


@functools.lru_cache(maxsize=256)
def _weight_format(fmt: str):
    """The decode descriptor and input names a format string names (parsed once)."""
    return weight_mod.format_from_json(fmt)


_LINEAR_DTYPES = {torch.float32: DType.F32, torch.float16: DType.F16,
                  torch.bfloat16: DType.BF16}
_LINEAR_PLANS: dict = {}
_NUMPY_DTYPES = {torch.float32: np.float32, torch.float16: np.float16,
                 torch.bfloat16: ml_dtypes.bfloat16}


def host_view(t: torch.Tensor):
    """A contiguous CPU tensor as a numpy view (bfloat16 through ml_dtypes)."""
    if t.dtype is torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _linear_dtype(dtype, name: str) -> DType:
    found = _LINEAR_DTYPES.get(dtype)
    if found is None:
        raise InvalidProblemError(f"{name} is {dtype}; dqgen::linear takes float32, float16 "
                                  "or bfloat16")
    return found


def _linear_plan(fmt: str, n: int, k: int, m: int, x_dtype, y_dtype, bias: bool,
                 transpose: bool, device: str = "cpu", compute: str = "f32"):
    """The plan of one problem, by keys that hash fast (a decode loop asks every token)."""
    key = (fmt, n, k, m, x_dtype, y_dtype, bias, transpose, device, compute)
    plan = _LINEAR_PLANS.get(key)
    if plan is None:
        descriptor, _ = _weight_format(fmt)
        plan = weight_mod.linear_plan(descriptor, n, k, m, _linear_dtype(x_dtype, "x"),
                                      _linear_dtype(y_dtype, "out_dtype"), bias, transpose,
                                      device, compute)
        if len(_LINEAR_PLANS) >= 1024:
            _LINEAR_PLANS.clear()
        _LINEAR_PLANS[key] = plan
    return plan


def run_linear(x: torch.Tensor, weight: List[torch.Tensor], fmt: str, n: int, k: int,
                bias: Optional[torch.Tensor], out_dtype: Optional[torch.dtype],
                transpose: bool, column_order: Optional[torch.Tensor] = None,
                compute: str = "f32") -> torch.Tensor:
    """``dqgen::linear``'s kernel (and ``linear_backward``'s with ``transpose``): checks,
    the plan of this problem, the tensors as numpy views (CUDA tensors by address, on the
    current stream), the run."""
    descriptor, names = _weight_format(fmt)
    if x.device.type not in ("cpu", "cuda"):
        raise UnsupportedError(f"dqgen::linear runs on the CPU or a CUDA device, not "
                               f"{x.device.type}")
    if len(weight) != len(names):
        raise InvalidProblemError(f"weight has {len(weight)} tensors; this format takes "
                                  f"{len(names)} ({', '.join(names)})")
    last = n if transpose else k
    if x.dim() < 1 or x.shape[-1] != last:
        raise InvalidProblemError(f"x has shape {tuple(x.shape)}; its last axis must be {last}")
    y_dtype = x.dtype if out_dtype is None else out_dtype
    lead = x.shape[:-1]
    if column_order is not None and not transpose:
        x = x.index_select(-1, column_order)
    xs = x.detach() if x.requires_grad else x
    if xs.dim() != 2:
        xs = xs.reshape(-1, last)
    m = xs.shape[0]
    if x.device.type == "cuda":
        return _run_linear_cuda(x, xs, weight, names, fmt, n, k, bias, y_dtype, transpose,
                                column_order, lead, compute)
    plan = _linear_plan(fmt, n, k, m, x.dtype, y_dtype, bias is not None, transpose,
                        compute=compute)
    y = torch.empty((m, k if transpose else n), dtype=y_dtype)
    # the plan refuses a non-contiguous array by name; buffers and x rows normally are
    arrays = {name: host_view(t if not t.requires_grad else t.detach())
              for name, t in zip(names, weight)}
    arrays["x"] = host_view(xs if xs.is_contiguous() else xs.contiguous())
    if bias is not None:
        if tuple(bias.shape) != (n,):
            raise InvalidProblemError(f"bias has shape {tuple(bias.shape)}, expected ({n},)")
        arrays["bias"] = host_view(bias.detach().to(x.dtype).contiguous())
    arrays["y"] = host_view(y)
    plan.run(arrays)
    if column_order is not None and transpose:   # stored column j is column_order[j]
        y = torch.empty_like(y).index_copy_(1, column_order, y)
    return y if len(lead) == 1 else y.reshape(*lead, y.shape[-1])


def _run_linear_cuda(x, xs, weight, names, fmt, n, k, bias, y_dtype, transpose, column_order,
                     lead, compute):
    """``run_linear`` on x's CUDA device: the tensors stay there, the kernel runs on the
    device's current stream."""
    device = f"cuda:{x.device.index if x.device.index is not None else 0}"
    m = xs.shape[0]
    plan = _linear_plan(fmt, n, k, m, x.dtype, y_dtype, bias is not None, transpose, device,
                        compute)
    y = torch.empty((m, k if transpose else n), dtype=y_dtype, device=x.device)
    arrays = {name: t.detach().contiguous() for name, t in zip(names, weight)}
    arrays["x"] = xs.contiguous()
    if bias is not None:
        if tuple(bias.shape) != (n,):
            raise InvalidProblemError(f"bias has shape {tuple(bias.shape)}, expected ({n},)")
        arrays["bias"] = bias.detach().to(x.dtype).contiguous()
    arrays["y"] = y
    plan.run(arrays, stream=torch.cuda.current_stream(x.device))
    if column_order is not None and transpose:
        y = torch.empty_like(y).index_copy_(1, column_order.to(y.device), y)
    return y if len(lead) == 1 else y.reshape(*lead, y.shape[-1])


class QuantLinear(torch.nn.Module):
    """``y = x @ W.T + bias`` with ``W [out_features, in_features]`` a ``QuantizedWeight``;
    ``compute="int8"`` (CPU) quantizes x to int8 a block and multiplies integers (SPEC.md
    §9)."""

    def __init__(self, weight: QuantizedWeight, bias=None, compute: str = "f32") -> None:
        super().__init__()
        if not isinstance(weight, QuantizedWeight):
            raise InvalidProblemError(f"QuantLinear takes a dqgen QuantizedWeight, got "
                                      f"{type(weight).__name__}")
        weight_mod.check_compute(weight, compute)
        self.compute = compute
        self.out_features, self.in_features = weight.shape
        self.format = weight.format_json
        self._names = tuple(weight.arrays)
        order = weight.column_order
        self.register_buffer("column_order", None if order is None else torch.from_numpy(order))
        for name, arr in weight.arrays.items():
            with warnings.catch_warnings():  # a mapped file is read-only; nothing writes it
                warnings.filterwarnings("ignore", "The given NumPy array is not writable")
                self.register_buffer(f"weight_{name}", torch.from_numpy(arr))
        if bias is not None:
            bias = torch.as_tensor(bias)
            if tuple(bias.shape) != (self.out_features,):
                raise InvalidProblemError(f"bias has shape {tuple(bias.shape)}, expected "
                                          f"({self.out_features},)")
            self.bias = torch.nn.Parameter(bias.detach().clone())
        else:
            self.register_parameter("bias", None)

    @property
    def weight_tensors(self) -> list:
        buffers = self._buffers   # read directly: nn.Module's attribute lookup is slow
        return [buffers[f"weight_{name}"] for name in self._names]

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_host_weight", None)   # views of the buffers: remade after a load
        return state

    def _apply(self, fn, *args, **kwargs):
        # .to(), .cuda(), .half() replace the buffers: the views of the old ones must not
        # keep them alive
        self.__dict__.pop("_host_weight", None)
        return super()._apply(fn, *args, **kwargs)

    def _run_cpu(self, x, bias):
        """``run_linear``'s work where x is a contiguous 2-D CPU tensor and there is no
        column order, in fewer steps (a decode step calls this hundreds of times a token):
        the weight's numpy views are kept while its buffers are the same tensors at the same
        addresses, and y is numpy's. None where x is anything else."""
        buffers = self.__dict__["_buffers"]
        np_dtype = _NUMPY_DTYPES.get(x.dtype)
        if not (np_dtype is not None and x.is_cpu and x.dim() == 2
                and x.shape[1] == self.in_features and x.is_contiguous()
                and buffers["column_order"] is None):
            return None
        tensors = [buffers[f"weight_{name}"] for name in self._names]
        held = self.__dict__.get("_host_weight")
        if held is None or len(held[0]) != len(tensors) or any(
                t is not h or t.data_ptr() != p for t, (h, p) in zip(tensors, held[0])):
            if not all(t.is_cpu for t in tensors):
                return None
            held = ((tuple((t, t.data_ptr()) for t in tensors)),
                    {name: host_view(t.detach()) for name, t in zip(self._names, tensors)})
            self.__dict__["_host_weight"] = held
        m, n = x.shape[0], self.out_features
        plan = _linear_plan(self.format, n, self.in_features, m, x.dtype, x.dtype,
                            bias is not None, False, "cpu", self.compute)
        arrays = dict(held[1])
        arrays["x"] = host_view(x)
        if bias is not None:
            arrays["bias"] = host_view(bias.detach().contiguous())
        y = np.empty((m, n), np_dtype)
        arrays["y"] = y
        plan.run(arrays)
        return torch.from_numpy(y) if x.dtype is not torch.bfloat16 else \
            torch.from_numpy(y.view(np.int16)).view(torch.bfloat16)

    def forward(self, x):
        bias = self.bias
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        if (type(x) is torch.Tensor and not torch.compiler.is_compiling()
                and not (torch.is_grad_enabled()
                         and (x.requires_grad or (bias is not None and bias.requires_grad)))):
            # nothing to trace or differentiate: the op's kernel itself, without the
            # dispatcher's round trip (a decode step calls this hundreds of times a token)
            y = self._run_cpu(x, bias)
            if y is not None:
                return y
            return run_linear(x, self.weight_tensors, self.format, self.out_features,
                               self.in_features, bias, None, False,
                               self._buffers["column_order"], self.compute)
        return torch.ops.dqgen.linear(x, self.weight_tensors, self.format, self.out_features,
                                      self.in_features, bias, None, self.column_order,
                                      self.compute)

    def extra_repr(self) -> str:
        fmt = self.format.split('"layout": "')[-1].split('"')[0]
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, format={fmt}"
                + (f", compute={self.compute}" if self.compute != "f32" else ""))


# transformers' GGUF loader: GGUF tensor names -> the model's (llama architecture).
_GGUF_LLAMA = (
    (r"blk\.(\d+)\.attn_q\.weight", r"model.layers.\1.self_attn.q_proj"),
    (r"blk\.(\d+)\.attn_k\.weight", r"model.layers.\1.self_attn.k_proj"),
    (r"blk\.(\d+)\.attn_v\.weight", r"model.layers.\1.self_attn.v_proj"),
    (r"blk\.(\d+)\.attn_output\.weight", r"model.layers.\1.self_attn.o_proj"),
    (r"blk\.(\d+)\.ffn_gate\.weight", r"model.layers.\1.mlp.gate_proj"),
    (r"blk\.(\d+)\.ffn_up\.weight", r"model.layers.\1.mlp.up_proj"),
    (r"blk\.(\d+)\.ffn_down\.weight", r"model.layers.\1.mlp.down_proj"),
    (r"output\.weight", r"lm_head"),
)


def _gguf_module_name(tensor_name: str) -> str | None:
    for pattern, repl in _GGUF_LLAMA:
        if re.fullmatch(pattern, tensor_name):
            return re.sub(pattern, repl, tensor_name)
    return None


def _unpermute_rows(n_rows: int, n_head: int) -> np.ndarray:
    """The row order that undoes llama.cpp's Q/K permutation (convert_hf_to_gguf's
    ``permute``: each head's rows interleaved by halves), as transformers' GGUF loader
    undoes it: GGUF row ``perm[i]`` is the model's row ``i``."""
    dim = n_rows // n_head
    rows = np.arange(n_rows).reshape(n_head, 2, dim // 2).swapaxes(1, 2).reshape(-1)
    return np.argsort(rows)


def quantize_model(model, source, compute: str = "f32"):
    """Swap ``model``'s ``nn.Linear`` layers for ``QuantLinear``s read from ``source``, a
    GGUF file (llama architecture names, as transformers' GGUF loader maps them, the Q/K
    row permutation undone on the quantized rows), or a GPTQ or AWQ checkpoint (a
    directory, index or ``.safetensors`` file: layer ``P.qweight`` is module ``P``,
    repacked exactly by ``formats.weight_repack``). Layers the file holds in a float type
    or does not hold are left as they are. ``compute="int8"``: each layer whose weight the
    int8 linear reads computes so (SPEC.md §9), the others in f32. Returns the model."""
    weight_mod.check_compute(None, compute)
    if Path(source).is_dir() or Path(source).suffix in (".safetensors", ".json"):
        return _quantize_from_checkpoint(model, source, compute)
    from .formats import gguf
    file = gguf.open(source)
    heads = _int_field(file, "llama.attention.head_count")
    kv_heads = _int_field(file, "llama.attention.head_count_kv", heads)
    modules = dict(model.named_modules())
    swapped = 0
    for name in file:
        target = _gguf_module_name(name)
        linear = modules.get(target) if target else None
        if linear is None or not isinstance(linear, torch.nn.Linear):
            continue
        weight = file.quantized_weight(name)
        if weight is None:   # a float tensor: the model's own weight stays
            continue
        if weight.shape != (linear.out_features, linear.in_features):
            raise InvalidProblemError(f"{source}: {name} is {weight.shape}, the model's "
                                      f"{target} is {(linear.out_features, linear.in_features)}")
        if ".attn_q." in name or ".attn_k." in name:
            weight = weight.rows(_unpermute_rows(weight.shape[0], heads if ".attn_q." in
                                                 name else kv_heads))
        parent, _, leaf = target.rpartition(".")
        setattr(modules[parent] if parent else model, leaf,
                QuantLinear(weight, linear.bias.detach() if linear.bias is not None else None,
                            weight_mod.compute_for(weight, compute)))
        swapped += 1
    if not swapped:
        raise UnsupportedError(f"{source}: no quantized tensor of it matches a linear layer "
                               "of the model")
    return model


def _quantize_from_checkpoint(model, source, compute: str):
    """``quantize_model`` for a GPTQ or AWQ checkpoint: each layer by its module name."""
    from .formats.weight_repack import checkpoint_weights
    modules = dict(model.named_modules())
    for name, (weight, bias) in checkpoint_weights(source).items():
        linear = modules.get(name)
        if not isinstance(linear, torch.nn.Linear):
            raise InvalidProblemError(f"{source}: layer {name or '(top level)'} is not a "
                                      "torch.nn.Linear of the model")
        if weight.shape != (linear.out_features, linear.in_features):
            raise InvalidProblemError(f"{source}: {name} is {weight.shape}, the model's is "
                                      f"{(linear.out_features, linear.in_features)}")
        if bias is None and linear.bias is not None:
            bias = linear.bias.detach()
        parent, _, leaf = name.rpartition(".")
        setattr(modules[parent] if parent else model, leaf, QuantLinear(
            weight, None if bias is None else torch.as_tensor(bias),
            weight_mod.compute_for(weight, compute)))
    return model


def _int_field(file, key: str, default=None) -> int:
    value = file.metadata.get(key, default)
    if value is None:
        raise InvalidProblemError(f"the GGUF file has no {key}")
    return int(value)
