"""``dqgen convert model.gguf out.safetensors --dtype f16|bf16|f32``: every tensor of a
GGUF file into a safetensors file (or shards and an index).

Quantized tensors are dequantized to ``--dtype``; F32/F16/BF16 (and F64/integer) tensors
are copied as stored; shapes are in PyTorch's order. The GGUF metadata becomes the
safetensors metadata (strings as they are, other values JSON-encoded, plus ``format:
pt``, which transformers asks for). Every type is checked before a file is created.

Memory stays small whatever the model: each tensor goes out in pieces of about
``CHUNK_BYTES``, dequantized into one of two reused buffers while the other is written,
so the kernels and the disk overlap. Output goes to hidden temporary files beside the
destination, renamed into place only once every shard is complete (``convert_output``:
what an earlier conversion there left is removed after, a failure leaves nothing).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InvalidProblemError, UnsupportedError
from ..ir import GGML_FLOAT_DTYPES, parse_dtype
from ..runtime import cpu as cpu_runtime
from . import ggml
from . import gguf as gguf_file
from .convert_output import Destination, kernel_jobs
from .progress import Progress
from .safetensors_io import NAMES, Partial, PendingFile, parse_size, shard_paths

CHUNK_BYTES = 16 << 20


def safetensors_metadata(metadata: dict) -> dict[str, str]:
    """GGUF metadata as safetensors metadata: strings kept, other values JSON-encoded."""
    out = {"format": "pt"}
    for key, value in metadata.items():
        out[key] = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return out


@dataclass(frozen=True)
class _Item:
    """One output tensor: what it is read from and how it is written."""

    info: gguf_file.TensorInfo
    dtype: str                 # safetensors dtype name
    nbytes: int
    dequantized: bool


def _plan(f: gguf_file.GGUFFile, out_dtype) -> list[_Item]:
    """Every tensor in file order; raises naming every tensor dqgen cannot read."""
    items, unsupported = [], []
    target = NAMES[out_dtype.np_dtype]
    for info in sorted(f.tensors.values(), key=lambda t: t.offset):
        if info.type in gguf_file.FLOAT_TYPES or info.type in gguf_file.VALUE_TYPES:
            dtype = NAMES[np.dtype(gguf_file.FLOAT_TYPES.get(info.type)
                                   or gguf_file.VALUE_TYPES[info.type])]
            items.append(_Item(info, dtype, info.nbytes, False))
        elif info.supported:
            items.append(_Item(info, target, math.prod(info.shape) * out_dtype.np_dtype.itemsize,
                               True))
        else:
            unsupported.append(info)
    if unsupported:
        listed = ", ".join(f"{t.name!r} ({t.type})" for t in unsupported[:8])
        more = f" and {len(unsupported) - 8} more" if len(unsupported) > 8 else ""
        types = sorted({t.type for t in unsupported})
        raise UnsupportedError(f"{f.path}: {len(unsupported)} tensors have types dqgen does not "
                               f"dequantize ({', '.join(types)}): {listed}{more}; it reads "
                               f"{', '.join(gguf_file.supported_types())}")
    return items


def _shards(items: list[_Item], max_bytes: int | None) -> list[list[_Item]]:
    """Consecutive runs of tensors of at most ``max_bytes`` each (a larger tensor alone)."""
    shards: list[list[_Item]] = [[]]
    size = 0
    for item in items:
        if max_bytes is not None and shards[-1] and size + item.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item.nbytes
    return shards


def _directory_out(dst) -> bool:
    return Path(dst).is_dir() or str(dst).endswith(os.sep)


def _base(dst) -> Path:
    """The file name shards of ``dst`` are named after (``model.safetensors`` in a
    directory)."""
    return Path(dst) / "model.safetensors" if _directory_out(dst) else Path(dst)


def output_paths(dst, count: int) -> tuple[list[Path], Path | None]:
    """The shard files and index for ``count`` shards of ``dst`` (``shard_paths``); a
    directory ``dst`` holds ``model.safetensors`` or ``model-*`` shards and
    ``model.safetensors.index.json``."""
    return shard_paths(_base(dst), count)


class _ShardWriter:
    """One safetensors file written front to back: the header (known in full up front),
    then the tensors' bytes in order, in pieces, into a temporary file that ``commit``
    renames to ``path``."""

    def __init__(self, path: Path, items: list[_Item], metadata: dict[str, str]) -> None:
        self.path = path
        header: dict = {"__metadata__": metadata}
        offset = 0
        for item in items:
            header[item.info.name] = {"dtype": item.dtype, "shape": list(item.info.shape),
                                      "data_offsets": [offset, offset + item.nbytes]}
            offset += item.nbytes
        self.expected, self.written = offset, 0
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        text += b" " * (-len(text) % 8)
        self._partial = Partial(path)
        try:
            self._partial.write(struct.pack("<Q", len(text)) + text)
        except BaseException:
            self.abort()
            raise

    def write(self, chunk: np.ndarray) -> None:
        view = memoryview(chunk.reshape(-1).view(np.uint8))
        self._partial.write(view)
        self.written += view.nbytes

    def finish(self) -> None:
        if self.written != self.expected:  # a bug, never bad input: the plan fixed the sizes
            raise RuntimeError(f"{self.path}: wrote {self.written} of {self.expected} bytes")
        self._partial.close()

    def commit(self) -> None:
        self._partial.commit()

    def abort(self) -> None:
        self._partial.abort()


def _pieces(f: gguf_file.GGUFFile, item: _Item, out_dtype, buffers):
    """The tensor's output bytes in pieces of about ``CHUNK_BYTES``: mapped file bytes for
    a copied tensor, else whole blocks dequantized into the next of ``buffers`` (a cycle
    shared by every tensor, so a piece never lands in the buffer of the one before it)."""
    data = f.array(item.info.name)
    if not item.dequantized:
        flat = data.reshape(-1).view(np.uint8)
        for start in range(0, flat.size, CHUNK_BYTES):
            yield flat[start:start + CHUNK_BYTES]
        return
    bv, bb = gguf_file.block_size(item.info.type)
    blocks = data.reshape(-1, bb)
    per = max(1, CHUNK_BYTES // (bv * out_dtype.np_dtype.itemsize))
    for start in range(0, blocks.shape[0], per):
        part = blocks[start:start + per]
        buf = next(buffers)
        y = buf[:part.shape[0] * bv * out_dtype.np_dtype.itemsize].view(out_dtype.np_dtype)
        ggml.dequantize(part, item.info.type, dtype=out_dtype.value,
                        out=y.reshape(part.shape[0], bv))
        yield y


def default_jobs() -> int | None:
    """Kernel threads when ``-j`` is not given: DQGEN_NUM_THREADS's (None), else every CPU
    but one, which the writer thread keeps busy (on 2 cores, 2 kernel threads beside it
    convert slower than 1: a thread of the kernel waits on the other at every call)."""
    if os.environ.get("DQGEN_NUM_THREADS", "").strip():
        return None
    return max(1, cpu_runtime.usable_cpus() - 1)


@contextlib.contextmanager
def _num_threads(jobs: int | None):
    """Kernels run on ``jobs`` threads meanwhile (DQGEN_NUM_THREADS, which plans read),
    at most ``thread_limit()`` (a warning says so)."""
    if jobs is None:
        yield
        return
    jobs = cpu_runtime.bounded_threads(cpu_runtime.check_thread_count(jobs, "jobs"), "jobs")
    old = os.environ.get("DQGEN_NUM_THREADS")
    os.environ["DQGEN_NUM_THREADS"] = str(jobs)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("DQGEN_NUM_THREADS", None)
        else:
            os.environ["DQGEN_NUM_THREADS"] = old


def convert_file(src, dst, dtype="f16", jobs: int | None = None,
                 max_shard_bytes: int | None = None, progress=None,
                 force: bool = False) -> list[Path]:
    """Write every tensor of GGUF file ``src`` to safetensors ``dst`` (sharded above
    ``max_shard_bytes``, with an index) with kernels on ``jobs`` threads (default:
    ``default_jobs()``); ``progress(done_bytes, total_bytes, name)`` is called as output
    is written. A directory ``dst`` must be empty or hold a checkpoint (an earlier
    conversion's, replaced) unless ``force``. Returns the files written (index last)."""
    out_dtype = parse_dtype(dtype, "dtype", GGML_FLOAT_DTYPES)
    if max_shard_bytes is not None and max_shard_bytes < 1:
        raise InvalidProblemError(f"max_shard_bytes={max_shard_bytes} must be >= 1")
    f = gguf_file.open(src)
    items = _plan(f, out_dtype)
    shards = _shards(items, max_shard_bytes)
    paths, index = output_paths(dst, len(shards))
    if any(p.resolve() == f.path.resolve() for p in paths):
        raise InvalidProblemError(f"the output {dst} must differ from the input {src}")
    where = Destination(_base(dst), paths, index, _directory_out(dst), force, keep=[f.path])
    metadata = safetensors_metadata(f.metadata)
    total = sum(item.nbytes for item in items)
    largest = max((item.nbytes for item in items if item.dequantized), default=0)
    buffers = itertools.cycle([np.empty(min(largest, CHUNK_BYTES), np.uint8) for _ in range(2)])
    writers: list = []  # the shards, then the index
    jobs = default_jobs() if jobs is None else jobs
    done = 0
    try:
        where.prepare()
        with _num_threads(jobs), ThreadPoolExecutor(1, thread_name_prefix="dqgen-write") as io:
            for shard, path in zip(shards, paths):
                writer = _ShardWriter(path, shard, metadata)
                writers.append(writer)
                pending = None
                for item in shard:
                    for piece in _pieces(f, item, out_dtype, buffers):
                        if pending is not None:  # the other buffer is free once written
                            done += pending.result()
                            if progress:
                                progress(done, total, item.info.name)
                        pending = io.submit(_write_piece, writer, piece)
                if pending is not None:
                    done += pending.result()
                    if progress:
                        progress(done, total, shard[-1].info.name)
                writer.finish()
        if index is not None:
            writers.append(_index(index, shards, paths, total))
        for writer in writers:  # the index last: it never names a shard not yet in place
            writer.commit()
    except BaseException:
        for writer in writers:
            writer.abort()
        where.failed()
        raise
    where.finished()
    return paths + ([index] if index is not None else [])


def _write_piece(writer: _ShardWriter, piece: np.ndarray) -> int:
    """Write one piece (on the writer thread); its size in bytes."""
    writer.write(piece)
    return piece.nbytes


def _index(path: Path, shards, paths, total: int) -> PendingFile:
    """``NAME.safetensors.index.json`` as transformers reads it (total size, tensor ->
    file), in a temporary file until committed."""
    weight_map = {item.info.name: p.name for shard, p in zip(shards, paths) for item in shard}
    return PendingFile(path, json.dumps({"metadata": {"total_size": total},
                                         "weight_map": weight_map}, indent=2).encode() + b"\n")


def run(args) -> int:
    """The ``dqgen convert`` command for a ``.gguf`` input (``convert.run`` hands it over)."""
    given = [f"--{flag.replace('_', '-')}" for flag in ("format", "bits", "group_size",
                                                        "checkpoint_format")
             if getattr(args, flag, None) is not None]
    if given:
        raise InvalidProblemError(f"{', '.join(given)} describe GPTQ/AWQ checkpoints; a .gguf "
                                  "file names each tensor's type itself")
    max_shard = getattr(args, "max_shard_size", None)
    max_shard = parse_size(max_shard) if isinstance(max_shard, str) else max_shard
    quiet = getattr(args, "quiet", False)
    bar: list = []
    last = [0.0]

    def progress(done: int, total: int, name: str) -> None:
        """The bar in MB, redrawn 10 times a second (a line every 2 s when not a terminal)."""
        if not bar:
            bar.append(Progress(max(1, -(-total // 10**6)), quiet, unit="MB"))
        now = time.perf_counter()
        if done == total or now - last[0] >= (0.1 if bar[0].tty else 2.0):
            last[0] = now
            bar[0].step(-(-done // 10**6), name)

    jobs = kernel_jobs(getattr(args, "jobs", None))
    start = time.perf_counter()
    try:
        files = convert_file(args.input, args.output, args.dtype, jobs, max_shard, progress,
                             force=getattr(args, "force", False))
    finally:
        if bar:
            bar[0].finish()
    seconds = time.perf_counter() - start
    if not quiet:
        size = sum(p.stat().st_size for p in files)
        shown = files[0] if len(files) == 1 else f"{len(files) - 1} shards and {files[-1]}"
        print(f"{shown}: {args.input} converted to {args.dtype} in {seconds:.1f} s "
              f"({size / 1e9:.2f} GB written, {size / 1e9 / max(seconds, 1e-9):.2f} GB/s)")
    return 0
