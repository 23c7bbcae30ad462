"""Streaming safetensors reading and writing, one tensor at a time.

The format: an 8-byte little-endian header length, a JSON header mapping each tensor
name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets into the data
that follows; ``"__metadata__"`` holds strings), then the data. The reader checks every
field before anything is read (a damaged file gives a clear error, never a crash or a
huge allocation) and maps the data, so a tensor is read only when used. The writer
takes the full list of entries first (the header precedes the data) and then the
tensors one by one, into a temporary file renamed into place at the end (``finish`` then
``commit``, so several files can all be complete before any is moved into place).
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from ..errors import InvalidProblemError

DTYPES = {
    "BOOL": np.dtype(np.bool_), "U8": np.dtype(np.uint8), "I8": np.dtype(np.int8),
    "I16": np.dtype(np.int16), "U16": np.dtype(np.uint16), "I32": np.dtype(np.int32),
    "U32": np.dtype(np.uint32), "I64": np.dtype(np.int64), "U64": np.dtype(np.uint64),
    "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16),
    "F32": np.dtype(np.float32), "F64": np.dtype(np.float64),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 << 20


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40}


def parse_size(text, name: str = "--max-shard-size") -> int:
    """``"5GB"``, ``"500MiB"``, ``"1e9"`` or a number of bytes -> bytes (Hugging Face's
    units: GB = 10^9, GiB = 2^30)."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = m and _SIZE_UNITS.get(m.group(2).upper())
    if not unit:
        raise InvalidProblemError(f"{name}={text!r} is not a size such as 5GB, 500MB, 2GiB "
                                  "or a number of bytes")
    size = int(float(m.group(1)) * unit)
    if size < 1:
        raise InvalidProblemError(f"{name}={text!r} must be at least one byte")
    return size


def shard_paths(dst, count: int) -> tuple[list[Path], Path | None]:
    """Where ``count`` shards of ``dst`` go, as transformers names them: ``dst`` itself
    for one; else ``NAME-00001-of-0000N.safetensors`` beside it and an index
    ``NAME.safetensors.index.json``."""
    dst = Path(dst)
    if count == 1:
        return [dst], None
    stem, suffix = (dst.stem, dst.suffix) if dst.suffix else (dst.name, ".safetensors")
    return ([dst.with_name(f"{stem}-{i:05d}-of-{count:05d}{suffix}") for i in range(1, count + 1)],
            dst.with_name(dst.name + ".index.json"))


def new_file_mode() -> int:
    """The mode ``open()`` gives a new file (0o666 less the umask); ``mkstemp``'s 0o600
    is set to it so an output is as readable as any other file its user writes."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


class CorruptFileError(InvalidProblemError):
    """A file is not a well-formed safetensors file."""


@dataclass(frozen=True)
class Entry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


class Reader:
    """A validated safetensors file; ``array(name)`` maps one tensor (no copy)."""

    def __init__(self, path) -> None:
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as fh:
                head = fh.read(8)
                if len(head) < 8:
                    self._bad(f"{size} bytes is too short for the 8-byte header length")
                (length,) = struct.unpack("<Q", head)
                if length < 2 or length > min(MAX_HEADER, size - 8):
                    self._bad(f"header length {length} does not fit a {size}-byte file")
                raw = fh.read(length)
        except OSError as exc:
            raise InvalidProblemError(f"{self.path}: cannot read: {exc.strerror}") from None
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            self._bad(f"the header is not JSON ({exc})")
        if not isinstance(header, dict):
            self._bad("the header is not a JSON object")
        self.data_start = 8 + length
        data_size = size - self.data_start
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            self._bad("__metadata__ is not a map of strings")
        self.metadata: dict[str, str] = meta
        self.entries: dict[str, Entry] = {}
        for name, info in header.items():
            self.entries[name] = self._entry(name, info, data_size)

    def _bad(self, why: str):
        raise CorruptFileError(f"{self.path}: not a valid safetensors file: {why}")

    def _entry(self, name: str, info, data_size: int) -> Entry:
        if not isinstance(info, dict):
            self._bad(f"tensor {name!r} has no description")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in DTYPES:
            self._bad(f"tensor {name!r} has unknown dtype {dtype!r}")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            self._bad(f"tensor {name!r} has a bad shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(type(o) is int for o in offsets) and 0 <= offsets[0] <= offsets[1] <= data_size):
            self._bad(f"tensor {name!r} has data_offsets {offsets!r} outside the "
                      f"{data_size} bytes of data")
        if offsets[1] - offsets[0] != math.prod(shape) * DTYPES[dtype].itemsize:
            self._bad(f"tensor {name!r}: {offsets[1] - offsets[0]} bytes for shape {shape} "
                      f"of {dtype}")
        return Entry(name, dtype, tuple(shape), offsets[0], offsets[1])

    def array(self, name: str) -> np.ndarray:
        e = self.entries[name]
        if e.end == e.begin:
            return np.empty(e.shape, DTYPES[e.dtype])
        return np.memmap(self.path, dtype=DTYPES[e.dtype], mode="r",
                         offset=self.data_start + e.begin, shape=e.shape)

    def raw(self, name: str) -> np.ndarray:
        e = self.entries[name]
        if e.end == e.begin:
            return np.empty(0, np.uint8)
        return np.memmap(self.path, dtype=np.uint8, mode="r",
                         offset=self.data_start + e.begin, shape=(e.end - e.begin,))


class Writer:
    """Write ``entries`` ((name, dtype name, shape) in order), then each tensor with ``put``."""

    def __init__(self, path, entries: list[tuple[str, str, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None) -> None:
        self.path = Path(path)
        header: dict = {"__metadata__": dict(metadata)} if metadata else {}
        self._order, offset = [], 0
        for name, dtype, shape in entries:
            nbytes = math.prod(shape) * DTYPES[dtype].itemsize
            header[name] = {"dtype": dtype, "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            self._order.append((name, nbytes))
            offset += nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        os.fchmod(fd, new_file_mode())
        self._tmp = Path(tmp)
        self._fh = os.fdopen(fd, "wb")
        self._fh.write(struct.pack("<Q", len(text)) + text)
        self._next = 0

    def put(self, name: str, data: np.ndarray) -> None:
        """Append the next tensor's bytes (``name`` must come in the declared order)."""
        want, nbytes = self._order[self._next]
        blob = memoryview(np.ascontiguousarray(data).reshape(-1).view(np.uint8))
        if name != want or blob.nbytes != nbytes:
            raise InvalidProblemError(f"writer expected {want} ({nbytes} bytes), got {name} "
                                      f"({blob.nbytes} bytes)")
        self._fh.write(blob)
        self._next += 1

    def finish(self) -> None:
        """Every tensor written: the temporary file flushed and closed, not yet in place."""
        if self._next != len(self._order):
            raise InvalidProblemError(f"{len(self._order) - self._next} tensors were not written")
        self._fh.close()

    def commit(self) -> None:
        """Move the finished file into place (after ``finish``)."""
        os.replace(self._tmp, self.path)

    def close(self) -> None:
        """``finish`` and ``commit``."""
        self.finish()
        self.commit()

    def abort(self) -> None:
        self._fh.close()
        self._tmp.unlink(missing_ok=True)


class PendingFile:
    """A small file (JSON, a copied config) written to a temporary name beside ``path``
    and moved into place by ``commit``, as ``Writer`` does for tensors."""

    def __init__(self, path, data: bytes) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        os.fchmod(fd, new_file_mode())
        self._tmp = Path(tmp)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
        except BaseException:
            self._tmp.unlink(missing_ok=True)
            raise

    def commit(self) -> None:
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        self._tmp.unlink(missing_ok=True)
