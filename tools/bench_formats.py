"""Checkpoint-format rows of the benchmark: GGML blocks against the gguf package, GPTQ
4-bit against a numpy unpack-and-scale path.

Run by ``tools/bench.py`` (or alone: ``python tools/bench_formats.py``). Times are medians
of interleaved repetitions in one process; only the ratios are reported as results, since
absolute times on a shared machine are noisy. Every dqgen result is first checked bit for
bit against its contender's. Four contenders a row: dqgen returning a fresh array, dqgen
writing a caller's buffer (``out=``), the baseline (fresh, as it only can), and the stream
of tools/stream_baseline.c over one byte in and one output element out per value (at
least the bytes any dequantizer moves), into a new array each call and into a reused one:
their times give the largest speed-up over the baseline that memory bandwidth allows for
fresh outputs and for ``out=`` (``bound``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_stream import Stream  # noqa: E402
from bench_timing import interleaved, summarize  # noqa: E402

import dqgen  # noqa: E402
from dqgen.formats import ggml, gptq  # noqa: E402
from dqgen.formats.pack import quantize_gptq  # noqa: E402

# A 16 MiB f32 output may be reused by the allocator call after call (glibc's mmap
# threshold adapts up to 32 MiB); a 64 MiB one is new memory each call, whose page faults
# (the kernel zeroing it) cost about as much as the dequantization itself, for dqgen and
# gguf alike: hence the out= and the fresh-stream columns.
GGML_SHAPES = ((1024, 4096), (4096, 4096))
GPTQ_SHAPE = (4096, 11008)   # [K, N]: in_features x out_features of an MLP projection
GPTQ_GROUP = 128


def numpy_gptq(qweight, qzeros, scales, g_idx, bits=4):
    """The numpy way: unpack every word with shifts, gather per-row groups, scale (v1)."""
    pack = 32 // bits
    mask = (1 << bits) - 1
    shifts = (np.arange(pack, dtype=np.uint32) * bits)[None, :, None]
    words = qweight.view(np.uint32)
    q = ((words[:, None, :] >> shifts) & mask).reshape(-1, words.shape[1])
    zwords = qzeros.view(np.uint32)
    z = ((zwords[:, :, None] >> shifts.reshape(1, 1, -1)) & mask).reshape(zwords.shape[0], -1) + 1
    g = g_idx.astype(np.int64)
    diff = q.astype(np.int32) - z[g].astype(np.int32)
    return (diff.astype(np.float32) * scales[g].astype(np.float32)).astype(np.float16)


def _threads() -> int:
    """The thread count dqgen's kernels use here (OpenMP's default is every CPU we may run on)."""
    return int(os.environ.get("DQGEN_NUM_THREADS") or len(os.sched_getaffinity(0)))


def _row(name: str, times: dict, baseline: str) -> dict:
    med = {k: summarize(v)["median_s"] for k, v in times.items()}
    return {"case": name, "dqgen_ms": med["dqgen"] * 1e3, "dqgen_out_ms": med["dqgen_out"] * 1e3,
            "baseline": baseline, "baseline_ms": med[baseline] * 1e3,
            "stream_ms": med["stream"] * 1e3, "stream_fresh_ms": med["stream_fresh"] * 1e3,
            "speedup": med[baseline] / med["dqgen"],
            "speedup_out": med[baseline] / med["dqgen_out"],
            "bound": med[baseline] / med["stream_fresh"], "bound_out": med[baseline] / med["stream"]}


def _contenders(stream: Stream, fresh, into, baseline: str, theirs, values: int, out) -> dict:
    """The calls of a row; ``into(out)`` writes the caller's buffer ``out``. The stream runs
    into a reused buffer and, like a function returning a result, into a new one each call
    (whose page faults then count: the bound for fresh outputs)."""
    q = np.zeros(values, np.int8)
    width = out.dtype if out.dtype.itemsize != 2 else np.dtype(np.int16)
    threads = _threads()

    def stream_fresh():
        sink = np.empty(values, width)
        stream.bind(q, sink, False, threads)()
        return sink
    return {"dqgen": fresh, "dqgen_out": lambda: into(out), baseline: theirs,
            "stream": stream.bind(q, np.empty(values, width), False, threads),
            "stream_fresh": stream_fresh}


def bench_ggml(repeat: int, stream: Stream) -> list[dict]:
    import gguf
    rng = np.random.default_rng(0)
    rows = []
    for shape in GGML_SHAPES:
        x = rng.standard_normal(shape, dtype=np.float32)
        for name in ("Q4_0", "Q8_0"):
            qtype = getattr(gguf.GGMLQuantizationType, name)
            data = gguf.quants.quantize(x, qtype)
            ours, theirs = ggml.dequantize(data, name), gguf.quants.dequantize(data, qtype)
            if not np.array_equal(ours.view(np.uint32), theirs.view(np.uint32)):
                raise SystemExit(f"GGML {name}: dqgen and gguf disagree")
            calls = _contenders(stream, lambda: ggml.dequantize(data, name),
                                lambda out: ggml.dequantize(data, name, out=out), "gguf",
                                lambda: gguf.quants.dequantize(data, qtype), x.size, ours)
            times = interleaved(calls, repeat=repeat, warmup=1)
            rows.append(_row(f"GGML {name} {list(shape)} -> f32", times, "gguf"))
    return rows


def bench_gptq(repeat: int, stream: Stream) -> list[dict]:
    rng = np.random.default_rng(1)
    k, n = GPTQ_SHAPE
    w = rng.standard_normal((k, n), dtype=np.float32) * 0.02
    rows = []
    for label, perm in (("", None), (", act-order", rng.permutation(k))):
        layer = quantize_gptq(w, GPTQ_GROUP, bits=4, perm=perm)
        args = (layer["qweight"], layer["qzeros"], layer["scales"], layer["g_idx"])
        ours = gptq.dequantize(*args, bits=4)
        theirs = numpy_gptq(*args)
        if not np.array_equal(ours.view(np.uint16), theirs.view(np.uint16)):
            raise SystemExit(f"GPTQ{label}: dqgen and the numpy path disagree")
        calls = _contenders(stream, lambda: gptq.dequantize(*args, bits=4),
                            lambda out: gptq.dequantize(*args, bits=4, out=out), "numpy",
                            lambda: numpy_gptq(*args), k * n, ours)
        times = interleaved(calls, repeat=repeat, warmup=1)
        rows.append(_row(f"GPTQ 4-bit {list(GPTQ_SHAPE)} g{GPTQ_GROUP}{label} -> f16", times,
                         "numpy"))
    return rows


def run(repeat: int = 10) -> list[dict]:
    """Every format row (GGML rows only where the gguf package is installed)."""
    with tempfile.TemporaryDirectory(prefix="dqgen-bench-") as work:
        stream = Stream(Path(work))
        stream.check()
        rows = bench_gptq(repeat, stream)
        try:
            rows = bench_ggml(repeat, stream) + rows
        except ImportError:
            print("gguf is not installed: GGML rows skipped", file=sys.stderr)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| case | baseline | baseline ms | dqgen ms (fresh / out=) | stream ms (fresh / reused) "
             "| dqgen speed-up (fresh / out=) | bound (fresh / out=) |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['baseline']} | {r['baseline_ms']:.1f} | {r['dqgen_ms']:.2f} / "
              f"{r['dqgen_out_ms']:.2f} | {r['stream_fresh_ms']:.2f} / {r['stream_ms']:.2f} | "
              f"{r['speedup']:.1f}x / {r['speedup_out']:.1f}x | {r['bound']:.1f}x / "
              f"{r['bound_out']:.1f}x |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)
    rows = run(args.repeat)
    print(f"dqgen {dqgen.__version__}, threads: {_threads()}")
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
