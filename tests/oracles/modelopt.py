"""ModelOpt's NVFP4 dequantize (nvidia-modelopt 0.47.0,
``modelopt/torch/quantization/qtensor/nvfp4_tensor.py``, ``NVFP4QTensor.dequantize`` with
``fast=False``), rewritten line for line in torch: ModelOpt itself is not installed with
the test extra (it pulls in a large dependency tree), and its dequantize is this much.

What matters for bit-exactness, as that code does it: the code table is float32 and maps
code 8 to +0.0 (not -0.0); the per-block scale is ``weight_scale.to(float32) *
weight_scale_2`` (one f32 product, the per-tensor scale multiplying); the values times
that scale are one f32 product, then ``.to(dtype)``.
"""

from __future__ import annotations

import torch

# ModelOpt's ``e2m1_values`` (torch.tensor of Python floats: float32; index 8 is +0).
E2M1_VALUES = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, 0, -0.5, -1, -1.5, -2, -3, -4, -6])


def nvfp4_dequantize(quantized_data: torch.Tensor, scale: torch.Tensor, double_scale,
                     shape, dtype: torch.dtype, block_size: int = 16) -> torch.Tensor:
    """``NVFP4QTensor(shape, dtype, quantized_data).dequantize(dtype, scale=scale,
    double_scale=double_scale, block_sizes={-1: block_size})``."""

    def _unpack_tensor(input: torch.Tensor):
        unpacked_shape = list(input.shape)
        unpacked_shape[-1] = unpacked_shape[-1] * 2
        unpacked = torch.empty(unpacked_shape, dtype=dtype, device=input.device)
        unpacked[..., 1::2] = input >> 4
        unpacked[..., 0::2] = input & 0x0F
        unpacked = unpacked.reshape(-1)
        unpacked = E2M1_VALUES.to(input.device)[unpacked.long()]
        return unpacked.reshape(unpacked_shape)

    q_per_block_scale = (scale.to(torch.float32) if scale.dtype == torch.float8_e4m3fn
                         else scale)
    per_block_quant_scale = double_scale
    per_block_scale = q_per_block_scale * per_block_quant_scale
    deq_data = _unpack_tensor(quantized_data)
    deq_data = deq_data.view((*tuple(deq_data.shape[:-1]), -1, block_size)) \
        * per_block_scale.unsqueeze(-1)
    return deq_data.reshape(shape).to(dtype)
