#!/usr/bin/env python3
"""Benchmark dqgen's dequantize against the memory-bandwidth limit, numpy and torch.

Everything is timed in one process run, interleaved: each repetition calls every
contender once, in an order shuffled anew every repetition, so that drift on a noisy
machine hits them all alike. Medians are compared as ratios within the run.

Contenders (CPU):
  stream       a C loop reading the same int8 array and writing an output of the same
               width (tools/stream_baseline.c, built with dqgen's compiler and flags,
               same OpenMP thread count): the bandwidth limit the targets compare to
  stream_nt    the same stream with non-temporal stores; the large-shape target takes the
               faster of the two (the true bound far beyond the caches), the plain-stream
               ratio stays for information
  floor        f16/bf16: the same bytes converted, q -> F((float)q) rounded exactly as
               dqgen rounds, no scale (the least work of any exact kernel on this ISA)
  dqgen        a reused plan's run() into a preallocated output
  dqgen_fresh  dqgen.dequantize_per_group(), returning a fresh output
  numpy        ((q.astype(C) - zp) * scale).astype(F), broadcast per group (one thread)
  torch_op     torch.ops.quantized_decomposed.dequantize_per_channel_group
  torch_expr   the same broadcast expression in torch
numpy and torch are timed only at the group sizes of --baseline-groups (default 128)
and the int dtypes of --baseline-ints (default s8): they take most of the run's time and
barely depend on either. Every case checks dqgen's outputs bit for bit against
dqgen.reference (first and last rows) and numpy's expression (all of it), so no timing
belongs to a wrong answer.

Also: run() overhead on a tiny problem; JIT cold build (fresh cache, new process), a
new process loading the kernel from cache, and a repeated select. Full runs add the
checkpoint formats (tools/bench_formats.py) and the PyTorch ops (tools/bench_torch.py).

  python tools/bench.py                 full run: docs/bench.json, docs/bench.md, docs/bench.png
  python tools/bench.py --update-doc    the same, and rewrite the generated block of docs/PERFORMANCE.md
  python tools/bench.py --quick         a subset in under a minute (docs/bench-quick.*)
  python tools/bench.py --from-json docs/bench.json [--update-doc]   re-render a saved run
  python tools/bench.py --device cuda   GPU effective bandwidth against a device-to-device copy and
                                        torch eager (needs torch with CUDA; tools/device_check.sh
                                        runs it with the GPU tests)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]

import ml_dtypes  # noqa: E402

import dqgen  # noqa: E402
from dqgen import reference  # noqa: E402
from dqgen.isa import cpu_flags, host_isa, supported_isas  # noqa: E402

import bench_report as report  # noqa: E402
from bench_stream import Stream  # noqa: E402
from bench_timing import LoadMeter, Patience, interleaved, spread_out, summarize  # noqa: E402

FULL_SHAPES = ((4096, 4096), (11008, 4096), (64, 4096))
FULL_DTYPES = tuple((i, f) for i in ("s8", "u8") for f in ("f32", "f16", "bf16", "f64"))
FULL_GROUPS = (32, 64, 128)
NP_FLOAT = {"f32": np.dtype(np.float32), "f16": np.dtype(np.float16),
            "bf16": np.dtype(ml_dtypes.bfloat16), "f64": np.dtype(np.float64)}
NP_INT = {"s8": np.dtype(np.int8), "u8": np.dtype(np.uint8)}
SMALL_REPEAT = 50  # timed runs at least, for problems under report.SMALL_ELEMENTS,
SMALL_BURST = 4    # each the mean of this many back-to-back calls after an untimed one


# --------------------------------------------------------------------------- options

def _shape(text: str) -> tuple[int, int]:
    try:
        rows, cols = (int(v) for v in text.lower().replace("*", "x").split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r} is not ROWSxCOLS") from None
    if rows <= 0 or cols <= 0:
        raise argparse.ArgumentTypeError(f"shape {text!r} must be positive")
    return rows, cols


def _shapes(text: str) -> tuple[tuple[int, int], ...]:
    return tuple(_shape(s) for s in text.split(",") if s.strip())


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: every value must be >= 1")
    return values


def _dtype_pairs(text: str) -> tuple[tuple[str, str], ...]:
    """``s8:f16,u8:bf16``; a lone float name means both int dtypes, a lone int all floats."""
    pairs: list[tuple[str, str]] = []
    for item in (v.strip().lower().replace("->", ":") for v in text.split(",") if v.strip()):
        if ":" in item:
            pairs.append(tuple(item.split(":", 1)))
        elif item in NP_FLOAT:
            pairs += [(i, item) for i in NP_INT]
        elif item in NP_INT:
            pairs += [(item, f) for f in NP_FLOAT]
        else:
            raise argparse.ArgumentTypeError(f"dtype {item!r}: expected s8, u8, f32, f16, bf16, f64 "
                                             "or INT:FLOAT")
    for i, f in pairs:
        if i not in NP_INT or f not in NP_FLOAT:
            raise argparse.ArgumentTypeError(f"dtype pair {i}:{f}: expected s8|u8 : f32|f16|bf16|f64")
    return tuple(dict.fromkeys(pairs))


def parse_args(argv: list[str]) -> argparse.Namespace:
    head, tail = __doc__.split("\n\n", 1)
    p = argparse.ArgumentParser(description=head, epilog=tail,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a subset that runs in under a minute")
    p.add_argument("--shapes", type=_shapes, help="ROWSxCOLS,... (default 4096x4096,11008x4096,64x4096; "
                   "with --device cuda 8192x8192,11008x4096)")
    p.add_argument("--dtypes", type=_dtype_pairs, help="INT:FLOAT,... or lone FLOAT/INT names "
                   "(default: s8 and u8 into f32, f16, bf16, f64)")
    p.add_argument("--groups", type=_ints, help="group sizes (default 32,64,128)")
    p.add_argument("--threads", type=_ints, help="thread counts for dqgen, the stream and torch "
                   "(default 1,2)")
    p.add_argument("--baseline-groups", default="128",
                   help="group sizes at which numpy and torch are timed: a list, 'all' or 'none' "
                   "(default 128)")
    p.add_argument("--baseline-ints", default="s8",
                   help="int dtypes at which numpy and torch are timed: s8, u8 or 'all' (default s8)")
    p.add_argument("--repeat", type=int, default=None,
                   help=f"timed runs a case (>= 10; default 10, at least {SMALL_REPEAT} for small problems)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs first (default 2)")
    p.add_argument("--statistic", choices=("median", "min"), default="median",
                   help="compare medians (default) or the fastest samples, the best of the repetitions "
                   "(for a machine other processes keep busy)")
    p.add_argument("--retries", type=int, default=None, help="times a case is measured again when "
                   "other processes kept more than --noisy CPUs busy during it or a contender's samples "
                   "spread over more than 2x between quartiles, while --wait-quiet lasts "
                   "(default 1; 0 with --quick)")
    p.add_argument("--noisy", type=float, default=0.15, help="CPUs busy in other processes above "
                   "which a measurement counts as noisy (default 0.15)")
    p.add_argument("--wait-quiet", type=float, default=None, help="seconds the run may spend in all "
                   "waiting for other processes to quiet down (at the start, 60 s at most) and "
                   "re-measuring noisy cases (waiting 15 s at most before each) (default 150; 5 with "
                   "--quick)")
    p.add_argument("--no-torch", action="store_true", help="leave torch out even when installed")
    p.add_argument("--no-jit", action="store_true", help="skip the JIT build/load/select timings")
    p.add_argument("--no-formats", action="store_true", help="skip the checkpoint-format rows "
                   "(GGML vs gguf, GPTQ vs numpy; never run with --quick)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--out", default=None, help="output path prefix (default docs/bench; "
                   "docs/bench-quick with --quick; docs/bench-cuda with --device cuda)")
    p.add_argument("--no-write", action="store_true", help="print only, write no files")
    p.add_argument("--label", default=None, help="what is measured, for the record (default: the git "
                   "commit, and whether dqgen/ or templates/ differ from it)")
    p.add_argument("--update-doc", action="store_true",
                   help="rewrite the generated results block of docs/PERFORMANCE.md")
    p.add_argument("--from-json", metavar="PATH", default=None,
                   help="measure nothing: print and write the report of an earlier run's JSON")
    args = p.parse_args(argv)
    if args.repeat is not None and args.repeat < 10:
        p.error("--repeat must be >= 10 (the median of fewer runs is too noisy)")
    if args.warmup < 1:
        p.error("--warmup must be >= 1")
    if args.update_doc and (args.quick or args.device != "cpu" or args.no_write):
        p.error("--update-doc takes a CPU run (no --quick, --device cuda or --no-write)")
    return args


@dataclass(frozen=True)
class Config:
    shapes: tuple
    dtypes: tuple
    groups: tuple
    threads: tuple
    baseline_groups: tuple
    baseline_ints: tuple
    repeat: int
    warmup: int
    retries: int
    noisy: float
    wait_quiet: float
    jit_trials: tuple[int, int]  # cold builds, new-process loads
    statistic: str = "median"


def make_config(args: argparse.Namespace) -> Config:
    if args.quick:
        shapes, dtypes, groups = ((4096, 4096), (64, 4096)), (("s8", "f32"), ("s8", "bf16")), (128,)
        retries, wait, jit_trials = 0, 5.0, (1, 3)
    else:
        shapes, dtypes, groups = FULL_SHAPES, FULL_DTYPES, FULL_GROUPS
        retries, wait, jit_trials = 1, 150.0, (3, 5)
    shapes, dtypes, groups = args.shapes or shapes, args.dtypes or dtypes, args.groups or groups
    threads = args.threads or (1, 2)
    bg = args.baseline_groups.strip().lower()
    baseline_groups = groups if bg == "all" else () if bg == "none" else _ints(bg)
    bi = args.baseline_ints.strip().lower()
    baseline_ints = tuple(NP_INT) if bi == "all" else tuple(v.strip() for v in bi.split(",") if v.strip())
    if any(v not in NP_INT for v in baseline_ints):
        raise SystemExit(f"bench: --baseline-ints {args.baseline_ints!r}: expected s8, u8 or all")
    for rows, cols in shapes:
        for g in groups:
            if cols % g:
                raise SystemExit(f"bench: shape {rows}x{cols}: axis {cols} is not a multiple of group {g}")
    if max(threads) > (os.cpu_count() or 1):
        print(f"bench: warning: {max(threads)} threads on {os.cpu_count()} CPUs oversubscribe them",
              file=sys.stderr)
    return Config(shapes, dtypes, groups, threads, baseline_groups, baseline_ints, args.repeat or 10,
                  args.warmup,
                  args.retries if args.retries is not None else retries, args.noisy,
                  args.wait_quiet if args.wait_quiet is not None else wait, jit_trials, args.statistic)


# --------------------------------------------------------------------------- contenders

def make_inputs(rows: int, cols: int, int_name: str, float_name: str, group: int,
                rng: np.random.Generator, q_cache: dict) -> dict:
    """q (shared by the cases of one shape and int dtype), scale and zero_point."""
    key = (rows, cols, int_name)
    if key not in q_cache:
        q_cache.clear()  # at most one big q alive at a time
        lo, hi = (-128, 128) if int_name == "s8" else (0, 256)
        q_cache[key] = rng.integers(lo, hi, size=(rows, cols), dtype=NP_INT[int_name])
    groups = cols // group
    scale = (rng.random((rows, groups), dtype=np.float32) * 0.02 + 1e-3).astype(NP_FLOAT[float_name])
    mid = 0 if int_name == "s8" else 128
    zp = rng.integers(mid - 16, mid + 16, size=(rows, groups)).astype(np.int32)
    return {"q": q_cache[key], "scale": scale, "zero_point": zp}


def numpy_expr(q, scale, zp, group: int, float_name: str):
    """The broadcast expression people write (computed in the spec's compute type)."""
    compute = np.float64 if float_name == "f64" else np.float32
    rows, cols = q.shape
    out_dtype = NP_FLOAT[float_name]

    def call():
        q3 = q.reshape(rows, cols // group, group)
        y = (q3.astype(compute) - zp.astype(compute)[..., None]) * scale.astype(compute)[..., None]
        return y.reshape(rows, cols).astype(out_dtype, copy=False)
    return call


def torch_contenders(torch, q, scale, zp, group: int, int_name: str, float_name: str):
    """torch's decomposed op and the broadcast expression, on zero-copy views of the inputs."""
    tf = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16, "f64": torch.float64}[float_name]
    compute = torch.float64 if float_name == "f64" else torch.float32
    tq, tz = torch.from_numpy(q), torch.from_numpy(zp)
    ts = (torch.from_numpy(scale.view(np.int16)).view(torch.bfloat16) if float_name == "bf16"
          else torch.from_numpy(scale))
    qdtype, qmin, qmax = (torch.int8, -128, 127) if int_name == "s8" else (torch.uint8, 0, 255)
    rows, cols = q.shape
    op = torch.ops.quantized_decomposed.dequantize_per_channel_group

    def op_call():
        return op(tq, ts, tz, qmin, qmax, qdtype, group, tf)

    def expr_call():
        y = (tq.view(rows, cols // group, group).to(compute) - tz.to(compute).unsqueeze(-1)) \
            * ts.to(compute).unsqueeze(-1)
        return y.view(rows, cols).to(tf)
    return op_call, expr_call


def _bits(a: np.ndarray) -> np.ndarray:
    return a.view(np.dtype(f"u{a.itemsize}"))


def check_exact(name: str, got: np.ndarray, inputs: dict, group: int) -> None:
    """``got`` equals dqgen.reference bit for bit on the first and last rows."""
    q, scale, zp = inputs["q"], inputs["scale"], inputs["zero_point"]
    rows = np.unique(np.r_[0:min(4, q.shape[0]), max(0, q.shape[0] - 4):q.shape[0]])
    want = reference.dequantize_per_group(q[rows], scale[rows], zp[rows], group)
    if not np.array_equal(_bits(np.asarray(got)[rows]), _bits(want)):
        raise SystemExit(f"bench: {name} differs from dqgen.reference: its timings would be meaningless")


# --------------------------------------------------------------------------- the runs

def set_threads(n: int, torch) -> None:
    os.environ["DQGEN_NUM_THREADS"] = str(n)  # dqgen.dequantize_per_group's thread count
    if torch is not None:
        torch.set_num_threads(n)


def run_case(stream: Stream, torch, shape, dtypes, group: int, threads: int, cfg: Config,
             rng, q_cache, patience: Patience) -> dict:
    (rows, cols), (int_name, float_name) = shape, dtypes
    inputs = make_inputs(rows, cols, int_name, float_name, group, rng, q_cache)
    q, scale, zp = inputs["q"], inputs["scale"], inputs["zero_point"]
    out = np.zeros((rows, cols), dtype=NP_FLOAT[float_name])
    desc = dqgen.DequantizePerGroupDescriptor(rows, cols, group, float_name, int_name)
    plan = dqgen.DequantizePerGroupPlan.select(desc, preference=dqgen.PlanPreference(num_threads=threads))
    args = dqgen.DequantizePerGroupArgs(q, scale, zp, out)
    calls = {  # the stream reads dqgen's q and writes dqgen's output: the very same bytes
        "stream": stream.bind(q, out, False, threads),
        "stream_nt": stream.bind(q, out, True, threads),
        "dqgen": lambda: plan.run(args),
        "dqgen_fresh": lambda: dqgen.dequantize_per_group(q, scale, zp, group),
    }
    floor = stream.bind_floor(q, out.view(np.uint16), float_name, threads) if out.itemsize == 2 else None
    if floor is not None:
        calls["floor"] = floor
    slow = group in cfg.baseline_groups and int_name in cfg.baseline_ints
    if slow:
        calls["numpy"] = numpy_expr(q, scale, zp, group, float_name)
        if torch is not None:
            calls["torch_op"], calls["torch_expr"] = torch_contenders(torch, q, scale, zp, group,
                                                                      int_name, float_name)
    small = rows * cols < report.SMALL_ELEMENTS
    repeat = max(cfg.repeat, SMALL_REPEAT) if small else cfg.repeat
    attempts = 0
    while True:
        t0 = time.monotonic()
        with LoadMeter() as meter:
            times = interleaved(calls, repeat, cfg.warmup, burst=SMALL_BURST if small else 1)
        if attempts:  # re-measuring spends the run's patience too
            patience.left = max(0.0, patience.left - (time.monotonic() - t0))
        attempts += 1
        noisy = meter.foreign is not None and meter.foreign > cfg.noisy
        spread = [n for n, t in times.items() if spread_out(t)]
        if not (noisy or spread) or attempts > cfg.retries or patience.left <= 0:
            break
        patience.wait(15, cfg.noisy)  # a busy neighbour or stalls: measure the case again

    # The timings count only if the outputs are right.
    plan.run(args)
    check_exact("dqgen (run)", out, inputs, group)
    check_exact("dqgen.dequantize_per_group", calls["dqgen_fresh"](), inputs, group)
    if slow and not np.array_equal(_bits(calls["numpy"]()), _bits(out)):
        raise SystemExit(f"bench: numpy's expression and dqgen disagree ({int_name}->{float_name} g{group})")
    agree = {}  # torch computes the same formula; with these inputs it rounds the same too
    for name in ("torch_op", "torch_expr"):
        if name in calls:
            y = calls[name]()
            y = y.view(torch.int16) if float_name == "bf16" else y  # numpy has no torch bf16
            agree[name] = bool(np.array_equal(_bits(y.numpy()), _bits(out)))
            if not agree[name]:
                print(f"bench: warning: {name} differs from dqgen for {int_name}->{float_name} g{group}",
                      file=sys.stderr)

    pick = min if cfg.statistic == "min" else statistics.median
    med = {n: pick(t) for n, t in times.items()}
    bytes_stream = rows * cols * (1 + NP_FLOAT[float_name].itemsize)
    bytes_dqgen = bytes_stream + scale.nbytes + zp.nbytes
    return report.complete_ratios({
            "shape": [rows, cols], "int": int_name, "float": float_name, "group": group,
            "threads": threads, "foreign_cpus": meter.foreign, "attempts": attempts,
            "noisy": noisy, "spread": spread,
            "bytes_stream": bytes_stream, "bytes_dqgen": bytes_dqgen, "kernel": str(plan.sku()),
            "torch_equals_dqgen": agree,
            "ratios": {}, "stats": {n: summarize(t) for n, t in times.items()},
            "gbps": {"dqgen": bytes_dqgen / med["dqgen"] / 1e9,
                     "stream": bytes_stream / med["stream"] / 1e9,
                     "stream_nt": bytes_stream / med["stream_nt"] / 1e9},
            "samples_s": times}, cfg.statistic)


def run_overhead(stream: Stream, cfg: Config) -> dict:
    """A reused plan's run() on one group: the Python cost of a call, beside the stream's
    cffi call on the same bytes."""
    group = 128
    q, out = np.zeros((1, group), np.int8), np.empty((1, group), np.float32)
    scale, zp = np.ones((1, 1), np.float32), np.zeros((1, 1), np.int32)
    desc = dqgen.DequantizePerGroupDescriptor(1, group, group, "f32", "s8")
    plan = dqgen.DequantizePerGroupPlan.select(desc, preference=dqgen.PlanPreference(num_threads=1))
    args = dqgen.DequantizePerGroupArgs(q, scale, zp, out)
    times = interleaved({"stream": stream.bind(q, out, False, 1), "dqgen": lambda: plan.run(args)},
                        max(cfg.repeat, 2000), 50)
    return {"shape": [1, group], "dtypes": "s8->f32", "group": group,
            "median_us": {n: statistics.median(t) * 1e6 for n, t in times.items()}}


def machine_info(stream: Stream) -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "numpy": np.__version__, "dqgen": dqgen.__version__, "cpu_count": os.cpu_count(),
            "isa": host_isa(), "isas_supported": list(supported_isas()),
            "compiler": stream.toolchain.identity.split("|")[-1], "flags": stream.flags,
            "cpu_simd_flags": sorted(f for f in cpu_flags()
                                     if f.startswith(("avx", "sse", "ssse", "fma", "f16c", "amx", "vaes", "gfni")))}
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        text = ""
    wanted = ("Model name", "Thread(s) per core", "Core(s) per socket", "Socket(s)", "L1d cache",
              "L2 cache", "L3 cache", "Hypervisor vendor")
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in wanted:
            info["lscpu " + key.strip()] = value.strip()
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["memory_gib"] = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return info


def source_label() -> str:
    """The commit measured, and whether the kernel sources differ from it."""
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "dqgen", "templates"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    return f"commit {head}" + (" with uncommitted changes in dqgen/ or templates/" if dirty else "")


def _import_torch(args):
    if args.no_torch:
        return None
    try:
        import torch
        import torch.ao.quantization.fx._decomposed  # noqa: F401 - registers quantized_decomposed
    except ImportError:
        print("bench: torch is not installed: the torch contenders are skipped", file=sys.stderr)
        return None
    return torch


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def run_cpu(args: argparse.Namespace, argv: list[str]) -> dict:
    from bench_jit import run_jit

    cfg = make_config(args)
    label = source_label()  # before the run: the tree may change while it runs
    patience = Patience(cfg.wait_quiet)
    start_foreign = patience.wait(60, cfg.noisy)
    loadavg_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="dqgen-bench-") as tmp:
        stream = Stream(Path(tmp))  # loaded first: torch then shares its libgomp
    stream.check()
    torch = _import_torch(args)
    info = machine_info(stream)
    info["torch"] = torch.__version__ if torch is not None else None
    print(f"dqgen bench on {info.get('lscpu Model name', platform.processor())}, {os.cpu_count()} CPUs, "
          f"ISA {info['isa']}, torch {info['torch'] or 'absent'}", flush=True)

    rng = np.random.default_rng(0)
    cases: list[dict] = []
    started = time.perf_counter()
    saved = os.environ.get("DQGEN_NUM_THREADS")
    try:
        for threads in cfg.threads:
            set_threads(threads, torch)
            q_cache: dict = {}
            for shape in cfg.shapes:
                for dtypes in cfg.dtypes:
                    for group in cfg.groups:
                        c = run_case(stream, torch, shape, dtypes, group, threads, cfg, rng, q_cache,
                                     patience)
                        cases.append(c)
                        print(f"  {report.case_label(c):38s} dqgen/stream {c['ratios']['dqgen/stream']:5.2f}  "
                              f"/best {c['ratios']['dqgen/stream_best']:5.2f}  "
                              f"numpy/dqgen {report.ratio_text(c, 'numpy/dqgen_fresh', 1):>5s}  torch op/dqgen "
                              f"{report.ratio_text(c, 'torch_op/dqgen_fresh', 1):>5s}  noise {report.noise_text(c)}  "
                              f"[{time.perf_counter() - started:.0f} s]", flush=True)
        set_threads(1, torch)
        overhead = run_overhead(stream, cfg)
    finally:
        if saved is None:
            os.environ.pop("DQGEN_NUM_THREADS", None)
        else:
            os.environ["DQGEN_NUM_THREADS"] = saved
    jit = None if args.no_jit else run_jit(*cfg.jit_trials)
    result = {
        "date": _now(), "command": shlex.join(["python", "tools/bench.py", *argv]), "machine": info,
        "measured": args.label or label,
        "foreign_cpus_start": start_foreign, "loadavg_start": loadavg_start,
        "loadavg_end": os.getloadavg(), "elapsed_s": time.perf_counter() - started,
        "config": {"shapes": cfg.shapes, "dtypes": cfg.dtypes, "groups": cfg.groups,
                   "threads": cfg.threads, "baseline_groups": cfg.baseline_groups,
                   "baseline_ints": cfg.baseline_ints,
                   "repeat": cfg.repeat, "small_repeat": max(cfg.repeat, SMALL_REPEAT),
                   "small_burst": SMALL_BURST, "warmup": cfg.warmup, "retries": cfg.retries,
                   "noisy_threshold_cpus": cfg.noisy, "wait_quiet_s": cfg.wait_quiet,
                   "statistic": cfg.statistic,
                   "wait_quiet_left_s": patience.left},
        "stream": {"source": "tools/stream_baseline.c", "command": stream.command,
                   "nontemporal_available": stream.nt_available, "parallel_min": stream.parallel_min},
        "overhead": overhead, "jit": jit, "cases": cases,
    }
    result["targets"] = report.evaluate(cases, jit)
    return result


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.device == "cuda":
        from bench_cuda import print_device, run_device

        floats = tuple(dict.fromkeys(f for _, f in args.dtypes)) if args.dtypes else None
        ints = tuple(dict.fromkeys(i for i, _ in args.dtypes)) if args.dtypes else None
        result = run_device(args.shapes, floats, repeat=args.repeat or 20, ints=ints,
                            groups=args.groups or (32, 128))
        if result is not None:
            print_device(result)
            if not args.no_write:
                prefix = Path(args.out) if args.out else ROOT / "docs" / "bench-cuda"
                _write(prefix.with_name(prefix.name + ".json"), json.dumps(result, indent=1) + "\n")
        return 0
    if args.from_json:
        result = json.loads(Path(args.from_json).read_text())
        result["targets"] = report.evaluate(result["cases"], result.get("jit"))
    else:
        result = run_cpu(args, argv)
        if not (args.quick or args.no_formats):
            import bench_formats
            result["formats"] = bench_formats.run()
        if not (args.quick or args.no_torch):
            import bench_torch
            result["torch_ops"] = bench_torch.run()
    report.print_report(result)
    if result.get("formats"):
        import bench_formats
        print(bench_formats.table(result["formats"]))
    if result.get("torch_ops"):
        import bench_torch
        print(bench_torch.table(result["torch_ops"]))
    if not args.no_write:
        prefix = Path(args.out) if args.out else ROOT / "docs" / ("bench-quick" if args.quick else "bench")
        _write(prefix.with_name(prefix.name + ".json"), json.dumps(result, indent=1) + "\n")
        md = report.markdown(result)
        if result.get("formats"):
            import bench_formats
            md += ("\n### Checkpoint formats\n\ndqgen returning a new array and writing a reused one "
                   "(`out=`), the stream into a new and a reused array, the OpenMP default thread "
                   "count; each dqgen result checked bit for bit against its baseline's first.\n\n"
                   + bench_formats.table(result["formats"]) + "\n")
        if result.get("torch_ops"):
            import bench_torch
            md += bench_torch.section(result["torch_ops"])
        _write(prefix.with_name(prefix.name + ".md"), md)
        png = prefix.with_name(prefix.name + ".png")
        note = report.chart(result, png)
        print(f"bench: {note}" if note else f"wrote {png.relative_to(ROOT) if png.is_relative_to(ROOT) else png}")
        if args.update_doc:
            report.update_doc(ROOT / "docs" / "PERFORMANCE.md", md)
            print("updated docs/PERFORMANCE.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
