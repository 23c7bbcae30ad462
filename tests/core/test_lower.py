"""The schedule (dqgen/lower.py): a descriptor lowered for a target and ISA is a frozen,
plain KernelSpec in the parameter order every target uses, and an unknown target or ISA
is refused. Nothing here builds a kernel."""

from __future__ import annotations

import dataclasses
import json
import platform

import pytest

import dqgen
from dqgen.errors import UnsupportedError
from dqgen.ir import DType, Op
from dqgen.lower import lower
from dqgen.spec import KernelSpec
from test_ir import _all_descriptors


@pytest.mark.parametrize("isa", ["avx2", "generic"] if platform.machine().lower() in
                         ("x86_64", "amd64") else ["generic"])
def test_lowering_is_a_frozen_plain_schedule(isa):
    for desc in _all_descriptors():
        spec = lower(desc, "c", isa)
        assert isinstance(spec, KernelSpec)
        with pytest.raises(dataclasses.FrozenInstanceError):
            spec.group_size = 1
        assert spec.entry == f"dqgen_{desc.uri}" and spec.uri == desc.uri
        assert spec.group_size == desc.group_size and spec.arch == isa and spec.target == "c"
        assert spec.op is desc.op and spec.float_dtype is desc.float_dtype
        compute = DType.F64 if desc.float_dtype is DType.F64 else DType.F32
        assert spec.compute_dtype is compute
        assert spec.compute_type == ("double" if compute is DType.F64 else "float")
        # Only enums, ints, bools, strings and tuples of them reach a template.
        json.dumps(spec.to_json())
        assert spec.pretty() == lower(desc, "c", isa).pretty()
        assert spec == lower(dataclasses.replace(desc, outer=desc.outer + 1), "c", isa)


def test_lowering_parameters_follow_the_args_order():
    names = {
        Op.DEQUANTIZE: ["q", "scale", "zero_point", "y", "outer", "axis"],
        Op.QUANTIZE: ["x", "scale", "zero_point", "q", "outer", "axis", "q_min", "q_max"],
        Op.DEQUANTIZE_BACKWARD: ["d_output", "scale", "d_input", "outer", "axis"],
        Op.QUANTIZE_BACKWARD: ["d_output", "x", "scale", "zero_point", "d_input", "outer", "axis",
                               "q_min", "q_max"],
    }
    for desc in _all_descriptors():
        assert [p.name for p in lower(desc, "c", "generic").params] == names[desc.op]


@pytest.mark.parametrize("target,arch", [("c", "sse9"), ("c", ""), ("c", "AVX2; rm -rf /"),
                                         ("vulkan", "generic"), ("cuda", "gfx90a"),
                                         ("cuda", "sm_9a")])
def test_lowering_refuses_unknown_targets_and_isas(target, arch):
    with pytest.raises(UnsupportedError):
        lower(dqgen.DequantizePerGroupDescriptor(1, 8, 8, "f32", "s8"), target, arch)
