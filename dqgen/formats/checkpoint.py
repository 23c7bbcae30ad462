"""A quantized checkpoint as it is published: its safetensors files and what its config
says about how they are packed.

A checkpoint is a ``.safetensors`` file, a ``*.safetensors.index.json`` (its
``weight_map`` names the shards beside it) or a directory holding either
(``model.safetensors.index.json`` first, else a single ``*.safetensors``). The packing
is read from ``config.json``'s ``quantization_config`` (what transformers reads), else
``quantize_config.json`` (AutoGPTQ, GPTQModel), else ``quant_config.json`` (older
AutoAWQ), in the checkpoint's directory. Keys: ``quant_method`` (``gptq`` | ``awq``),
``bits`` (``w_bit``), ``group_size`` (``q_group_size``; -1 is one group), ``desc_act``,
``sym``, ``checkpoint_format`` (GPTQModel also writes ``format``; ``gptq`` is v1,
``gptq_v2``) and AWQ's ``version`` (only ``gemm`` is this layout).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InvalidProblemError, UnsupportedError
from ..ir import GPTQ_BITS, GPTQ_CHECKPOINT_FORMATS

INDEX_NAME = "model.safetensors.index.json"
CONFIG_FILES = ("config.json", "quantize_config.json", "quant_config.json")
# Files of the input directory the output does not copy: the weights (rewritten), and
# the quantization configs (the output is not quantized).
NOT_COPIED = {INDEX_NAME, "quantize_config.json", "quant_config.json"}


@dataclass(frozen=True)
class QuantConfig:
    """What a checkpoint's config says (None: not said)."""

    source: str | None = None          # the file it came from
    method: str | None = None          # "gptq" | "awq"
    bits: int | None = None
    group_size: int | None = None      # None: inferred from the shapes
    checkpoint_format: str | None = None
    desc_act: bool | None = None
    sym: bool | None = None
    extra: dict = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class Checkpoint:
    """The files of a checkpoint: its shards in order, its index (or None), the
    directory it lives in (named as IN or not), and its config (``config.json``, parsed,
    or None)."""

    files: tuple[Path, ...]
    index: Path | None
    directory: Path
    from_directory: bool
    quant: QuantConfig
    config: dict | None


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InvalidProblemError(f"{path}: cannot read: {exc.strerror}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidProblemError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise InvalidProblemError(f"{path}: expected a JSON object")
    return value


def _shards_of_index(index: Path) -> tuple[Path, ...]:
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(v, str) and "/" not in v and "\\" not in v and v not in ("", ".", "..")
            for v in weight_map.values()):
        raise InvalidProblemError(f"{index}: 'weight_map' must map tensor names to the shard "
                                  "file names beside it")
    names = list(dict.fromkeys(weight_map.values()))
    return tuple(index.parent / name for name in sorted(names))


def _int(value, key: str, where: str):
    if value is None:
        return None
    if type(value) is not int:
        raise InvalidProblemError(f"{where}: {key}={value!r} is not an integer")
    return value


def parse_quant_config(config: dict, where: str) -> QuantConfig:
    """A ``quantization_config`` / ``quantize_config.json`` object, its keys checked."""
    method = str(config.get("quant_method") or "gptq").lower()
    if method not in ("gptq", "awq"):
        raise UnsupportedError(f"{where}: quant_method={config.get('quant_method')!r} is not "
                               "one dqgen converts; it reads gptq and awq")
    bits = _int(config.get("bits", config.get("w_bit")), "bits", where)
    group = _int(config.get("group_size", config.get("q_group_size")), "group_size", where)
    fmt = config.get("checkpoint_format", config.get("format"))
    if method == "awq":
        fmt = config.get("version", fmt)
    fmt = None if fmt is None else str(fmt).lower()
    if config.get("is_marlin_format"):
        fmt = "marlin"
    if method == "gptq":
        if fmt is not None and fmt not in GPTQ_CHECKPOINT_FORMATS:
            raise UnsupportedError(f"{where}: GPTQ checkpoint_format={fmt!r} is not one dqgen "
                                   f"reads ({', '.join(GPTQ_CHECKPOINT_FORMATS)})")
        if bits is not None and bits not in GPTQ_BITS:
            raise UnsupportedError(f"{where}: GPTQ bits={bits} is not supported; expected one "
                                   f"of {', '.join(map(str, GPTQ_BITS))}")
    else:
        if fmt is not None and fmt != "gemm":
            raise UnsupportedError(f"{where}: AWQ version={fmt!r} is not the GEMM layout, the "
                                   "one dqgen reads")
        if bits not in (None, 4):
            raise UnsupportedError(f"{where}: AWQ bits={bits}; dqgen reads 4-bit AWQ")
        if config.get("zero_point") is False:
            raise UnsupportedError(f"{where}: AWQ without zero points (zero_point=false) is not "
                                   "supported")
        fmt = None
    if group is not None and group != -1 and group < 1:
        raise InvalidProblemError(f"{where}: group_size={group} must be positive or -1")
    flags = {k: config.get(k) for k in ("desc_act", "sym")}
    return QuantConfig(where, method, bits, None if group == -1 else group, fmt,
                       flags["desc_act"], flags["sym"], dict(config))


def read_quant_config(directory: Path) -> tuple[QuantConfig, dict | None]:
    """The quantization config in ``directory`` and its ``config.json`` (or None)."""
    config = None
    path = directory / "config.json"
    if path.is_file():
        config = _read_json(path)
        quant = config.get("quantization_config")
        if isinstance(quant, dict):
            return parse_quant_config(quant, f"{path} quantization_config"), config
    for name in CONFIG_FILES[1:]:
        path = directory / name
        if path.is_file():
            return parse_quant_config(_read_json(path), str(path)), config
    return QuantConfig(), config


def open_checkpoint(path) -> Checkpoint:
    """The checkpoint at ``path`` (a file, an index or a directory), config included."""
    path = Path(path)
    index = None
    from_directory = path.is_dir()
    if from_directory:
        directory = path
        if (path / INDEX_NAME).is_file():
            index = path / INDEX_NAME
            files = _shards_of_index(index)
        else:
            found = sorted(p for p in path.glob("*.safetensors") if p.is_file())
            if len(found) != 1:
                what = "no .safetensors file" if not found else (
                    f"{len(found)} .safetensors files ({', '.join(p.name for p in found[:4])}"
                    f"{', ...' if len(found) > 4 else ''}) and no {INDEX_NAME}")
                raise InvalidProblemError(f"{path}: {what}")
            files = tuple(found)
    elif path.name.endswith(".index.json"):
        directory, index = path.parent, path
        files = _shards_of_index(path)
    else:
        directory, files = path.parent, (path,)
    missing = [str(f) for f in files if not f.is_file()]
    if missing and (index is not None or path.exists()):
        raise InvalidProblemError(f"{index or path}: shard {missing[0]} is missing")
    quant, config = read_quant_config(directory)
    return Checkpoint(files, index, directory, from_directory, quant, config)
