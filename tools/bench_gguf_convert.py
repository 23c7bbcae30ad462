"""``dqgen convert model.gguf out.safetensors`` against the same conversion done the way
a Python user does it today: gguf-py's numpy dequantize of each tensor, then
``safetensors.numpy.save_file`` of them all.

The benchmark writes its own GGUF file of about ``--gib`` GiB: [4096, 4096] tensors in
llama.cpp's Q4_K_M mix (four Q4_K to each Q6_K and Q8_0), block bytes random but for
their f16 scales, which are positive and finite as a quantizer writes them. The file is
read while in the page cache (just written); outputs go to the same disk. Each conversion
runs in a process of its own into a new file, timed inside it (imports and interpreter
start left out), with the peak of its private memory (the mapped GGUF's page-cache pages
not counted). Reported: the seconds of each, GB/s of GGUF read and of safetensors
written, the ratio to gguf-py, and a write bound: the same output bytes written from
memory in the same pieces (what the disk and page cache allow at all), and dqgen's
dequantization alone (every tensor into one reused buffer, nothing written). dqgen runs on 1
and 2 kernel threads (``-j``), best of ``--repeat``; gguf-py once (it is slow). The dqgen
output is checked bit for bit against gguf-py's. Every file is deleted at the end. Run:
``python tools/bench_gguf_convert.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from dqgen.formats import gguf as gguf_file
from dqgen.formats import gguf_convert

GROUP = (("Q4_K",) * 4) + ("Q6_K", "Q8_0")
FALLBACK = (("Q4_0",) * 4) + ("Q8_0", "Q8_0")
SHAPE = (4096, 4096)
# Where each type's f16 scales sit in its block (gguf-py's quants.py): (offset, count).
F16_FIELDS = {"Q4_K": ((0, 2),), "Q6_K": ((208, 1),), "Q8_0": ((0, 1),), "Q4_0": ((0, 1),)}


def _types() -> tuple[str, ...]:
    return GROUP if all(gguf_file.supports(t) for t in GROUP) else FALLBACK


def _blocks(rng, qtype: str, shape) -> np.ndarray:
    values, size = gguf_file.block_size(qtype)
    blocks = rng.integers(0, 256, size=(shape[0] * shape[1] // values, size), dtype=np.uint8)
    for at, count in F16_FIELDS[qtype]:
        scales = rng.uniform(1e-4, 1e-2, size=(blocks.shape[0], count)).astype(np.float16)
        blocks[:, at:at + 2 * count] = scales.view(np.uint8)
    return blocks.reshape(shape[0], -1)


def write_model(path: Path, gib: float, types) -> int:
    import gguf
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("bench")
    w.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(1000)])
    size, i = 0, 0
    while size < gib * (1 << 30):
        qtype = types[i % len(types)]
        data = _blocks(rng, qtype, SHAPE)
        w.add_tensor(f"blk.{i // len(types)}.{qtype.lower()}.{i}", data,
                     raw_dtype=gguf.GGMLQuantizationType[qtype])
        size += data.nbytes
        i += 1
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return i


def gguf_py_convert(src: Path, dst: Path, dtype) -> None:
    """The numpy way: every tensor dequantized by gguf-py, cast, then one save_file."""
    import gguf
    from safetensors.numpy import save_file
    reader = gguf.GGUFReader(str(src))
    tensors = {t.name: gguf.quants.dequantize(t.data, t.tensor_type).astype(dtype)
               for t in reader.tensors}
    meta = {k: str(f.contents()) for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    save_file(tensors, str(dst), metadata=meta)


def dequantize_only(src) -> None:
    """dqgen's part of a conversion alone: every tensor into one reused buffer, no file."""
    f = gguf_file.open(src)
    buf = np.empty(max(math.prod(t.shape) for t in f.tensors.values()), np.float16)
    for name, info in f.tensors.items():
        f.dequantize(name, "f16", out=buf[:math.prod(info.shape)].reshape(info.shape))


def write_bound(dst: Path, nbytes: int) -> None:
    """The output's bytes written from a buffer in memory, in convert's piece size."""
    piece = np.ones(gguf_convert.CHUNK_BYTES, np.uint8)
    with open(dst, "wb") as fh:
        left = nbytes
        while left > 0:
            fh.write(memoryview(piece)[:min(left, piece.nbytes)])
            left -= piece.nbytes


def _anonymous_bytes() -> int:
    """This process's private memory now (RssAnon: not the mapped file's page-cache pages,
    which the peak RSS would count)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def child(kind: str, src: str, dst: str, jobs: int) -> None:
    """One conversion in this (fresh) process: print its seconds and the peak of its
    private memory (sampled every 20 ms) above what it held before."""
    import threading
    base, peak, stop = _anonymous_bytes(), [0], threading.Event()

    def sample():
        while not stop.wait(0.02):
            peak[0] = max(peak[0], _anonymous_bytes())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    if kind == "dqgen":
        gguf_convert.convert_file(src, dst, "f16", jobs=jobs)
    elif kind == "dequantize":
        dequantize_only(src)
    else:
        gguf_py_convert(Path(src), Path(dst), np.float16)
    seconds = time.perf_counter() - start
    stop.set()
    sampler.join()
    print(json.dumps({"seconds": seconds, "peak_bytes": max(0, peak[0] - base)}))


def timed(kind: str, src: Path, dst: Path, jobs: int = 1) -> dict:
    """A conversion in a new process (so each one's peak memory is its own); the previous
    run's dirty pages written back first, not during this one."""
    if kind != "dequantize":
        dst.unlink(missing_ok=True)  # a new file, as converting to a new name makes
    os.sync()
    env = dict(os.environ, DQGEN_NUM_THREADS=str(jobs))
    run = subprocess.run([sys.executable, __file__, "--child", kind, str(src), str(dst),
                          str(jobs)], env=env, check=True, capture_output=True, text=True)
    return json.loads(run.stdout.strip().splitlines()[-1])


def same(a: Path, b: Path) -> bool:
    from safetensors import safe_open
    with safe_open(str(a), "np") as fa, safe_open(str(b), "np") as fb:
        if set(fa.keys()) != set(fb.keys()):
            return False
        return all(np.array_equal(fa.get_tensor(k).view(np.uint16),
                                  fb.get_tensor(k).view(np.uint16)) for k in fa.keys())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gib", type=float, default=1.0, help="GGUF size (default 1 GiB)")
    parser.add_argument("--repeat", type=int, default=2, help="dqgen runs each (best kept)")
    parser.add_argument("--threads", default="1,2", help="dqgen -j values (default 1,2)")
    parser.add_argument("--dir", default=None, help="scratch directory (default: a temp dir)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--child", nargs=4, metavar=("KIND", "SRC", "DST", "JOBS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, src, dst, jobs = args.child
        child(kind, src, dst, int(jobs))
        return 0
    work = Path(tempfile.mkdtemp(prefix="dqgen-bench-gguf-", dir=args.dir))
    try:
        types = _types()
        src = work / "model.gguf"
        count = write_model(src, args.gib, types)
        in_bytes = src.stat().st_size
        print(f"{src.name}: {count} tensors {list(SHAPE)} of {'/'.join(sorted(set(types)))}, "
              f"{in_bytes / 1e9:.2f} GB; free: {shutil.disk_usage(work).free / 1e9:.0f} GB")
        small = work / "warm.gguf"  # compile the kernels into the cache before timing
        import gguf
        w = gguf.GGUFWriter(str(small), "llama")
        for qtype in sorted(set(types)):
            w.add_tensor(qtype, _blocks(np.random.default_rng(1), qtype, (1, 256)),
                         raw_dtype=gguf.GGMLQuantizationType[qtype])
        w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file()
        w.close()
        gguf_convert.convert_file(small, work / "warm.safetensors", "f16")

        results = {"tensors": count, "types": sorted(set(types)), "gguf_bytes": in_bytes}
        ours = work / "dqgen.safetensors"
        for jobs in [int(j) for j in args.threads.split(",")]:
            runs = [timed("dqgen", src, ours, jobs) for _ in range(args.repeat)]
            results[f"dqgen -j {jobs}"] = min(runs, key=lambda r: r["seconds"])
        out_bytes = ours.stat().st_size
        for jobs in [int(j) for j in args.threads.split(",")]:
            runs = [timed("dequantize", src, ours, jobs) for _ in range(args.repeat)]
            results[f"dqgen dequantize only, -j {jobs}"] = min(runs, key=lambda r: r["seconds"])
        results["safetensors_bytes"] = out_bytes
        bound = work / "bound.bin"
        best = float("inf")
        for _ in range(args.repeat):
            bound.unlink(missing_ok=True)
            os.sync()
            start = time.perf_counter()
            write_bound(bound, out_bytes)
            best = min(best, time.perf_counter() - start)
        results["write bound"] = {"seconds": best, "peak_bytes": None}
        bound.unlink()
        theirs = work / "gguf-py.safetensors"
        results["gguf-py + safetensors"] = timed("gguf-py", src, theirs)
        results["bit_exact"] = same(ours, theirs)
        theirs.unlink()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    base = results["gguf-py + safetensors"]["seconds"]
    print("\n| conversion to f16 | seconds | GGUF GB/s | written GB/s | vs gguf-py "
          "| peak private memory |")
    print("|---|---|---|---|---|---|")
    for label, r in results.items():
        if not isinstance(r, dict):
            continue
        s, peak = r["seconds"], r["peak_bytes"]
        print(f"| {label} | {s:.2f} | {in_bytes / s / 1e9:.2f} | {out_bytes / s / 1e9:.2f} | "
              f"{base / s:.1f}x | {'-' if peak is None else f'{peak / 2**20:.0f} MiB'} |")
    print(f"\ndqgen output bit for bit equal to gguf-py's: {results['bit_exact']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0 if results["bit_exact"] else 1


if __name__ == "__main__":
    sys.exit(main())
