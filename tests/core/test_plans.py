"""The Plan API (dqgen/plans.py, SPEC.md §5) of the family's four ops: select /
can_implement / workspace_size / precision_guarantee (and that its "deterministic" and
"bit_stable" claims hold: repeated runs and different thread counts give identical bytes)
/ sku (stable across processes) / run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import dqgen
import strategies as S

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _wild_problem(float_name, int_name="s8", outer=300, axis=256, gs=32, seed=0):
    """Inputs for every op with NaN/Inf/subnormal scales and values, fixed by ``seed``."""
    rng = np.random.default_rng(seed)
    fdt = S.np_dtype(float_name)
    groups = (outer, axis // gs)
    pool = np.array(S.scale_pool(float_name))
    scale = np.where(rng.random(groups) < 0.2, pool[rng.integers(0, len(pool), groups)],
                     rng.uniform(0.01, 2, groups)).astype(fdt)
    x = (rng.standard_normal((outer, axis)) * 50).astype(fdt)
    x.reshape(-1)[rng.integers(0, x.size, 50)] = np.array(S.float_specials(float_name))[
        rng.integers(0, len(S.float_specials(float_name)), 50)].astype(fdt)
    lo, hi = S.INT_RANGES[int_name]
    q = rng.integers(lo, hi + 1, (outer, axis)).astype(S.np_dtype(int_name))
    zp = rng.integers(-2**31, 2**31 - 1, groups, endpoint=True).astype(np.int32)
    return x, q, scale, zp


def _all_ops(float_name, int_name="s8", outer=300, axis=256, gs=32, pref=None):
    """(name, plan, args, output) for all four ops on one wild problem."""
    x, q, scale, zp = _wild_problem(float_name, int_name, outer, axis, gs)
    fdt = S.np_dtype(float_name)
    full = (outer, axis)
    ops = []
    d = dqgen.DequantizePerGroupDescriptor(outer, axis, gs, float_name, int_name)
    out = np.empty(full, fdt)
    ops.append(("dequantize", dqgen.DequantizePerGroupPlan.select(d, preference=pref),
                dqgen.DequantizePerGroupArgs(q, scale, zp, out), out))
    d = dqgen.QuantizePerGroupDescriptor(outer, axis, gs, float_name, int_name)
    out = np.empty(full, S.np_dtype(int_name))
    small_zp = (zp % 7).astype(np.int32)
    ops.append(("quantize", dqgen.QuantizePerGroupPlan.select(d, preference=pref),
                dqgen.QuantizePerGroupArgs(x, scale, small_zp, out), out))
    d = dqgen.DequantizePerGroupBackwardDescriptor(outer, axis, gs, float_name)
    out = np.empty(full, fdt)
    ops.append(("dequantize_backward", dqgen.DequantizePerGroupBackwardPlan.select(d, preference=pref),
                dqgen.DequantizePerGroupBackwardArgs(x, scale, out), out))
    d = dqgen.QuantizePerGroupBackwardDescriptor(outer, axis, gs, float_name, -8, 7)
    out = np.empty(full, fdt)
    with np.errstate(over="ignore"):
        dy = x * 3
    ops.append(("quantize_backward", dqgen.QuantizePerGroupBackwardPlan.select(d, preference=pref),
                dqgen.QuantizePerGroupBackwardArgs(dy, x, scale, small_zp, out), out))
    return ops


@pytest.mark.parametrize("float_name", S.FLOAT_NAMES)
def test_plan_surface(float_name):
    for name, plan, args, out in _all_ops(float_name, outer=3, axis=64):
        assert plan.workspace_size() == 0, name
        assert plan.can_implement(args) is None, name
        assert plan.run(args) is None, name
        g = plan.precision_guarantee()
        assert isinstance(g, dqgen.PrecisionGuarantee)
        expected = "f64" if float_name == "f64" else "f32"
        assert (g.math_precision, g.accumulator) == (expected, expected), name
        assert g.deterministic is True and g.bit_stable is True
        assert plan.run(args, workspace=None) is None


def test_select_reuses_the_plan_for_an_equal_descriptor():
    a = dqgen.DequantizePerGroupPlan.select(dqgen.DequantizePerGroupDescriptor(4, 64, 32, "f32", "s8"))
    b = dqgen.DequantizePerGroupPlan.select(
        dqgen.DequantizePerGroupDescriptor(4, 64, 32, np.float32, np.int8), device="cpu")
    assert a is b or a.sku() == b.sku()


@pytest.mark.parametrize("isa", S.ISAS)
@pytest.mark.parametrize("float_name", S.FLOAT_NAMES)
def test_runs_are_deterministic_to_the_byte(float_name, isa):
    """bit_stable: a second run (on a dirty output) gives the same bytes, NaN payloads too."""
    for name, plan, args, out in _all_ops(float_name, pref=dqgen.PlanPreference(isa=isa)):
        out.fill(0)
        plan.run(args)
        first = out.tobytes()
        out.reshape(-1).view(np.uint8)[:] = 0x5A
        plan.run(args)
        assert out.tobytes() == first, name


@pytest.mark.parametrize("isa", S.ISAS)
@pytest.mark.parametrize("float_name", S.FLOAT_NAMES)
def test_thread_count_does_not_change_a_bit(float_name, isa, monkeypatch):
    """300 x 256 elements is above the parallel threshold: 1, 2 and 3 threads agree."""
    from dqgen.spec import PARALLEL_MIN_ELEMENTS
    assert 300 * 256 >= PARALLEL_MIN_ELEMENTS  # else the kernels would not go parallel
    results = {}
    for threads in (1, 2, 3):
        pref = dqgen.PlanPreference(num_threads=threads, isa=isa)
        for name, plan, args, out in _all_ops(float_name, pref=pref):
            out.fill(0)
            plan.run(args)
            results.setdefault(name, []).append(out.tobytes())
    monkeypatch.setenv("DQGEN_NUM_THREADS", "2")
    for name, plan, args, out in _all_ops(float_name, pref=dqgen.PlanPreference(isa=isa)):
        plan.run(args)
        results[name].append(out.tobytes())
    for name, runs in results.items():
        assert all(r == runs[0] for r in runs), name


def test_sku_names_the_kernel():
    isa = S.ISAS[0]
    plan = dqgen.DequantizePerGroupPlan.select(
        dqgen.DequantizePerGroupDescriptor(4, 128, 128, "bf16", "u8"),
        preference=dqgen.PlanPreference(isa=isa))
    sku = plan.sku()
    assert isinstance(sku, dqgen.KernelSku)
    assert (sku.int_dtype, sku.float_dtype, sku.group_size) == ("u8", "bf16", 128)
    assert sku.target == "c" and sku.arch == isa
    assert "dequant" in sku.op.lower()
    assert len(sku.cache_key) == 64 and int(sku.cache_key, 16) >= 0
    assert len(sku.template_hash) == 64
    text = str(sku)
    assert "u8" in text and "bf16" in text and "128" in text and isa in text
    # Other kernels have other identities; runtime sizes do not change it.
    other = dqgen.DequantizePerGroupPlan.select(
        dqgen.DequantizePerGroupDescriptor(9, 256, 128, "bf16", "u8"),
        preference=dqgen.PlanPreference(isa=isa)).sku()
    assert other == sku
    if len(S.ISAS) > 1:
        generic = dqgen.DequantizePerGroupPlan.select(
            dqgen.DequantizePerGroupDescriptor(4, 128, 128, "bf16", "u8"),
            preference=dqgen.PlanPreference(isa=S.ISAS[-1])).sku()
        assert generic.cache_key != sku.cache_key and generic.arch == S.ISAS[-1]
    f16 = dqgen.DequantizePerGroupPlan.select(
        dqgen.DequantizePerGroupDescriptor(4, 128, 128, "f16", "u8"),
        preference=dqgen.PlanPreference(isa=isa)).sku()
    assert f16.cache_key != sku.cache_key and f16.uri != sku.uri


def _collect_skus():
    """The SKUs of a few kernels on every ISA, as plain JSON data."""
    out = []
    for isa in S.ISAS:
        pref = dqgen.PlanPreference(isa=isa)
        for desc, plan in [
            (dqgen.DequantizePerGroupDescriptor(4, 128, 128, "bf16", "u8"), dqgen.DequantizePerGroupPlan),
            (dqgen.QuantizePerGroupDescriptor(4, 64, 32, "f16", "s8", -8, 7), dqgen.QuantizePerGroupPlan),
        ]:
            out.append(dataclasses.asdict(plan.select(desc, preference=pref).sku()))
    return json.loads(json.dumps(out, sort_keys=True))


def test_sku_is_stable_across_processes():
    here = _collect_skus()
    script = ("import json, sys; sys.path[:0] = ['tests', 'tests/core']; from test_plans import _collect_skus; "
              "print(json.dumps(_collect_skus(), sort_keys=True))")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=ROOT, env=dict(os.environ), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == here
