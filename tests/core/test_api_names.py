"""What a new user types first: one name for the stored integer type (``int_dtype``, with
``dtype`` as its alias), qparams for every storage dtype, errors that name the reading the
arrays fit (packed 4-bit, the other checkpoint layout), torchao's tinygemm ``q`` taken as
torchao hands it over, and ``output_dtype`` on the torch dequantize op."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import dqgen
from dqgen import InvalidProblemError, UnsupportedError
from dqgen.formats import awq, floatzp, gptq, pack

G = 32


def _weight(rows=4, cols=128, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal((rows, cols)).astype(dtype)


# --------------------------------------------------------------------------- int_dtype / dtype

def test_int_dtype_and_its_alias_agree():
    w = _weight()
    scale, zp = dqgen.choose_qparams_per_group(w, G, int_dtype="u4")
    q = dqgen.quantize_per_group(w, scale, zp, G, int_dtype="u4")
    assert np.array_equal(q, dqgen.quantize_per_group(w, scale, zp, G, dtype="u4"))
    assert np.array_equal(q, dqgen.quantize_per_group(w, scale, zp, G, "u4"))  # positional
    y = dqgen.dequantize_per_group(q, scale, zp, G, int_dtype="u4")
    assert np.array_equal(y, dqgen.dequantize_per_group(q, scale, zp, G, dtype="u4"))
    s2, z2 = dqgen.choose_qparams_per_group(w, G, dtype="u4")
    assert np.array_equal(s2, scale) and np.array_equal(z2, zp)


def test_int_dtype_and_alias_disagreeing_is_refused():
    w = _weight()
    scale, zp = dqgen.choose_qparams_per_group(w, G)
    with pytest.raises(InvalidProblemError, match="dtype is an alias of int_dtype"):
        dqgen.quantize_per_group(w, scale, zp, G, int_dtype="s8", dtype="u8")
    with pytest.raises(InvalidProblemError, match="dtype is an alias of int_dtype"):
        dqgen.choose_qparams_per_group(w, G, int_dtype="s8", dtype="u4")


@pytest.mark.parametrize("name", ["int_dtype", "dtype"])
def test_a_bad_storage_names_the_argument_passed(name):
    w = _weight()
    scale, zp = dqgen.choose_qparams_per_group(w, G)
    with pytest.raises(UnsupportedError, match=f"^{name}='s3' is not supported"):
        dqgen.quantize_per_group(w, scale, zp, G, **{name: "s3"})


# --------------------------------------------------------------------------- u4/s4 qparams

@pytest.mark.parametrize("storage,lo,hi", [("u4", 0, 15), ("s4", -8, 7)])
def test_choose_qparams_for_4_bit_storage(storage, lo, hi):
    """qparams for the 4-bit range: nothing saturates (u8's saturated ~98% of nibbles)."""
    w = _weight(8, 256)
    scale, zp = dqgen.choose_qparams_per_group(w, G, int_dtype=storage)
    assert zp.min() >= lo and zp.max() <= hi
    q = dqgen.quantize_per_group(w, scale, zp, G, int_dtype=storage)
    y = dqgen.dequantize_per_group(q, scale, zp, G, int_dtype=storage)
    assert np.all(np.abs(y - w) <= np.repeat(scale, G, axis=1) / 2 * (1 + 1e-6))
    sym_scale, sym_zp = dqgen.choose_qparams_per_group(w, G, int_dtype=storage, symmetric=True)
    assert np.all(sym_zp == (hi + lo + 1) // 2)


@pytest.mark.parametrize("domain", ["int", "float"])
def test_choose_qparams_bf16_needs_no_numpy_finfo(monkeypatch, domain):
    """numpy 2.5's finfo refuses ml_dtypes' bfloat16 (seen on a GPU image): the scale
    floor comes from ml_dtypes.finfo, which knows every float dtype."""
    real = np.finfo

    def finfo(dtype):
        if np.dtype(dtype) == np.dtype(ml_dtypes.bfloat16):
            raise ValueError("data type dtype(bfloat16) not compatible with finfo")
        return real(dtype)

    monkeypatch.setattr(np, "finfo", finfo)
    scale, _ = dqgen.choose_qparams_per_group(np.zeros((2, 64), ml_dtypes.bfloat16), G,
                                              int_dtype="u4", zero_point_domain=domain)
    assert np.all(scale.astype(np.float32) == np.float32(2.0 ** -126))


# --------------------------------------------------------------------------- shape hints

def test_packed_bytes_without_int_dtype_suggest_u4():
    w = _weight(64, 256)
    scale, zp = dqgen.choose_qparams_per_group(w, 32, int_dtype="u4")
    q4 = dqgen.quantize_per_group(w, scale, zp, 32, int_dtype="u4")
    with pytest.raises(InvalidProblemError,
                       match=r"scale has shape \(64, 8\), expected \(64, 4\).*"
                             r"did you mean int_dtype='u4'"):
        dqgen.dequantize_per_group(q4, scale, zp, 32)


def test_one_value_a_byte_read_as_u4_says_so():
    w = _weight(4, 128)
    scale, zp = dqgen.choose_qparams_per_group(w, G, int_dtype="u8")
    q = dqgen.quantize_per_group(w, scale, zp, G, int_dtype="u8")
    with pytest.raises(InvalidProblemError, match="q holds one value a byte"):
        dqgen.dequantize_per_group(q, scale, zp, G, int_dtype="u4")


def test_gptq_arrays_given_to_awq_name_gptq():
    layer = pack.quantize_gptq(_weight(128, 64), 64)
    with pytest.raises(InvalidProblemError, match="in GPTQ's layout.*use gptq.dequantize"):
        awq.dequantize(layer["qweight"], layer["qzeros"], layer["scales"])


def test_awq_arrays_given_to_gptq_name_awq():
    layer = pack.quantize_awq(_weight(128, 64), 64)
    with pytest.raises(InvalidProblemError, match="in AWQ's layout.*use awq.dequantize"):
        gptq.dequantize(layer["qweight"], layer["qzeros"], layer["scales"])


# --------------------------------------------------------------------------- torchao's q

torch = pytest.importorskip("torch", reason="torchao's tinygemm q is a torch tensor")
qp = pytest.importorskip("torchao.quantization.quant_primitives",
                         reason="torchao (pip install torchao) is the oracle")


@pytest.mark.parametrize("float_dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("q_dtype", ["uint8", "int32"])
def test_floatzp_takes_torchaos_tinygemm_q(float_dtype, q_dtype):
    """torchao's tinygemm quantize returns one 4-bit value an element (uint8 for
    torch.uint4, int32 for the int4mm path): dequantize(..., int_dtype="u4") takes
    either and equals torchao's dequantize bit for bit."""
    f = getattr(torch, float_dtype)
    x = torch.from_numpy(_weight(8, 128, seed=3)).to(f)
    mapping = qp.MappingType.ASYMMETRIC
    scale, zero = qp._choose_qparams_affine_tinygemm(x, mapping, (1, G), torch.uint4, 0, 15)
    target = torch.uint4 if q_dtype == "uint8" else torch.int32
    q = qp._quantize_affine_tinygemm(x, (1, G), scale, zero, target, 0, 15)
    assert q.dtype == getattr(torch, q_dtype) and q.shape == x.shape
    want = qp._dequantize_affine_tinygemm(q, (1, G), scale, zero, torch.uint4, 0, 15,
                                          output_dtype=f)
    got = floatzp.dequantize(q, scale, zero, G, int_dtype="u4")
    assert got.dtype == f and torch.equal(got, want)


def test_floatzp_unpacked_values_outside_4_bits_are_refused():
    q = np.full((2, 64), 3, np.int32)
    q[1, 5] = 16
    ones = np.ones((2, 2), np.float32)
    with pytest.raises(InvalidProblemError, match=r"\[3, 16\], outside u4's \[0, 15\]"):
        floatzp.dequantize(q, ones, ones, G, int_dtype="u4")


# --------------------------------------------------------------------------- output_dtype

@pytest.mark.parametrize("scale_dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("output_dtype", ["float32", "bfloat16", "float16"])
def test_torch_dequantize_output_dtype_matches_torchao(scale_dtype, output_dtype):
    import dqgen.torch as dt
    gen = torch.Generator().manual_seed(5)
    q = torch.randint(-128, 128, (4, 128), dtype=torch.int8, generator=gen)
    zp = torch.randint(-128, 128, (4, 4), dtype=torch.int32, generator=gen)
    scale = (torch.rand(4, 4, generator=gen) * 0.1).to(getattr(torch, scale_dtype))
    out = getattr(torch, output_dtype)
    got = dt.dequantize_per_group(q, scale, zp, G, output_dtype=out)
    want = qp.dequantize_affine(q, (1, G), scale, zp, torch.int8, -128, 127, output_dtype=out)
    assert got.dtype == out and torch.equal(got, want)


def test_torch_dequantize_output_dtype_opcheck():
    import dqgen.torch as dt
    gen = torch.Generator().manual_seed(6)
    q = torch.randint(0, 256, (4, 32), dtype=torch.uint8, generator=gen)
    zp = torch.randint(0, 16, (4, 2), dtype=torch.int32, generator=gen)
    scale = torch.rand(4, 2, generator=gen).to(torch.bfloat16).requires_grad_()
    torch.library.opcheck(dt.dequantize_per_group.overload,
                          (q, scale, zp, G, "u4", torch.float32))
    y = dt.dequantize_per_group(q, scale, zp, G, "u4", output_dtype=torch.float32)
    y.sum().backward()
    assert scale.grad.dtype == torch.bfloat16
    with pytest.raises(UnsupportedError, match="output_dtype"):
        dt.dequantize_per_group(q, scale.detach(), zp, G, "u4", output_dtype=torch.int32)
