"""Streaming safetensors reading and writing, one tensor at a time.

The format: an 8-byte little-endian header length, a JSON header mapping each tensor
name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets into the data
that follows; ``"__metadata__"`` holds strings), then the data. The reader checks every
field before anything is read (a damaged file gives a clear error, never a crash or a
huge allocation) and maps the data, so a tensor is read only when used. The writer
takes the full list of entries first (the header precedes the data) and then the
tensors one by one, into a temporary file renamed into place at the end (``finish`` then
``commit``, so several files can all be complete before any is moved into place).

A temporary file is ``.NAME.<random>.dqgen.partial`` beside its destination, locked
(``flock``) for as long as its writer lives: a later run removes the partial files that
a killed run left (``remove_stale_partials``) and never one another process is writing.
A failure to write names the destination, never the temporary file.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import struct
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from ..errors import DqgenError, InvalidProblemError

try:
    import fcntl
except ImportError:  # no flock: partial files are never removed by a later run
    fcntl = None

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


class OutputError(DqgenError, OSError):
    """An output file cannot be written (permissions, a full disk): names the file the
    user asked for, not the temporary one dqgen writes first (``errno`` is the cause's)."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


@contextlib.contextmanager
def writing(path):
    """Turn an ``OSError`` while writing ``path`` into an ``OutputError`` naming ``path``."""
    try:
        yield
    except OutputError:
        raise
    except OSError as exc:
        why = exc.strerror or str(exc)
        raise OutputError(exc.errno, f"cannot write {path}: {why}") from None


PARTIAL_SUFFIX = ".dqgen.partial"
_NEW_SUFFIX = ".dqgen.new"   # before its lock is taken: only for an instant
_STALE_NEW_SECONDS = 3600


class Partial:
    """A new, locked temporary file beside ``path``: ``file`` to write, then ``commit``
    (moved to ``path``) or ``abort`` (deleted). The lock, held on a descriptor of its own
    until then, tells a later run the file is alive; a killed process loses it."""

    def __init__(self, path) -> None:
        self.path = Path(path)
        with writing(self.path):
            fd, new = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=_NEW_SUFFIX,
                                       dir=self.path.parent)
            try:
                if fcntl is not None:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                os.fchmod(fd, new_file_mode())
                self.tmp = Path(new[:-len(_NEW_SUFFIX)] + PARTIAL_SUFFIX)
                os.replace(new, self.tmp)  # visible to cleaners only once locked
            except BaseException:
                os.close(fd)
                Path(new).unlink(missing_ok=True)
                raise
        self._lock = os.dup(fd)
        self.file = os.fdopen(fd, "wb")

    def write(self, data) -> None:
        with writing(self.path):
            self.file.write(data)

    def close(self) -> None:
        """All bytes written: the file closed, still locked and not yet in place."""
        with writing(self.path):
            self.file.close()

    def commit(self) -> None:
        with writing(self.path):
            self.file.close()
            os.replace(self.tmp, self.path)
        self._release()

    def abort(self) -> None:
        try:
            self.file.close()
        except OSError:
            pass  # the write that failed is what is being reported
        self.tmp.unlink(missing_ok=True)
        self._release()

    def _release(self) -> None:
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None


def remove_stale_partials(directory) -> list[Path]:
    """Delete the partial files in ``directory`` that no live process holds (a killed
    run's); returns them. Another run's live partial keeps its lock and is left alone."""
    removed = []
    if fcntl is None:
        return removed
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        path = Path(directory) / name
        if name.startswith(".") and name.endswith(PARTIAL_SUFFIX):
            if _remove_if_unlocked(path):
                removed.append(path)
        elif name.startswith(".") and name.endswith(_NEW_SUFFIX):
            with contextlib.suppress(OSError):
                if time.time() - path.lstat().st_mtime > _STALE_NEW_SECONDS:
                    path.unlink()
                    removed.append(path)
    return removed


def _remove_if_unlocked(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.fstat(fd).st_ino != path.lstat().st_ino:
            return False  # renamed into place meanwhile, and the name reused
        path.unlink()
        return True
    except OSError:
        return False  # locked: its writer is alive
    finally:
        os.close(fd)


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
        with writing(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._partial = Partial(self.path)
        try:
            self._partial.write(struct.pack("<Q", len(text)) + text)
        except BaseException:
            self._partial.abort()
            raise
        self._next = 0

    def put(self, name: str, data: np.ndarray) -> None:
        """Append the next tensor's bytes (``name`` must come in the declared order)."""
        want, nbytes = self._order[self._next]
        blob = memoryview(np.ascontiguousarray(data).reshape(-1).view(np.uint8))
        if name != want or blob.nbytes != nbytes:
            raise InvalidProblemError(f"writer expected {want} ({nbytes} bytes), got {name} "
                                      f"({blob.nbytes} bytes)")
        self._partial.write(blob)
        self._next += 1

    def finish(self) -> None:
        """Every tensor written: the temporary file flushed and closed, not yet in place."""
        if self._next != len(self._order):
            raise InvalidProblemError(f"{len(self._order) - self._next} tensors were not written")
        self._partial.close()

    def commit(self) -> None:
        """Move the finished file into place (after ``finish``)."""
        self._partial.commit()

    def close(self) -> None:
        """``finish`` and ``commit``."""
        self.finish()
        self.commit()

    def abort(self) -> None:
        self._partial.abort()


class PendingFile:
    """A small file (JSON, a copied config) written to a temporary name beside ``path``
    and moved into place by ``commit``, as ``Writer`` does for tensors."""

    def __init__(self, path, data: bytes) -> None:
        self.path = Path(path)
        with writing(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._partial = Partial(self.path)
        try:
            self._partial.write(data)
            self._partial.close()
        except BaseException:
            self._partial.abort()
            raise

    def commit(self) -> None:
        self._partial.commit()

    def abort(self) -> None:
        self._partial.abort()
