"""JIT timings for tools/bench.py: cold build, load from cache in a new process, and a
repeated select in this process.

Cold and warm calls run in child processes (a fresh interpreter, its own
``DQGEN_CACHE_DIR``) and time ``select`` there, so interpreter start-up and
``import dqgen`` are reported separately rather than folded in.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import dqgen

ROOT = Path(__file__).resolve().parent.parent
KERNEL = dict(outer=4096, axis=4096, group_size=128, float_dtype="bf16", int_dtype="s8")

_CHILD = textwrap.dedent("""
    import json, sys, time
    t0 = time.perf_counter()
    import dqgen
    t1 = time.perf_counter()
    desc = dqgen.DequantizePerGroupDescriptor(**KERNEL)
    profile = None
    if PROFILE:
        import cProfile, io, pstats
        profile = cProfile.Profile()
        profile.enable()
    t2 = time.perf_counter()
    plan = dqgen.DequantizePerGroupPlan.select(desc)
    t3 = time.perf_counter()
    top = []
    if profile is not None:
        profile.disable()
        text = io.StringIO()
        pstats.Stats(profile, stream=text).sort_stats("cumulative").print_stats(18)
        top = [line.rstrip() for line in text.getvalue().splitlines() if line.strip()]
    kernel = getattr(plan, "_kernel", None)
    print(json.dumps({"import_s": t1 - t0, "select_s": t3 - t2, "profile": top,
                      "compiled": getattr(kernel, "compiled", None), "sku": str(plan.sku())}))
""")


def _child(cache_dir: Path, profile: bool = False) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("DQGEN_DISABLE_JIT", "DQGEN_BUNDLE")}
    env["DQGEN_CACHE_DIR"] = str(cache_dir)
    code = _CHILD.replace("KERNEL", repr(KERNEL)).replace("PROFILE", repr(profile))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          cwd=str(ROOT), timeout=600, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"bench: the JIT child process failed:\n{proc.stderr}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_wall_s"] = wall
    return result


def _repeated_select(n: int = 2000) -> tuple[float, float]:
    """Median seconds of select: the same descriptor object, and an equal new one."""
    desc = dqgen.DequantizePerGroupDescriptor(**KERNEL)
    select = dqgen.DequantizePerGroupPlan.select
    select(desc)
    equal = [dqgen.DequantizePerGroupDescriptor(**KERNEL) for _ in range(n)]
    same, new = [], []
    clock = time.perf_counter_ns
    for other in equal:
        t0 = clock()
        select(desc)
        t1 = clock()
        select(other)
        t2 = clock()
        same.append((t1 - t0) * 1e-9)
        new.append((t2 - t1) * 1e-9)
    return statistics.median(same), statistics.median(new)


def run_jit(cold_trials: int, load_trials: int) -> dict:
    cold, loads = [], []
    with tempfile.TemporaryDirectory(prefix="dqgen-bench-jit-") as tmp:
        for i in range(cold_trials):
            # An empty cache: nothing built, not even the compiler's version probe.
            cold.append(_child(Path(tmp) / f"cache{i}"))
            if cold[-1]["compiled"] is False:
                raise SystemExit("bench: the cold-cache child loaded a kernel instead of building it")
        for _ in range(load_trials):
            loads.append(_child(Path(tmp) / "cache0"))
            if loads[-1]["compiled"] is True:
                raise SystemExit("bench: the warm-cache child rebuilt the kernel")
        profile = _child(Path(tmp) / "cache0", profile=True)["profile"]
    same, new = _repeated_select()
    return {
        "kernel": dict(KERNEL),
        "cold_build": cold,
        "cold_build_median_s": statistics.median(c["select_s"] for c in cold),
        "new_process_load": loads,
        "new_process_load_median_s": statistics.median(c["select_s"] for c in loads),
        "new_process_load_profile": profile,
        "import_median_s": statistics.median(c["import_s"] for c in loads),
        "process_wall_median_s": statistics.median(c["process_wall_s"] for c in loads),
        "repeated_select_median_us": same * 1e6,
        "repeated_select_equal_desc_median_us": new * 1e6,
    }
