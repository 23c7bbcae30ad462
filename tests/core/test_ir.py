"""The descriptor IR (dqgen/ir.py): validation, normalisation, frozen-ness and stable
identities (the schedule it is lowered to: test_lower.py). Nothing here builds a kernel."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import dqgen
from dqgen.errors import InvalidProblemError
from dqgen.ir import DType

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _all_descriptors(outer=4, axis=256, gs=128):
    out = []
    for f in ("f32", "f64", "f16", "bf16"):
        for i in ("s8", "u8"):
            out.append(dqgen.DequantizePerGroupDescriptor(outer, axis, gs, f, i))
            out.append(dqgen.QuantizePerGroupDescriptor(outer, axis, gs, f, i))
        out.append(dqgen.DequantizePerGroupBackwardDescriptor(outer, axis, gs, f))
        out.append(dqgen.QuantizePerGroupBackwardDescriptor(outer, axis, gs, f, -8, 7))
    return out


@pytest.mark.parametrize("spelling,expected", [
    ("s8", DType.S8), ("u8", DType.U8), ("f32", DType.F32), ("f64", DType.F64),
    ("f16", DType.F16), ("bf16", DType.BF16), ("int8", DType.S8), ("uint8", DType.U8),
    ("float16", DType.F16), ("half", DType.F16), ("bfloat16", DType.BF16),
    ("float32", DType.F32), ("float64", DType.F64), ("double", DType.F64), ("BF16", DType.BF16),
    (np.int8, DType.S8), (np.dtype(np.uint8), DType.U8), (np.float16, DType.F16),
    (np.float32, DType.F32), (np.dtype("float64"), DType.F64), (ml_dtypes.bfloat16, DType.BF16),
    (np.dtype(ml_dtypes.bfloat16), DType.BF16), (DType.F16, DType.F16),
])
def test_dtype_spellings(spelling, expected):
    field = "int_dtype" if expected in (DType.S8, DType.U8) else "float_dtype"
    kwargs = {"float_dtype": "f32", "int_dtype": "s8", field: spelling}
    desc = dqgen.DequantizePerGroupDescriptor(1, 8, 8, **kwargs)
    assert getattr(desc, field) is expected


def test_torch_dtype_spellings():
    torch = pytest.importorskip("torch", reason="torch (CPU build) is an optional test dependency")
    d = dqgen.DequantizePerGroupDescriptor(1, 8, 8, torch.bfloat16, torch.uint8)
    assert (d.float_dtype, d.int_dtype) == (DType.BF16, DType.U8)
    d = dqgen.DequantizePerGroupDescriptor(1, 8, 8, torch.float16, torch.int8)
    assert (d.float_dtype, d.int_dtype) == (DType.F16, DType.S8)


def test_dtypes_know_their_numpy_types_and_ranges():
    assert DType.BF16.np_dtype == np.dtype(ml_dtypes.bfloat16)
    assert DType.F16.itemsize == 2 and DType.F64.itemsize == 8
    assert DType.S8.int_range == (-128, 127) and DType.U8.int_range == (0, 255)
    assert DType.F32.is_float and not DType.S8.is_float


def test_descriptors_are_frozen_and_hashable():
    for desc in _all_descriptors():
        with pytest.raises(dataclasses.FrozenInstanceError):
            desc.group_size = 64
        assert hash(desc) == hash(dataclasses.replace(desc))


def test_equal_spellings_give_equal_descriptors_and_keys():
    a = dqgen.DequantizePerGroupDescriptor(4, 256, 128, "bf16", "s8")
    b = dqgen.DequantizePerGroupDescriptor(np.int64(4), np.int32(256), 128,
                                           ml_dtypes.bfloat16, np.int8)
    assert a == b and a.key() == b.key() and a.uri == b.uri
    assert type(b.outer) is int and type(b.axis) is int


@pytest.mark.parametrize("desc,uri", [
    (dqgen.DequantizePerGroupDescriptor(4, 256, 128, "bf16", "s8"), "dequant_pg_s8_bf16_g128"),
    (dqgen.QuantizePerGroupDescriptor(1, 32, 32, "f16", "u8", 0, 15), "quant_pg_u8_f16_g32"),
    (dqgen.DequantizePerGroupBackwardDescriptor(3, 3, 1, "f32"), "dequant_pg_bwd_f32_g1"),
    (dqgen.QuantizePerGroupBackwardDescriptor(0, 14, 7, "f64", -8, 7), "quant_pg_bwd_f64_g7"),
])
def test_uri_names_only_what_the_kernel_is_specialised_on(desc, uri):
    assert desc.uri == uri
    # Runtime sizes and the q range are kernel arguments, not part of its name.
    assert dataclasses.replace(desc, outer=desc.outer + 9, axis=desc.axis * 2).uri == uri
    if hasattr(desc, "q_min"):
        assert dataclasses.replace(desc, q_min=desc.q_min + 1).uri == uri


def test_keys_differ_for_every_field():
    base = dqgen.QuantizePerGroupDescriptor(4, 256, 128, "f16", "s8", -8, 7)
    variants = [dataclasses.replace(base, outer=5), dataclasses.replace(base, axis=384),
                dataclasses.replace(base, group_size=64), dataclasses.replace(base, float_dtype="f32"),
                dataclasses.replace(base, int_dtype="u8", q_min=0), dataclasses.replace(base, q_min=-7),
                dataclasses.replace(base, q_max=6),
                dqgen.DequantizePerGroupDescriptor(4, 256, 128, "f16", "s8")]
    keys = {base.key()} | {v.key() for v in variants}
    assert len(keys) == len(variants) + 1
    assert all(len(k) == 64 and int(k, 16) >= 0 for k in keys)


def test_keys_and_uris_are_stable_across_processes():
    here = [[d.uri, d.key()] for d in _all_descriptors()]
    script = ("import sys, json; sys.path[:0] = ['tests', 'tests/core']; from test_ir import _all_descriptors; "
              "print(json.dumps([[d.uri, d.key()] for d in _all_descriptors()]))")
    env = dict(os.environ, PYTHONHASHSEED="12345")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == here


def test_uris_are_unique_across_the_family():
    descs = _all_descriptors()
    assert len({d.uri for d in descs}) == len(descs)


def test_to_json_is_canonical():
    d = dqgen.QuantizePerGroupDescriptor(4, 256, 128, "f16", "u8")
    j = d.to_json()
    assert j["float_dtype"] == "f16" and j["int_dtype"] == "u8"
    assert (j["q_min"], j["q_max"]) == (0, 255)
    json.dumps(j)  # plain JSON


def test_verify_catches_a_field_forced_past_the_frozen_dataclass():
    d = dqgen.DequantizePerGroupDescriptor(4, 256, 128, "f32", "s8")
    assert d.validate() is None
    object.__setattr__(d, "group_size", 100)
    with pytest.raises(InvalidProblemError, match="group_size|axis"):
        d.validate()


@given(outer=st.integers(-3, 2**40), axis=st.integers(-3, 2**40), gs=st.integers(-3, 2**33))
def test_size_validation_is_exactly_the_spec(outer, axis, gs):
    """Valid iff sizes >= 0, 0 < group_size < 2^31, axis % group_size == 0 and
    outer * axis fits in int64 (SPEC.md §1)."""
    valid = (outer >= 0 and axis >= 0 and 0 < gs <= 2**31 - 1 and axis % gs == 0
             and outer * axis <= 2**63 - 1)
    try:
        d = dqgen.DequantizePerGroupBackwardDescriptor(outer, axis, gs, "f32")
    except InvalidProblemError:
        assert not valid
    else:
        assert valid and d.num_groups == axis // gs


def test_outer_times_axis_must_fit_in_int64():
    with pytest.raises(InvalidProblemError, match="int64"):
        dqgen.DequantizePerGroupDescriptor(2**32, 2**32, 2**16, "f32", "s8")
    dqgen.DequantizePerGroupDescriptor(2**31, 2**31, 2**16, "f32", "s8")
