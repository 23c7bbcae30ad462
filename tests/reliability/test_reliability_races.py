"""Races: many processes or threads selecting the same kernel on an empty cache.

The compiler wrapper sleeps before compiling, so every contender arrives while the first
build is still running: all must get a correct kernel, the compiler must run once (and
its version probe once), and nothing temporary may be left in the cache.
"""

from __future__ import annotations

import threading
import time

import numpy as np

import dqgen
from dqgen import reference
import test_reliability_support as support
from test_reliability_support import (CHECK, CompilerWrapper, child_env, entries, leftovers,
                                      needs_cc, start_child)

isolated = support.isolated  # the fixture, shared

CONTENDERS = 8

RACER = CHECK + """
import sys, time
from pathlib import Path
go, ready = Path(sys.argv[1]), Path(sys.argv[2])
ready.touch()
deadline = time.monotonic() + 30
while not go.exists() and time.monotonic() < deadline:
    time.sleep(0.002)
plan, ok = check()
print("OK" if ok else "WRONG", plan._kernel.compiled)
"""


@needs_cc
def test_processes_started_at_once_build_once(tmp_path):
    cc = CompilerWrapper(tmp_path / "bin", before="sleep 0.5")
    cache_dir = tmp_path / "cache"
    env = child_env(cache_dir, cc)
    go = tmp_path / "go"
    children = [start_child(RACER, env, str(go), str(tmp_path / f"ready{i}"))
                for i in range(CONTENDERS)]
    deadline = time.monotonic() + 60
    while (sum((tmp_path / f"ready{i}").exists() for i in range(CONTENDERS)) < CONTENDERS
           and time.monotonic() < deadline):
        time.sleep(0.01)
    go.touch()  # every child has imported dqgen: release them together
    results = [child.communicate(timeout=120) for child in children]
    for child, (out, err) in zip(children, results):
        assert child.returncode == 0, err
        assert out.split()[0] == "OK", out + err
    built = [out.split()[1] == "True" for out, _ in results]
    assert sum(built) == 1, "exactly one process should have compiled the kernel"
    assert cc.compiles == 1
    assert cc.probes == 1, "the compiler's version probe should also run once"
    assert len(entries(cache_dir)) == 1
    assert leftovers(cache_dir) == []


@needs_cc
def test_threads_in_one_process_build_once(isolated, tmp_path, monkeypatch):
    cc = CompilerWrapper(tmp_path / "bin", before="sleep 0.5")
    monkeypatch.setenv("CC", str(cc.path))
    desc = dqgen.DequantizePerGroupDescriptor(8, 256, 64, "f32", "s8")
    rng = np.random.default_rng(1)
    q = rng.integers(-128, 128, (8, 256), dtype=np.int8)
    s = rng.standard_normal((8, 4)).astype(np.float32)
    z = rng.integers(-300, 300, (8, 4)).astype(np.int32)
    expected = reference.dequantize_per_group(q, s, z, 64).tobytes()
    barrier = threading.Barrier(CONTENDERS)
    results, errors = [], []

    def contender():
        try:
            barrier.wait(timeout=30)
            plan = dqgen.DequantizePerGroupPlan.select(desc)
            y = np.empty((8, 256), np.float32)
            plan.run(dqgen.DequantizePerGroupArgs(q, s, z, y))
            results.append((y.tobytes() == expected, plan._kernel))
        except BaseException as exc:  # reported below, with the thread's error
            errors.append(exc)

    threads = [threading.Thread(target=contender) for _ in range(CONTENDERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert len(results) == CONTENDERS and all(ok for ok, _ in results)
    assert len({id(kernel) for _, kernel in results}) == 1, "one loaded kernel shared by all"
    assert cc.compiles == 1
    assert cc.probes == 1
    assert leftovers(isolated) == []
