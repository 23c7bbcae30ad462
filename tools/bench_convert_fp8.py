"""``dqgen convert`` of an FP8 block-scaled checkpoint (DeepSeek-V3 style) to bf16,
against writing the same output bytes, with the conversion's peak memory beside the
largest tensor's bf16 size.

The benchmark writes its own checkpoint directory of at least ``--gb`` GB of FP8 weights
(default 2; ``--quick``: about 0.1 GB of smaller layers): DeepSeek-V3's attention shapes
(``q_a_proj`` [1536, 7168], ``kv_a_proj_with_mqa`` [576, 7168], ...) and a dense MLP of
intermediate size 18000, so ``gate_proj``/``up_proj`` [18000, 7168] and ``down_proj``
[7168, 18000] end in partial 128 x 128 blocks on either axis. Each weight is
float8_e4m3fn (random codes, no NaN) with an f32 ``weight_scale_inv``
[ceil(N / 128), ceil(K / 128)]; norms, ``embed_tokens`` and ``lm_head`` (vocabulary
16384) are bf16. One layer a shard (embeddings in the first, ``lm_head`` in the last),
a ``model.safetensors.index.json`` and a ``config.json`` whose ``quantization_config`` is
DeepSeek-V3's (``fp8``, ``e4m3``, ``weight_block_size`` [128, 128]).

Measured, each in a process of its own, its wall time seen from outside (interpreter
start and imports included, as a user sees them), the input in the page cache (just
written), each output a new directory on the same disk, the previous run's dirty pages
written back first:

- ``dqgen convert IN OUT --dtype bf16 --quiet``; its peak RSS (``wait4``'s ru_maxrss:
  the mapped input's page-cache pages count) and its peak private memory (RssAnon,
  sampled every 10 ms);
- the write baseline: the same output files (names, header, every tensor's bytes) written
  with dqgen's own safetensors writer (``dqgen.formats.safetensors_io.Writer``: a locked
  temporary file, plain ``write`` calls, ``os.replace``) from one buffer in memory, and
  the same index; no fsync, as ``dqgen convert`` does none;
- after each of them, the ``sync`` that puts the written bytes on the disk (what
  "converted" costs when the data must reach it);
- dqgen's dequantization alone: every FP8 weight into one reused bf16 buffer, nothing
  written (the kernels' share);
- ``dqgen convert`` of a tiny checkpoint: the command's fixed cost.

One conversion runs untimed first (its output is checked, and it makes the first pass
over fresh memory: on a virtual machine a page the host has not backed yet costs several
times the system time of one a previous run freed). Then convert and baseline alternate
(convert, baseline, baseline, convert, ...); the best of ``--repeat`` (default 3) each is
reported, with each child's user and system CPU seconds and the CPUs other processes kept
busy meanwhile (the machine's busy time less the child's own). The check: every tensor's name, dtype and shape, the copied bf16 tensors byte for byte,
``config.json`` without its quantization config, and FP8 weights with partial blocks on
either axis bit for bit against DeepSeek-V3's ``weight_dequant`` formula in torch
(``weight.float() * scale`` per 128 x 128 block, ``.to(torch.bfloat16)``; numpy with
ml_dtypes where torch is absent), read back with the ``safetensors`` library. The scratch
directory is deleted at the end unless ``--keep``. Run:
``python tools/bench_convert_fp8.py [--gb 2] [--quick] [--dir DIR] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import ml_dtypes
import numpy as np

from bench_timing import cpu_model

BLOCK = 128
GB = 1e9
# DeepSeek-V3's shapes; the MLP's intermediate size is 18000 (not a multiple of 128) so the
# largest tensors end in partial blocks; a smaller vocabulary keeps the bf16 part small.
FULL = {"hidden": 7168, "q_lora": 1536, "q_out": 24576, "kv_lora": 512, "kv_a": 576,
        "kv_b": 32768, "o_in": 16384, "inter": 18000, "vocab": 16384}
SMALL = {"hidden": 1536, "q_lora": 512, "q_out": 3072, "kv_lora": 256, "kv_a": 320,
         "kv_b": 4096, "o_in": 2048, "inter": 4000, "vocab": 4096}
TINY = {"hidden": 200, "q_lora": 128, "q_out": 256, "kv_lora": 64, "kv_a": 72,
        "kv_b": 256, "o_in": 256, "inter": 300, "vocab": 64}
QUANT = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
         "weight_block_size": [BLOCK, BLOCK]}
F8, F32, BF16 = "F8_E4M3", "F32", "BF16"
ITEMSIZE = {F8: 1, F32: 4, BF16: 2}
SAMPLE_EVERY = 0.01
GNU_TIME = "/usr/bin/time"


class BenchError(Exception):
    """Something the user can change (the disk, the size asked for)."""


# --- the checkpoint ----------------------------------------------------------------------

def linear_shapes(d: dict) -> list[tuple[str, tuple[int, int]]]:
    """A layer's FP8 linear weights, [out_features, in_features] as DeepSeek-V3 stores them."""
    return [("self_attn.q_a_proj", (d["q_lora"], d["hidden"])),
            ("self_attn.q_b_proj", (d["q_out"], d["q_lora"])),
            ("self_attn.kv_a_proj_with_mqa", (d["kv_a"], d["hidden"])),
            ("self_attn.kv_b_proj", (d["kv_b"], d["kv_lora"])),
            ("self_attn.o_proj", (d["hidden"], d["o_in"])),
            ("mlp.gate_proj", (d["inter"], d["hidden"])),
            ("mlp.up_proj", (d["inter"], d["hidden"])),
            ("mlp.down_proj", (d["hidden"], d["inter"]))]


def norm_shapes(d: dict) -> list[tuple[str, tuple[int]]]:
    return [("input_layernorm", (d["hidden"],)), ("post_attention_layernorm", (d["hidden"],)),
            ("self_attn.q_a_layernorm", (d["q_lora"],)),
            ("self_attn.kv_a_layernorm", (d["kv_lora"],))]


def scale_shape(shape: tuple[int, int]) -> tuple[int, int]:
    return (-(-shape[0] // BLOCK), -(-shape[1] // BLOCK))


def layer_entries(i: int, d: dict) -> list[tuple[str, str, tuple]]:
    """(name, dtype, shape) of layer ``i``'s tensors, each weight before its scale."""
    out = []
    for part, shape in norm_shapes(d):
        out.append((f"model.layers.{i}.{part}.weight", BF16, shape))
    for part, shape in linear_shapes(d):
        out.append((f"model.layers.{i}.{part}.weight", F8, shape))
        out.append((f"model.layers.{i}.{part}.weight_scale_inv", F32, scale_shape(shape)))
    return out


def checkpoint_plan(fp8_bytes: float, d: dict) -> list[list[tuple[str, str, tuple]]]:
    """The shards' entries: layers (one a shard) until their FP8 weights reach
    ``fp8_bytes``, the embeddings in the first shard, the final norm and lm_head in the
    last."""
    per_layer = sum(math.prod(s) for _, s in linear_shapes(d))
    layers = max(1, math.ceil(fp8_bytes / per_layer))
    shards = [layer_entries(i, d) for i in range(layers)]
    shards[0].insert(0, ("model.embed_tokens.weight", BF16, (d["vocab"], d["hidden"])))
    shards[-1] += [("model.norm.weight", BF16, (d["hidden"],)),
                   ("lm_head.weight", BF16, (d["vocab"], d["hidden"]))]
    return shards


def nbytes(entry) -> int:
    return math.prod(entry[2]) * ITEMSIZE[entry[1]]


def tensor_data(rng, name: str, dtype: str, shape: tuple) -> np.ndarray:
    """Random data shaped as a quantizer writes it: FP8 codes of every value but NaN,
    positive scales near DeepSeek-V3's, bf16 weights of a trained model's size."""
    count = math.prod(shape)
    if dtype == F8:
        codes = rng.integers(0, 256, count, dtype=np.uint8)
        codes[(codes & 0x7F) == 0x7F] ^= 1   # e4m3fn's NaN codes (0x7f, 0xff) -> 448
        return codes
    if dtype == F32:
        return rng.uniform(1e-5, 1e-3, count).astype(np.float32)
    scale = 1.0 if name.endswith("norm.weight") else 0.02
    values = rng.standard_normal(count, dtype=np.float32) * scale + (
        1.0 if name.endswith("norm.weight") else 0.0)
    return values.astype(ml_dtypes.bfloat16)


def write_safetensors(path: Path, entries, data_of) -> None:
    """A safetensors file written one tensor at a time (a plain writer of the format, not
    dqgen's), so the input never holds more than one tensor in memory."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, dtype, shape in entries:
        header[name] = {"dtype": dtype, "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes((name, dtype, shape))]}
        offset += nbytes((name, dtype, shape))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(text)) + text)
        for name, dtype, shape in entries:
            fh.write(memoryview(data_of(name, dtype, shape).view(np.uint8)))


def shard_name(i: int, count: int) -> str:
    return f"model-{i + 1:05d}-of-{count:05d}.safetensors"


def write_checkpoint(directory: Path, shards, d: dict, seed: int = 0) -> None:
    """The checkpoint directory: shards, index, config.json and generation_config.json."""
    directory.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    weight_map, total = {}, 0
    for i, entries in enumerate(shards):
        name = shard_name(i, len(shards))
        write_safetensors(directory / name, entries,
                          lambda n, t, s: tensor_data(rng, n, t, s))
        for entry in entries:
            weight_map[entry[0]] = name
            total += nbytes(entry)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
              "hidden_size": d["hidden"], "intermediate_size": d["inter"],
              "q_lora_rank": d["q_lora"], "kv_lora_rank": d["kv_lora"],
              "num_hidden_layers": len(shards), "vocab_size": d["vocab"],
              "torch_dtype": "bfloat16", "quantization_config": QUANT}
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    (directory / "generation_config.json").write_text('{"bos_token_id": 0}\n')


# --- reading safetensors headers (for the baseline's layout and the check) -----------------

def read_header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        return json.loads(fh.read(length)), 8 + length


def output_layout(out_dir: Path) -> dict:
    """What the convert wrote: each shard's metadata and (name, dtype, shape) in file
    order, and the index; the baseline writes the same."""
    shards = []
    for path in sorted(out_dir.glob("*.safetensors")):
        header, _ = read_header(path)
        meta = header.pop("__metadata__", None)
        items = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
        shards.append({"file": path.name, "metadata": meta,
                       "entries": [[n, v["dtype"], v["shape"]] for n, v in items]})
    index = (out_dir / "model.safetensors.index.json").read_text()
    return {"shards": shards, "index": index}


# --- the children ----------------------------------------------------------------------------

def write_baseline(out_dir: str, layout_path: str) -> None:
    """The convert's output files written with dqgen's safetensors writer from one buffer
    of the largest tensor's size (pages touched before, so no page fault is timed twice)."""
    from dqgen.formats.safetensors_io import PendingFile, Writer
    layout = json.loads(Path(layout_path).read_text())
    largest = max(math.prod(s) * ITEMSIZE[t] for sh in layout["shards"] for _, t, s in sh["entries"])
    buf = np.ones(largest, np.uint8)
    out = Path(out_dir)
    for shard in layout["shards"]:
        entries = [(n, t, tuple(s)) for n, t, s in shard["entries"]]
        writer = Writer(out / shard["file"], entries, shard["metadata"])
        for name, dtype, shape in entries:
            writer.put(name, buf[:math.prod(shape) * ITEMSIZE[dtype]])
        writer.close()
    PendingFile(out / "model.safetensors.index.json", layout["index"].encode()).commit()


def dequantize_only(in_dir: str) -> None:
    """Every FP8 weight of the checkpoint into one reused bf16 buffer, nothing written;
    prints the seconds it took (imports left out)."""
    from dqgen.formats import fp8
    weights = []
    for path in sorted(Path(in_dir).glob("*.safetensors")):
        header, start = read_header(path)
        header.pop("__metadata__", None)
        for name, v in header.items():
            if v["dtype"] == F8:
                s = header[name + "_scale_inv"]
                weights.append((path, start, v, s))
    largest = max(math.prod(v["shape"]) for _, _, v, _ in weights)
    buf = np.empty(largest, ml_dtypes.bfloat16)
    begin = time.perf_counter()
    for path, start, v, s in weights:
        w = np.memmap(path, np.uint8, "r", start + v["data_offsets"][0], tuple(v["shape"]))
        sc = np.memmap(path, np.float32, "r", start + s["data_offsets"][0], tuple(s["shape"]))
        out = buf[:w.size].reshape(w.shape)
        fp8.dequantize(w.view(ml_dtypes.float8_e4m3fn), sc, (BLOCK, BLOCK), "bf16", out=out)
    print(json.dumps({"seconds": time.perf_counter() - begin}))


# --- running and measuring a child -------------------------------------------------------------

def _busy_seconds() -> float:
    """CPU seconds all CPUs have spent busy since boot (user, nice, system, irq, softirq)."""
    with open("/proc/stat") as fh:
        fields = [int(x) for x in fh.readline().split()[1:8]]
    user, nice, system, _idle, _iowait, irq, softirq = fields
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def _status_kib(pid: int, keys=("RssAnon", "VmHWM")) -> dict:
    try:
        with open(f"/proc/{pid}/status") as fh:
            return {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in fh)
                    if k in keys}
    except (OSError, ValueError):
        return {}


def _measured_pid(pid: int, wrapped: bool) -> int | None:
    """The process to sample: ``pid``, or the one ``/usr/bin/time`` started."""
    if not wrapped:
        return pid
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return None
    return int(children[0]) if children else None


def measured(cmd: list[str], scratch: Path) -> dict:
    """Run ``cmd``; its wall time, the sync after it, its peak RSS and peak private memory
    (RssAnon, sampled every 10 ms), and the CPUs other processes kept busy meanwhile.

    The peak RSS is GNU time's (``wait4``'s ru_maxrss of a child of that small process:
    a child of this one would inherit this process's own high-water mark through fork
    and exec), else the last VmHWM sampled. It counts the mapped input's page-cache
    pages; the private memory does not."""
    os.sync()  # the previous run's dirty pages go out now, not during this one
    out_path, err_path, rss_path = (scratch / f"child.{x}" for x in ("out", "err", "rss"))
    rss_path.unlink(missing_ok=True)
    wrapped = os.access(GNU_TIME, os.X_OK)
    full = [GNU_TIME, "-f", "%M", "-o", str(rss_path)] + cmd if wrapped else cmd
    peak = {"RssAnon": 0, "VmHWM": 0}
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        busy0, begin = _busy_seconds(), time.perf_counter()
        # A crash prints every thread's Python stack into the error reported.
        proc = subprocess.Popen(full, stdout=out, stderr=err,
                                env=dict(os.environ, PYTHONFAULTHANDLER="1"))
        stop = threading.Event()

        def sample():
            target = None
            while not stop.wait(SAMPLE_EVERY):
                target = target or _measured_pid(proc.pid, wrapped)
                if target is not None:
                    for key, kib in _status_kib(target).items():
                        peak[key] = max(peak[key], kib)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)  # reaps it: Popen must not wait again
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        seconds = time.perf_counter() - begin
        busy = _busy_seconds() - busy0
        proc.returncode = os.waitstatus_to_exitcode(status)
        stop.set()
        sampler.join()
    sync_begin = time.perf_counter()
    os.sync()
    synced = time.perf_counter() - sync_begin
    if proc.returncode != 0:
        raise BenchError(f"{' '.join(cmd)} exited {proc.returncode}:\n"
                         f"{err_path.read_text(errors='replace')}")
    peak_rss = peak["VmHWM"]
    if wrapped:
        peak_rss = int(rss_path.read_text().split()[-1])
    child_cpu = usage.ru_utime + usage.ru_stime
    return {"seconds": seconds, "sync_seconds": synced, "peak_rss_bytes": peak_rss * 1024,
            "peak_rss_sampled_bytes": peak["VmHWM"] * 1024,
            "peak_private_bytes": peak["RssAnon"] * 1024, "child_cpu_seconds": child_cpu,
            "user_seconds": usage.ru_utime, "sys_seconds": usage.ru_stime,
            "others_cpus_busy": max(0.0, (busy - child_cpu) / seconds),
            "stdout": out_path.read_text(errors="replace").strip()}


def dqgen_command() -> list[str]:
    """The ``dqgen`` console script beside this interpreter, else ``python -m dqgen.cli``."""
    script = Path(sys.executable).parent / "dqgen"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "dqgen.cli"]


# --- the check -----------------------------------------------------------------------------------

def deepseek_dequant(w, scale, torch=None):
    """DeepSeek-V3's weight_dequant: each 128 x 128 block's FP8 values times its scale in
    f32, rounded once to bf16."""
    n, k = w.shape
    if torch is not None:
        s = scale.repeat_interleave(BLOCK, 0)[:n].repeat_interleave(BLOCK, 1)[:, :k]
        return (w.float() * s).to(torch.bfloat16)
    s = np.repeat(np.repeat(scale, BLOCK, 0)[:n], BLOCK, 1)[:, :k]
    return (w.astype(np.float32) * s).astype(ml_dtypes.bfloat16)


def _sample_weights() -> list[str]:
    """The weights whose last blocks are partial: rows (kv_a_proj_with_mqa, gate_proj) and
    columns (down_proj), of layer 0."""
    return [f"model.layers.0.{p}.weight" for p in
            ("self_attn.kv_a_proj_with_mqa", "mlp.gate_proj", "mlp.down_proj")]


def check_output(in_dir: Path, out_dir: Path, shards) -> list[str]:
    """What is wrong with the conversion's output (empty: nothing)."""
    problems = []
    want = {}
    for entries in shards:
        for name, dtype, shape in entries:
            if name.endswith("_scale_inv"):
                continue
            want[name] = (BF16, list(shape))
    got = {}
    where = {}
    for path in sorted(out_dir.glob("*.safetensors")):
        header, _ = read_header(path)
        header.pop("__metadata__", None)
        for name, v in header.items():
            got[name] = (v["dtype"], v["shape"])
            where[name] = path
    if got != want:
        problems.append(f"tensors differ: missing {sorted(set(want) - set(got))[:4]}, extra "
                        f"{sorted(set(got) - set(want))[:4]}, other dtype or shape "
                        f"{[n for n in want if n in got and got[n] != want[n]][:4]}")
    config = json.loads((out_dir / "config.json").read_text())
    if "quantization_config" in config or config.get("torch_dtype") != "bfloat16":
        problems.append("config.json keeps its quantization_config or is not bfloat16")
    index = json.loads((out_dir / "model.safetensors.index.json").read_text())
    if set(index["weight_map"]) != set(want):
        problems.append("the index names other tensors than the shards hold")
    in_where = {}
    for path in sorted(in_dir.glob("*.safetensors")):
        header, _ = read_header(path)
        for name in header:
            in_where[name] = path
    copies = ["model.embed_tokens.weight", "model.layers.0.input_layernorm.weight",
              "lm_head.weight"]
    problems += _check_copies(in_where, where, [n for n in copies if n in where])
    problems += _check_weights(in_where, where, [n for n in _sample_weights() if n in where])
    return problems


def _check_copies(in_where, out_where, names) -> list[str]:
    """The bf16 tensors the convert copies: the same bytes."""
    return [f"{name} is not copied byte for byte" for name in names
            if not np.array_equal(_raw(in_where[name], name, np.uint16),
                                  _raw(out_where[name], name, np.uint16))]


def _check_weights(in_where, out_where, names, rows: int = 16 * BLOCK) -> list[str]:
    """Each weight bit for bit against DeepSeek's formula, ``rows`` rows (whole blocks) at
    a time so memory stays small."""
    bad = []
    try:
        import torch
        from safetensors import safe_open
    except ImportError:
        torch = None
    for name in names:
        scale_name = name + "_scale_inv"
        if torch is not None:
            with safe_open(str(in_where[name]), "pt") as fw, \
                    safe_open(str(in_where[scale_name]), "pt") as fs, \
                    safe_open(str(out_where[name]), "pt") as fo:
                w, s, y = fw.get_tensor(name), fs.get_tensor(scale_name), fo.get_tensor(name)
                if w.dtype != torch.float8_e4m3fn or y.dtype != torch.bfloat16:
                    bad.append(f"{name}: read back as {w.dtype} -> {y.dtype}")
                    continue
                for r in range(0, w.shape[0], rows):
                    want = deepseek_dequant(w[r:r + rows], s[r // BLOCK:(r + rows) // BLOCK], torch)
                    if not torch.equal(want.view(torch.int16), y[r:r + rows].view(torch.int16)):
                        bad.append(f"{name}: rows {r}..{min(r + rows, w.shape[0])} differ from "
                                   "DeepSeek's formula")
                        break
        else:
            w = _raw(in_where[name], name, np.uint8).view(ml_dtypes.float8_e4m3fn)
            s = _raw(in_where[scale_name], scale_name, np.float32)
            y = _raw(out_where[name], name, np.uint16)
            for r in range(0, w.shape[0], rows):
                want = deepseek_dequant(w[r:r + rows], s[r // BLOCK:(r + rows) // BLOCK])
                if not np.array_equal(want.view(np.uint16), y[r:r + rows]):
                    bad.append(f"{name}: rows {r}..{min(r + rows, w.shape[0])} differ from "
                                   "DeepSeek's formula")
                    break
    return bad


def _raw(path: Path, name: str, dtype) -> np.ndarray:
    header, start = read_header(path)
    v = header[name]
    return np.memmap(path, dtype, "r", start + v["data_offsets"][0], tuple(v["shape"]))


# --- the machine -----------------------------------------------------------------------------



def machine() -> dict:
    from dqgen.isa import host_isa
    from dqgen.version import __version__
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=Path(__file__).parent).stdout.strip() or None
    except OSError:
        commit = None
    return {"cpu": cpu_model(), "threads": len(os.sched_getaffinity(0)),
            "isa": host_isa(), "dqgen": __version__, "commit": commit,
            "load_average": os.getloadavg()}


# --- the run ---------------------------------------------------------------------------------------

def need_bytes(shards, keep: bool) -> tuple[int, int, int]:
    """Input, output and scratch bytes the run needs on its disk: the input and one output
    at a time (two when ``keep`` keeps the last convert's beside a baseline's), 1 GB spare."""
    in_bytes = sum(nbytes(e) for entries in shards for e in entries)
    out_bytes = sum(math.prod(e[2]) * ITEMSIZE[BF16] for entries in shards for e in entries
                    if not e[0].endswith("_scale_inv"))
    return in_bytes, out_bytes, in_bytes + out_bytes * (2 if keep else 1) + int(GB)


def check_disk(where: Path, need: int) -> None:
    free = shutil.disk_usage(where).free
    if free < need:
        raise BenchError(f"{where} has {free / GB:.1f} GB free; this run needs about "
                         f"{need / GB:.1f} GB (the checkpoint, its bf16 output and 1 GB "
                         "spare): pass a smaller --gb or a --dir on a larger disk")


def convert_cmd(src: Path, dst: Path, jobs: int | None) -> list[str]:
    cmd = dqgen_command() + ["convert", str(src), str(dst), "--dtype", "bf16", "--quiet"]
    return cmd + (["-j", str(jobs)] if jobs else [])


def fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    return path


def run_all(work: Path, args, shards, dims) -> dict:
    """Every measurement; returns the results (the check's findings under "problems")."""
    src = work / "fp8"
    begin = time.perf_counter()
    write_checkpoint(src, shards, dims)
    print(f"checkpoint written in {time.perf_counter() - begin:.0f} s", flush=True)
    tiny_shards = checkpoint_plan(1, TINY)
    write_checkpoint(work / "tiny", tiny_shards, TINY, seed=1)
    me = [sys.executable, str(Path(__file__).resolve())]
    results: dict = {"runs": {"dqgen convert": [], "write baseline": []}}

    measured(convert_cmd(work / "tiny", fresh(work / "tiny-out"), args.jobs), work)  # kernels
    fixed = [measured(convert_cmd(work / "tiny", fresh(work / "tiny-out"), args.jobs), work)
             for _ in range(3)]
    results["fixed cost"] = min(fixed, key=lambda r: r["seconds"])

    out = work / "out"
    layout_path = work / "layout.json"
    # Untimed: the check, the layout the baseline copies, and the first pass over fresh
    # memory (on a virtual machine, pages the host has not backed yet cost several times
    # more system time to fill than pages freed by a previous run).
    measured(convert_cmd(src, fresh(out), args.jobs), work)
    layout_path.write_text(json.dumps(output_layout(out)))
    results["out_bytes"] = sum(p.stat().st_size for p in out.iterdir())
    print("checking the output ...", flush=True)
    results["problems"] = check_output(src, out, shards)
    order = []
    for r in range(args.repeat):
        order += ["dqgen convert", "write baseline"] if r % 2 == 0 else [
            "write baseline", "dqgen convert"]
    for i, kind in enumerate(order):
        if kind == "dqgen convert":
            run = measured(convert_cmd(src, fresh(out), args.jobs), work)
            if not (args.keep and kind not in order[i + 1:]):
                fresh(out)
        else:
            base = fresh(work / "baseline")
            base.mkdir()
            run = measured(me + ["--child-write", str(base), str(layout_path)], work)
            fresh(base)
        results["runs"][kind].append(run)
        print(f"  {kind}: {run['seconds']:.2f} s (+ sync {run['sync_seconds']:.2f} s), CPU "
              f"{run['user_seconds']:.2f} user + {run['sys_seconds']:.2f} sys; others kept "
              f"{run['others_cpus_busy']:.2f} CPUs busy", flush=True)
    for kind, runs in results["runs"].items():
        results[kind] = min(runs, key=lambda r: r["seconds"])
    dq = measured(me + ["--child-dequantize", str(src)], work)
    dq["seconds_in_process"] = json.loads(dq["stdout"].splitlines()[-1])["seconds"]
    results["dequantize only"] = dq
    return results


def table(results: dict, info: dict, ckpt: dict) -> str:
    """The markdown report."""
    out_bytes = results["out_bytes"]
    base = results["write baseline"]["seconds"]
    lines = [f"{info['cpu']}, {info['threads']} threads, kernels for {info['isa']}, dqgen "
             f"{info['dqgen']} ({info['commit']}); checkpoint: {ckpt['layers']} layers in "
             f"{ckpt['shards']} shards, {ckpt['fp8_bytes'] / GB:.2f} GB FP8 e4m3 "
             f"({ckpt['fp8_tensors']} weights, 128 x 128 blocks) + "
             f"{ckpt['bf16_bytes'] / GB:.2f} GB bf16 in, {out_bytes / GB:.2f} GB bf16 out", "",
             "| run | seconds | written GB/s | vs write baseline | + sync s | to disk GB/s "
             "| CPU user + sys s | peak RSS | peak private | others' CPUs busy |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for label, key in (("`dqgen convert --dtype bf16`", "dqgen convert"),
                       ("write baseline (same files, dqgen's Writer, one buffer)",
                        "write baseline")):
        r = results[key]
        s, sync = r["seconds"], r["sync_seconds"]
        lines.append(f"| {label} | {s:.2f} | {out_bytes / s / GB:.2f} | {s / base:.2f}x | "
                     f"{sync:.2f} | {out_bytes / (s + sync) / GB:.2f} | {_cpu(r)} | "
                     f"{r['peak_rss_bytes'] / 2**20:.0f} MiB | "
                     f"{r['peak_private_bytes'] / 2**20:.0f} MiB | "
                     f"{r['others_cpus_busy']:.2f} |")
    dq = results["dequantize only"]
    s = dq["seconds_in_process"]
    lines.append(f"| dequantize only (every FP8 weight into one buffer, no file; in-process "
                 f"time) | {s:.2f} | {ckpt['fp8_bytes'] * 2 / s / GB:.2f} (bf16 made) | "
                 f"{s / base:.2f}x | - | - | {_cpu(dq)} | {dq['peak_rss_bytes'] / 2**20:.0f} MiB | "
                 f"{dq['peak_private_bytes'] / 2**20:.0f} MiB | {dq['others_cpus_busy']:.2f} |")
    fx = results["fixed cost"]
    lines.append(f"| `dqgen convert` of a {ckpt['tiny_bytes'] / 1e6:.1f} MB checkpoint (the "
                 f"fixed cost) | {fx['seconds']:.2f} | - | - | - | - | {_cpu(fx)} | "
                 f"{fx['peak_rss_bytes'] / 2**20:.0f} MiB | "
                 f"{fx['peak_private_bytes'] / 2**20:.0f} MiB | {fx['others_cpus_busy']:.2f} |")
    conv = results["dqgen convert"]
    largest = ckpt["largest_bf16_bytes"]
    lines += ["", f"Largest tensor: {ckpt['largest_name']} {ckpt['largest_shape']}, "
              f"{largest / 2**20:.0f} MiB in bf16. Convert's peak RSS "
              f"{conv['peak_rss_bytes'] / 2**20:.0f} MiB = {conv['peak_rss_bytes'] / largest:.2f}x "
              f"it ({(conv['peak_rss_bytes'] - fx['peak_rss_bytes']) / largest:.2f}x above the "
              f"tiny conversion's {fx['peak_rss_bytes'] / 2**20:.0f} MiB); peak private memory "
              f"{conv['peak_private_bytes'] / 2**20:.0f} MiB = "
              f"{conv['peak_private_bytes'] / largest:.2f}x it.",
              "Every run (seconds): " + "; ".join(
                  f"{k}: " + ", ".join(f"{r['seconds']:.2f}" for r in runs)
                  for k, runs in results["runs"].items()) + f"; medians' ratio "
              f"{_median(results['runs']['dqgen convert']) / _median(results['runs']['write baseline']):.2f}x "
              "(the best of each may come from a quieter moment for one of them).",
              "Output check (names, dtypes, shapes, config, index, copied bf16 bytes, "
              "kv_a_proj_with_mqa / gate_proj / down_proj of layer 0 bit for bit against "
              "DeepSeek's formula): " + ("passed" if not results["problems"] else
                                         "FAILED: " + "; ".join(results["problems"]))]
    return "\n".join(lines)


def _median(runs: list[dict]) -> float:
    return float(np.median([r["seconds"] for r in runs]))


def _cpu(r: dict) -> str:
    return f"{r['user_seconds']:.2f} + {r['sys_seconds']:.2f}"


def describe(shards) -> dict:
    entries = [e for sh in shards for e in sh]
    fp8 = [e for e in entries if e[1] == F8]
    largest = max((e for e in entries if not e[0].endswith("_scale_inv")),
                  key=lambda e: math.prod(e[2]))
    return {"layers": len(shards), "shards": len(shards), "fp8_tensors": len(fp8),
            "fp8_bytes": sum(nbytes(e) for e in fp8),
            "bf16_bytes": sum(nbytes(e) for e in entries if e[1] == BF16),
            "largest_name": largest[0], "largest_shape": list(largest[2]),
            "largest_bf16_bytes": math.prod(largest[2]) * ITEMSIZE[BF16],
            "tiny_bytes": sum(nbytes(e) for sh in checkpoint_plan(1, TINY) for e in sh)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gb", type=float, default=2.0,
                        help="GB (1e9 bytes) of FP8 weights at least (default 2)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: about 0.1 GB of smaller layers, one repeat")
    parser.add_argument("--repeat", type=int, default=3,
                        help="timed convert and baseline runs each, best kept (default 3)")
    parser.add_argument("-j", "--jobs", type=int, default=None,
                        help="dqgen convert -j (default: dqgen's own)")
    parser.add_argument("--dir", default=None, help="scratch directory (default: a temp dir)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the checkpoint and the last conversion's output")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--child-write", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--child-dequantize", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_write:
        write_baseline(*args.child_write)
        return 0
    if args.child_dequantize:
        dequantize_only(args.child_dequantize)
        return 0
    if args.quick:
        args.gb, args.repeat = min(args.gb, 0.1), 1
    if not args.gb > 0 or args.repeat < 1:
        parser.error("--gb must be above 0 and --repeat at least 1")
    dims = SMALL if args.quick else FULL
    shards = checkpoint_plan(args.gb * GB, dims)
    in_bytes, out_bytes, need = need_bytes(shards, args.keep)
    parent = Path(args.dir) if args.dir else Path(tempfile.gettempdir())
    try:
        if not parent.is_dir():
            raise BenchError(f"--dir {parent} is not a directory")
        check_disk(parent, need)
        work = Path(tempfile.mkdtemp(prefix="dqgen-bench-fp8-", dir=parent))
        info = machine()
        ckpt = describe(shards)
        print(f"{info['cpu']}, {info['threads']} threads; load average "
              f"{'/'.join(f'{x:.1f}' for x in info['load_average'])}; writing "
              f"{in_bytes / GB:.2f} GB of checkpoint into {work} "
              f"({shutil.disk_usage(work).free / GB:.0f} GB free)", flush=True)
        try:
            results = run_all(work, args, shards, dims)
        finally:
            if args.keep:
                print(f"kept: {work}")
            else:
                shutil.rmtree(work, ignore_errors=True)
    except BenchError as exc:
        print(f"bench_convert_fp8: {exc}", file=sys.stderr)
        return 2
    info["load_average_after"] = os.getloadavg()
    print()
    print(table(results, info, ckpt))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "checkpoint": ckpt,
                                               "results": results}, indent=2) + "\n")
    return 0 if not results["problems"] else 1


if __name__ == "__main__":
    sys.exit(main())
