"""bitsandbytes' NF4/FP4 and LLM.int8 weights, with bitsandbytes itself as the oracle:
tensors quantized by ``bitsandbytes.functional.quantize_4bit`` / ``int8_vectorwise_quant``
on the CPU (every block size, shapes whose size is no multiple of the block, double
quantization, bf16/f16/f32) dequantize bit for bit as the library does, on every ISA this
CPU runs, in the CUDA text's host emulation and through NVRTC, aot, emit and verify; the
state dict transformers saves is read with no other input.

The 4-bit oracle is the library's public ``dequantize_4bit`` where its CPU kernel is right,
and everywhere its pure-torch kernel (``backends/default``: what it runs without its C
library): the AVX-512 CPU kernel of bitsandbytes 0.50 indexes absmax per row (wrong when a
row is not a whole number of blocks) and its AVX512_BF16 conversion flushes subnormal
results to zero (FORMATS.md).
"""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dqgen import InvalidProblemError, UnsupportedError, aot, bundle, cli, verify
from dqgen.formats import bitsandbytes as dq
from dqgen.formats.plan import FormatPlan
from dqgen.layouts import bitsandbytes as layout
from dqgen.layouts.bitsandbytes import BNB_BLOCKSIZES, Bnb4bitDescriptor, Bnb8bitDescriptor
from dqgen.lower import lower
from dqgen.plans import PlanPreference
from dqgen.render import render
from formats_util import assert_bits_equal
from strategies import ISAS

DTYPES = ("bf16", "f16", "f32")
NP = {"bf16": np.dtype(ml_dtypes.bfloat16), "f16": np.dtype(np.float16),
      "f32": np.dtype(np.float32)}


def _bnb():
    """bitsandbytes' functional module (the oracle), or the test is skipped."""
    pytest.importorskip("torch", reason="bitsandbytes runs on torch")
    return pytest.importorskip("bitsandbytes.functional",
                               reason="bitsandbytes (the oracle) is not installed")


def _torch_dtype(name):
    import torch
    return {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[name]


def host(t) -> np.ndarray:
    """A torch tensor's values as numpy, bfloat16 through ml_dtypes."""
    import torch
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.contiguous().numpy()


def quantize(shape, blocksize, quant_type, dtype, nested, seed=0, scale=1.0):
    """A random weight quantized by bitsandbytes itself: (packed, QuantState)."""
    import torch
    F = _bnb()
    g = torch.Generator().manual_seed(seed)
    a = (torch.randn(shape, generator=g) * scale).to(_torch_dtype(dtype))
    return F.quantize_4bit(a, blocksize=blocksize, quant_type=quant_type,
                           compress_statistics=nested)


def state_absmax(state):
    """The f32 absmax bitsandbytes' dequantize_4bit uses (decoded when double-quantized)."""
    F = _bnb()
    if not state.nested:
        return state.absmax.float()
    return (F.dequantize_blockwise(state.absmax, state.state2) + state.offset).float()


def reference_4bit(packed, state, absmax=None) -> np.ndarray:
    """bitsandbytes' own pure-torch 4-bit kernel (uncompiled), on ``state``'s absmax."""
    import torch
    F = _bnb()
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    kernel = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)
    absmax = state_absmax(state) if absmax is None else absmax
    code = F.get_4bit_type(state.quant_type, device="cpu")
    return host(kernel(packed.view(torch.uint8).reshape(-1), absmax, code, state.blocksize,
                       state.shape, state.dtype))


def library_path_is_exact(shape, blocksize) -> bool:
    """Where bitsandbytes' public CPU dequantize_4bit is its flat-block semantics without a
    torch.compile fallback: whole blocks a row, below 2048, an even row."""
    return shape[-1] % blocksize == 0 and blocksize < 2048 and shape[-1] % 2 == 0


def dq_kwargs(state) -> dict:
    kwargs = dict(blocksize=state.blocksize, quant_type=state.quant_type,
                  dtype={"torch.bfloat16": "bf16", "torch.float16": "f16",
                         "torch.float32": "f32"}[str(state.dtype)])
    if state.nested:
        kwargs.update(nested_absmax=state.state2.absmax, nested_quant_map=state.state2.code,
                      offset=state.offset.item(), nested_blocksize=state.state2.blocksize)
    return kwargs


def dequantize(packed, state, absmax=None):
    got = dq.dequantize_4bit(packed, state.absmax if absmax is None else absmax, state.shape,
                             **dq_kwargs(state))
    return host(got)


# --- 4-bit ----------------------------------------------------------------------------

SHAPES = ((4, 256), (3, 96), (5, 33), (2, 3, 40), (1, 4095), (7,))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_matches_bitsandbytes(quant_type, dtype):
    """Every block size, with and without double quantization; shapes whose size is no
    multiple of the block (blocks run across rows), an odd count of values, 1-D and 3-D."""
    F = _bnb()
    for i, blocksize in enumerate(BNB_BLOCKSIZES):
        for shape in SHAPES[i % 3:i % 3 + 4]:
            for nested in (False, True):
                packed, state = quantize(shape, blocksize, quant_type, dtype, nested, seed=i)
                got = dequantize(packed, state)
                assert got.dtype == NP[dtype] and got.shape == tuple(shape)
                assert_bits_equal(got, reference_4bit(packed, state))
                if library_path_is_exact(shape, blocksize):
                    assert_bits_equal(got, host(F.dequantize_4bit(packed, state)))


def test_4bit_torch_in_torch_out_and_out():
    import torch
    packed, state = quantize((64, 128), 64, "nf4", "bf16", True)
    got = dq.dequantize_4bit(packed, state.absmax, state.shape, **dq_kwargs(state))
    assert isinstance(got, torch.Tensor) and got.dtype == torch.bfloat16
    assert torch.equal(got, _bnb().dequantize_4bit(packed, state))
    out = np.empty((64, 128), ml_dtypes.bfloat16)
    assert dq.dequantize_4bit(packed.numpy(), state.absmax.numpy(), (64, 128),
                              **dq_kwargs(state), out=out) is out
    assert_bits_equal(out, host(got))


def test_4bit_every_stored_shape_of_the_packed_bytes():
    """quant_storage other than uint8 (FSDP's bf16, f32), the [1, n/2] transposed form,
    and flat bytes all hold the same bytes."""
    import torch
    F = _bnb()
    a = torch.randn(16, 96, generator=torch.Generator().manual_seed(3))
    want = None
    for storage in (torch.uint8, torch.bfloat16, torch.float32, torch.int8):
        packed, state = F.quantize_4bit(a, blocksize=64, quant_type="fp4", quant_storage=storage)
        want = reference_4bit(packed, state) if want is None else want
        for form in (packed, packed.reshape(1, -1), packed.reshape(-1)):
            assert_bits_equal(dequantize(form, state), want)


def test_4bit_special_absmax_and_every_index():
    """Random bytes (every index pair) with NaN, infinite, zero, subnormal and huge absmax;
    the result of each is one f32 product rounded once to F, subnormals kept (bitsandbytes'
    pure-torch kernel; its AVX512_BF16 kernel flushes subnormal results to zero)."""
    import torch
    rng = np.random.default_rng(7)
    for dtype in DTYPES:
        for quant_type in ("nf4", "fp4"):
            packed, state = quantize((8, 200), 64, quant_type, dtype, False)
            packed = torch.from_numpy(rng.integers(0, 256, tuple(packed.shape), dtype=np.uint8))
            absmax = torch.from_numpy((rng.standard_normal(state.absmax.shape) * 4).astype(np.float32))
            absmax[:10] = torch.tensor([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-40, 3e-39,
                                        1.1e-38, 3.4e38, 6e-8])
            state.dtype = _torch_dtype(dtype)
            assert_bits_equal(dequantize(packed, state, absmax), reference_4bit(packed, state, absmax))


def test_4bit_special_nested_statistics():
    """Double quantization with special nested absmax and offsets: the two f32 roundings
    (product, then plus the offset) in bitsandbytes' order."""
    import torch
    F = _bnb()
    rng = np.random.default_rng(8)
    packed, state = quantize((40, 4096), 64, "nf4", "f32", True)   # 2560 blocks: 10 nested
    nested = torch.from_numpy((rng.standard_normal(10) * 3).astype(np.float32))
    nested[:5] = torch.tensor([np.nan, np.inf, 1e-40, 0.0, 3e38])
    for offset in (0.0, -1.5, 1e-39, 7.3e-3):
        state.state2.absmax, state.offset = nested, torch.tensor(offset, dtype=torch.float32)
        want = reference_4bit(packed, state)
        assert_bits_equal(dequantize(packed, state), want)
        assert_bits_equal(want, host(F.dequantize_4bit(packed, state)))


SPECIALS = (np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-40, 1.1e-38, 3.4e38, 6e-8)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 4), cols=st.integers(1, 300), blocksize=st.sampled_from(BNB_BLOCKSIZES[:4]),
       quant_type=st.sampled_from(["nf4", "fp4"]), dtype=st.sampled_from(DTYPES),
       nested=st.booleans(), scale=st.sampled_from([1.0, 1e-3, 6e4]), seed=st.integers(0, 99),
       special=st.none() | st.sampled_from(SPECIALS))
def test_4bit_any_shape(rows, cols, blocksize, quant_type, dtype, nested, scale, seed, special):
    """Any shape, and a special value in the first block's statistics: its absmax, or
    with double quantization its nested absmax or the offset."""
    import torch
    packed, state = quantize((rows, cols), blocksize, quant_type, dtype, nested, seed, scale)
    if special is not None and not nested:
        state.absmax[0] = special
    elif special is not None:
        state.state2.absmax[0] = special
        state.offset = torch.tensor(special if seed % 2 else 0.25, dtype=torch.float32)
    assert_bits_equal(dequantize(packed, state), reference_4bit(packed, state))


def test_threads(monkeypatch):
    """More than one thread (blocks split between them) gives the same bits."""
    monkeypatch.setenv("DQGEN_NUM_THREADS", "2")
    packed, state = quantize((64, 1001), 64, "nf4", "bf16", True)
    assert_bits_equal(dequantize(packed, state), reference_4bit(packed, state))
    cb, scb = int8_layer(64, 1024)
    assert_bits_equal(host(dq.dequantize_int8(cb, scb, "f16")), reference_int8(cb, scb, "f16"))


def test_standard_tables_are_bitsandbytes():
    F = _bnb()
    for quant_type in ("nf4", "fp4"):
        want = F.get_4bit_type(quant_type, device="cpu").numpy()
        assert np.array_equal(dq.code_table(quant_type).view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("isa", ISAS)
def test_every_isa(isa):
    import torch
    for dtype, blocksize, nested in (("bf16", 64, True), ("f16", 32, False), ("f32", 128, True),
                                     ("f16", 4096, False)):
        packed, state = quantize((5, 999), blocksize, "nf4", dtype, nested)
        desc = Bnb4bitDescriptor(5, 999, blocksize, 256 if nested else 0, dtype)
        arrays = {"w": packed.view(torch.uint8).numpy().reshape(-1),
                  "code": dq.code_table("nf4"), "y": np.empty((5, 999), NP[dtype])}
        if nested:
            arrays.update(absmax=state.absmax.numpy(), nested_code=state.state2.code.numpy(),
                          nested_absmax=state.state2.absmax.numpy(),
                          offset=state.offset.reshape(1).numpy())
        else:
            arrays["absmax"] = state.absmax.numpy()
        FormatPlan.select(desc, preference=PlanPreference(isa=isa)).run(arrays)
        assert_bits_equal(arrays["y"], reference_4bit(packed, state))
    cb, scb = int8_layer(9, 300)
    for dtype in DTYPES:
        y = np.empty((9, 300), NP[dtype])
        FormatPlan.select(Bnb8bitDescriptor(9, 300, dtype), preference=PlanPreference(isa=isa)).run(
            {"w": cb.numpy(), "scb": scb.numpy(), "y": y})
        assert_bits_equal(y, reference_int8(cb, scb, dtype))


# --- LLM.int8 -------------------------------------------------------------------------

def int8_layer(rows, cols, seed=0, specials=True):
    """An int8 weight and SCB from bitsandbytes' int8_vectorwise_quant, the SCB with
    specials (NaN, infinity, zero, subnormal, huge) when ``specials``."""
    import torch
    F = _bnb()
    a = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)).half() * 3
    cb, scb, _ = F.int8_vectorwise_quant(a)
    if specials and rows >= 6:
        scb[:6] = torch.tensor([np.nan, np.inf, 0.0, 1e-40, 3e38, 1e-3])
    return cb, scb


def reference_int8(cb, scb, dtype) -> np.ndarray:
    """bitsandbytes' int8_vectorwise_dequant, then .to(dtype) as transformers does."""
    return host(_bnb().int8_vectorwise_dequant(cb, scb).to(_torch_dtype(dtype)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_matches_bitsandbytes(dtype):
    import torch
    for rows, cols in ((64, 300), (7, 1), (1, 4096)):
        cb, scb = int8_layer(rows, cols)
        got = dq.dequantize_int8(cb, scb, dtype)
        assert isinstance(got, torch.Tensor) and got.shape == (rows, cols)
        assert_bits_equal(host(got), reference_int8(cb, scb, dtype))
    rng = np.random.default_rng(1)   # every int8 value, SCB of any magnitude
    cb = rng.integers(-128, 128, (50, 256), dtype=np.int8)
    scb = (rng.standard_normal(50) * 10.0 ** rng.integers(-30, 30, 50)).astype(np.float32)
    assert_bits_equal(dq.dequantize_int8(cb, scb[:, None], dtype),
                      reference_int8(torch.from_numpy(cb), torch.from_numpy(scb), dtype))


def test_int8_multiplies_by_the_f32_reciprocal():
    """f32(1/127) is 0x3c010204, and the library multiplies by it: dividing by 127 differs
    somewhere in a row of every int8 value."""
    import torch
    assert int(np.float32(layout.INT8_SCALE).view(np.uint32)) == 0x3C010204
    cb = np.arange(-128, 128, dtype=np.int8)[None, :].repeat(3, 0)
    scb = np.array([1.0, 3.3, 127.0], np.float32)
    got = dq.dequantize_int8(cb, scb, "f32")
    assert_bits_equal(got, reference_int8(torch.from_numpy(cb), torch.from_numpy(scb), "f32"))
    divided = (cb.astype(np.float32) * scb[:, None]) / np.float32(127)
    assert not np.array_equal(got.view(np.uint32), divided.view(np.uint32))


# --- the state dict transformers saves --------------------------------------------------

def state_dict_4bit(prefix, shape, blocksize, quant_type, dtype, nested, seed=0):
    """What Linear4bit._save_to_state_dict writes for one layer (packed quant state)."""
    packed, state = quantize(shape, blocksize, quant_type, dtype, nested, seed)
    tensors = {f"{prefix}.weight": packed}
    tensors.update({f"{prefix}.weight.{k}": v for k, v in state.as_dict(packed=True).items()})
    return tensors, packed, state


def test_from_state_dict_reads_every_key():
    import torch
    F = _bnb()
    from bitsandbytes.functional import QuantState
    for quant_type, dtype, nested in (("nf4", "bf16", True), ("fp4", "f16", False),
                                      ("nf4", "f32", False)):
        tensors, packed, state = state_dict_4bit("model.layers.0.mlp.down_proj", (48, 128), 64,
                                                 quant_type, dtype, nested)
        kwargs = dq.from_state_dict(tensors, "model.layers.0.mlp.down_proj")
        assert kwargs["shape"] == (48, 128) and kwargs["dtype"] == dtype
        assert kwargs["quant_type"] == quant_type and kwargs["blocksize"] == 64
        assert ("nested_absmax" in kwargs) == nested
        loaded = QuantState.from_dict({k.split("weight.", 1)[1]: v for k, v in tensors.items()
                                       if ".weight." in k}, torch.device("cpu"))
        want = F.dequantize_4bit(packed, loaded)
        assert torch.equal(dq.dequantize_4bit(**kwargs), want)
        assert torch.equal(dq.dequantize_layer(tensors, "model.layers.0.mlp.down_proj."), want)
        # numpy tensors, as safetensors.numpy loads them
        as_numpy = {k: host(v) for k, v in tensors.items()}
        assert_bits_equal(dq.dequantize_layer(as_numpy, "model.layers.0.mlp.down_proj"), host(want))


def test_int8_state_dict():
    import torch
    cb, scb = int8_layer(16, 64, specials=False)
    tensors = {"lm.weight": cb, "lm.SCB": scb, "lm.weight_format": torch.tensor(0, dtype=torch.uint8)}
    assert torch.equal(dq.dequantize_layer(tensors, "lm"), _bnb().int8_vectorwise_dequant(cb, scb))
    assert_bits_equal(host(dq.dequantize_layer(tensors, "lm", "bf16")), reference_int8(cb, scb, "bf16"))
    tensors["lm.weight_format"] = torch.tensor(2, dtype=torch.uint8)
    with pytest.raises(InvalidProblemError, match="lm.weight_format is not 0"):
        dq.dequantize_layer(tensors, "lm")


def test_bad_state_dicts_are_named():
    import torch
    tensors, _, _ = state_dict_4bit("q", (8, 64), 64, "nf4", "bf16", True)
    key = "q.weight.quant_state.bitsandbytes__nf4"
    broken = dict(tensors, **{"q.weight.quant_map": tensors["q.weight.quant_map"] * 2})
    with pytest.raises(InvalidProblemError, match="q.weight.quant_map is not bitsandbytes' nf4 table"):
        dq.from_state_dict(broken, "q")
    for edit, message in ((lambda s: s.update(quant_type="fp4"), "does not match the key"),
                          (lambda s: s.update(dtype="int8"), "dtype 'int8'"),
                          (lambda s: s.update(shape=None), "shape None"),
                          (lambda s: s.pop("nested_offset"), "nested_offset")):
        state = json.loads(bytes(tensors[key].numpy()).decode())
        edit(state)
        bad = dict(tensors, **{key: torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)})
        with pytest.raises(InvalidProblemError, match=message):
            dq.from_state_dict(bad, "q")
    with pytest.raises(InvalidProblemError, match="is not JSON"):
        dq.from_state_dict(dict(tensors, **{key: torch.tensor([255, 0], dtype=torch.uint8)}), "q")
    with pytest.raises(InvalidProblemError, match="q.weight.absmax is missing"):
        dq.from_state_dict({k: v for k, v in tensors.items() if k != "q.weight.absmax"}, "q")
    with pytest.raises(InvalidProblemError, match="k is not a bitsandbytes layer"):
        dq.dequantize_layer(tensors, "k")


def test_bad_inputs():
    packed, state = quantize((4, 64), 64, "nf4", "bf16", False)
    with pytest.raises(UnsupportedError, match="blocksize=48 is not a bitsandbytes 4-bit block"):
        dq.dequantize_4bit(packed, state.absmax, (4, 64), blocksize=48)
    with pytest.raises(InvalidProblemError, match="quant_type='int4'"):
        dq.dequantize_4bit(packed, state.absmax, (4, 64), quant_type="int4")
    with pytest.raises(InvalidProblemError, match=r"weight has 128 bytes \(shape \(128, 1\)\), expected 129"):
        dq.dequantize_4bit(packed, state.absmax, (1, 258))
    with pytest.raises(InvalidProblemError, match=r"absmax has shape \(4,\), expected \(2,\)"):
        dq.dequantize_4bit(packed, state.absmax, (4, 64), blocksize=128)
    with pytest.raises(InvalidProblemError, match="absmax is uint8 .double-quantized."):
        dq.dequantize_4bit(packed, state.absmax.to(dtype=packed.dtype), (4, 64))
    with pytest.raises(InvalidProblemError, match="needs nested_quant_map and offset"):
        dq.dequantize_4bit(packed, state.absmax, (4, 64), nested_absmax=state.absmax)
    with pytest.raises(InvalidProblemError, match=r"quant_map has shape \(8,\)"):
        dq.dequantize_4bit(packed, state.absmax, (4, 64), quant_map=np.zeros(8, np.float32))
    with pytest.raises(UnsupportedError, match="dtype"):
        dq.dequantize_4bit(packed, state.absmax, (4, 64), dtype="f64")
    with pytest.raises(InvalidProblemError, match="shape"):
        dq.dequantize_4bit(packed, state.absmax, 256)
    cb, scb = int8_layer(4, 8, specials=False)
    with pytest.raises(InvalidProblemError, match="weight has dtype uint8; an LLM.int8 weight is int8"):
        dq.dequantize_int8(cb.numpy().view(np.uint8), scb)
    with pytest.raises(InvalidProblemError, match="SCB has dtype float16; bitsandbytes keeps it f32"):
        dq.dequantize_int8(cb, scb.half())
    with pytest.raises(InvalidProblemError, match=r"SCB has shape \(3,\), expected \(4,\)"):
        dq.dequantize_int8(cb, scb[:3])


# --- CUDA text, aot, emit, verify ------------------------------------------------------

def test_cuda_text_in_emulation(tmp_path):
    import torch
    from test_formats_cuda import needs_gxx, run_emulated
    if needs_gxx.args[0]:
        pytest.skip(needs_gxx.kwargs["reason"])
    for dtype, blocksize, nested in (("bf16", 64, True), ("f16", 32, False)):
        packed, state = quantize((3, 701), blocksize, "fp4", dtype, nested)
        desc = Bnb4bitDescriptor(3, 701, blocksize, 256 if nested else 0, dtype)
        y = np.zeros((3, 701), NP[dtype])
        arrays = [packed.view(torch.uint8).numpy().reshape(-1), dq.code_table("fp4"),
                  state.absmax.numpy()]
        if nested:
            arrays += [state.state2.code.numpy(), state.state2.absmax.numpy(),
                       state.offset.reshape(1).numpy()]
        run_emulated(desc, arrays + [y], [3, 701], y.size, tmp_path)
        assert_bits_equal(y, reference_4bit(packed, state))
    cb, scb = int8_layer(12, 130)
    for dtype in ("f32", "bf16"):
        y = np.zeros((12, 130), NP[dtype])
        run_emulated(Bnb8bitDescriptor(12, 130, dtype), [cb.numpy(), scb.numpy(), y], [12, 130],
                     y.size, tmp_path)
        assert_bits_equal(y, reference_int8(cb, scb, dtype))


def test_nvrtc_compiles():
    from dqgen.build import nvrtc
    if not nvrtc.nvrtc_available():
        pytest.skip("NVRTC is not installed")
    descs = [Bnb4bitDescriptor(0, 0, 64, nested, d) for d in DTYPES for nested in (0, 256)]
    for desc in descs + [Bnb8bitDescriptor(0, 0, d) for d in DTYPES]:
        source = render(lower(desc, "cuda", "sm_90"))
        art = nvrtc.compile_cuda(source.text, name=desc.uri, arch="sm_90")
        assert source.entry.encode() in art.ptx and b"fma.rn" not in art.ptx


def test_aot_emit_and_verify(tmp_path, capsys):
    """dqgen aot enumerates both ops (bnb4: f32 or u8 absmax by --scale), emit prints one
    kernel, and dqgen verify checks the bundled kernels against the layouts' oracles."""
    assert [r.uri for r in aot.expand({"op": "bnb4"})] == [
        "dequant_bnb4_b64_bf16", "dequant_bnb4_b64_dq256_bf16", "dequant_bnb4_b64_dq256_f16",
        "dequant_bnb4_b64_f16"]
    assert [r.uri for r in aot.expand({"op": "bnb8"})] == ["dequant_bnb8_bf16", "dequant_bnb8_f16"]
    assert [r.uri for r in aot.expand({"op": "bnb4", "scale": "u8", "group_size": "32,4096",
                                       "float": "f32"})] == [
        "dequant_bnb4_b32_dq256_f32", "dequant_bnb4_b4096_dq256_f32"]
    with pytest.raises(UnsupportedError, match="op bnb4: scale='f16'"):
        aot.expand({"op": "bnb4", "scale": "f16"})
    assert cli.main(["emit", "bnb4", "--float", "f16", "--group-size", "128", "--scale", "u8"]) == 0
    assert "dqgen_dequant_bnb4_b128_dq256_f16" in capsys.readouterr().out
    assert cli.main(["emit", "bnb8", "--float", "bf16"]) == 0
    assert "#define INT8_SCALE 0x1.0204080000000p-7f" in capsys.readouterr().out
    out = tmp_path / "bundle"
    assert cli.main(["aot", "--op", "bnb4", "--op", "bnb8", "--float", "bf16", "-o", str(out),
                     "-q"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert {k["uri"] for k in manifest["kernels"]} >= {"dequant_bnb4_b64_dq256_bf16",
                                                       "dequant_bnb8_bf16"}
    outcomes = verify.verify_bundle(bundle.Bundle.open(out))
    assert len(outcomes) == 3 and all(o.status == verify.OK for o in outcomes), \
        [str(o) for o in outcomes]


def test_verify_oracle_is_its_own():
    """The layouts' oracles unpack and round on their own: the low nibble first, or the
    nested absmax without its rounding before the offset, is caught."""
    rng = np.random.default_rng(2)
    desc = Bnb4bitDescriptor(3, 300, 64, 256, "f32")
    arrays = {"w": rng.integers(0, 256, desc.packed_bytes, dtype=np.uint8),
              "code": dq.code_table("nf4"), "absmax": rng.integers(0, 256, desc.num_blocks, dtype=np.uint8),
              "nested_code": rng.standard_normal(256).astype(np.float32),
              "nested_absmax": rng.standard_normal(desc.nested_blocks).astype(np.float32),
              "offset": np.array([0.1], np.float32)}
    want = layout.BNB4.oracle(desc, arrays)
    swapped = dict(arrays, w=((arrays["w"] << 4) | (arrays["w"] >> 4)).astype(np.uint8))
    assert not np.array_equal(layout.BNB4.oracle(desc, swapped), want)
    scale = (arrays["nested_code"][arrays["absmax"]].astype(np.float64) *
             arrays["nested_absmax"][np.arange(desc.num_blocks) // 256] + 0.1).astype(np.float32)
    fused = dq.code_table("nf4")[layout.unpack_nibbles(arrays["w"], 900)] * np.repeat(scale, 64)[:900]
    assert not np.array_equal(fused.reshape(3, 300), want)
