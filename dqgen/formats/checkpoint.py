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

A GPTQ v1 file's zero points decode as its producer's loader reads them
(``v1_zeros_rule``): GPTQModel lists itself in ``meta.quantizer``; AutoGPTQ writes no
``meta`` but always a ``model_file_base_name`` key (and ``auto_gptq_version`` in the
safetensors metadata), and loads ``qlinear_cuda_old`` (``autogptq``) unless the layers
have act-order, when it loads ``qlinear_cuda`` (``exllama``: an all-ones field reads
2^bits).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InvalidProblemError, UnsupportedError
from ..ir import GPTQ_BITS, GPTQ_CHECKPOINT_FORMATS, GPTQ_V1_ZEROS

INDEX_NAME = "model.safetensors.index.json"
CONFIG_FILES = ("config.json", "quantize_config.json", "quant_config.json")
MODELOPT_CONFIG = "hf_quant_config.json"   # NVIDIA ModelOpt's export
# Files of the input directory the output does not copy: the weights (rewritten), and
# the quantization configs (the output is not quantized).
NOT_COPIED = {INDEX_NAME, "quantize_config.json", "quant_config.json", MODELOPT_CONFIG}


@dataclass(frozen=True)
class QuantConfig:
    """What a checkpoint's config says (None: not said)."""

    source: str | None = None          # the file it came from
    method: str | None = None          # gptq, awq, mlx, fp8, compressed-tensors,
    #                                    bitsandbytes, mxfp4, modelopt
    bits: int | None = None
    group_size: int | None = None      # None: inferred from the shapes
    checkpoint_format: str | None = None
    desc_act: bool | None = None
    sym: bool | None = None
    producer: str | None = None        # "gptqmodel" | "autogptq" (None: not said)
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


# GPTQ layouts' names, as GPTQModel writes them in checkpoint_format/format.
_GPTQ_LAYOUTS = GPTQ_CHECKPOINT_FORMATS + ("gptq_p", "marlin")
# The key AutoGPTQ's BaseQuantizeConfig.to_dict always writes (set or null), which
# GPTQModel's config does not; and the safetensors metadata key of its save_quantized.
AUTOGPTQ_CONFIG_KEY = "model_file_base_name"
AUTOGPTQ_METADATA_KEY = "auto_gptq_version"


def _layout_key(config: dict, method: str) -> str | None:
    """The key that names the checkpoint's layout: AWQ's ``version`` first, else
    ``checkpoint_format``, else ``format`` (GPTQModel writes both for either method)."""
    keys = (("version",) if method == "awq" else ()) + ("checkpoint_format", "format")
    return next((k for k in keys if config.get(k) is not None), None)


def producer_of(config: dict) -> str | None:
    """``"gptqmodel"`` when ``meta.quantizer`` lists ``gptqmodel:<version>`` (GPTQModel's
    writer), ``"autogptq"`` for AutoGPTQ's config (``model_file_base_name``, no
    ``meta.quantizer``), else None: the config does not say."""
    meta = config.get("meta")
    quantizers = meta.get("quantizer") if isinstance(meta, dict) else None
    if isinstance(quantizers, str):
        quantizers = [quantizers]
    if isinstance(quantizers, list) and quantizers:
        names = {str(q).split(":")[0].strip().lower() for q in quantizers}
        return "gptqmodel" if "gptqmodel" in names else None
    if AUTOGPTQ_CONFIG_KEY in config:
        return "autogptq"
    return None


def parse_fp8_config(config: dict, where: str) -> QuantConfig:
    """``quant_method: "fp8"`` (DeepSeek-V3, Qwen3-FP8): ``fmt`` (e4m3) and
    ``weight_block_size`` ([rows, cols]; absent: a scale a tensor or a row, from its
    shape), kept in ``extra["block"]`` and ``extra["fp8"]``."""
    fmt = str(config.get("fmt", "e4m3")).lower()
    if fmt not in ("e4m3", "e5m2"):
        raise UnsupportedError(f"{where}: fmt={config.get('fmt')!r} is not an FP8 encoding "
                               "dqgen reads (e4m3, e5m2)")
    block = config.get("weight_block_size")
    if block is not None:
        if (not isinstance(block, list) or len(block) != 2
                or not all(isinstance(b, int) and b > 0 for b in block)):
            raise InvalidProblemError(f"{where}: weight_block_size={block!r} is not [rows, "
                                      "columns] of positive integers")
        block = tuple(block)
    return QuantConfig(where, "fp8", extra={"block": block, "fp8": fmt})


AUTO_ROUND_METHODS = ("auto-round", "intel/auto-round", "auto_round")
# AutoRound's packing_format -> the layout it wrote: (quant_method, checkpoint_format).
AUTO_ROUND_FORMATS = {
    "auto_round:auto_gptq": ("gptq", "gptq"), "auto_round:gptq": ("gptq", "gptq"),
    "auto_round": ("gptq", "gptq_v2"), "auto_round:gptqmodel": ("gptq", "gptq_v2"),
    "auto_round:auto_awq": ("awq", None), "auto_awq": ("awq", None),
}


def _auto_round(config: dict, where: str) -> dict:
    """An AutoRound config as the GPTQ or AWQ config its ``packing_format`` names."""
    packing = str(config.get("packing_format") or config.get("backend") or "auto_round").lower()
    if packing not in AUTO_ROUND_FORMATS:
        known = ", ".join(AUTO_ROUND_FORMATS)
        raise UnsupportedError(f"{where}: AutoRound packing_format={packing!r} is not a layout "
                               f"dqgen reads ({known})")
    method, fmt = AUTO_ROUND_FORMATS[packing]
    out = {k: v for k, v in config.items() if k not in ("packing_format", "backend")}
    out["quant_method"] = method
    if fmt is not None:
        out["checkpoint_format"] = fmt
    return out


CT_FORMATS = ("pack-quantized", "int-quantized", "naive-quantized", "float-quantized",
              "mixed-precision", "nvfp4-pack-quantized", "mxfp4-pack-quantized")


def parse_compressed_tensors(config: dict, where: str) -> QuantConfig:
    """``quant_method: "compressed-tensors"``: the top-level ``format`` and each config
    group's ``format`` must be ones dqgen reads; the groups' weight args (``num_bits``,
    ``block_structure``) are kept in ``extra["groups"]``."""
    groups = config.get("config_groups") or {}
    if not isinstance(groups, dict):
        raise InvalidProblemError(f"{where}: config_groups is not an object")
    formats = {str(config.get("format") or "pack-quantized")}
    kept = []
    for name, group in groups.items():
        if not isinstance(group, dict):
            raise InvalidProblemError(f"{where}: config_groups.{name} is not an object")
        formats.add(str(group.get("format") or config.get("format") or "pack-quantized"))
        kept.append(group.get("weights") or {})
    unknown = sorted(f for f in formats if f not in CT_FORMATS)
    if unknown:
        known = ", ".join(f for f in CT_FORMATS if f != "mixed-precision")
        raise UnsupportedError(f"{where}: compressed-tensors format {unknown[0]!r} is not one "
                               f"dqgen reads ({known})")
    return QuantConfig(where, "compressed-tensors", extra={"groups": kept,
                                                          "formats": sorted(formats)})


BNB_QUANT_TYPES = ("nf4", "fp4")


def _flag(config: dict, key: str, where: str) -> bool:
    value = config.get(key, False)
    if not isinstance(value, bool):
        raise InvalidProblemError(f"{where}: {key}={value!r} is not true or false")
    return value


def parse_bitsandbytes(config: dict, where: str) -> QuantConfig:
    """``quant_method: "bitsandbytes"`` (transformers' BitsAndBytesConfig): exactly one
    of ``load_in_4bit`` (``bnb_4bit_quant_type`` nf4 or fp4, kept in
    ``extra["quant_type"]`` when said) and ``load_in_8bit`` (LLM.int8) -> bits 4 or 8."""
    four, eight = _flag(config, "load_in_4bit", where), _flag(config, "load_in_8bit", where)
    if four and eight:
        raise InvalidProblemError(f"{where}: load_in_4bit and load_in_8bit are both true: the "
                                  "config contradicts itself")
    if not (four or eight):
        raise InvalidProblemError(f"{where}: quant_method='bitsandbytes' but neither "
                                  "load_in_4bit nor load_in_8bit is true")
    quant_type = config.get("bnb_4bit_quant_type")
    if four and quant_type is not None and str(quant_type).lower() not in BNB_QUANT_TYPES:
        raise UnsupportedError(f"{where}: bnb_4bit_quant_type={quant_type!r} is not one "
                               f"bitsandbytes writes ({', '.join(BNB_QUANT_TYPES)})")
    extra = {"quant_type": str(quant_type).lower() if four and quant_type is not None else None}
    return QuantConfig(where, "bitsandbytes", 4 if four else 8, extra=extra)


MODELOPT_ALGOS = ("NVFP4",)


def parse_modelopt(config: dict, where: str, key: str = "quant_algo") -> QuantConfig:
    """NVIDIA ModelOpt's export: ``hf_quant_config.json``'s ``quantization`` object or
    config.json's ``quantization_config`` with ``quant_method: "modelopt"``; its
    ``quant_algo`` must be NVFP4 (blocks of ``group_size`` 16)."""
    algo = config.get("quant_algo")
    if algo is None:
        raise InvalidProblemError(f"{where}: no {key}; ModelOpt's export names its algorithm "
                                  "there (NVFP4)")
    if str(algo).upper() not in MODELOPT_ALGOS:
        raise UnsupportedError(f"{where}: {key}={algo!r} is not a ModelOpt algorithm dqgen "
                               f"converts ({', '.join(MODELOPT_ALGOS)})")
    group = _int(config.get("group_size", 16), "group_size", where)
    if group != 16:
        raise UnsupportedError(f"{where}: NVFP4 group_size={group}; NVFP4 blocks are 16 values")
    return QuantConfig(where, "modelopt", 4, 16, extra={"algo": str(algo).upper()})


def parse_modelopt_file(path: Path) -> QuantConfig:
    """``hf_quant_config.json``: ``{"producer": ..., "quantization": {"quant_algo": ...}}``."""
    value = _read_json(path)
    quant = value.get("quantization")
    if not isinstance(quant, dict):
        raise InvalidProblemError(f"{path}: no 'quantization' object (ModelOpt writes its "
                                  "quant_algo there)")
    return parse_modelopt(quant, str(path), "quantization.quant_algo")


def parse_quant_config(config: dict, where: str) -> QuantConfig:
    """A ``quantization_config`` / ``quantize_config.json`` object, its keys checked (no
    quant_method: bitsandbytes' when load_in_4bit/load_in_8bit are there, else GPTQ)."""
    bnb_keys = any(k in config for k in ("load_in_4bit", "load_in_8bit"))
    method = str(config.get("quant_method") or ("bitsandbytes" if bnb_keys else "gptq")).lower()
    if method == "compressed-tensors":
        return parse_compressed_tensors(config, where)
    if method == "bitsandbytes":
        return parse_bitsandbytes(config, where)
    if method == "mxfp4":
        return QuantConfig(where, "mxfp4", 4, 32)
    if method == "modelopt":
        return parse_modelopt(config, where)
    if method in AUTO_ROUND_METHODS:
        config = _auto_round(config, where)
        method = config["quant_method"]
    if method == "fp8":
        return parse_fp8_config(config, where)
    if method not in ("gptq", "awq"):
        raise UnsupportedError(f"{where}: quant_method={config.get('quant_method')!r} is not "
                               "one dqgen converts; it reads gptq, awq, auto-round, "
                               "compressed-tensors, fp8, bitsandbytes, mxfp4, modelopt and "
                               "mlx_lm's")
    bits = _int(config.get("bits", config.get("w_bit")), "bits", where)
    group = _int(config.get("group_size", config.get("q_group_size")), "group_size", where)
    key = _layout_key(config, method)
    fmt = None if key is None else str(config[key]).lower()
    if config.get("is_marlin_format"):
        key, fmt = "is_marlin_format", "marlin"
    if method == "gptq":
        if key == "is_marlin_format":
            raise UnsupportedError(f"{where}: GPTQ is_marlin_format=true: Marlin's repacked "
                                   "layout is not one dqgen reads")
        if fmt is not None and fmt not in GPTQ_CHECKPOINT_FORMATS:
            raise UnsupportedError(f"{where}: GPTQ {key}={fmt!r} is not one dqgen "
                                   f"reads ({', '.join(GPTQ_CHECKPOINT_FORMATS)})")
        if bits is not None and bits not in GPTQ_BITS:
            raise UnsupportedError(f"{where}: GPTQ bits={bits} is not supported; expected one "
                                   f"of {', '.join(map(str, GPTQ_BITS))}")
    else:
        if fmt in _GPTQ_LAYOUTS:
            raise InvalidProblemError(
                f"{where}: quant_method='awq', but {key}={config[key]!r} names a GPTQ "
                "layout: the config contradicts itself. Fix quant_method (\"gptq\") or "
                f"{key} (AWQ's GEMM layout is version=\"gemm\") there")
        if fmt is not None and fmt != "gemm":
            raise UnsupportedError(f"{where}: AWQ {key}={fmt!r} is not the GEMM layout, the "
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
    producer = producer_of(config) if method == "gptq" else None
    return QuantConfig(where, method, bits, None if group == -1 else group, fmt,
                       flags["desc_act"], flags["sym"], producer, dict(config))


def v1_zeros_rule(quant: QuantConfig, metadata: dict | None = None) -> tuple[str, str]:
    """How a GPTQ v1 checkpoint's zero points decode when ``--v1-zeros`` is not given:
    the rule of its producer's own loader, and why (for a note to the user).

    GPTQModel (``meta.quantizer``) reads v1 word-wise (``gptqmodel``), as transformers
    and optimum do through it. AutoGPTQ (its config, or ``auto_gptq_version`` in the
    file's ``metadata``) picks its kernel by the config's ``desc_act`` and group size:
    ``qlinear_cuda_old`` (``autogptq``) without act-order or with one group, else
    ``qlinear_cuda`` (``exllama``). Otherwise the default, ``gptqmodel``.
    """
    producer = quant.producer
    if producer is None and AUTOGPTQ_METADATA_KEY in (metadata or {}) and \
            quant.method in (None, "gptq"):
        producer, said = "autogptq", f"the safetensors metadata's {AUTOGPTQ_METADATA_KEY}"
    else:
        said = quant.source
    if producer == "autogptq":
        one_group = quant.extra.get("group_size") == -1
        if quant.desc_act and not one_group:
            return "exllama", (f"{said}: written by AutoGPTQ with desc_act, which loads "
                               "qlinear_cuda (each field + 1)")
        return "autogptq", (f"{said}: written by AutoGPTQ, which loads qlinear_cuda_old "
                            "(each field + 1, modulo 2^bits)")
    if producer == "gptqmodel":
        return "gptqmodel", f"{said}: meta.quantizer names GPTQModel (word-wise)"
    return GPTQ_V1_ZEROS[0], "the default (GPTQModel's and transformers' reading)"


MLX_BITS = (2, 3, 4, 5, 6, 8)


def parse_mlx_quantization(quant: dict, where: str) -> QuantConfig:
    """mlx_lm's ``quantization`` object: the default ``group_size`` and ``bits``, and an
    entry per layer that differs (its module path -> ``{group_size, bits}``, or false for
    a layer left in floats), kept in ``extra["layers"]`` as path -> (bits, group_size)."""
    mode = quant.get("mode", "affine")
    if mode != "affine":
        raise UnsupportedError(f"{where}: MLX mode={mode!r} is not one dqgen reads (affine)")
    bits = _int(quant.get("bits"), "bits", where)
    group = _int(quant.get("group_size"), "group_size", where)
    if bits is None or group is None:
        raise InvalidProblemError(f"{where}: MLX quantization needs group_size and bits")
    layers = {}
    for key, value in quant.items():
        if key in ("group_size", "bits", "mode", "quant_method") or value is False:
            continue
        if not isinstance(value, dict):
            raise InvalidProblemError(f"{where}: {key}={value!r}: a layer's entry is "
                                      "{group_size, bits} or false")
        layers[key] = (_int(value.get("bits", bits), f"{key}.bits", where),
                       _int(value.get("group_size", group), f"{key}.group_size", where))
    for key, (b, _) in [("bits", (bits, group)), *layers.items()]:
        if b not in MLX_BITS:
            raise UnsupportedError(f"{where}: {key} has bits={b}; MLX writes "
                                   f"{', '.join(map(str, MLX_BITS))}")
    return QuantConfig(where, "mlx", bits, group, extra={"layers": layers})


def read_quant_config(directory: Path) -> tuple[QuantConfig, dict | None]:
    """The quantization config in ``directory`` and its ``config.json`` (or None); a
    ModelOpt ``hf_quant_config.json`` must agree with config.json's."""
    quant, config = _read_configs(directory)
    modelopt = directory / MODELOPT_CONFIG
    if not modelopt.is_file():
        return quant, config
    said = parse_modelopt_file(modelopt)
    if quant.method is None:
        return said, config
    if quant.method != "modelopt" or quant.extra.get("algo") != said.extra["algo"]:
        what = quant.extra.get("algo") if quant.method == "modelopt" else quant.method
        raise InvalidProblemError(
            f"{modelopt} says quant_algo={said.extra['algo']!r} but {quant.source} says "
            f"{'quant_algo' if quant.method == 'modelopt' else 'quant_method'}={what!r}: the "
            "configs contradict each other")
    return quant, config


def _read_configs(directory: Path) -> tuple[QuantConfig, dict | None]:
    """config.json's quantization (mlx_lm's, else quantization_config), else
    quantize_config.json or quant_config.json; and config.json itself."""
    config = None
    path = directory / "config.json"
    if path.is_file():
        config = _read_json(path)
        mlx = config.get("quantization")  # mlx_lm's (its quantization_config repeats it)
        if isinstance(mlx, dict):
            return parse_mlx_quantization(mlx, f"{path} quantization"), config
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
