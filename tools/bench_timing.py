"""Timing for tools/bench.py: interleaved repetitions, and how busy the machine was.

On a shared 2-core machine a neighbour's process stalls every 2-thread parallel region,
so each measurement also records the CPUs other processes kept busy meanwhile.
"""

from __future__ import annotations

import os
import platform
import random
import statistics
import sys
import time


def interleaved(calls: dict, repeat: int, warmup: int, seed: int = 0,
                burst: int = 1) -> dict[str, list[float]]:
    """Seconds a call for each contender: one turn of each per repetition, in an order
    shuffled every repetition (seeded), so that no contender always runs first or always
    follows the same one.

    With ``burst`` > 1 a turn is one untimed call and then ``burst`` timed back-to-back
    calls (their mean is the sample): the steady state of a call repeated in a loop, for
    problems small enough that the previous contender's cache footprint would otherwise
    decide the time."""
    names = list(calls)
    times: dict[str, list[float]] = {n: [] for n in names}
    clock = time.perf_counter_ns
    order = random.Random(seed)
    for rep in range(warmup + repeat):
        sequence = names[:]
        order.shuffle(sequence)
        for name in sequence:
            fn = calls[name]
            if burst > 1:
                result = fn()
                del result
                t0 = clock()
                for _ in range(burst):
                    result = fn()
                    del result
                t1 = clock()
            else:
                t0 = clock()
                result = fn()
                t1 = clock()
                del result  # a fresh output is freed outside the timed region
            if rep >= warmup:
                times[name].append((t1 - t0) * 1e-9 / burst)
    return times


def summarize(samples: list[float]) -> dict:
    s = sorted(samples)
    return {"median_s": statistics.median(s), "min_s": s[0], "max_s": s[-1],
            "q1_s": s[len(s) // 4], "q3_s": s[(3 * len(s)) // 4], "n": len(s)}


def spread_out(samples: list[float], factor: float = 2.0) -> bool:
    """True when the upper quartile exceeds ``factor`` times the lower one: a bimodal
    sample (on this VM, fresh memory sometimes stalls for hundreds of ms) whose median
    may sit in either mode."""
    s = sorted(samples)
    return len(s) >= 4 and s[(3 * len(s)) // 4] > factor * s[len(s) // 4]


class LoadMeter:
    """CPUs kept busy by other processes during a ``with`` block: all busy CPU time in
    /proc/stat less this process's own (every thread's) CPU time, per second of wall time.
    ``foreign`` stays None where /proc/stat is missing."""

    HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    @staticmethod
    def _busy_s() -> float | None:
        try:
            with open("/proc/stat") as fh:
                v = [int(x) for x in fh.readline().split()[1:9]]
        except (OSError, ValueError):
            return None
        return (sum(v) - v[3] - v[4]) / LoadMeter.HZ  # everything but idle and iowait

    def __enter__(self) -> "LoadMeter":
        self.busy0, self.own0, self.t0 = self._busy_s(), time.process_time(), time.monotonic()
        self.foreign: float | None = None
        return self

    def __exit__(self, *exc) -> None:
        busy = self._busy_s()
        if busy is not None and self.busy0 is not None:
            elapsed = max(time.monotonic() - self.t0, 1e-9)
            own = time.process_time() - self.own0
            self.foreign = max(0.0, (busy - self.busy0 - own) / elapsed)


def foreign_load(seconds: float = 1.0) -> float | None:
    """CPUs other processes use now, sampled over ``seconds``."""
    with LoadMeter() as meter:
        time.sleep(seconds)
    return meter.foreign


def wait_quiet(limit_s: float, threshold: float) -> float | None:
    """Wait at most ``limit_s`` until other processes use under ``threshold`` CPUs;
    return the last sample."""
    deadline = time.monotonic() + limit_s
    load = foreign_load()
    while load is not None and load > threshold and time.monotonic() < deadline:
        print(f"bench: other processes keep {load:.2f} CPUs busy; waiting for a quieter machine",
              file=sys.stderr, flush=True)
        time.sleep(4)
        load = foreign_load()
    return load


class Patience:
    """The seconds a whole run may spend waiting for a quiet machine, shared by the wait
    at the start and the waits before re-measuring a noisy case."""

    def __init__(self, seconds: float) -> None:
        self.left = max(0.0, seconds)

    def wait(self, limit_s: float, threshold: float) -> float | None:
        t0 = time.monotonic()
        load = wait_quiet(min(limit_s, self.left), threshold)
        self.left = max(0.0, self.left - (time.monotonic() - t0))
        return load


def cpu_model() -> str:
    """The CPU's marketing name (/proc/cpuinfo), else what platform knows."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
