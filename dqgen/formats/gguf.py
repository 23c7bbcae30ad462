"""GGUF files (llama.cpp): open one memory-mapped, list its tensors and metadata, and
dequantize one tensor at a time.

dqgen reads the container itself (``gguf_reader``): the header and the tensor table at
open, metadata values when asked for, so a file with a 262k-token vocabulary opens in
milliseconds, and without llama.cpp's ``gguf`` package (kernels of the IQ1/IQ2/IQ3
types still read their grids from it). What the tensor table says is
checked here before any tensor is touched: every tensor's type is known, its rows hold
whole blocks, and its bytes lie inside the file and before the next tensor's. So a
damaged or truncated file fails naming the file, the tensor and its type, never with a
numpy error or a wrong value. A quantized tensor's mapped block bytes go to
``dqgen.formats.ggml.dequantize`` as they are (no copy), F32/F16/BF16 tensors' bytes too
(cast, rounded once to nearest even).

GGUF lists a tensor's dimensions innermost first; shapes here are in PyTorch's order.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InvalidProblemError, UnsupportedError
from ..ir import GGML_FLOAT_DTYPES, DType, parse_dtype
from . import ggml
from .gguf_reader import GGML_TYPES, GgufFileError, GGUFReader

#: Float tensor types dequantize casts; numpy dtype of their values.
FLOAT_TYPES = {"F32": DType.F32.np_dtype, "F16": DType.F16.np_dtype,
               "BF16": DType.BF16.np_dtype}
#: Types stored as plain values that are read, not dequantized (``GGUFFile.array``).
VALUE_TYPES = {"F64": np.dtype(np.float64), "I8": np.dtype(np.int8),
               "I16": np.dtype(np.int16), "I32": np.dtype(np.int32),
               "I64": np.dtype(np.int64)}
#: GGML type name -> (values, bytes) of one block, for every type a GGUF file may hold.
BLOCK_SIZES = {name: (values, nbytes) for name, values, nbytes in GGML_TYPES.values()}


def supports(qtype: str) -> bool:
    """Whether ``GGUFFile.dequantize`` reads tensors of GGML type ``qtype`` ("Q4_K")."""
    return qtype in ggml.TYPES


def block_size(qtype: str) -> tuple[int, int]:
    """(values, bytes) of one block of GGML type ``qtype``."""
    try:
        return BLOCK_SIZES[qtype]
    except KeyError:
        raise UnsupportedError(f"qtype={qtype!r} is not a GGML type; expected one of: "
                               f"{', '.join(BLOCK_SIZES)}") from None


def supported_types() -> tuple[str, ...]:
    """Every GGML type name a GGUF file may hold that dequantize reads, in GGML's order."""
    return tuple(name for name, _, _ in GGML_TYPES.values() if supports(name))


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a GGUF file, as the file describes it."""

    name: str
    type: str                 # GGML type name: "Q4_K", "F32", ...
    shape: tuple[int, ...]    # PyTorch order (GGUF's dimensions reversed)
    nbytes: int               # bytes of data in the file
    offset: int               # where its data starts, from the start of the file

    @property
    def supported(self) -> bool:
        """Whether ``dequantize`` reads it (``array`` reads every tensor)."""
        return supports(self.type)

    def describe(self) -> str:
        return f"tensor {self.name!r} ({self.type}, shape {list(self.shape)})"


def _tensor_table(reader: GGUFReader) -> dict[str, TensorInfo]:
    """name -> TensorInfo in file order: each tensor's type known, rows of whole blocks,
    bytes inside the file and before the next tensor's; raises naming the first tensor
    that is not."""
    path, size = reader.path, reader.size
    infos, spans = {}, []
    for entry in reader.tensors:
        name, ne = entry.name, list(entry.dims)
        known = GGML_TYPES.get(entry.type_id)
        if known is None:
            raise UnsupportedError(f"{path}: tensor {name!r} has GGML type {entry.type_id}, "
                                   f"unknown to dqgen {_version()} (a newer llama.cpp type? "
                                   "try a newer dqgen)")
        qtype, values_per_block, block_bytes = known
        begin = reader.data_offset + entry.offset
        nbytes = math.prod(ne) // values_per_block * block_bytes
        info = TensorInfo(name, qtype, tuple(reversed(ne)), nbytes, begin)
        if not ne:
            raise GgufFileError(f"{path}: {info.describe()} has no dimensions")
        if ne[0] % values_per_block:
            raise GgufFileError(f"{path}: {info.describe()} has rows of {ne[0]} values, not a "
                                f"multiple of the {values_per_block}-value {qtype} block")
        if begin > size:
            raise GgufFileError(f"{path}: {info.describe()} starts at byte {begin}, past the "
                                f"end of the {size}-byte file (truncated?)")
        if begin + nbytes > size:
            raise GgufFileError(f"{path}: {info.describe()} needs bytes [{begin}, "
                                f"{begin + nbytes}) but the file ends at byte {size} "
                                "(truncated?)")
        infos[name] = info
        spans.append((begin, begin + nbytes, info))
    spans.sort(key=lambda s: (s[0], s[1]))
    for (b0, e0, a), (b1, _, b) in zip(spans, spans[1:]):
        if e0 > b1:
            raise GgufFileError(f"{path}: {a.describe()} needs {e0 - b0} bytes but "
                                f"{b.describe()} starts {b1 - b0} bytes after it: the bytes "
                                "do not match its type and shape")
    return infos


def _version() -> str:
    from ..version import __version__
    return __version__


class Metadata(Mapping):
    """Key -> value of a GGUF file's metadata (file order; the container's own ``GGUF.*``
    keys left out), each value read from the map when first asked for and kept: a
    262k-entry token list costs nothing until it is used. ``dict(f.metadata)`` reads all."""

    def __init__(self, reader: GGUFReader) -> None:
        self._reader = reader
        self._fields = {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}
        self._values: dict = {}

    def __getitem__(self, key):
        try:
            return self._values[key]
        except KeyError:
            field = self._fields[key]  # a missing key: KeyError, as a dict's
        value = self._values[key] = self._reader.value(field)
        return value

    def __contains__(self, key) -> bool:  # without reading the value, as Mapping's would
        return key in self._fields

    def __iter__(self):
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)

    def __repr__(self) -> str:
        return f"<GGUF metadata of {str(self._reader.path)!r}: {len(self)} keys>"


class GGUFFile:
    """A GGUF file, memory-mapped: ``tensors`` (name -> ``TensorInfo``, in file order),
    ``metadata`` (key -> plain Python value), and ``dequantize`` one tensor at a time."""

    def __init__(self, path) -> None:
        self.path = Path(path)
        reader = GGUFReader(self.path)
        self.tensors: dict[str, TensorInfo] = _tensor_table(reader)
        self._reader = reader
        self.version = reader.version
        self.alignment = reader.alignment

    def _live(self) -> GGUFReader:
        if self._reader is None:
            raise InvalidProblemError(f"{self.path} is closed")
        return self._reader

    @functools.cached_property
    def metadata(self) -> Metadata:
        """Key -> value of every metadata field, as str, int, float, bool or a list of
        them (an array of arrays as nested lists), each read when first asked for."""
        return Metadata(self._live())

    def __repr__(self) -> str:
        return f"GGUFFile({str(self.path)!r}, {len(self.tensors)} tensors)"

    def __len__(self) -> int:
        return len(self.tensors)

    def __iter__(self):
        return iter(self.tensors)

    def __contains__(self, name) -> bool:
        return name in self.tensors

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Drop this object's hold on the map (arrays from ``array`` keep theirs)."""
        self._reader = None

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            some = ", ".join(list(self.tensors)[:5])
            raise InvalidProblemError(f"{self.path}: no tensor {name!r} (it has "
                                      f"{len(self.tensors)}: {some}, ...)") from None

    def array(self, name: str) -> np.ndarray:
        """The tensor's data as stored, mapped read-only (no copy): values for float and
        integer types, uint8 block bytes ``[..., bytes_per_row]`` for block types."""
        info = self.info(name)
        data = self._live().data[info.offset:info.offset + info.nbytes]
        dtype = FLOAT_TYPES.get(info.type, VALUE_TYPES.get(info.type))
        if dtype is not None:
            return data.view(dtype).reshape(info.shape)
        values, nbytes = BLOCK_SIZES[info.type]
        return data.reshape(*info.shape[:-1], info.shape[-1] // values * nbytes)

    def dequantize(self, name: str, dtype="f16", out=None):
        """Tensor ``name`` as floats of ``dtype`` (f16 default, bf16 or f32) in PyTorch's
        dimension order: a new numpy array, or written into ``out`` (a numpy array or CPU
        torch tensor of that dtype and shape) and ``out`` returned."""
        info = self.info(name)
        out_dtype = parse_dtype(dtype, "dtype", GGML_FLOAT_DTYPES)
        if not info.supported:
            raise UnsupportedError(
                f"{self.path}: {info.describe()}: dqgen does not dequantize {info.type}"
                + (f" (it holds plain {info.type} values: read them with .array(name))"
                   if info.type in VALUE_TYPES else
                   f"; it reads {', '.join(supported_types())}"))
        data = self.array(name).view(np.uint8)  # float types' values as their bytes
        return ggml.dequantize(data, info.type, dtype=out_dtype.value, out=out)

    def quantized_weight(self, name: str):
        """Tensor ``name`` (2-D, a block type) as a ``QuantizedWeight`` over the mapped
        bytes (no copy), for ``dqgen.linear`` and ``QuantLinear``; None for a float or
        integer tensor (its values are read with ``array``)."""
        from .weight import QuantizedWeight
        info = self.info(name)
        if info.type in FLOAT_TYPES or info.type in VALUE_TYPES:
            return None
        if len(info.shape) != 2:
            raise UnsupportedError(f"{self.path}: {info.describe()} is not a matrix")
        if not info.supported:
            raise UnsupportedError(f"{self.path}: {info.describe()}: dqgen does not read "
                                   f"{info.type}")
        return QuantizedWeight.ggml(self.array(name), info.type, info.shape)

    def items(self, dtype="f16"):
        """(name, array) for every tensor dqgen dequantizes, in file order; each result is
        made only when asked for, so a loop that drops them holds one at a time."""
        for name, info in self.tensors.items():
            if info.supported:
                yield name, self.dequantize(name, dtype)


def open(path) -> GGUFFile:  # noqa: A001 - the module's verb, as in gguf.open(path)
    """Memory-map and check GGUF file ``path``; nothing is read until asked for."""
    return GGUFFile(path)
