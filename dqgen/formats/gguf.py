"""GGUF files (llama.cpp): open one memory-mapped, list its tensors and metadata, and
dequantize one tensor at a time.

llama.cpp's own ``gguf`` package parses the file (the optional dependency
``dqgen[gguf]``). What that parser takes on trust is checked here before any tensor is
touched: every tensor's type is known, its rows hold whole blocks, and its bytes lie
inside the file and before the next tensor's. So a damaged or truncated file fails naming
the file, the tensor and its type, never with a numpy error or a wrong value. A quantized
tensor's mapped block bytes go to ``dqgen.formats.ggml.dequantize`` as they are (no
copy), F32/F16/BF16 tensors' bytes too (cast, rounded once to nearest even).

GGUF lists a tensor's dimensions innermost first; shapes here are in PyTorch's order.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InvalidProblemError, UnsupportedError
from ..ir import GGML_FLOAT_DTYPES, DType, parse_dtype
from . import ggml

#: Float tensor types dequantize casts; numpy dtype of their values.
FLOAT_TYPES = {"F32": DType.F32.np_dtype, "F16": DType.F16.np_dtype,
               "BF16": DType.BF16.np_dtype}
#: Types stored as plain values that are read, not dequantized (``GGUFFile.array``).
VALUE_TYPES = {"F64": np.dtype(np.float64), "I8": np.dtype(np.int8),
               "I16": np.dtype(np.int16), "I32": np.dtype(np.int32),
               "I64": np.dtype(np.int64)}
INSTALL_HINT = "pip install 'dqgen[gguf]'"


class GgufFileError(InvalidProblemError):
    """A GGUF file is damaged: truncated, or a tensor's type, shape or bytes do not fit."""


def _gguf():
    """The ``gguf`` package, imported on first use (it is an optional dependency)."""
    try:
        import gguf
    except ImportError:
        raise UnsupportedError("reading GGUF files needs llama.cpp's gguf package: "
                               f"{INSTALL_HINT}") from None
    return gguf


def supports(qtype: str) -> bool:
    """Whether ``GGUFFile.dequantize`` reads tensors of GGML type ``qtype`` ("Q4_K")."""
    return qtype in ggml.TYPES


def block_size(qtype: str) -> tuple[int, int]:
    """(values, bytes) of one block of GGML type ``qtype``, from the gguf package's table."""
    gguf = _gguf()
    return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]


def supported_types() -> tuple[str, ...]:
    """Every GGML type name of the installed gguf package that dequantize reads."""
    return tuple(t.name for t in _gguf().GGMLQuantizationType if supports(t.name))


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


@functools.cache
def _reader_class():
    """``gguf.GGUFReader`` with the tensor table checked before it maps each tensor."""
    gguf = _gguf()

    class CheckedReader(gguf.GGUFReader):
        # The parser slices its map once or twice per metadata element (a 128k-token
        # vocabulary is ~10^6 slices); a plain ndarray view of the np.memmap slices
        # several times faster than the memmap subclass (4.6 s instead of 16.5 s to open
        # a llama-3-sized tokenizer under load). The view keeps the map alive.
        data = property(lambda self: self._map,
                        lambda self, value: setattr(self, "_map", value.view(np.ndarray)))

        def __init__(self, path: Path) -> None:
            self.checked_path = path
            super().__init__(path, "r")

        def _build_tensors(self, start_offs: int, fields) -> None:
            _check_tensor_table(self, start_offs, fields)
            super()._build_tensors(start_offs, fields)

    return CheckedReader


def _check_tensor_table(reader, start: int, fields) -> None:
    """Each tensor's type known, rows of whole blocks, bytes inside the file and before the
    next tensor's; raises naming the first tensor that is not."""
    gguf = _gguf()
    path, size = reader.checked_path, len(reader.data)
    spans = []
    for i, field in enumerate(fields):
        name_len, name_data, n_dims, dims, raw_type, rel = field.parts
        if (len(name_data) != int(name_len[0]) or len(dims) != int(n_dims[0])
                or len(raw_type) != 1 or len(rel) != 1):
            raise GgufFileError(f"{path}: not a valid GGUF file: the tensor table is cut short "
                                f"at tensor {i} of {len(fields)} (truncated file?)")
        name = bytes(name_data).decode("utf-8", "replace")
        try:
            qtype = gguf.GGMLQuantizationType(int(raw_type[0]))
        except ValueError:
            raise UnsupportedError(f"{path}: tensor {name!r} has GGML type {int(raw_type[0])}, "
                                   f"unknown to gguf {_version()} (a newer llama.cpp type? "
                                   "try a newer gguf package)") from None
        values_per_block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
        ne = [int(d) for d in dims]
        info = TensorInfo(name, qtype.name, tuple(reversed(ne)), 0, start + int(rel[0]))
        if not ne:
            raise GgufFileError(f"{path}: {info.describe()} has no dimensions")
        if ne[0] % values_per_block:
            raise GgufFileError(f"{path}: {info.describe()} has rows of {ne[0]} values, not a "
                                f"multiple of the {values_per_block}-value {qtype.name} block")
        nbytes = math.prod(ne) // values_per_block * block_bytes
        begin = info.offset
        if begin > size:
            raise GgufFileError(f"{path}: {info.describe()} starts at byte {begin}, past the "
                                f"end of the {size}-byte file (truncated?)")
        if begin + nbytes > size:
            raise GgufFileError(f"{path}: {info.describe()} needs bytes [{begin}, "
                                f"{begin + nbytes}) but the file ends at byte {size} "
                                "(truncated?)")
        spans.append((begin, begin + nbytes, info))
    spans.sort(key=lambda s: (s[0], s[1]))
    for (b0, e0, a), (b1, _, b) in zip(spans, spans[1:]):
        if e0 > b1:
            raise GgufFileError(f"{path}: {a.describe()} needs {e0 - b0} bytes but "
                                f"{b.describe()} starts {b1 - b0} bytes after it: the bytes "
                                "do not match its type and shape")


def _version() -> str:
    from importlib import metadata
    try:
        return metadata.version("gguf")
    except metadata.PackageNotFoundError:
        return "(unknown version)"


class GGUFFile:
    """A GGUF file, memory-mapped: ``tensors`` (name -> ``TensorInfo``, in file order),
    ``metadata`` (key -> plain Python value), and ``dequantize`` one tensor at a time."""

    def __init__(self, path) -> None:
        self.path = Path(path)
        try:
            reader = _reader_class()(self.path)
        except (InvalidProblemError, UnsupportedError):  # ours, already naming the tensor
            raise
        except OSError as exc:
            raise InvalidProblemError(f"{self.path}: cannot read: {exc.strerror or exc}") from None
        except (ValueError, IndexError, KeyError, OverflowError, TypeError) as exc:
            raise GgufFileError(f"{self.path}: not a valid GGUF file "
                                f"({type(exc).__name__}: {exc})") from None
        if reader.byte_order != "I":
            raise UnsupportedError(f"{self.path}: the file's byte order is not this machine's "
                                   "(a big-endian GGUF file); dqgen reads little-endian files")
        self._reader = reader
        self.version = int(reader.fields["GGUF.version"].parts[0][0])
        self.alignment = int(reader.alignment)
        self._tensors = {t.name: t for t in reader.tensors}
        self.tensors: dict[str, TensorInfo] = {
            t.name: TensorInfo(t.name, t.tensor_type.name,
                               tuple(int(d) for d in reversed(t.shape.tolist())),
                               int(t.n_bytes), int(t.data_offset))
            for t in reader.tensors}

    def _live(self):
        if self._reader is None:
            raise InvalidProblemError(f"{self.path} is closed")
        return self._reader

    @functools.cached_property
    def metadata(self) -> dict:
        """Key -> value of every metadata field (the parser's own ``GGUF.*`` counts left
        out), as str, int, float, bool or a list of them."""
        out = {}
        for key, field in self._live().fields.items():
            if key.startswith("GGUF."):
                continue
            try:
                out[key] = field.contents()
            except (UnicodeDecodeError, ValueError, IndexError) as exc:
                raise GgufFileError(f"{self.path}: metadata {key!r} cannot be read "
                                    f"({type(exc).__name__}: {exc})") from None
        return out

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
        self._tensors = {}

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
        self._live()
        data = self._tensors[name].data
        if info.type == "BF16":  # the parser maps BF16 as bytes
            return data.view(FLOAT_TYPES["BF16"]).reshape(info.shape)
        return data

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

    def items(self, dtype="f16"):
        """(name, array) for every tensor dqgen dequantizes, in file order; each result is
        made only when asked for, so a loop that drops them holds one at a time."""
        for name, info in self.tensors.items():
            if info.supported:
                yield name, self.dequantize(name, dtype)


def open(path) -> GGUFFile:  # noqa: A001 - the module's verb, as in gguf.open(path)
    """Memory-map and check GGUF file ``path``; nothing is read until asked for."""
    return GGUFFile(path)
