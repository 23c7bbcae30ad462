"""Modules on ``dqgen::linear``: ``QuantLinear`` (an ``nn.Linear`` whose weight stays
quantized) and ``quantize_model`` (a transformers model's linears swapped for them, read
from a GGUF file without a float copy of any weight).

A ``QuantLinear`` holds the weight's arrays as buffers (``torch.from_numpy`` views of what
the reader returned: no copy) and its format as text; ``forward`` is one ``dqgen::linear``
call, so ``torch.compile(fullgraph=True)`` and ``torch.export`` trace it, and autograd
gives x's gradient by the transposed fused kernel (the weight is frozen, as in QLoRA).
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import torch

from .errors import InvalidProblemError, UnsupportedError
from .formats.weight import QuantizedWeight


class QuantLinear(torch.nn.Module):
    """``y = x @ W.T + bias`` with ``W [out_features, in_features]`` a ``QuantizedWeight``."""

    def __init__(self, weight: QuantizedWeight, bias=None) -> None:
        super().__init__()
        if not isinstance(weight, QuantizedWeight):
            raise InvalidProblemError(f"QuantLinear takes a dqgen QuantizedWeight, got "
                                      f"{type(weight).__name__}")
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
        return [getattr(self, f"weight_{name}") for name in self._names]

    def forward(self, x):
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return torch.ops.dqgen.linear(x, self.weight_tensors, self.format, self.out_features,
                                      self.in_features, bias, None, self.column_order)

    def extra_repr(self) -> str:
        fmt = self.format.split('"layout": "')[-1].split('"')[0]
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, format={fmt}")


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


def quantize_model(model, source):
    """Swap ``model``'s ``nn.Linear`` layers for ``QuantLinear``s read from ``source``, a
    GGUF file (llama architecture names, as transformers' GGUF loader maps them, the Q/K
    row permutation undone on the quantized rows). Layers the file holds in a float type
    or does not hold are left as they are. Returns the model."""
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
                QuantLinear(weight, linear.bias.detach() if linear.bias is not None else None))
        swapped += 1
    if not swapped:
        raise UnsupportedError(f"{source}: no quantized tensor of it matches a linear layer "
                               "of the model")
    return model


def _int_field(file, key: str, default=None) -> int:
    value = file.metadata.get(key, default)
    if value is None:
        raise InvalidProblemError(f"the GGUF file has no {key}")
    return int(value)
