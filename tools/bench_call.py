#!/usr/bin/env python3
"""The fixed cost of a call: a reused plan's ``run()`` against the plain functions on the
smallest problems (one [1, 128] group; one Q8_0 block), with ``out=`` and without, in one
run. The plain functions' target is within 2x of ``run()`` (dqgen/call_memo.py).

    python tools/bench_call.py [--repeat 7]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import dqgen
from dqgen.formats import ggml
from bench_timing import cpu_model




def per_call_us(fn, calls: int, repeat: int) -> float:
    """The fastest of ``repeat`` loops of ``calls`` calls, in microseconds a call."""
    for _ in range(200):
        fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best * 1e6


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--calls", type=int, default=20000)
    args = p.parse_args()
    q = np.random.default_rng(0).integers(-128, 128, (1, 128), dtype=np.int8)
    scale, zp = np.ones((1, 1), np.float32), np.zeros((1, 1), np.int32)
    out = np.empty((1, 128), np.float32)
    desc = dqgen.DequantizePerGroupDescriptor(1, 128, 128, "f32", "s8")
    plan = dqgen.DequantizePerGroupPlan.select(desc, preference=dqgen.PlanPreference(num_threads=1))
    run_args = dqgen.DequantizePerGroupArgs(q, scale, zp, out)
    block = np.zeros(34, np.uint8)
    block[:2] = np.frombuffer(np.float16(0.5).tobytes(), np.uint8)
    block_out = np.empty(32, np.float32)
    row, row_out = block.reshape(1, 34).copy(), np.empty((1, 32), np.float32)
    cases = {
        "plan.run, [1, 128] s8->f32": lambda: plan.run(run_args),
        "dequantize_per_group, out=": lambda: dqgen.dequantize_per_group(q, scale, zp, 128, out=out),
        "dequantize_per_group": lambda: dqgen.dequantize_per_group(q, scale, zp, 128),
        "ggml.dequantize Q8_0 [34], out=": lambda: ggml.dequantize(block, "Q8_0", "f32", out=block_out),
        "ggml.dequantize Q8_0 [1, 34], out=": lambda: ggml.dequantize(row, "Q8_0", "f32", out=row_out),
        "ggml.dequantize Q8_0 [34]": lambda: ggml.dequantize(block, "Q8_0", "f32"),
    }
    times = {name: per_call_us(fn, args.calls, args.repeat) for name, fn in cases.items()}
    base = times["plan.run, [1, 128] s8->f32"]
    print(f"{cpu_model()}, {len(__import__('os').sched_getaffinity(0))} CPUs, one thread a call")
    for name, us in times.items():
        print(f"  {name:36s} {us:6.2f} us  {us / base:5.2f}x run()")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
