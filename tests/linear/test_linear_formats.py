"""The fused linear on bitsandbytes NF4/FP4 (plain and double-quantized absmax) and
LLM.int8, ModelOpt and compressed-tensors FP4, gpt-oss's MXFP4 experts, and MLX (f32, f16, bf16), read by
``dqgen.formats.weight_readers``: ``linear`` is bit for bit ``reference.linear`` of the
weight's f32 values, and those values are bit for bit the library's own dequantize in f32
(bitsandbytes' pure-torch kernels, ModelOpt's dequantize rewritten in
tests/oracles/modelopt.py, compressed-tensors' unpack and dequantize on f32, transformers'
``convert_moe_packed_tensors`` in f32; MLX: the
numpy oracle, its 16-bit values widened). Every weight has rows of their own scales, so a wrong row offset in a
format's linear view shows; the double-quantized weight has two nested blocks a row."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from dqgen import InvalidProblemError, UnsupportedError, reference
from dqgen.formats import weight_readers as readers
from dqgen.formats.weight import QuantizedWeight, linear
from dqgen.ir import DType
from dqgen.layouts.bitsandbytes import Bnb4bitDescriptor
from dqgen.layouts.fp4 import Fp4DequantizeDescriptor
from dqgen.layouts.linear import LinearDescriptor
from dqgen.layouts.mlx import MLX, MlxDequantizeDescriptor
from formats_util import assert_bits_equal

torch = pytest.importorskip("torch")
X_DTYPES = {"f32": np.float32, "bf16": ml_dtypes.bfloat16}
MS = (1, 3, 17)


def _bnb():
    return pytest.importorskip("bitsandbytes.functional",
                               reason="bitsandbytes (the oracle) is not installed")


def rows_apart(shape, seed):
    """A random f32 tensor whose rows have scales far apart (row r about 2^r)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * (2.0 ** torch.arange(shape[0]))[:, None]


# --- the weights and their library values in f32 --------------------------------------

def bnb4(shape, blocksize, quant_type, nested, seed=0):
    """A weight bitsandbytes' quantize_4bit wrote, and the library's f32 values of it: its
    pure-torch kernel on the absmax its dequantize_4bit decodes."""
    F = _bnb()
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    packed, state = F.quantize_4bit(rows_apart(shape, seed), blocksize=blocksize,
                                    quant_type=quant_type, compress_statistics=nested)
    absmax = state.absmax.float()
    kwargs = {}
    if nested:
        absmax = (F.dequantize_blockwise(state.absmax, state.state2) + state.offset).float()
        kwargs = dict(nested_absmax=state.state2.absmax, nested_quant_map=state.state2.code,
                      offset=state.offset.item(), nested_blocksize=state.state2.blocksize)
    weight = readers.bnb4_weight(packed, state.absmax, shape, blocksize, quant_type, **kwargs)
    kernel = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)
    code = F.get_4bit_type(quant_type, device="cpu")
    want = kernel(packed.view(torch.uint8).reshape(-1), absmax, code, blocksize, state.shape,
                  torch.float32)
    return weight, want.numpy()


def int8(shape, seed=1):
    F = _bnb()
    cb, scb, _ = F.int8_vectorwise_quant(rows_apart(shape, seed))
    return readers.int8_weight(cb, scb), F.int8_vectorwise_dequant(cb, scb).numpy()


def fp4_arrays(rng, n, k, block, e4m3):
    """Random e2m1 codes, and random scale codes with no NaN (E4M3) or infinite (E8M0)
    scale, so the sums stay comparable."""
    w = rng.integers(0, 256, (n, k // 2), dtype=np.uint8)
    if e4m3:
        s = rng.integers(0, 0x7F, (n, k // block), dtype=np.uint8)
        s[:, 0] = 0x20 + 8 * np.arange(n)          # each row's first block its own scale
        s |= rng.integers(0, 2, s.shape, dtype=np.uint8) << 7
    else:
        s = (100 + 3 * np.arange(n)[:, None] + rng.integers(0, 20, (n, k // block))).astype(np.uint8)
    return w, s


def nvfp4_modelopt(n=4, k=48):
    from oracles.modelopt import nvfp4_dequantize
    w, s = fp4_arrays(np.random.default_rng(2), n, k, 16, True)
    gs = np.array([0.37], np.float32)
    want = nvfp4_dequantize(torch.from_numpy(w), torch.from_numpy(s).view(torch.float8_e4m3fn),
                            torch.from_numpy(gs).reshape(()), (n, k), torch.float32)
    return readers.nvfp4_weight(w, s.view(ml_dtypes.float8_e4m3fn), gs), want.numpy()


def _ct_library(w, scale, n, k, block, global_scale=None):
    """compressed-tensors' decompress of a packed FP4 weight, on f32 (the library's
    decompress itself unpacks to bf16): its unpack and dequantize."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize
    args = QuantizationArgs(num_bits=4, type="float", group_size=block, symmetric=True,
                            strategy="tensor_group" if global_scale is not None else "group")
    values = unpack_fp4_from_uint8(torch.from_numpy(w), n, k, dtype=torch.float32)
    return dequantize(x_q=values, scale=scale, args=args, global_scale=global_scale,
                      dtype=torch.float32).numpy()


def ct_nvfp4(n=5, k=32):
    w, s = fp4_arrays(np.random.default_rng(3), n, k, 16, True)
    gs = np.array([3.5], np.float32)
    scale = torch.from_numpy(s).view(torch.float8_e4m3fn).to(torch.float32)
    want = _ct_library(w, scale, n, k, 16, torch.from_numpy(gs))
    return readers.ct_nvfp4_weight(w, s.view(ml_dtypes.float8_e4m3fn), gs), want


def ct_mxfp4(n=3, k=64):
    w, s = fp4_arrays(np.random.default_rng(4), n, k, 32, False)
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.mx_utils import decompress_mx_scale
    scale = decompress_mx_scale(torch.from_numpy(s)).to(torch.float32)
    return readers.ct_mxfp4_weight(w, s), _ct_library(w, scale, n, k, 32)


def gptoss_mxfp4(experts=2, n=3, k=64):
    """gpt-oss experts (E8M0 scales by ldexp, each row's its own) read as stored; the
    library's experts come out [E, K, N] and are transposed back to rows here."""
    pytest.importorskip("transformers")
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors
    w, s = fp4_arrays(np.random.default_rng(7), experts * n, k, 32, False)
    blocks, scales = w.reshape(experts, n, k // 32, 16), s.reshape(experts, n, k // 32)
    want = convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales),
                                      dtype=torch.float32).numpy()
    return (readers.gptoss_mxfp4_weight(blocks, scales),
            np.ascontiguousarray(want.transpose(0, 2, 1)).reshape(experts * n, k))


def mlx(float_name, n=4, k=96, group_size=32, bits=3):
    """MLX affine, scales and biases of ``float_name`` (f16/bf16: the values are that
    dtype's, decoded in it and widened); 3-bit values straddle words; each row's scales
    and biases its own."""
    f = {"f16": np.float16, "bf16": ml_dtypes.bfloat16, "f32": np.float32}[float_name]
    rng = np.random.default_rng(5)
    q = rng.integers(0, 2**32, (n, k * bits // 32), dtype=np.uint32)
    scales = (rng.random((n, k // group_size)) * 2.0 ** np.arange(n)[:, None]).astype(f)
    biases = rng.standard_normal((n, k // group_size)).astype(f)
    desc = MlxDequantizeDescriptor(n, k, group_size, bits, float_name)
    want = MLX.oracle(desc, {"q": q.view(np.int32), "scales": scales, "biases": biases})
    return readers.mlx_weight(q, scales, biases, group_size, bits), want.astype(np.float32)


WEIGHTS = {
    "bnb4_nf4": lambda: bnb4((5, 192), 64, "nf4", False),
    # double-quantized, K not whole nested blocks: the absmax decoded to f32 once
    "bnb4_fp4_dq_f32_absmax": lambda: bnb4((3, 128), 64, "fp4", True),
    # double-quantized, two nested blocks (2 x 256 blocks of 32) a row: the codes kept
    "bnb4_nf4_dq": lambda: bnb4((3, 16384), 32, "nf4", True),
    "int8": lambda: int8((6, 37)),                 # K = 37: a lane tail
    "nvfp4_modelopt": nvfp4_modelopt,
    "nvfp4_ct": ct_nvfp4,
    "mxfp4_ct": ct_mxfp4,
    "mxfp4_gptoss": gptoss_mxfp4,
    "mlx_f32": lambda: mlx("f32"),
    "mlx_f16": lambda: mlx("f16", k=128, group_size=64, bits=4),
    "mlx_bf16": lambda: mlx("bf16"),
    "hqq4_f16": lambda: hqq_layer(4, "f16"),
}


def hqq_layer(bits, dtype):
    """An HQQ layer from HQQ's own quantizer, and its own dequantized values."""
    from test_hqq import _hqq, _np, _quantized
    torch, Quantizer = _hqq()
    tdtype = {"f16": torch.float16, "bf16": torch.bfloat16}[dtype]
    W_q, meta = _quantized(torch, Quantizer, bits, tdtype, optimize=True)
    want = _np(Quantizer.dequantize(W_q, meta))
    return readers.hqq_weight(W_q, meta["scale"], meta["zero"], bits, meta["shape"],
                              meta["group_size"]), want.astype(np.float32)


def expected(weight, x, bias, y_dtype):
    return reference.linear(x, weight.dequantize("f32"), bias, y_dtype)


@pytest.mark.parametrize("name", sorted(WEIGHTS))
def test_weight_values_are_the_librarys_in_f32(name):
    weight, want = WEIGHTS[name]()
    assert_bits_equal(weight.dequantize("f32"), want.reshape(weight.shape))


@pytest.mark.parametrize("x_dtype", sorted(X_DTYPES))
@pytest.mark.parametrize("name", sorted(WEIGHTS))
def test_linear_is_the_reference_of_the_weights_values(name, x_dtype):
    """x f32 with a bias, bf16 without; M in 1, 3, 17."""
    weight, _ = WEIGHTS[name]()
    n, k = weight.shape
    rng = np.random.default_rng(len(name))
    dtype = X_DTYPES[x_dtype]
    bias = rng.standard_normal(n).astype(dtype) if x_dtype == "f32" else None
    for m in MS:
        x = rng.standard_normal((m, k)).astype(dtype)
        assert_bits_equal(linear(x, weight, bias), expected(weight, x, bias, dtype))


@pytest.mark.parametrize("name", ["bnb4_nf4_dq", "int8", "nvfp4_ct", "mlx_bf16"])
def test_transposed_product_reads_the_same_rows(name):
    """dx = dy @ W in chunks of W's columns (the double-quantized weight: a nested block a
    chunk), on 1 and 2 threads."""
    from test_linear import check_transposed
    weight, _ = WEIGHTS[name]()
    check_transposed(weight, np.random.default_rng(6), ((1, 1), (3, 2)))


def test_double_quantized_absmax_stay_codes_where_rows_are_whole_nested_blocks():
    kept, _ = WEIGHTS["bnb4_nf4_dq"]()
    assert kept.descriptor.nested_blocksize == 256 and kept.arrays["absmax"].dtype == np.uint8
    decoded, _ = WEIGHTS["bnb4_fp4_dq_f32_absmax"]()
    assert decoded.descriptor.nested_blocksize == 0
    assert decoded.arrays["absmax"].dtype == np.float32


def test_layers_of_a_state_dict():
    """A 4-bit layer as Linear4bit saves it, and an LLM.int8 one, by their prefixes."""
    F = _bnb()
    packed, state = F.quantize_4bit(rows_apart((4, 128), 7), blocksize=64, quant_type="nf4",
                                    compress_statistics=True)
    tensors = {"layer.weight": packed}
    tensors.update({f"layer.weight.{k}": v for k, v in state.as_dict(packed=True).items()})
    weight = readers.layer_weight(tensors, "layer")
    from dqgen.formats import bitsandbytes as dq
    assert_bits_equal(weight.dequantize("f32"), dq.dequantize_layer(tensors, "layer", "f32").numpy())
    cb, scb, _ = F.int8_vectorwise_quant(rows_apart((3, 40), 8))
    weight = readers.layer_weight({"lm.weight": cb, "lm.SCB": scb}, "lm")
    assert_bits_equal(weight.dequantize("f32"), F.int8_vectorwise_dequant(cb, scb).numpy())
    with pytest.raises(InvalidProblemError, match="not a bitsandbytes layer"):
        readers.layer_weight({"lm.weight": cb}, "lm")


def test_what_a_row_cannot_be_is_refused_in_the_users_terms():
    with pytest.raises(InvalidProblemError, match="K=96 is not a multiple of blocksize=64"):
        readers.bnb4_weight(np.zeros(96, np.uint8), np.ones(3, np.float32), (2, 96), 64)
    with pytest.raises(InvalidProblemError, match="takes nested_absmax, nested_quant_map"):
        readers.bnb4_weight(np.zeros(64, np.uint8), np.zeros(2, np.uint8), (2, 64), 64,
                            nested_absmax=np.ones(1, np.float32))
    with pytest.raises(InvalidProblemError, match="weight has 10 bytes"):
        readers.bnb4_weight(np.zeros(10, np.uint8), np.ones(2, np.float32), (2, 64), 64)
    # a nested-absmax decode reads whole nested blocks a row: 32 x 256 values
    nested = Bnb4bitDescriptor(0, 0, 32, 256, DType.F32)
    with pytest.raises(InvalidProblemError, match="k=4096 is not a multiple of 8192"):
        LinearDescriptor(nested, 1, 2, 4096)
    with pytest.raises(InvalidProblemError, match="SCB has dtype float16"):
        readers.int8_weight(np.zeros((2, 8), np.int8), np.ones(2, np.float16))
    with pytest.raises(InvalidProblemError, match=r"weight_scale has shape \(2, 2\), expected "
                                                  r"\(2, 4\)"):
        readers.ct_nvfp4_weight(np.zeros((2, 32), np.uint8), np.zeros((2, 2), np.uint8),
                                np.float32(1.0))
    with pytest.raises(InvalidProblemError, match="weight_scale_2 has dtype float64"):
        readers.nvfp4_weight(np.zeros((2, 8), np.uint8), np.zeros((2, 1), np.uint8),
                             np.array([1.0]))
    with pytest.raises(InvalidProblemError, match=r"biases have dtype float32; MLX keeps "
                                                  r"them in scales' dtype \(float16\)"):
        readers.mlx_weight(np.zeros((2, 12), np.uint32), np.ones((2, 3), np.float16),
                           np.ones((2, 3), np.float32), 32, 3)
    with pytest.raises(InvalidProblemError, match=r"blocks has shape \(3, 32\); gpt-oss "
                                                  r"MXFP4 blocks are \[N, G, 16\]"):
        readers.gptoss_mxfp4_weight(np.zeros((3, 32), np.uint8), np.zeros(3, np.uint8))
    with pytest.raises(InvalidProblemError, match=r"scales has shape \(2, 3, 1\), expected "
                                                  r"\(2, 3, 2\)"):
        readers.gptoss_mxfp4_weight(np.zeros((2, 3, 2, 16), np.uint8),
                                    np.zeros((2, 3, 1), np.uint8))
    with pytest.raises(InvalidProblemError, match="only a format that writes its experts "
                                                  "transposed has stored rows"):
        Fp4DequantizeDescriptor(0, 0, 1, "mxfp4", "compressed-tensors", DType.F32,
                                stored_rows=True)


def test_gptoss_experts_are_rows_of_one_weight():
    """Every expert's outputs from one call over [E * N, K] are each expert's own, and the
    transposed gpt-oss descriptor reads as the same rows (its linear view is the stored
    one), so x @ W_e of transformers' [K, N] expert is linear(x, W_e)."""
    weight, want = gptoss_mxfp4(experts=3, n=4, k=96)
    x = np.random.default_rng(8).standard_normal((2, 96)).astype(np.float32)
    y = linear(x, weight)
    for e in range(3):
        one = readers.gptoss_mxfp4_weight(
            weight.arrays["w"].reshape(3, 4, 3, 16)[e], weight.arrays["scales"].reshape(3, 4, 3)[e])
        assert_bits_equal(linear(x, one), y[:, 4 * e:4 * e + 4])
    transposed = Fp4DequantizeDescriptor(0, 0, 1, "mxfp4", "gpt-oss", DType.F32)
    same = QuantizedWeight(transposed, weight.arrays, weight.shape)
    assert same.descriptor == weight.descriptor
    assert_bits_equal(same.dequantize("f32"), want)
    exact = x.astype(np.float64) @ want.astype(np.float64).T
    assert np.all(np.abs(y - exact) <= 1e-5 * (np.abs(x) @ np.abs(want).T))


def test_a_cuda_array_is_refused_by_name():
    """The readers' weights live on the host (the fused linear runs on the CPU)."""
    class DeviceArray:
        __cuda_array_interface__ = {"shape": (2, 8), "typestr": "|i1", "data": (0, False),
                                    "version": 3}
    with pytest.raises(UnsupportedError, match="weight is a CUDA array; the fused linear runs on the CPU"):
        readers.int8_weight(DeviceArray(), np.ones(2, np.float32))


@pytest.mark.parametrize("name", ["bnb4_nf4", "bnb4_nf4_dq", "int8", "mlx_f16", "hqq4_f16",
                                  "nvfp4_modelopt", "nvfp4_ct", "mxfp4_ct", "mxfp4_gptoss"])
def test_cuda_text_in_emulation(name, tmp_path):
    """The CUDA linear reads these weights through their kernels' own per-element CUDA
    code (cuda/values.j2) and equals the reference in host emulation."""
    import ml_dtypes
    from test_formats_cuda import needs_gxx, run_emulated
    from dqgen.layouts.linear import LinearDescriptor
    if needs_gxx.args[0]:
        pytest.skip(needs_gxx.kwargs["reason"])
    weight, _ = WEIGHTS[name]()
    n, k = weight.shape
    rng = np.random.default_rng(21)
    x = rng.standard_normal((2, k)).astype(ml_dtypes.bfloat16)
    desc = LinearDescriptor(weight.descriptor, 2, n, k, "bf16", "f32")
    y = np.zeros((2, n), np.float32)
    run_emulated(desc, [*weight.arrays.values(), x, y], [2, n, k], y.size, tmp_path)
    assert_bits_equal(y, expected(weight, x, None, np.float32))


def test_nvrtc_compiles_the_fp4_cuda_linear():
    """The FP4 formats' CUDA linear (their values from cuda/values.j2's fp4 macro, its
    scale the FP4 kernel's own) compiles with NVRTC, both products."""
    from dqgen.build import nvrtc
    from dqgen.layouts.linear import LinearDescriptor
    from dqgen.lower import lower
    from dqgen.render import render
    if not nvrtc.nvrtc_available():
        pytest.skip("NVRTC is not installed")
    for name in ("nvfp4_modelopt", "mxfp4_ct", "mxfp4_gptoss"):
        weight, _ = WEIGHTS[name]()
        for transpose in (False, True):
            desc = LinearDescriptor(weight.descriptor, 0, 0, 0, "bf16", bias=not transpose,
                                    transpose=transpose)
            source = render(lower(desc, "cuda", "sm_90"))
            assert source.entry.encode() in nvrtc.compile_cuda(source.text, name=desc.uri,
                                                               arch="sm_90").ptx


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
@pytest.mark.parametrize("bits", [8, 4, 3, 2, 1])
def test_hqq_weight_is_hqqs_own_and_the_linear_its_reference(bits, dtype):
    """HQQ (axis=1) through the fused linear: its planes unpacked to bytes once, the values
    those of HQQ's own ``Quantizer.dequantize``, the product reference.linear's; and the
    CUDA kernel's emulation for one width."""
    from test_hqq import _hqq, _np, _quantized
    torch, Quantizer = _hqq()
    tdtype = {"f16": torch.float16, "bf16": torch.bfloat16}[dtype]
    W_q, meta = _quantized(torch, Quantizer, bits, tdtype, optimize=bits != 8)
    want = _np(Quantizer.dequantize(W_q, meta))
    weight = readers.hqq_weight(W_q, meta["scale"], meta["zero"], bits, meta["shape"],
                                meta["group_size"])
    assert_bits_equal(weight.dequantize(dtype), want)
    x = np.random.default_rng(bits).standard_normal((3, 128)).astype(np.float32)
    assert_bits_equal(linear(x, weight), reference.linear(x, want, None, np.float32))


def test_hqq_refuses_what_the_linear_cannot_read():
    with pytest.raises(UnsupportedError, match="axis=0"):
        readers.hqq_weight(np.zeros((8, 16), np.uint8), np.ones(16, np.float16),
                           np.ones(16, np.float16), 8, (8, 16), 8, axis=0)


@pytest.mark.parametrize("bits,symmetric", [(4, True), (4, False), (3, True), (8, False)])
def test_compressed_tensors_packed_layer(bits, symmetric):
    """compressed-tensors pack-quantized (the library's own compressor writes it) through
    the fused linear: the weight's values round to the library's decompress, the product
    is reference.linear's; act-order reads x in the stored order."""
    torch = pytest.importorskip("torch")
    from dqgen.formats import compressed_tensors as ct
    from test_compressed_tensors import act_order_layer, compressed, ctc
    torch.manual_seed(bits)
    w = torch.randn(24, 256, dtype=torch.bfloat16)
    state, want = compressed(ctc.PackedQuantizationCompressor, w, bits, symmetric, "group", 64)
    weight = ct.packed_weight(state["weight_packed"], state["weight_scale"],
                              state["weight_shape"], state.get("weight_zero_point"), bits)
    assert_bits_equal(weight.dequantize("bf16"), want.view(torch.int16).numpy()
                      .view(ml_dtypes.bfloat16))
    x = np.random.default_rng(bits).standard_normal((3, 256)).astype(np.float32)
    assert_bits_equal(linear(x, weight), expected(weight, x, None, np.float32))
    (packed, scale, packed_z, g_idx), want = act_order_layer(bits, symmetric, 24, 80, 16,
                                                             torch.float32, bits)
    weight = ct.packed_weight(packed, scale, (24, 80), packed_z, bits, weight_g_idx=g_idx)
    assert weight.column_order is not None
    assert_bits_equal(weight.dequantize("f32"), want.numpy())
    x = np.random.default_rng(bits).standard_normal((2, 80)).astype(np.float32)
    assert_bits_equal(linear(x, weight), reference.linear(
        x[:, weight.column_order], weight.dequantize("f32")[:, weight.column_order], None,
        np.float32))


@pytest.mark.parametrize("symmetric", [True, False])
def test_compressed_tensors_int8_layer(symmetric):
    """compressed-tensors int-quantized (the library's own compressor) through the linear:
    the values round to its decompress, the product is reference.linear's."""
    torch = pytest.importorskip("torch")
    from dqgen.formats import compressed_tensors as ct
    from test_compressed_tensors import compressed, ctc
    torch.manual_seed(12)
    w = torch.randn(16, 128, dtype=torch.bfloat16)
    state, want = compressed(ctc.IntQuantizationCompressor, w, 8, symmetric, "group", 32)
    weight = ct.int8_weight(state["weight"], state["weight_scale"],
                            state.get("weight_zero_point"))
    assert_bits_equal(weight.dequantize("bf16"), want.view(torch.int16).numpy()
                      .view(ml_dtypes.bfloat16))
    x = np.random.default_rng(12).standard_normal((3, 128)).astype(np.float32)
    assert_bits_equal(linear(x, weight), expected(weight, x, None, np.float32))
