"""The GGUF container (llama.cpp's model file, versions 2 and 3), read memory-mapped.

A GGUF file is a header (magic ``GGUF``, version, tensor count, metadata count), the
metadata (key, value type, value), the tensor table (name, dimensions, GGML type, offset
into the data) and, from the next multiple of ``general.alignment`` (32 by default), the
tensors' data. Opening reads the header and the tensor table and only walks over the
metadata: a metadata array's elements are parsed when its value is first asked for, so a
262k-entry token list costs one pass over its string lengths at open, not 262k objects.

Every count and length the file states is checked against the bytes left before it is
used, so a truncated or lying file fails with ``GgufFileError`` naming the file and what
is wrong, never with an IndexError, a MemoryError or a walk of a count the file cannot
hold. What the tensors' types, shapes and offsets mean is checked by ``gguf.py``.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

import numpy as np

from ..errors import InvalidProblemError, UnsupportedError

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
#: Arrays of arrays deeper than this are refused (llama.cpp reads none; gguf-py writes them).
MAX_ARRAY_DEPTH = 16
HEADER_BYTES = 24             # magic, version, tensor count, metadata count
MIN_KV_BYTES = 8 + 4 + 1      # key length, value type, a one-byte value
MIN_TENSOR_BYTES = 8 + 4 + 4 + 8  # name length, dimension count, type, offset

#: GGML tensor types: id -> (name, values per block, bytes per block), as ggml.h and
#: gguf-py's GGML_QUANT_SIZES have them (ids 4, 5, 31-33 and 36-38 are retired types).
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2),
    26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17), 40: ("NVFP4", 64, 36), 41: ("Q1_0", 128, 18),
    42: ("Q2_0", 64, 18),
}


class GgufFileError(InvalidProblemError):
    """A GGUF file is damaged: truncated, or a tensor's type, shape or bytes do not fit."""


class ValueType(IntEnum):
    """GGUF metadata value types (the file's numbering)."""

    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


#: Little-endian numpy dtype of each fixed-size value type.
SCALAR_DTYPES = {ValueType.UINT8: np.dtype("u1"), ValueType.INT8: np.dtype("i1"),
                 ValueType.UINT16: np.dtype("<u2"), ValueType.INT16: np.dtype("<i2"),
                 ValueType.UINT32: np.dtype("<u4"), ValueType.INT32: np.dtype("<i4"),
                 ValueType.FLOAT32: np.dtype("<f4"), ValueType.BOOL: np.dtype("?"),
                 ValueType.UINT64: np.dtype("<u8"), ValueType.INT64: np.dtype("<i8"),
                 ValueType.FLOAT64: np.dtype("<f8")}
_SCALAR_STRUCTS = {t: struct.Struct("<" + c) for t, c in zip(SCALAR_DTYPES, "BbHhIif?Qqd")}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_ARRAY_HEAD = struct.Struct("<IQ")  # element type, element count


@dataclass(frozen=True)
class Field:
    """One metadata entry: its value's type and where the value's bytes lie."""

    key: str
    type: int     # a ValueType
    start: int    # first byte of the value
    end: int      # one past its last byte


@dataclass(frozen=True)
class TensorEntry:
    """One row of the tensor table, as stored."""

    index: int
    name: str
    dims: tuple[int, ...]  # GGUF order: innermost first
    type_id: int           # a GGML type id (a key of GGML_TYPES when known)
    offset: int            # from the start of the tensor data


def _type_name(value_type: int) -> str:
    try:
        return ValueType(value_type).name.lower()
    except ValueError:
        return f"type {value_type}"


class _Walker:
    """A position in the map and the checks that keep every read inside it."""

    def __init__(self, buf, size: int, path: Path) -> None:
        self.buf, self.size, self.path, self.pos = buf, size, path, 0

    def fail(self, what: str) -> GgufFileError:
        return GgufFileError(f"{self.path}: not a valid GGUF file: {what}")

    def need(self, n: int, what: str) -> int:
        """Position of the next ``n`` bytes (and past them), or fail naming ``what``."""
        pos = self.pos
        if n > self.size - pos:
            raise self.fail(f"{what} needs {n} bytes at byte {pos} but the file ends at "
                            f"byte {self.size} (truncated?)")
        self.pos = pos + n
        return pos

    def u32(self, what: str) -> int:
        return _U32.unpack_from(self.buf, self.need(4, what))[0]

    def u64(self, what: str) -> int:
        return _U64.unpack_from(self.buf, self.need(8, what))[0]

    def text(self, what: str) -> str:
        """A length-prefixed UTF-8 string (keys and tensor names)."""
        n = self.u64(f"the length of {what}")
        start = self.need(n, f"{what} ({n} bytes)")
        try:
            return bytes(self.buf[start:start + n]).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self.fail(f"{what} is not UTF-8 ({exc.reason} at byte {start + exc.start})") \
                from None

    def value(self, key: str, value_type: int, depth: int = 0) -> None:
        """Step over a value of ``value_type`` without building it."""
        scalar = SCALAR_DTYPES.get(value_type)
        if scalar is not None:
            self.need(scalar.itemsize, f"metadata {key!r}")
        elif value_type == ValueType.STRING:
            self.need(self.u64(f"the length of metadata {key!r}"), f"metadata {key!r}")
        elif value_type == ValueType.ARRAY:
            self.array(key, depth)
        else:
            raise self.fail(f"metadata {key!r} has value type {value_type}, not one of "
                            f"GGUF's ({len(ValueType)} types, 0-{len(ValueType) - 1})")

    def array(self, key: str, depth: int) -> None:
        if depth >= MAX_ARRAY_DEPTH:
            raise self.fail(f"metadata {key!r} nests arrays more than {MAX_ARRAY_DEPTH} deep")
        element_type, count = _ARRAY_HEAD.unpack_from(
            self.buf, self.need(_ARRAY_HEAD.size, f"the array head of metadata {key!r}"))
        scalar = SCALAR_DTYPES.get(element_type)
        least = (scalar.itemsize if scalar is not None else
                 8 if element_type == ValueType.STRING else
                 _ARRAY_HEAD.size if element_type == ValueType.ARRAY else None)
        if least is None:
            raise self.fail(f"metadata {key!r} is an array of value type {element_type}, not "
                            f"one of GGUF's ({len(ValueType)} types, 0-{len(ValueType) - 1})")
        if count * least > self.size - self.pos:
            raise self.fail(f"metadata {key!r} claims {count} elements "
                            f"({_type_name(element_type)}) but the file has room for at most "
                            f"{(self.size - self.pos) // least}")
        if scalar is not None:
            self.pos += count * least
        elif element_type == ValueType.STRING:
            self.pos = _skip_strings(self, key, count)
        else:
            for _ in range(count):
                self.array(key, depth + 1)


def _skip_strings(walker: _Walker, key: str, count: int) -> int:
    """Position past ``count`` length-prefixed strings: one read of each length (the hot
    loop of opening a file with a large vocabulary; ~50 ns a string)."""
    buf, pos, size = walker.buf, walker.pos, walker.size
    limit = size - 8
    unpack = _U64.unpack_from
    for i in range(count):
        if pos > limit:  # string i's length is cut short, or string i - 1 ran past the end
            bad = i - 1 if pos > size else i
            break
        pos += 8 + unpack(buf, pos)[0]
    else:
        if pos <= size:
            return pos
        bad = count - 1
    raise walker.fail(f"metadata {key!r}: string {bad} of its {count} runs past the end of "
                      f"the file at byte {size} (truncated?)")


def _decode(buf, start: int, n: int) -> str:
    return bytes(buf[start:start + n]).decode("utf-8")


def _read_strings(buf, pos: int, count: int) -> tuple[list[str], int]:
    unpack = _U64.unpack_from
    out = []
    for _ in range(count):
        n = unpack(buf, pos)[0]
        out.append(_decode(buf, pos + 8, n))
        pos += 8 + n
    return out, pos


def _read_value(buf, value_type: int, pos: int):
    """(value, position past it) of a value the walk at open found whole."""
    scalar = _SCALAR_STRUCTS.get(value_type)
    if scalar is not None:
        return scalar.unpack_from(buf, pos)[0], pos + scalar.size
    if value_type == ValueType.STRING:
        n = _U64.unpack_from(buf, pos)[0]
        return _decode(buf, pos + 8, n), pos + 8 + n
    element_type, count = _ARRAY_HEAD.unpack_from(buf, pos)
    pos += _ARRAY_HEAD.size
    dtype = SCALAR_DTYPES.get(element_type)
    if dtype is not None:
        values = np.frombuffer(buf, dtype, count, pos).tolist()
        return values, pos + count * dtype.itemsize
    if element_type == ValueType.STRING:
        return _read_strings(buf, pos, count)
    out = []
    for _ in range(count):
        value, pos = _read_value(buf, element_type, pos)
        out.append(value)
    return out, pos


class GGUFReader:
    """A GGUF file mapped read-only: ``version``, ``alignment``, ``fields`` (key ->
    ``Field``, file order), ``tensors`` (``TensorEntry`` list), ``data_offset`` and
    ``data`` (the whole file as a read-only uint8 array)."""

    def __init__(self, path) -> None:
        self.path = Path(path)
        self._map = _map_file(self.path)
        self.data = np.frombuffer(self._map, np.uint8)
        self.size = len(self._map)
        walker = _Walker(self._map, self.size, self.path)
        self.version, tensor_count, kv_count = _read_header(walker)
        self.fields = _read_fields(walker, kv_count)
        self.alignment = _alignment(walker, self.fields)
        self.tensors = _read_tensor_table(walker, tensor_count)
        self.data_offset = -(-walker.pos // self.alignment) * self.alignment

    def value(self, field: Field):
        """The value of ``field`` as str, int, float, bool or a (nested) list of them;
        GgufFileError where a string in it is not UTF-8."""
        try:
            return _read_value(self._map, field.type, field.start)[0]
        except UnicodeDecodeError as exc:
            raise GgufFileError(f"{self.path}: metadata {field.key!r} cannot be read "
                                f"(UnicodeDecodeError: {exc})") from None


def _map_file(path: Path) -> mmap.mmap:
    try:
        with open(path, "rb") as fh:
            return mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    except ValueError:  # mmap refuses an empty file
        raise GgufFileError(f"{path}: not a valid GGUF file: the file is empty") from None
    except OSError as exc:
        raise InvalidProblemError(f"{path}: cannot read: {exc.strerror or exc}") from None


def _read_header(walker: _Walker) -> tuple[int, int, int]:
    """(version, tensor count, metadata count), each count checked against the file."""
    head = bytes(walker.buf[:4])
    if head != MAGIC:
        raise walker.fail(f"it starts with {head!r}, not {MAGIC!r}")
    walker.pos = 4
    version = walker.u32("the version")
    if version & 0xFFFF == 0 and version:
        raise UnsupportedError(f"{walker.path}: the file's byte order is not this machine's "
                               "(a big-endian GGUF file); dqgen reads little-endian files")
    if version not in VERSIONS:
        raise UnsupportedError(f"{walker.path}: GGUF version {version}; dqgen reads versions "
                               f"{' and '.join(map(str, VERSIONS))}")
    tensor_count = walker.u64("the tensor count")
    kv_count = walker.u64("the metadata count")
    room = (walker.size - walker.pos) // MIN_KV_BYTES
    if kv_count > room:
        raise walker.fail(f"the header claims {kv_count} metadata entries but the file has "
                          f"room for at most {room}")
    return version, tensor_count, kv_count


def _read_fields(walker: _Walker, count: int) -> dict[str, Field]:
    fields: dict[str, Field] = {}
    for i in range(count):
        key = walker.text(f"metadata key {i} of {count}")
        value_type = walker.u32(f"the value type of metadata {key!r}")
        start = walker.pos
        walker.value(key, value_type)
        if key in fields:
            raise walker.fail(f"metadata key {key!r} appears twice")
        fields[key] = Field(key, value_type, start, walker.pos)
    return fields


def _alignment(walker: _Walker, fields: dict[str, Field]) -> int:
    """general.alignment (a uint32 power of two) or the default 32."""
    field = fields.get("general.alignment")
    if field is None:
        return DEFAULT_ALIGNMENT
    if field.type != ValueType.UINT32:
        raise walker.fail(f"general.alignment is a {_type_name(field.type)}, not a uint32")
    alignment = _U32.unpack_from(walker.buf, field.start)[0]
    if alignment == 0 or alignment & (alignment - 1):
        raise walker.fail(f"general.alignment is {alignment}, not a power of two")
    return alignment


def _read_tensor_table(walker: _Walker, count: int) -> list[TensorEntry]:
    room = (walker.size - walker.pos) // MIN_TENSOR_BYTES
    if count > room:
        raise walker.fail(f"the header claims {count} tensors but the file has room for at "
                          f"most {room} after its metadata")
    entries, names = [], set()
    for i in range(count):
        where = f"tensor {i} of {count}"
        name = walker.text(f"the name of {where}")
        if name in names:
            raise walker.fail(f"tensor name {name!r} appears twice")
        names.add(name)
        n_dims = walker.u32(f"the dimension count of tensor {name!r}")
        at = walker.need(8 * n_dims, f"the {n_dims} dimensions of tensor {name!r}")
        dims = struct.unpack_from(f"<{n_dims}Q", walker.buf, at)
        type_id = walker.u32(f"the type of tensor {name!r}")
        offset = walker.u64(f"the data offset of tensor {name!r}")
        entries.append(TensorEntry(i, name, dims, type_id, offset))
    return entries
