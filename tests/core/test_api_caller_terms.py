"""The plain functions' refusals name their own arguments; ml_dtypes int4/uint4 q."""

import ml_dtypes
import numpy as np
import pytest

import dqgen
from dqgen import InvalidProblemError, reference
from formats_util import assert_bits_equal
from oracles import checkpoints as oracle

G = 32


def test_plain_functions_name_their_arguments_and_shapes():
    q = np.zeros(64, np.int8)
    with pytest.raises(InvalidProblemError, match=r"^scale has shape \(64,\), expected \(2,\)$"):
        dqgen.dequantize_per_group(q, np.ones(64, np.float32), np.zeros(2, np.int32), G)
    x = np.ones((1, 64), np.float32)
    s, z = np.ones((1, 2), np.float32), np.zeros((1, 2), np.int32)
    with pytest.raises(InvalidProblemError, match="^out overlaps x in memory"):
        dqgen.quantize_per_group(x, s, z, G, out=x.view(np.int8)[:, :64])
    read_only = np.broadcast_to(np.zeros(64, np.int8), (1, 64))
    with pytest.raises(InvalidProblemError, match="^out is read-only"):
        dqgen.quantize_per_group(x, s, z, G, out=read_only)
    with pytest.raises(InvalidProblemError, match=r"^x has shape \(1, 32\), expected \(1, 64\)$"):
        dqgen.quantize_per_group_backward(x, x[:, :32], s, z, G, -128, 127)
    with pytest.raises(InvalidProblemError, match=r"^scale has shape \(7,\), expected \(1, 2\)$"):
        dqgen.dequantize_per_group_backward(x, np.ones(7, np.float32), G)


@pytest.mark.parametrize("storage,np_type,lo,hi", [("s4", ml_dtypes.int4, -8, 8),
                                                   ("u4", ml_dtypes.uint4, 0, 16)])
def test_dequantize_per_group_reads_ml_dtypes_4_bit_values(storage, np_type, lo, hi):
    rng = np.random.default_rng(0)
    values = rng.integers(lo, hi, (2, 64))
    scale = rng.uniform(0.5, 2, (2, 2)).astype(np.float32)
    zp = rng.integers(lo, hi, (2, 2)).astype(np.int32)
    want = reference.dequantize_per_group(values, scale, zp, G)
    assert_bits_equal(dqgen.dequantize_per_group(values.astype(np_type), scale, zp, G), want)
    assert_bits_equal(dqgen.dequantize_per_group(values.astype(np_type), scale, zp, G,
                                                 int_dtype=storage), want)
    assert_bits_equal(dqgen.dequantize_per_group(oracle.pack_int4(values), scale, zp, G,
                                                 int_dtype=storage), want)
