"""A new process that needs an already-built kernel never invokes the compiler.

Proved with a counting compiler wrapper set as ``CC``: a tiny script that appends its
arguments to a log and then runs gcc. Separate processes share one ``DQGEN_CACHE_DIR``:
the first builds (each kernel once, even when selected for several shapes), the second
and a JIT-disabled third run without one line added to the log, and get the same bytes.
Changing the compiler (the wrapper's contents) invalidates the entries.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc on PATH")

CHILD = r"""
import hashlib, json, os, pathlib, sys
import numpy as np
import dqgen

rng = np.random.default_rng(0)
report = {}
isas = [os.environ["DQGEN_ISA"]] if os.environ.get("DQGEN_ISA") else dqgen.isa.supported_isas()
for isa in isas:
    pref = dqgen.PlanPreference(isa=isa)
    for outer in (3, 40):  # two shapes, one kernel each
        q = rng.integers(-128, 128, (outer, 256)).astype(np.int8)
        s = rng.uniform(0.1, 2, (outer, 2)).astype(np.float32)
        z = rng.integers(-5, 5, (outer, 2)).astype(np.int32)
        y = np.empty((outer, 256), np.float32)
        plan = dqgen.DequantizePerGroupPlan.select(
            dqgen.DequantizePerGroupDescriptor(outer, 256, 128, "f32", "s8"), preference=pref)
        plan.run(dqgen.DequantizePerGroupArgs(q, s, z, y))
        qq = np.empty((outer, 256), np.uint8)
        qplan = dqgen.QuantizePerGroupPlan.select(
            dqgen.QuantizePerGroupDescriptor(outer, 256, 128, "f32", "u8", 0, 15), preference=pref)
        qplan.run(dqgen.QuantizePerGroupArgs(y, s, z, qq))
        report[f"{isa}/{outer}"] = {
            "keys": [plan.sku().cache_key, qplan.sku().cache_key],
            "digest": hashlib.sha256(y.tobytes() + qq.tobytes()).hexdigest(),
        }
cached_sources = {p.read_text() for p in pathlib.Path(os.environ["DQGEN_CACHE_DIR"]).rglob("*.c")}
report["sources_beside_binaries"] = plan.source() in cached_sources and qplan.source() in cached_sources
print(json.dumps(report, sort_keys=True))
"""


def _wrapper(path: Path, log: Path, tag: str = "") -> Path:
    path.write_text(f"#!/bin/sh\n# counting compiler wrapper {tag}\n"
                    f"echo \"$*\" >> '{log}'\nexec gcc \"$@\"\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def _child(env: dict) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _lines(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def _compiles(lines: list[str]) -> list[str]:
    return [line for line in lines if "-shared" in line]


def test_second_process_reuses_the_cache_without_compiling(tmp_path):
    log = tmp_path / "cc.log"
    wrapper = _wrapper(tmp_path / "counting-cc", log)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DQGEN_")}
    env.update(CC=str(wrapper), DQGEN_CACHE_DIR=str(tmp_path / "cache"))
    from dqgen.isa import supported_isas
    kernels = 2 * len(supported_isas())  # dequantize + quantize, per ISA

    first = _child(env)
    after_first = _lines(log)
    assert len(_compiles(after_first)) == kernels, after_first  # once each, not per shape
    assert first["sources_beside_binaries"] is True

    second = _child(env)
    assert _lines(log) == after_first, "the second process ran the compiler"
    assert second == first

    third = _child(dict(env, DQGEN_DISABLE_JIT="1"))
    assert _lines(log) == after_first
    assert third == first


def test_a_different_compiler_invalidates_the_entries(tmp_path):
    log = tmp_path / "cc.log"
    wrapper = _wrapper(tmp_path / "counting-cc", log)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DQGEN_")}
    env.update(CC=str(wrapper), DQGEN_CACHE_DIR=str(tmp_path / "cache"),
               DQGEN_ISA="generic")
    first = _child(env)
    built = len(_compiles(_lines(log)))
    assert built == 2
    _wrapper(wrapper, log, tag="v2 -- a compiler upgrade")  # new size/contents
    second = _child(env)
    assert len(_compiles(_lines(log))) == 2 * built, "an upgraded compiler reused old binaries"
    runs = [k for k in first if "/" in k]
    assert [second[k]["digest"] for k in runs] == [first[k]["digest"] for k in runs]
    assert all(second[k]["keys"] != first[k]["keys"] for k in runs)
