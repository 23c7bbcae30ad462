"""Opening a GGUF file: ``dqgen.formats.gguf.open`` against gguf-py's ``GGUFReader``.

The benchmark writes (with gguf-py's ``GGUFWriter``) a file shaped like a small model
with a large vocabulary: ``--tokens`` entries (262144 by default, Gemma 3's) in
``tokenizer.ggml.tokens``, ``tokenizer.ggml.scores`` and ``tokenizer.ggml.token_type``,
a few scalar keys, and a few tensors (Q4_K, Q6_K, Q8_0, F32). Timed, in this process,
with the file in the page cache (just written): open the file and read the first
tensor's bytes (a sum over them), for dqgen (best of ``--repeat``) and gguf-py (once:
it parses every array element at open). Both must list the same tensors and first-tensor
bytes. Printed: the CPU model, both times and their ratio. The file is deleted at the
end. Run: ``python tools/bench_gguf_open.py``.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from bench_timing import cpu_model
from dqgen.formats import gguf as gguf_file

TENSORS = (("token_embd.weight", "Q8_0", (64, 640)), ("blk.0.attn_q.weight", "Q4_K", (640, 256)),
           ("blk.0.ffn_down.weight", "Q6_K", (640, 512)), ("output_norm.weight", "F32", (640,)))




def write_model(path: Path, n_tokens: int) -> None:
    """A GGUF file with an ``n_tokens`` vocabulary and the tensors of ``TENSORS``."""
    import gguf
    rng, words = np.random.default_rng(0), random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyzé▁"
    tokens = ["".join(words.choice(letters) for _ in range(words.randrange(1, 10))) + str(i)
              for i in range(n_tokens)]
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_name("bench")
    w.add_context_length(32768)
    w.add_block_count(1)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(rng.standard_normal(n_tokens).astype(np.float32).tolist())
    w.add_token_types([1] * n_tokens)
    for name, qtype, shape in TENSORS:
        kind = gguf.GGMLQuantizationType[qtype]
        values, nbytes = gguf.GGML_QUANT_SIZES[kind]
        if qtype == "F32":
            w.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
            continue
        blocks = rng.integers(0, 256, (*shape[:-1], shape[-1] // values * nbytes), np.uint8)
        w.add_tensor(name, blocks, raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def open_dqgen(path: Path) -> tuple[list[str], int]:
    f = gguf_file.open(path)
    first = next(iter(f.tensors))
    return list(f.tensors), int(f.array(first).view(np.uint8).sum(dtype=np.uint64))


def open_gguf_py(path: Path) -> tuple[list[str], int]:
    import gguf
    reader = gguf.GGUFReader(str(path))
    first = reader.tensors[0]
    return [t.name for t in reader.tensors], int(first.data.view(np.uint8).sum(dtype=np.uint64))


def best_time(fn, path: Path, repeat: int):
    """(seconds of the fastest of ``repeat`` calls, its result)."""
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn(path)
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=262144, help="vocabulary size")
    parser.add_argument("--repeat", type=int, default=5, help="dqgen runs (best is kept)")
    args = parser.parse_args()
    import gguf  # noqa: F401 - imported before timing, as dqgen is
    tmp = Path(tempfile.mkdtemp(prefix="dqgen-bench-gguf-open-"))
    try:
        path = tmp / "model.gguf"
        write_model(path, args.tokens)
        ours_s, ours = best_time(open_dqgen, path, args.repeat)
        theirs_s, theirs = best_time(open_gguf_py, path, 1)
        if ours != theirs:
            raise SystemExit("dqgen and gguf-py read different tensors or first-tensor bytes")
        print(f"GGUF open + first tensor on {cpu_model()}, {os.cpu_count()} CPUs "
              f"({args.tokens}-entry token list, {path.stat().st_size / 2**20:.1f} MiB file)")
        print(f"  dqgen  gguf.open      {ours_s * 1e3:9.1f} ms  (best of {args.repeat})")
        print(f"  gguf-py GGUFReader    {theirs_s * 1e3:9.1f} ms")
        print(f"  gguf-py / dqgen       {theirs_s / ours_s:9.1f}x")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
