#!/usr/bin/env python3
"""The fused dequantize-matmul (``dqgen.linear``) against the bytes it reads and its peers,
in one run.

    python tools/bench_linear.py [--quick] [--json PATH] [--llama-cpp PATH] [--repeat N]
                                 [--sections m1,llama,cost,int4]

1. ``M = 1`` (a decode step) on [4096, 4096], [14336, 4096] and [4096, 14336] (N, K), for
   Q4_0, Q8_0, Q4_K, Q6_K, IQ4_XS, the family's u4 and s8 (group 128) and FP8 e4m3
   (128 x 128 blocks): weight bytes a second of a reused linear plan (what ``linear``
   runs) against ``tools/stream_read.c``, a read-only stream over a buffer of the weight's
   size (a sum of 64-bit words, built with dqgen's compiler and flags, the same OpenMP
   threads), on one thread and on all; also with ``compute="int8"`` where it reads the
   weight (all but FP8).
2. llama.cpp's own CPU ``MUL_MAT`` (``tests/test-backend-ops perf``) for the GGML types at
   ``M = 1`` and 8, on the shapes its built-in perf cases have (W [4096, 14336] for every
   type, Q4_K also [4096, 4096] and [14336, 4096]), on the same thread counts: the program
   gives its CPU backend hardware_concurrency() / 2 threads, which ``tools/nprocs_shim.c``
   (LD_PRELOAD) sets. It runs in its own process, before dqgen's side is timed, not
   interleaved with it. dqgen is timed with f32 products and with ``compute="int8"`` (x
   rounded to int8 a block of 32, as llama.cpp does). (``--llama-cpp PATH``, else
   ``LLAMA_CPP_TEST_BACKEND_OPS``; skipped with the reason printed when neither is given.)
3. The fixed cost of a call on a [1, 128] Q8_0 weight: ``QuantLinear.forward``,
   ``linear(x, w, out=y)``, ``linear(x, w)`` and the reused plan's ``run``.
4. An int4 group-128 [4096, 4096] weight at ``M`` = 1, 8, 64, 512, x in f32 and bf16:
   ``linear`` (f32, and ``compute="int8"``) against torch's ``_weight_int4pack_mm_for_cpu``
   (torchao's int4 CPU path) on the same weight, dqgen's dequantize then ``torch.matmul``,
   and ``torch.matmul`` on the float weight.

Times are medians of repetitions interleaved in a shuffled order (``bench_timing``), each
the mean of a few back-to-back calls after an untimed one: the steady state of a layer
called in a loop, so a weight that fits the last-level cache is read from it, as it is by
the stream and by llama.cpp's perf mode (which repeats one node). The ``L3`` column says
which weights fit. Absolute times on a shared machine are noisy: read the ratios, which
compare contenders of one run; each row says how many CPUs other processes kept busy
meanwhile, and a noisy case is measured again while ``--patience`` lasts. Every dqgen
result is first checked bit for bit against ``dqgen.reference.linear`` (int8:
``reference.linear_int8``) on a slice of rows at each end of the weight (and GGML weights' decode against gguf-py's dequantize) before it
is timed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS))
from bench_timing import (LoadMeter, Patience, cpu_model, interleaved, spread_out,  # noqa: E402
                          summarize)

import dqgen  # noqa: E402
from dqgen import reference  # noqa: E402
from dqgen.formats.plan import FormatPlan  # noqa: E402
from dqgen.formats.weight import QuantizedWeight  # noqa: E402
from dqgen.layouts import linear_int8  # noqa: E402
from dqgen.layouts.linear import LinearDescriptor  # noqa: E402
from dqgen.plans import PlanPreference  # noqa: E402

SHAPES = ((4096, 4096), (14336, 4096), (4096, 14336))  # (N, K): attention, MLP up, MLP down
QUICK_SHAPES = ((256, 512), (512, 256))
GGML_TYPES = ("Q4_0", "Q8_0", "Q4_K", "Q6_K", "IQ4_XS")
QUANTIZABLE = ("Q4_0", "Q8_0")  # the types gguf-py's quantizer writes
FAMILY = {"u4 g128": "u4", "s8 g128": "s8"}
FP8 = "FP8 e4m3 128x128"
MXFP4 = "MXFP4 gpt-oss"   # gpt-oss's experts as stored: codes [N, K / 2], E8M0 scales [N, K / 32]
FORMATS = GGML_TYPES + tuple(FAMILY) + (FP8, MXFP4)
GROUP = 128
FP8_BLOCK = (128, 128)
CHECK_ROWS = 128  # rows at each end of W checked against reference.linear
BURST = 3         # timed back-to-back calls a sample

# test-backend-ops' built-in MUL_MAT perf cases (make_test_cases_perf): every type at
# m = 4096, k = 14336 (W [4096, 14336]) with n = 1, 2, 3, 4, 5, 8, 512; Q4_K also at
# m = 4096, 6144, 6272, 14336 with k = 4096 and n <= 8. Only these shapes compare.
# (gpt-oss's MXFP4 rows against GGML's MXFP4 blocks: the same values and bytes, laid out
# apart or in blocks)
LLAMA_NAMES = {"Q4_0": "q4_0", "Q8_0": "q8_0", "Q4_K": "q4_K", "Q6_K": "q6_K",
               "IQ4_XS": "iq4_xs", MXFP4: "mxfp4"}
LLAMA_CASES = tuple((t, (4096, 14336)) for t in GGML_TYPES) + (("Q4_K", (4096, 4096)),
                                                               ("Q4_K", (14336, 4096)),
                                                               (MXFP4, (4096, 14336)))
LLAMA_MS = (1, 8)
QUICK_LLAMA_CASES = (("Q4_0", (4096, 14336)),)
QUICK_LLAMA_MS = (1,)
LLAMA_ENV = "LLAMA_CPP_TEST_BACKEND_OPS"
LLAMA_TIMEOUT_S = 300
LLAMA_LINE = re.compile(
    r"MUL_MAT\(type_a=(\w+),type_b=f32,m=(\d+),n=(\d+),k=(\d+),bs=\[1,1\],nr=\[1,1\],"
    r"per=\[0,1,2,3\],k_v=0,o=1[^)]*\):\s+(\d+) runs -\s+([\d.]+) us/run")

INT4_SHAPE = (4096, 4096)
INT4_MS = (1, 8, 64, 512)
QUICK_INT4_SHAPE = (512, 512)
QUICK_INT4_MS = (1, 8)
# torch's f32 path of _weight_int4pack_mm_for_cpu is a scalar fallback (seconds at M = 64);
# bf16 is the path torchao uses.
TINYGEMM_F32_MAX_M = 8
SECTIONS = ("m1", "llama", "cost", "int4")


class BenchError(Exception):
    """A problem the user can fix (a path given), or a contender that gave a wrong answer."""


# --- the machine ----------------------------------------------------------------------



def cpu_flags(prefix: str = "avx512") -> list[str]:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return sorted(f for f in line.split(":", 1)[1].split() if f.startswith(prefix))
    except OSError:
        pass
    return []


def l3_bytes() -> int | None:
    """The last-level cache of CPU 0 (sysfs), or None where it is not said."""
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    sizes = []
    for index in sorted(base.glob("index*")):
        try:
            level = int((index / "level").read_text())
            text = (index / "size").read_text().strip()
        except (OSError, ValueError):
            continue
        unit = {"K": 1 << 10, "M": 1 << 20}.get(text[-1:], 1)
        sizes.append((level, int(text.rstrip("KM")) * unit))
    return max(sizes)[1] if sizes else None


def all_threads() -> int:
    return len(os.sched_getaffinity(0))


# --- the read-only stream ---------------------------------------------------------------

def _compile(source: Path, workdir: Path) -> Path:
    from dqgen.build import cc
    from dqgen.isa import host_isa
    lib = workdir / (source.stem + ".so")
    cc.compile_shared(cc.toolchain(), source, lib, host_isa())
    return lib


class ReadStream:
    """tools/stream_read.c: reads a buffer once (a sum of its 64-bit words)."""

    def __init__(self, workdir: Path) -> None:
        import cffi
        self.ffi = cffi.FFI()
        self.ffi.cdef("uint64_t stream_read(const void *data, int64_t bytes, int32_t num_threads);")
        self.lib = self.ffi.dlopen(str(_compile(TOOLS / "stream_read.c", workdir)))

    def bind(self, buf: np.ndarray, threads: int):
        fn, ptr, size = self.lib.stream_read, self.ffi.from_buffer(buf), buf.nbytes

        def call() -> int:
            return fn(ptr, size, threads)
        call.keep = buf
        return call

    def check(self) -> None:
        """Every thread count reads every byte: the sum is numpy's (mod 2^64)."""
        buf = np.random.default_rng(0).integers(0, 256, 1_000_003, dtype=np.uint8)
        words = buf[:buf.size // 8 * 8].view(np.uint64)
        want = (int(words.sum(dtype=np.uint64)) + int(buf[words.size * 8:].sum())) % 2**64
        for threads in (1, 2, 3):
            if self.bind(buf, threads)() != want:
                raise BenchError(f"the read stream is wrong on {threads} threads")


def stream_buffer(nbytes: int) -> np.ndarray:
    """A buffer of ``nbytes`` with its pages touched (written), as a loaded weight's are."""
    return np.full(nbytes, 1, np.uint8)


# --- weights ------------------------------------------------------------------------------

@dataclass
class BenchWeight:
    """A weight of one format and its reader for a slice of rows ``[a, b)`` (the check)."""

    format: str
    origin: str
    weight: QuantizedWeight
    rows: Callable[[int, int], QuantizedWeight]
    peer_dequantize: Callable[[int, int], np.ndarray] | None = None


def ggml_weight(rng, qtype: str, n: int, k: int) -> BenchWeight:
    """gguf-py's quantizer on normal values where it writes ``qtype``; random valid blocks
    (small normal d/dmin, as bench_formats makes them) where it does not."""
    import gguf
    from bench_formats import gguf_blocks
    t = gguf.GGMLQuantizationType[qtype]
    if qtype in QUANTIZABLE:
        chunks = [gguf.quants.quantize(rng.standard_normal((min(2048, n - r), k),
                                                            dtype=np.float32), t)
                  for r in range(0, n, 2048)]
        data, origin = np.concatenate(chunks), "gguf-py quantizer"
    else:
        data, origin = gguf_blocks(rng, qtype, (n, k)), "random valid blocks"
    data = np.ascontiguousarray(data.reshape(n, -1))
    return BenchWeight(qtype, origin, QuantizedWeight.ggml(data, qtype, (n, k)),
                       lambda a, b: QuantizedWeight.ggml(data[a:b], qtype, (b - a, k)),
                       lambda a, b: gguf.quants.dequantize(data[a:b], t).reshape(b - a, k))


def family_arrays(rng, storage: str, n: int, k: int):
    """Random codes, f32 scales and integer zero points of the family's ``storage``."""
    lo, hi = {"s8": (-128, 128), "u4": (0, 16)}[storage]
    values = rng.integers(lo, hi, (n, k), dtype=np.int16)
    if storage == "u4":
        q = (values[:, 0::2] | (values[:, 1::2] << 4)).astype(np.uint8)
    else:
        q = values.astype(np.int8)
    scale = (rng.random((n, k // GROUP), dtype=np.float32) * 0.02 + 1e-3)
    zp = rng.integers(-4, 12, (n, k // GROUP), dtype=np.int32)
    return q, scale, zp


def family_weight(rng, name: str, n: int, k: int) -> BenchWeight:
    storage = FAMILY[name]
    q, scale, zp = family_arrays(rng, storage, n, k)
    return BenchWeight(name, "random codes",
                       QuantizedWeight.per_group(q, scale, zp, GROUP, storage),
                       lambda a, b: QuantizedWeight.per_group(q[a:b], scale[a:b], zp[a:b],
                                                              GROUP, storage))


def fp8_weight(rng, n: int, k: int) -> BenchWeight:
    codes = rng.integers(0, 256, (n, k), dtype=np.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0x3C  # no NaN codes
    r, c = FP8_BLOCK
    scale = rng.random((-(-n // r), -(-k // c)), dtype=np.float32) * 0.01 + 1e-4

    def rows(a: int, b: int) -> QuantizedWeight:
        return QuantizedWeight.fp8(codes[a:b], scale[a // r:-(-b // r)], FP8_BLOCK, fp8="e4m3")
    return BenchWeight(FP8, "random codes", rows(0, n), rows)


def mxfp4_weight(rng, n: int, k: int) -> BenchWeight:
    """Random e2m1 codes with E8M0 scales near 1, as gpt-oss stores an expert."""
    from dqgen.formats.weight_readers import gptoss_mxfp4_weight
    blocks = rng.integers(0, 256, (n, k // 32, 16), dtype=np.uint8)
    scales = rng.integers(118, 127, (n, k // 32)).astype(np.uint8)
    return BenchWeight(MXFP4, "random codes", gptoss_mxfp4_weight(blocks, scales),
                       lambda a, b: gptoss_mxfp4_weight(blocks[a:b], scales[a:b]))


def build_weight(fmt: str, shape, seed: int) -> BenchWeight:
    rng = np.random.default_rng(seed)
    n, k = shape
    if fmt in GGML_TYPES:
        return ggml_weight(rng, fmt, n, k)
    if fmt in FAMILY:
        return family_weight(rng, fmt, n, k)
    if fmt == MXFP4:
        return mxfp4_weight(rng, n, k)
    return fp8_weight(rng, n, k)


def check_slices(bw: BenchWeight) -> list[tuple[int, int]]:
    n = bw.weight.shape[0]
    rows = min(CHECK_ROWS, n)
    return sorted({(0, rows), (n - rows, n)})


def check_decode(bw: BenchWeight) -> None:
    """GGML weights: dqgen's decode of the checked rows is gguf-py's, bit for bit."""
    if bw.peer_dequantize is None:
        return
    for a, b in check_slices(bw):
        ours = bw.rows(a, b).dequantize("f32")
        if ours.tobytes() != bw.peer_dequantize(a, b).astype(np.float32).tobytes():
            raise BenchError(f"{bw.format}: dqgen's decode of rows {a}..{b} is not gguf-py's")


def check_linear(bw: BenchWeight, x: np.ndarray, y: np.ndarray, what: str) -> None:
    """``y`` (the whole product) agrees bit for bit with ``reference.linear`` on the rows of
    W at each end (and the first rows of x)."""
    xs = x[:4]
    for a, b in check_slices(bw):
        want = reference.linear(xs, bw.rows(a, b).dequantize("f32"), None, y.dtype)
        if want.tobytes() != np.ascontiguousarray(y[:xs.shape[0], a:b]).tobytes():
            raise BenchError(f"{what}: dqgen's linear differs from reference.linear in "
                             f"rows {a}..{b} of W")


def check_linear_int8(bw: BenchWeight, x: np.ndarray, y: np.ndarray, what: str) -> None:
    """``y`` of ``compute="int8"`` agrees bit for bit with ``reference.linear_int8`` on the
    rows of W at each end (and the first rows of x)."""
    xs = x[:4]
    for a, b in check_slices(bw):
        rows = bw.rows(a, b)
        desc = LinearDescriptor(rows.descriptor, xs.shape[0], b - a, rows.shape[1],
                                compute="int8")
        want = linear_int8.expected(desc, rows.arrays, xs, None, y.dtype)
        if want.tobytes() != np.ascontiguousarray(y[:xs.shape[0], a:b]).tobytes():
            raise BenchError(f"{what}: dqgen's int8 linear differs from reference.linear_int8 "
                             f"in rows {a}..{b} of W")


def linear_call(weight: QuantizedWeight, m: int, threads: int, x: np.ndarray,
                compute: str = "f32"):
    """A reused plan's ``run`` of ``x @ W.T`` on ``threads`` threads (y in x's dtype), and y."""
    n, k = weight.shape
    dtype = {np.dtype(np.float32): "f32"}.get(x.dtype, "bf16")
    plan = FormatPlan.select(LinearDescriptor(weight.descriptor, m, n, k, dtype, dtype,
                                              compute=compute),
                             preference=PlanPreference(num_threads=threads))
    y = np.empty((m, n), x.dtype)
    arrays = {**weight.arrays, "x": x, "y": y}

    def call() -> None:
        plan.run(arrays)
    return call, y


class Noise:
    """When a case counts as noisy (other processes kept more than ``threshold`` CPUs busy,
    or a contender's samples spread over 2x) and how much waiting for a quieter machine
    and measuring again the whole run may spend (``bench_timing.Patience``)."""

    def __init__(self, threshold: float, retries: int, patience_s: float) -> None:
        self.threshold, self.retries = threshold, retries
        self.patience = Patience(patience_s)

    def noisy(self, foreign: float | None, times: dict) -> bool:
        busy = foreign is not None and foreign > self.threshold
        return busy or any(spread_out(t) for t in times.values())


def _cpus(load: float | None) -> str:
    return "?" if load is None else f"{load:.2f}"


def measure(calls: dict, repeat: int, noise: Noise,
            burst: int = BURST) -> tuple[dict, float | None]:
    """Median seconds a call of each contender, and the CPUs other processes kept busy; a
    noisy case is measured again after a wait for a quieter machine while the run's
    patience lasts, and the quietest attempt kept."""
    best = None
    for attempt in range(noise.retries + 1):
        t0 = time.monotonic()
        with LoadMeter() as meter:
            times = interleaved(calls, repeat=repeat, warmup=1, burst=burst)
        if attempt:  # measuring again spends the run's patience too
            noise.patience.left = max(0.0, noise.patience.left - (time.monotonic() - t0))
        load = meter.foreign
        if best is None or (load is not None and (best[1] is None or load < best[1])):
            best = ({name: summarize(t)["median_s"] for name, t in times.items()}, load)
        if not noise.noisy(load, times) or noise.patience.left <= 0 or attempt == noise.retries:
            break
        noise.patience.wait(15, noise.threshold)
    return best


# --- 1. M = 1 against the read stream ----------------------------------------------------

def bench_m1(shapes, thread_counts, repeat: int, noise: Noise, stream: ReadStream, keep: set,
             bank: dict) -> list[dict]:
    l3 = l3_bytes()
    rows = []
    for si, shape in enumerate(shapes):
        n, k = shape
        for fi, fmt in enumerate(FORMATS):
            bw = build_weight(fmt, shape, seed=100 * si + fi)
            check_decode(bw)
            w = bw.weight
            x = np.random.default_rng(fi).standard_normal((1, k), dtype=np.float32)
            buf = stream_buffer(w.nbytes)
            for threads in thread_counts:
                call, y = linear_call(w, 1, threads, x)
                call()
                check_linear(bw, x, y, f"{fmt} {list(shape)} M=1 on {threads} threads")
                calls = {"dqgen": call, "stream": stream.bind(buf, threads)}
                if linear_int8.reads(w.descriptor):
                    calls["int8"], y8 = linear_call(w, 1, threads, x, "int8")
                    calls["int8"]()
                    check_linear_int8(bw, x, y8, f"{fmt} {list(shape)} M=1 int8")
                med, load = measure(calls, repeat, noise)
                int8_us = med["int8"] * 1e6 if "int8" in med else None
                rows.append({
                    "format": fmt, "origin": bw.origin, "shape": [n, k], "threads": threads,
                    "weight_mib": w.nbytes / 2**20,
                    "fits_l3": None if l3 is None else w.nbytes <= l3,
                    "dqgen_us": med["dqgen"] * 1e6, "stream_us": med["stream"] * 1e6,
                    "dqgen_gbs": w.nbytes / med["dqgen"] / 1e9,
                    "stream_gbs": w.nbytes / med["stream"] / 1e9,
                    "of_stream": med["stream"] / med["dqgen"],
                    "dqgen_gflops": 2 * n * k / med["dqgen"] / 1e9, "other_cpus": load,
                    "int8_us": int8_us,
                    "int8_of_stream": None if int8_us is None else med["stream"] * 1e6 / int8_us})
            del buf
            if (fmt, tuple(shape)) in keep:
                bank[(fmt, tuple(shape))] = bw
    return rows


def m1_table(rows: list[dict]) -> str:
    lines = ["| format | W [N, K] | MiB | L3 | threads | dqgen us | dqgen GB/s | stream GB/s "
             "| dqgen / stream | dqgen GFLOP/s | int8 us | int8 / stream | other CPUs |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['format']} | {r['shape']} | {r['weight_mib']:.1f} | "
              f"{'-' if r['fits_l3'] is None else ('fits' if r['fits_l3'] else 'exceeds')} | "
              f"{r['threads']} | {r['dqgen_us']:.0f} | {r['dqgen_gbs']:.1f} | "
              f"{r['stream_gbs']:.1f} | {r['of_stream']:.2f} | {r['dqgen_gflops']:.1f} | "
              + ("- | - |" if r.get("int8_us") is None else
                 f"{r['int8_us']:.0f} | {r['int8_of_stream']:.2f} |")
              + f" {_cpus(r['other_cpus'])} |"
              for r in rows]
    return "\n".join(lines)


# --- 2. llama.cpp's CPU MUL_MAT ---------------------------------------------------------

def llama_path(given: str | None) -> tuple[Path | None, str]:
    """test-backend-ops from ``--llama-cpp`` or the environment, or None and why not. A path
    named that is not an executable file is the user's error."""
    source, value = ("--llama-cpp", given) if given else (LLAMA_ENV, os.environ.get(LLAMA_ENV))
    if not value:
        return None, (f"no test-backend-ops given (--llama-cpp PATH or {LLAMA_ENV}): "
                      "llama.cpp section skipped")
    path = Path(value).expanduser()
    if not path.is_file() or not os.access(path, os.X_OK):
        raise BenchError(f"{source} {value}: not an executable file (llama.cpp's "
                         "tests/test-backend-ops, built with -DLLAMA_BUILD_TESTS=ON)")
    return path, f"{source} {path}"


@dataclass
class LlamaRun:
    """One test-backend-ops run: us a call by (type, N, M, K), the CPUs it kept busy, the
    CPUs other processes kept busy meanwhile, and what went wrong (or "")."""

    us: dict
    busy: float = 0.0
    other_cpus: float | None = None
    problem: str = ""


def run_llama(path: Path, threads: int, cases, ms, shim: Path) -> LlamaRun:
    """test-backend-ops perf on ``cases`` x ``ms``, its CPU backend on ``threads`` threads
    (it takes hardware_concurrency() / 2: the shim makes that ``threads``)."""
    types = "|".join(sorted({LLAMA_NAMES[t] for t, _ in cases}))
    ns = "|".join(sorted({str(s[0]) for _, s in cases}))
    ks = "|".join(sorted({str(s[1]) for _, s in cases}))
    mm = "|".join(str(m) for m in ms)
    pattern = (f"type_a=({types}),type_b=f32,m=({ns}),n=({mm}),k=({ks}),"
               r"bs=\[1,1\],nr=\[1,1\],per=\[0,1,2,3\],k_v=0,o=1,")
    env = {**os.environ, "LD_PRELOAD": str(shim), "DQGEN_BENCH_NPROCS": str(2 * threads)}
    before, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.monotonic()
    try:
        with LoadMeter() as meter:  # counts the child as another process: subtracted below
            proc = subprocess.run([str(path), "perf", "-o", "MUL_MAT", "-b", "CPU", "-p",
                                   pattern], capture_output=True, text=True, env=env,
                                  timeout=LLAMA_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return LlamaRun({}, problem=f"test-backend-ops ran past {LLAMA_TIMEOUT_S} s")
    except OSError as exc:
        return LlamaRun({}, problem=f"test-backend-ops did not start: {exc}")
    after, wall = resource.getrusage(resource.RUSAGE_CHILDREN), time.monotonic() - t0
    busy = ((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)) / wall
    other = None if meter.foreign is None else max(0.0, meter.foreign - busy)
    if proc.returncode:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
        return LlamaRun({}, busy, other,
                        f"test-backend-ops exited {proc.returncode}: {' / '.join(tail)}")
    wanted = {(LLAMA_NAMES[t], s[0], m, s[1]) for t, s in cases for m in ms}
    found = {}
    for line in re.sub(r"\x1b\[[0-9;]*m", "", proc.stdout).splitlines():
        hit = LLAMA_LINE.search(line)
        if hit:
            key = (hit[1], int(hit[2]), int(hit[3]), int(hit[4]))
            if key in wanted:
                found[key] = float(hit[6])
    missing = len(wanted) - len(found)
    return LlamaRun(found, busy, other,
                    f"{missing} of {len(wanted)} cases not in its output" if missing else "")


def bench_llama(path: Path | None, cases, ms, thread_counts, repeat: int, noise: Noise,
                bank: dict, workdir: Path) -> tuple[list[dict], list[str]]:
    notes = []
    if path is None:
        return [], notes
    shim = _compile(TOOLS / "nprocs_shim.c", workdir)
    rows = []
    for threads in thread_counts:
        run = run_llama(path, threads, cases, ms, shim)
        if run.other_cpus is not None and run.other_cpus > noise.threshold \
                and noise.patience.left > 0 and not run.problem:
            noise.patience.wait(15, noise.threshold)  # a busy neighbour: once more
            again = run_llama(path, threads, cases, ms, shim)
            if again.other_cpus is not None and again.other_cpus < run.other_cpus:
                run = again
        theirs = run.us
        notes.append(f"test-backend-ops on {threads} thread(s): {run.busy:.2f} CPUs busy, "
                     f"other processes {_cpus(run.other_cpus)}"
                     + (f"; {run.problem}" if run.problem else ""))
        if threads > 1 and run.busy < 0.65 * threads:
            why = ("other processes held the CPUs" if (run.other_cpus or 0) > 0.5
                   else "the thread count did not apply")
            notes.append(f"  it did not keep {threads} CPUs busy ({why}): its {threads}-thread "
                         "rows are left out")
            continue
        for fi, (fmt, shape) in enumerate(cases):
            bw = bank.get((fmt, tuple(shape))) or build_weight(fmt, shape, seed=900 + fi)
            bank[(fmt, tuple(shape))] = bw
            n, k = shape
            for m in ms:
                us = theirs.get((LLAMA_NAMES[fmt], n, m, k))
                if us is None:
                    continue
                x = np.random.default_rng(m).standard_normal((m, k), dtype=np.float32)
                call, y = linear_call(bw.weight, m, threads, x)
                call()
                check_linear(bw, x, y, f"{fmt} {list(shape)} M={m} on {threads} threads")
                call8, y8 = linear_call(bw.weight, m, threads, x, "int8")
                call8()
                check_linear_int8(bw, x, y8, f"{fmt} {list(shape)} M={m} int8")
                med, load = measure({"dqgen": call, "int8": call8}, repeat, noise)
                rows.append({"format": fmt, "shape": [n, k], "m": m, "threads": threads,
                             "llama_us": us, "dqgen_us": med["dqgen"] * 1e6,
                             "llama_over_dqgen": us / (med["dqgen"] * 1e6),
                             "int8_us": med["int8"] * 1e6,
                             "llama_over_int8": us / (med["int8"] * 1e6),
                             "dqgen_gbs": bw.weight.nbytes / med["dqgen"] / 1e9,
                             "llama_gbs": bw.weight.nbytes / (us * 1e-6) / 1e9,
                             "other_cpus": load})
    return rows, notes


def llama_table(rows: list[dict]) -> str:
    lines = ["| format | W [N, K] | M | threads | llama.cpp us | dqgen f32 us | llama.cpp / dqgen "
             "f32 | dqgen int8 us | llama.cpp / dqgen int8 | llama.cpp GB/s | dqgen f32 GB/s "
             "| other CPUs (dqgen) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['format']} | {r['shape']} | {r['m']} | {r['threads']} | "
              f"{r['llama_us']:.0f} | {r['dqgen_us']:.0f} | {r['llama_over_dqgen']:.2f} | "
              f"{r['int8_us']:.0f} | {r['llama_over_int8']:.2f} | "
              f"{r['llama_gbs']:.1f} | {r['dqgen_gbs']:.1f} | {_cpus(r['other_cpus'])} |"
              for r in rows]
    return "\n".join(lines)


# --- 3. the fixed cost of a call ---------------------------------------------------------

def per_call_us(fn, calls: int, loops: int) -> float:
    """The median over ``loops`` loops of ``calls`` calls, in microseconds a call."""
    for _ in range(min(calls, 200)):
        fn()
    samples = []
    for _ in range(loops):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - t0) / calls)
    return statistics.median(samples) * 1e6


def bench_call_cost(calls: int, loops: int) -> list[dict]:
    import gguf
    import torch
    from dqgen.formats.weight import linear, linear_plan
    from dqgen.ir import DType
    from dqgen.torch_nn import QuantLinear
    rng = np.random.default_rng(3)
    data = gguf.quants.quantize(rng.standard_normal((1, 128), dtype=np.float32),
                                gguf.GGMLQuantizationType.Q8_0)
    w = QuantizedWeight.ggml(data, "Q8_0", (1, 128))
    x = rng.standard_normal((1, 128), dtype=np.float32)
    y = np.empty((1, 1), np.float32)
    plan = linear_plan(w.descriptor, 1, 128, 1, DType.F32, DType.F32, False)
    arrays = {**w.arrays, "x": x, "y": y}
    module = QuantLinear(w)
    xt = torch.from_numpy(x)
    wf = torch.from_numpy(w.dequantize("f32"))
    want = reference.linear(x, w.dequantize("f32"), None, np.float32)
    with torch.no_grad():
        for got in (linear(x, w), linear(x, w, out=np.empty((1, 1), np.float32)),
                    module(xt).numpy()):
            if got.tobytes() != want.tobytes():
                raise BenchError("Q8_0 [1, 128]: a call differs from reference.linear")
        cases = {
            "plan.run (the plan linear() uses)": lambda: plan.run(arrays),
            "linear(x, w, out=y)": lambda: linear(x, w, out=y),
            "linear(x, w)": lambda: linear(x, w),
            "QuantLinear.forward (torch, no_grad)": lambda: module(xt),
            "torch F.linear, float [1, 128] weight": lambda: torch.nn.functional.linear(xt, wf),
        }
        times = {name: per_call_us(fn, calls, loops) for name, fn in cases.items()}
    base = times["plan.run (the plan linear() uses)"]
    return [{"call": name, "us": us, "over_run": us / base} for name, us in times.items()]


def call_table(rows: list[dict]) -> str:
    lines = ["| call | us | / plan.run |", "|---|---|---|"]
    lines += [f"| {r['call']} | {r['us']:.2f} | {r['over_run']:.2f} |" for r in rows]
    return "\n".join(lines)


# --- 4. int4 group 128 against torch ------------------------------------------------------

def torch_view(arr: np.ndarray):
    """A CPU tensor sharing ``arr`` (bfloat16 through its bits)."""
    import ml_dtypes
    import torch
    if arr.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(arr)


def int4_weight(rng, n: int, k: int):
    """u4 codes, scales ``c * 2^-e`` (c < 16) and integer zero points: then tinygemm's
    float zero ``(8 - zp) * scale`` and every weight value are exact in bf16, so dqgen's
    ``(q - zp) * scale`` and tinygemm's ``(q - 8) * scale + zero`` are the same weight."""
    values = rng.integers(0, 16, (n, k), dtype=np.int32)
    q = (values[:, 0::2] | (values[:, 1::2] << 4)).astype(np.uint8)
    groups = (n, k // GROUP)
    scale = (rng.integers(1, 16, groups) * 2.0 ** -rng.integers(8, 12, groups)).astype(np.float32)
    zp = rng.integers(0, 16, groups, dtype=np.int32)
    return values, q, scale, zp


def bench_int4(shape, ms, threads: int, repeat: int, noise: Noise) -> tuple[list[dict], list[str]]:
    import ml_dtypes
    import torch
    from dqgen.ir import DequantizePerGroupDescriptor
    from dqgen.plans import DequantizePerGroupArgs, DequantizePerGroupPlan
    torch.set_num_threads(threads)
    n, k = shape
    values, q, scale, zp = int4_weight(np.random.default_rng(4), n, k)
    w = QuantizedWeight.per_group(q, scale, zp, GROUP, "u4")
    w32 = w.dequantize("f32")
    expanded = np.repeat(np.arange(k // GROUP), GROUP)
    want = ((values - zp[:, expanded]) * scale[:, expanded]).astype(np.float32)
    if w32.tobytes() != want.tobytes():
        raise BenchError("int4: dqgen's decode is not (q - zp) * scale")
    bw = BenchWeight("u4 g128", "random codes", w,
                     lambda a, b: QuantizedWeight.per_group(q[a:b], scale[a:b], zp[a:b], GROUP,
                                                            "u4"))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.from_numpy(values), 1)
    zero = (8 - zp) * scale  # exact (see int4_weight)
    rows, notes = [], []
    for name, np_dtype, t_dtype in (("f32", np.float32, torch.float32),
                                    ("bf16", ml_dtypes.bfloat16, torch.bfloat16)):
        # torchao's pack_tinygemm_scales_and_zeros: [K / group, N, 2] (scale, zero)
        sz = torch.stack([torch.from_numpy(scale), torch.from_numpy(zero)], -1).to(t_dtype) \
            .transpose(0, 1).contiguous()
        w_float = torch_view(np.ascontiguousarray(w32.astype(np_dtype)))
        deq = DequantizePerGroupPlan.select(
            DequantizePerGroupDescriptor(n, k, GROUP, name, "u4"),
            preference=PlanPreference(num_threads=threads))
        w_buf = np.empty((n, k), np_dtype)
        deq_args = DequantizePerGroupArgs(q, scale.astype(np_dtype), zp, w_buf)
        w_buf_t = torch_view(w_buf)
        deq.run(deq_args)
        if w_buf.tobytes() != w32.astype(np_dtype).tobytes():
            raise BenchError(f"int4 -> {name}: the dequantize plan's weight is not the linear's")
        for m in ms:
            x = np.random.default_rng(m).standard_normal((m, k), dtype=np.float32).astype(np_dtype)
            xt = torch_view(x)
            dq, y = linear_call(w, m, threads, x)
            dq()
            check_linear(bw, x, y, f"int4 {name} M={m}")
            dq8, y8 = linear_call(w, m, threads, x, "int8")
            dq8()
            check_linear_int8(bw, x, y8, f"int4 {name} M={m} int8")
            calls = {"dqgen": dq, "dqgen int8": dq8,
                     "dequantize+matmul": lambda: (deq.run(deq_args), torch.matmul(xt, w_buf_t.T)),
                     "matmul float W": lambda: torch.matmul(xt, w_float.T)}
            if name == "bf16" or m <= TINYGEMM_F32_MAX_M:
                def tinygemm(xt=xt, sz=sz):
                    return torch.ops.aten._weight_int4pack_mm_for_cpu(xt, packed, GROUP, sz)
                got = tinygemm().float().numpy()
                ref = x.astype(np.float64) @ w32.T.astype(np.float64)
                if np.abs(got - ref).max() > 0.01 * np.abs(ref).max():
                    raise BenchError(f"int4 {name} M={m}: tinygemm is not the same weight's "
                                     "product")
                calls["tinygemm"] = tinygemm
            elif m == min(mm for mm in ms if mm > TINYGEMM_F32_MAX_M):
                notes.append(f"tinygemm with f32 x is torch's scalar fallback (seconds a call "
                             f"at M = 64): timed at M <= {TINYGEMM_F32_MAX_M} only")
            med, load = measure(calls, repeat if m < 512 else max(3, repeat // 2), noise, burst=2)
            row = {"x_dtype": name, "m": m, "shape": [n, k], "threads": threads,
                   "dqgen_us": med["dqgen"] * 1e6,
                   "dqgen_gflops": 2 * m * n * k / med["dqgen"] / 1e9, "other_cpus": load}
            for other in ("dqgen int8", "tinygemm", "dequantize+matmul", "matmul float W"):
                if other in med:
                    row[f"{other}_us"] = med[other] * 1e6
                    row[f"{other}_over_dqgen"] = med[other] / med["dqgen"]
            rows.append(row)
    return rows, notes


def int4_table(rows: list[dict]) -> str:
    def cell(r, name):
        if f"{name}_us" not in r:
            return "-"
        return f"{r[f'{name}_us']:.0f} ({r[f'{name}_over_dqgen']:.2f}x)"
    lines = ["| x | M | dqgen us | dqgen GFLOP/s | dqgen int8 us (/ dqgen) | tinygemm us (/ dqgen) "
             "| dequantize + matmul us (/ dqgen) | matmul float W us (/ dqgen) | other CPUs |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['x_dtype']} | {r['m']} | {r['dqgen_us']:.0f} | {r['dqgen_gflops']:.1f} | "
              f"{cell(r, 'dqgen int8')} | {cell(r, 'tinygemm')} | {cell(r, 'dequantize+matmul')} | "
              f"{cell(r, 'matmul float W')} | {_cpus(r['other_cpus'])} |" for r in rows]
    return "\n".join(lines)


# --- the run --------------------------------------------------------------------------------

def write_json(path: Path, record: dict) -> None:
    """Atomically: a temporary file beside ``path``, then a rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent or ".", prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(record, indent=2) + "\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def header(threads: list[int], llama_note: str) -> dict:
    from dqgen.isa import host_isa
    l3 = l3_bytes()
    info = {"cpu": cpu_model(), "avx512_flags": cpu_flags(), "cpus": all_threads(),
            "thread_counts": threads, "l3_bytes": l3, "dqgen": dqgen.__version__,
            "isa": host_isa(), "llama_cpp": llama_note}
    print(f"CPU: {info['cpu']}, {info['cpus']} CPUs, L3 "
          f"{'?' if l3 is None else f'{l3 / 2**20:.0f} MiB'}")
    print(f"avx512 flags: {' '.join(info['avx512_flags']) or 'none'}")
    print(f"dqgen {info['dqgen']}, kernels for {info['isa']}; thread counts: "
          f"{', '.join(map(str, threads))}")
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="small shapes, few repetitions (a smoke run)")
    p.add_argument("--repeat", type=int, default=None,
                   help="repetitions a case (default 9, quick 3)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write every row here")
    p.add_argument("--llama-cpp", default=None, metavar="PATH",
                   help=f"llama.cpp's test-backend-ops (default: ${LLAMA_ENV})")
    p.add_argument("--sections", default=",".join(SECTIONS), metavar="LIST",
                   help=f"the sections to run, comma-separated (default: {','.join(SECTIONS)})")
    p.add_argument("--noisy", type=float, default=0.15, help="CPUs busy in other processes "
                   "above which a case is measured again (default 0.15)")
    p.add_argument("--patience", type=float, default=None, help="seconds the run may spend "
                   "waiting for a quieter machine and measuring noisy cases again (default 60, "
                   "quick 0)")
    args = p.parse_args(argv)
    repeat = args.repeat if args.repeat is not None else (3 if args.quick else 9)
    if repeat < 1:
        p.error(f"--repeat must be at least 1, got {repeat}")
    if args.json and not Path(args.json).expanduser().resolve().parent.is_dir():
        p.error(f"--json {args.json}: its folder does not exist")
    sections = [name.strip() for name in args.sections.split(",") if name.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown or not sections:
        p.error(f"--sections {args.sections}: the sections are {', '.join(SECTIONS)}")
    try:
        llama, llama_note = llama_path(args.llama_cpp) if "llama" in sections \
            else (None, "llama.cpp section not asked for")
    except BenchError as exc:
        p.error(str(exc))
    threads = sorted({1, all_threads()})
    t_start = time.monotonic()
    info = header(threads, llama_note)
    patience = args.patience if args.patience is not None else (0.0 if args.quick else 60.0)
    noise = Noise(args.noisy, retries=0 if args.quick else 1, patience_s=patience)
    load = noise.patience.wait(min(20.0, patience), args.noisy)
    print(f"other processes keep {'?' if load is None else f'{load:.2f}'} CPUs busy at the start\n")
    shapes = QUICK_SHAPES if args.quick else SHAPES
    cases = QUICK_LLAMA_CASES if args.quick else LLAMA_CASES
    llama_ms = QUICK_LLAMA_MS if args.quick else LLAMA_MS
    record = {"machine": info, "start_other_cpus": load, "noisy_threshold_cpus": args.noisy,
              "patience_s": patience}
    try:
        with tempfile.TemporaryDirectory(prefix="dqgen-bench-linear-") as work:
            stream = ReadStream(Path(work))  # before torch: one OpenMP runtime for all
            stream.check()
            bank: dict = {}
            keep = {(f, tuple(s)) for f, s in cases} if llama else set()
            if "m1" in sections:
                m1 = bench_m1(shapes, threads, repeat, noise, stream, keep, bank)
                print("## 1. M = 1: weight bytes a second against a read-only stream of as "
                      "many bytes\n")
                print(m1_table(m1) + "\n")
                record["m1"] = m1
            if "llama" in sections:
                print("## 2. llama.cpp's CPU MUL_MAT (test-backend-ops perf), same shape and "
                      "threads\n")
                llama_rows, notes = bench_llama(llama, cases, llama_ms, threads, repeat, noise,
                                                bank, Path(work))
                bank.clear()
                print(llama_note if llama is None else "\n".join(notes))
                if llama_rows:
                    print("\n" + llama_table(llama_rows))
                print()
                record["llama_cpp"] = {"rows": llama_rows, "notes": notes}
        if "cost" in sections:
            calls, loops = (300, 5) if args.quick else (2000, 15)
            cost = bench_call_cost(calls, loops)
            print("## 3. Fixed cost of a call: Q8_0 weight [1, 128], x [1, 128] f32 "
                  f"(median of {loops} loops of {calls} calls)\n")
            print(call_table(cost) + "\n")
            record["call_cost"] = cost
        if "int4" in sections:
            shape, ms = (QUICK_INT4_SHAPE, QUICK_INT4_MS) if args.quick else (INT4_SHAPE, INT4_MS)
            int4, notes = bench_int4(shape, ms, all_threads(), repeat, noise)
            print(f"## 4. int4 group 128 {list(shape)}, {all_threads()} threads: dqgen linear "
                  "against torch (ratios: their time / dqgen's)\n")
            print(int4_table(int4))
            for note in notes:
                print(f"\n{note}")
            record["int4"] = {"rows": int4, "notes": notes}
    except BenchError as exc:
        print(f"bench_linear: {exc}", file=sys.stderr)
        return 1
    record["elapsed_s"] = time.monotonic() - t_start
    record["patience_left_s"] = noise.patience.left
    print(f"\n({record['elapsed_s']:.0f} s)")
    if args.json:
        write_json(Path(args.json).expanduser(), record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
