"""torchao's ``Int4Tensor`` (``Int4WeightOnlyConfig``, plain packing), rewritten in torch
where torchao leans on a package that is not installed here.

torchao 0.18.0 builds an ``Int4Tensor`` with mslk's ``int4_row_quantize_zp`` and
``pack_int4`` (``mslk.quantize.shuffle``; earlier ``fbgemm_gpu.experimental.gen_ai``):
mslk ships CUDA kernels only and is not a dependency of the tests, so both are rewritten
here: the same torch operations in the same order (the bits follow). torchao has no dequantize
of its own for the tensor (``Int4Tensor.dequantize`` raises ``NotImplementedError``): the
weight's values are what its linear multiplies with, mslk's ``bf16i4bf16_rowwise``, a
CUTLASS SM90 mixed-input GEMM whose mainloop (``MixedInputUtils::dequantize_A_kblock``,
``ConvertAndScaleWithZero``) converts the signed 4-bit value to the scale's type F and
computes ``q * scale + zero`` there: a product rounded to F, then a sum rounded to F
(``cutlass::bfloat16_t``/``half_t`` operators; ``float`` for f32 scales). ``dequantize``
below is that, on torch's CPU tensors of F (each op computed in f32 and rounded to F once).
"""

from __future__ import annotations

import torch


def pack_int4(x: torch.Tensor) -> torch.Tensor:
    """mslk's ``pack_int4``: int8 values ``[N, K]`` -> int8 ``[N, K / 2]``, column ``2k``
    in the low nibble (its sign bits dropped), column ``2k + 1`` shifted into the high one."""
    even, odd = x[:, 0::2].to(torch.int16), x[:, 1::2].to(torch.int16)
    return (((odd << 4) | (even & 0xF)) & 0xFF).to(torch.uint8).view(torch.int8).contiguous()


def int4_row_quantize_zp(x: torch.Tensor, group_size: int = 128):
    """mslk's ``int4_row_quantize_zp`` (asymmetric, 16 levels over each group's range):
    ``(q int8 [N, K] in [-8, 7], scale f32 [K / group_size, N], zero f32 [K / group_size,
    N])``, ``zero`` the value at q = 0. The same f32 operations in the same order, each
    its own torch op (nothing fused): ``scale = clamp(max - min, 1e-6) / 15``, ``zero =
    min + scale * 8``, ``q = clamp(round((x - min) / scale), 0, 15) - 8``."""
    n, k = x.shape
    groups = x.to(torch.float32).reshape(n, k // group_size, group_size)
    lo = groups.amin(dim=-1, keepdim=True)
    hi = groups.amax(dim=-1, keepdim=True)
    scale = torch.clamp(hi - lo, min=1e-6) / 15
    zero = lo + scale * 8
    levels = torch.clamp(torch.round((groups - lo) / scale), 0, 15)
    q = (levels - 8).to(torch.int8).reshape(n, k)
    return q, scale.reshape(n, -1).t().contiguous(), zero.reshape(n, -1).t().contiguous()


def unpack_int4(qdata: torch.Tensor) -> torch.Tensor:
    """``[..., K / 2]`` packed bytes -> int16 values ``[..., K]`` in [-8, 7]: a nibble
    ``n`` is ``(n ^ 8) - 8`` (two's complement), the low nibble first."""
    b = qdata.to(torch.int16) & 0xFF
    low = ((b & 0xF) ^ 8) - 8
    high = (((b >> 4) & 0xF) ^ 8) - 8
    return torch.stack((low, high), dim=-1).reshape(*qdata.shape[:-1], qdata.shape[-1] * 2)


def dequantize(qdata: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
               group_size: int) -> torch.Tensor:
    """``W = F(F(q * scale) + zero)`` ``[..., N, K]`` in F (scale's dtype) from ``qdata
    [..., N, K / 2]`` and the transposed ``scale``/``zero_point [..., K / group_size, N]``."""
    q = unpack_int4(qdata).to(scale.dtype)          # exact: |q| <= 8
    s = scale.transpose(-1, -2).repeat_interleave(group_size, dim=-1)
    z = zero_point.transpose(-1, -2).repeat_interleave(group_size, dim=-1)
    return q * s + z                                 # two F operations, no FMA
