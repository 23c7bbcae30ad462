"""``dqgen convert IN OUT``: dequantize every quantized linear layer of a GPTQ, AWQ or
MLX checkpoint into a plain float ``*.weight``.

IN is a ``.safetensors`` file, a ``*.safetensors.index.json`` or a checkpoint directory
(``checkpoint.py``). The format, bits, group size and GPTQ v1/v2 come from the
checkpoint's config, else from the shapes (GPTQ or AWQ) and the file's metadata
(``checkpoint_format``); flags override. A directory or index gives a directory OUT:
the same shards (or ``--max-shard-size`` ones) with a ``model.safetensors.index.json``
where the input had one, ``config.json`` without its ``quantization_config`` and with the
new ``torch_dtype``, and the directory's other files (tokenizer, generation config)
copied. A file gives a file (or shards of it with ``--max-shard-size``).

A layer is the tensors ``P.qweight``, ``P.qzeros``, ``P.scales`` (and GPTQ's optional
``P.g_idx``) sharing a prefix ``P``, in any shards; it becomes ``P.weight`` shaped
``[out_features, in_features]`` as ``torch.nn.Linear`` holds it (the transpose of the
``[K, N]`` that GPTQ/AWQ pack), in the shard of its ``qweight``. Every other tensor and
each file's metadata are copied unchanged. One layer is in memory at a time; every shape
is checked before a file is created, and the output files appear only once all are
complete.

An MLX layer (mlx_lm) is ``P.weight`` (uint32 words), ``P.scales`` and ``P.biases``; its
bits and group size come from ``config.json``'s ``quantization``, per layer.

A bitsandbytes layer is 4-bit (``P.weight`` packed, ``P.weight.absmax``,
``P.weight.quant_state.bitsandbytes__nf4|fp4`` giving its shape, block size and type,
plus ``quant_map`` and double quantization's ``nested_*``) or LLM.int8 (int8 ``P.weight``,
``P.SCB``, ``P.weight_format``); the config's ``load_in_4bit``/``load_in_8bit`` and
``bnb_4bit_quant_type`` must agree with the tensors.

FP4 layers: gpt-oss MXFP4 experts (``NAME_blocks``, ``NAME_scales`` -> ``NAME``, as
transformers names the dequantized parameter), ModelOpt NVFP4 (uint8 ``P.weight``,
``P.weight_scale``, ``P.weight_scale_2``; ``P.input_scale`` dropped; the config is
``hf_quant_config.json`` or config.json's ``quant_method: "modelopt"``, which must agree)
and compressed-tensors' ``nvfp4-``/``mxfp4-pack-quantized`` (the scale's dtype tells
which; the config must name that format).

A ``.gguf`` input (llama.cpp) needs no ``--format``: every tensor is converted
(``gguf_convert``).

``--shards I/N`` converts the I-th (from 1, as a Slurm array's ``--array=1-N`` numbers
its tasks) of N contiguous runs of the output shards (the input's, or the
``--max-shard-size`` ones), so N processes on as many machines write one OUT on a shared
filesystem. Every slice plans the whole conversion from the input's headers (the output
shards' names, sizes and index depend on no tensor's data), writes its own shards, and
records itself done in a ledger in OUT; the slice that finds every slice done writes the
index and side files (``convert_output``). The output is byte for byte one run's.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Callable, NamedTuple
from pathlib import Path

import ml_dtypes
import numpy as np

from .. import env
from ..errors import InvalidProblemError, UnsupportedError
from ..ir import GPTQ_BITS, GPTQ_CHECKPOINT_FORMATS, GPTQ_V1_ZEROS
from . import awq, bitsandbytes, compressed_tensors, fp4, fp8, gptq, mlx
from .checkpoint import (CONFIG_FILES, INDEX_NAME, MLX_BITS, NOT_COPIED, Checkpoint,
                         open_checkpoint, v1_zeros_rule)
from .convert_output import Destination, SliceLedger, kernel_jobs
from .progress import Progress
from .safetensors_io import DTYPES, PendingFile, Reader, Writer, parse_size, shard_paths

PARTS = ("qweight", "qzeros", "scales", "g_idx")
FORMATS = ("gptq", "awq", "mlx", "fp8", "compressed-tensors", "bitsandbytes", "mxfp4",
           "modelopt")
OUT_DTYPES = {"f16": "F16", "bf16": "BF16", "f32": "F32"}
TORCH_DTYPES = {"f16": "float16", "bf16": "bfloat16", "f32": "float32"}
OUT_DTYPES_NP = {"f16": np.dtype(np.float16), "bf16": np.dtype(ml_dtypes.bfloat16),
                 "f32": np.dtype(np.float32)}


DESCRIPTION = """\
Dequantize a quantized checkpoint into plain float weights.

GPTQ and AWQ checkpoints (safetensors): every quantized linear layer (the
tensors P.qweight, P.qzeros, P.scales and GPTQ's optional P.g_idx) becomes
P.weight, shaped [out_features, in_features] as torch.nn.Linear holds it; every
other tensor is copied unchanged. The format, bits, group size and GPTQ v1/v2
come from the checkpoint's config.json or quantize_config.json, else from the
tensor shapes and the file's metadata; the flags below override them.

MLX checkpoints (mlx_lm): every layer with P.scales and P.biases beside a uint32
P.weight becomes a float P.weight; each layer's bits and group size come from
config.json's quantization (the default, or the layer's own entry).

FP8 checkpoints (DeepSeek-V3, Qwen3-FP8; quant_method "fp8"): every F8_E4M3 or
F8_E5M2 P.weight with its P.weight_scale_inv (or P.weight_scale) becomes a float
P.weight, in the config's weight_block_size blocks.

bitsandbytes checkpoints (quant_method "bitsandbytes", load_in_4bit or
load_in_8bit): a 4-bit P.weight (NF4 or FP4, with P.weight.absmax and its
quant_state) or an LLM.int8 one (with P.SCB) becomes a float P.weight, its
quant-state tensors dropped.

FP4 checkpoints: gpt-oss MXFP4 experts (quant_method "mxfp4"): NAME_blocks and
NAME_scales become a float NAME ([experts, K, N], as transformers loads it);
NVIDIA ModelOpt NVFP4 (hf_quant_config.json, or quant_method "modelopt"): a
uint8 P.weight with P.weight_scale and P.weight_scale_2 becomes a float
P.weight, its input_scale dropped; compressed-tensors nvfp4-pack-quantized and
mxfp4-pack-quantized layers as its other formats.

  IN a directory or a model.safetensors.index.json: OUT is a directory with
    the same shards (or --max-shard-size ones) and index, config.json without
    its quantization config and with the new torch_dtype, and the tokenizer
    and other files copied.
  IN one .safetensors file: OUT is one file (or shards of it and an index
    with --max-shard-size).
  IN a llama.cpp .gguf file: every tensor is converted (quantized ones
    dequantized, float ones copied) and the GGUF metadata kept; --format,
    --bits and --group-size do not apply.

Every shape is checked before anything is written, and the output files appear
only once all are complete: a failure or Ctrl-C leaves OUT as it was.
Converting again into the same OUT replaces the earlier output there. A
directory OUT that holds other files and no checkpoint is refused unless
--force.

On many machines: --shards I/N converts slice I of N (counted from 1) of the
output shards (the input's own, or the --max-shard-size ones), so N processes
(a Slurm array, Ray tasks) write one OUT on a shared filesystem at the same
time, each checking every layer's shapes first. The last slice to finish
writes the index and config.json, so no index names a shard not yet written;
the result is the same bytes as one run. A slice run again is harmless; N
may exceed the number of shards (the extra slices have nothing to write).

examples:
  dqgen convert Llama-GPTQ/ llama-f16/
  dqgen convert model.safetensors out.safetensors --format awq --dtype bf16
  dqgen convert Qwen3-4B-4bit-mlx/ qwen3-bf16/ --dtype bf16
  dqgen convert DeepSeek-V3/ deepseek-v3-bf16/ --dtype bf16
  dqgen convert model-Q4_K_M.gguf out/ --max-shard-size 5GB
  sbatch --array=1-16 --wrap \\
    'dqgen convert DeepSeek-V3/ v3-bf16/ --shards $SLURM_ARRAY_TASK_ID/16'
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's arguments and help text (the CLI wires them to a ``convert``
    subcommand)."""
    parser.description = DESCRIPTION
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("input", metavar="IN", help="quantized checkpoint: a .safetensors "
                        "file, a model.safetensors.index.json or a checkpoint directory (or a "
                        "llama.cpp .gguf file: every tensor converted, no --format)")
    parser.add_argument("output", metavar="OUT", help="file to write (a directory for a "
                        "directory or index IN)")
    parser.add_argument("--format", choices=FORMATS, default=None, metavar="FORMAT",
                        help=f"how the layers are packed: {', '.join(FORMATS)}; default: "
                             "the config's quant_method, else read from the shapes")
    parser.add_argument("--dtype", default="f16", choices=tuple(OUT_DTYPES),
                        help="dtype of the dequantized weights (default f16)")
    parser.add_argument("--bits", type=int, choices=sorted(set(GPTQ_BITS) | set(MLX_BITS)),
                        default=None,
                        help="bits; default: the config's, else (GPTQ) inferred from qzeros "
                             "and scales")
    parser.add_argument("--checkpoint-format", choices=GPTQ_CHECKPOINT_FORMATS, default=None,
                        help="GPTQ zero-point convention; default: the config's, else the "
                             "file's metadata 'checkpoint_format', else 'gptq' (v1, zeros "
                             "stored minus one)")
    parser.add_argument("--v1-zeros", choices=GPTQ_V1_ZEROS, default=None,
                        help="how GPTQ v1 zeros decode: gptqmodel (word-wise: GPTQModel, and "
                             "so transformers/optimum), autogptq (AutoGPTQ's qlinear_cuda_old) "
                             "or exllama (AutoGPTQ's qlinear_cuda for act-order, exllama, "
                             "vLLM); default: the loader of the checkpoint's producer, as its "
                             "config says (GPTQModel's meta.quantizer, AutoGPTQ's "
                             "quantize_config), else gptqmodel")
    parser.add_argument("--group-size", type=int, default=None,
                        help="group size; default: the config's, else inferred from the shapes")
    parser.add_argument("--quiet", action="store_true", help="no progress display")
    parser.add_argument("-j", "--jobs", type=int, default=None,
                        help="kernel threads (default: DQGEN_NUM_THREADS, else all CPUs; "
                             "for a .gguf all but one, which writes the output); at most 4 "
                             "per CPU")
    parser.add_argument("--max-shard-size", default=None, metavar="SIZE",
                        help="write shards of at most SIZE (5GB, 500MiB, bytes) and an index "
                             "(default: the input's shards; one file for a .gguf or a file)")
    parser.add_argument("--force", action="store_true",
                        help="write into a directory OUT even if it holds other files")
    parser.add_argument("--shards", default=None, metavar="I/N",
                        help="convert only slice I of N (counted from 1) of the output "
                             "shards, into the same OUT as the other slices (a Slurm "
                             "array: --array=1-N, --shards $SLURM_ARRAY_TASK_ID/N); the "
                             "last slice to finish writes the index and config")


class Tensors:
    """Every tensor of a checkpoint's shards by name: which file, which entry."""

    def __init__(self, ckpt: Checkpoint) -> None:
        self.readers = [Reader(path) for path in ckpt.files]
        self.where: dict[str, Reader] = {}
        for reader in self.readers:
            for name in reader.entries:
                if name in self.where:
                    raise InvalidProblemError(f"tensor {name} is in both {self.where[name].path} "
                                              f"and {reader.path}")
                self.where[name] = reader
        self.entries = {name: r.entries[name] for name, r in self.where.items()}

    def array(self, name: str) -> np.ndarray:
        return self.where[name].array(name)

    def raw(self, name: str) -> np.ndarray:
        return self.where[name].raw(name)


def find_layers(tensors, fmt: str | None) -> dict[str, dict[str, str]]:
    """Prefix -> {part: tensor name} for every quantized layer, checked complete."""
    layers: dict[str, dict[str, str]] = {}
    for name in tensors.entries:
        prefix, _, part = name.rpartition(".")
        if part in PARTS:
            layers.setdefault(prefix, {})[part] = name
    for prefix, parts in layers.items():
        label = prefix or "(top level)"
        missing = [p for p in PARTS[:3] if p not in parts]
        if missing:
            raise InvalidProblemError(f"layer {label} has {', '.join(sorted(parts))} but no "
                                      f"{', '.join(missing)}")
        if fmt == "awq" and "g_idx" in parts:
            raise InvalidProblemError(f"layer {label} has a g_idx, which AWQ checkpoints do not "
                                      "have; is this a GPTQ checkpoint (--format gptq)?")
        if f"{prefix}.weight" in tensors.entries:
            raise InvalidProblemError(f"layer {label} has both qweight and weight tensors")
    if not layers:
        where = getattr(tensors, "path", None) or ", ".join(
            str(r.path) for r in getattr(tensors, "readers", ()))
        raise InvalidProblemError(f"{where}: no quantized layers (no *.qweight tensors)")
    return layers


def _shape(tensors, name: str, ndim: int) -> tuple[int, ...]:
    shape = tensors.entries[name].shape
    if len(shape) != ndim:
        raise InvalidProblemError(f"{name} has shape {list(shape)}, expected {ndim} dims")
    return shape


def layer_format(tensors, parts: dict[str, str], requested: str | None,
                 said_by: str = "--format") -> str:
    """``"gptq"`` or ``"awq"`` from the shapes (GPTQ packs along K, so qweight and scales
    have the same columns; AWQ packs 8 columns a word); raises naming the tensors when
    ``requested`` (from ``said_by``) says otherwise."""
    qw = _shape(tensors, parts["qweight"], 2)
    sc = _shape(tensors, parts["scales"], 2)
    seen = "gptq" if sc[1] == qw[1] else "awq" if sc[1] == 8 * qw[1] else None
    if "g_idx" in parts and seen == "awq":
        seen = None
    if requested is None:
        if seen is None:
            raise InvalidProblemError(
                f"{parts['qweight']} {list(qw)} and {parts['scales']} {list(sc)} fit neither "
                "GPTQ (same columns) nor AWQ (scales 8x the columns); pass --format")
        return seen
    if seen is not None and seen != requested:
        how = {"gptq": "packed along K (qweight and scales have the same columns)",
               "awq": "packed 8 columns a word along N (scales has 8x qweight's columns)"}
        raise InvalidProblemError(
            f"{said_by} {requested}, but {parts['qweight']} {list(qw)} and {parts['scales']} "
            f"{list(sc)} are {how[seen]}: the file looks like {seen.upper()} "
            f"(--format {seen})")
    return requested


@dataclass(frozen=True)
class Settings:
    """How the checkpoint's layers are read: flags over config over file metadata."""

    format: str | None
    format_source: str
    bits: int | None
    checkpoint_format: str
    v1_zeros: str
    group_size: int | None
    dtype: str


def settings(args, ckpt: Checkpoint, tensors: Tensors) -> Settings:
    q = ckpt.quant
    if q.method is not None and args.format is not None and q.method != args.format:
        print(f"dqgen convert: --format {args.format} overrides {q.source} "
              f"(quant_method={q.method})", file=sys.stderr)
    metadata = tensors.readers[0].metadata if tensors.readers else {}
    version = gptq_version(q, metadata, args.checkpoint_format)
    group = args.group_size if args.group_size is not None else q.group_size
    said_by = "--format" if args.format else f"{q.source}: quant_method"
    v1_zeros = getattr(args, "v1_zeros", None)
    if v1_zeros is None:  # the rule of the loader of the checkpoint's producer
        v1_zeros, why = v1_zeros_rule(q, metadata)
        if version == "gptq" and v1_zeros != GPTQ_V1_ZEROS[0]:
            print(f"dqgen convert: GPTQ v1 zero points read with --v1-zeros {v1_zeros}: "
                  f"{why}", file=sys.stderr)
    return Settings(args.format or q.method, said_by, args.bits or q.bits, version,
                    v1_zeros, group, args.dtype)


def gptq_version(quant, metadata: dict, requested=None) -> str:
    """GPTQ's v1 or v2: the flag, else the config, else the safetensors metadata, else v1."""
    version = requested or quant.checkpoint_format or metadata.get("checkpoint_format", "gptq")
    if version not in GPTQ_CHECKPOINT_FORMATS:
        raise InvalidProblemError(f"metadata checkpoint_format={version!r} is not one of "
                                  f"{', '.join(GPTQ_CHECKPOINT_FORMATS)}")
    return version


def gptq_bits(tensors, parts: dict[str, str], requested, hint: str = "pass --bits") -> int:
    """Bits from the flag (or config), else from how many values a qzeros word holds."""
    if requested is not None:
        return requested
    cols = tensors.entries[parts["scales"]].shape[-1]
    words = tensors.entries[parts["qzeros"]].shape[-1]
    if words and (32 * words) % cols == 0 and 32 * words // cols in GPTQ_BITS:
        return 32 * words // cols
    raise InvalidProblemError(f"cannot infer bits for {parts['qweight']}: qzeros has {words} "
                              f"words a row for {cols} columns; {hint}")


def _plan_layer(tensors, parts: dict[str, str], s: Settings) -> tuple:
    """(format, output shape, dequantize callable) for one layer, shapes checked up front
    (the callable raises naming the layer too)."""
    fmt = layer_format(tensors, parts, s.format, s.format_source)
    qw = _shape(tensors, parts["qweight"], 2)
    _shape(tensors, parts["qzeros"], 2)
    get = tensors.array
    if fmt == "gptq":
        bits = gptq_bits(tensors, parts, s.bits)
        shape = (qw[1], qw[0] * 32 // bits)
        _check_gptq_shapes(tensors, parts, bits)

        def run():
            g_idx = get(parts["g_idx"]) if "g_idx" in parts else None
            return np.ascontiguousarray(gptq.dequantize(
                get(parts["qweight"]), get(parts["qzeros"]), get(parts["scales"]), g_idx,
                bits=bits, checkpoint_format=s.checkpoint_format, dtype=s.dtype,
                group_size=s.group_size, v1_zeros=s.v1_zeros).T)  # [N, K], as torch stores it
    else:
        shape = (qw[1] * 8, qw[0])

        def run():
            return np.ascontiguousarray(awq.dequantize(
                get(parts["qweight"]), get(parts["qzeros"]), get(parts["scales"]), dtype=s.dtype,
                group_size=s.group_size).T)
    return fmt, shape, _naming(parts["qweight"].rpartition(".")[0] or "(top level)", run)


class LayerPlan(NamedTuple):
    """One quantized layer's conversion: its format, output shape, the callable that
    dequantizes it, and its output tensor's name (None: ``PREFIX.weight``)."""

    format: str
    shape: tuple
    run: Callable
    name: str | None = None


def _none_found(tensors, what: str) -> InvalidProblemError:
    """The error for a checkpoint whose shards hold none of a format's layers."""
    where = ", ".join(str(r.path) for r in getattr(tensors, "readers", ()))
    return InvalidProblemError(f"{where}: {what}")


def main_part(parts: dict[str, str]) -> str:
    """The tensor a quantized layer's float weight takes the place of."""
    return parts["qweight"] if "qweight" in parts else parts["weight"]


def find_mlx_layers(tensors) -> dict[str, dict[str, str]]:
    """Prefix -> {part: tensor name} for every MLX-quantized layer: a ``weight`` of uint32
    words with its ``scales`` and ``biases`` (a layer left in floats has neither)."""
    layers: dict[str, dict[str, str]] = {}
    for name in tensors.entries:
        prefix, _, part = name.rpartition(".")
        if part in ("scales", "biases"):
            layers.setdefault(prefix, {})[part] = name
    for prefix, parts in layers.items():
        label = prefix or "(top level)"
        weight = f"{prefix}.weight" if prefix else "weight"
        missing = [p for p in ("scales", "biases") if p not in parts]
        if missing or weight not in tensors.entries:
            raise InvalidProblemError(f"layer {label} has {', '.join(sorted(parts))} but no "
                                      f"{', '.join(missing or ['weight'])}")
        if tensors.entries[weight].dtype not in ("U32", "I32"):
            raise InvalidProblemError(f"{weight} has dtype {tensors.entries[weight].dtype}; an "
                                      "MLX-quantized weight is uint32 words")
        parts["weight"] = weight
    if not layers:
        raise _none_found(tensors, "no MLX-quantized layers (no *.scales and *.biases beside "
                                   "a uint32 *.weight)")
    return layers


def _plan_mlx_layer(tensors, prefix: str, parts: dict[str, str], s, quant) -> tuple:
    """(format, output shape, dequantize callable) of one MLX layer: its bits and group
    size from its own config entry, else the flags', else the config's defaults."""
    bits, group = quant.extra.get("layers", {}).get(
        prefix, (s.bits or quant.bits, s.group_size or quant.group_size))
    if bits is None or group is None:
        raise InvalidProblemError(f"layer {prefix}: no bits or group_size (the config's "
                                  "quantization has none; pass --bits and --group-size)")
    words = tensors.entries[parts["weight"]].shape
    if (words[-1] * 32) % bits:
        raise InvalidProblemError(f"{parts['weight']} {list(words)}: rows of {words[-1]} words "
                                  f"are not a whole number of {bits}-bit values")
    shape = (*words[:-1], words[-1] * 32 // bits)
    get = tensors.array

    def run():
        w = mlx.dequantize(get(parts["weight"]), get(parts["scales"]), get(parts["biases"]),
                           group, bits)
        want = OUT_DTYPES_NP[s.dtype]
        return w if w.dtype == want else w.astype(want)  # the library's values, then --dtype
    return "mlx", shape, _naming(prefix or "(top level)", run)


FP8_SCALES = ("weight_scale_inv", "weight_scale")  # DeepSeek's name, then AMD Quark's
FP8_DTYPES = {"F8_E4M3": "e4m3", "F8_E5M2": "e5m2"}


def find_fp8_layers(tensors) -> dict[str, dict[str, str]]:
    """Prefix -> {part: tensor name} for every FP8 weight with its scale; other tensors
    (norms, embeddings, activation scales) are copied as they are."""
    layers: dict[str, dict[str, str]] = {}
    for name, entry in tensors.entries.items():
        prefix, _, part = name.rpartition(".")
        if part != "weight" or entry.dtype not in FP8_DTYPES:
            continue
        scales = [f"{prefix}.{s}" for s in FP8_SCALES if f"{prefix}.{s}" in tensors.entries]
        if not scales:
            raise InvalidProblemError(f"{name} is {entry.dtype} but has no {prefix}."
                                      f"{FP8_SCALES[0]} (or .{FP8_SCALES[1]}) beside it")
        layers[prefix] = {"weight": name, "scale": scales[0]}
    if not layers:
        raise _none_found(tensors, "no FP8 weights (F8_E4M3 or F8_E5M2 *.weight)")
    return layers


def _plan_fp8_layer(tensors, prefix: str, parts: dict[str, str], s, quant) -> tuple:
    """(format, output shape, dequantize callable) of one FP8 weight: its block from the
    config's weight_block_size, else (one scale a tensor or a row) from the scale's shape."""
    entry = tensors.entries[parts["weight"]]
    shape = tuple(_shape(tensors, parts["weight"], 2))
    encoding = FP8_DTYPES[entry.dtype]
    if quant.extra.get("fp8", encoding) != encoding:
        raise InvalidProblemError(f"{parts['weight']} is {entry.dtype} but {quant.source} says "
                                  f"fmt={quant.extra['fp8']!r}")
    block = quant.extra.get("block")
    if block is not None:
        want = tuple(-(-n // b) for n, b in zip(shape, block))
        got = tuple(tensors.entries[parts["scale"]].shape)
        if got != want:
            raise InvalidProblemError(f"{parts['scale']} has shape {list(got)}, expected "
                                      f"{list(want)} for {list(shape)} in {block[0]} x "
                                      f"{block[1]} blocks ({quant.source}: weight_block_size)")
    get = tensors.array

    def run():
        return fp8.dequantize(get(parts["weight"]), get(parts["scale"]), block, s.dtype)
    return "fp8", shape, _naming(prefix, run)


def find_ct_layers(tensors) -> dict[str, dict[str, str]]:
    """Prefix -> {part: tensor name} for every compressed-tensors layer: pack-quantized
    (``weight_packed``, ``weight_shape``, act-order ``weight_g_idx``), int8 or FP8
    ``weight``, each with its ``weight_scale`` (and ``weight_zero_point``); other tensors
    are copied."""
    layers: dict[str, dict[str, str]] = {}
    for name, entry in tensors.entries.items():
        prefix, _, part = name.rpartition(".")
        if part not in ("weight_packed", "weight") or f"{prefix}.weight_scale" not in tensors.entries:
            continue
        if part == "weight" and entry.dtype not in ("I8", *FP8_DTYPES):
            continue
        parts = {"weight": name, "scale": f"{prefix}.weight_scale"}
        for extra in ("weight_shape", "weight_zero_point", "weight_g_idx", *CT_FP4_EXTRA):
            if f"{prefix}.{extra}" in tensors.entries:
                parts[extra] = f"{prefix}.{extra}"
        fp4_scale = tensors.entries[parts["scale"]].dtype in CT_FP4_SCALES
        if part == "weight_packed" and "weight_shape" not in parts and not fp4_scale:
            raise InvalidProblemError(f"{name} has no {prefix}.weight_shape beside it")
        layers[prefix] = parts
    if not layers:
        raise _none_found(tensors, "no compressed-tensors layers (*.weight_packed or an "
                                   "int8/FP8 *.weight, each with *.weight_scale)")
    return layers


def _plan_ct_layer(tensors, prefix: str, parts: dict[str, str], s, quant,
                   written_by: tuple[int, ...] | None = None) -> tuple:
    """(format, output shape, dequantize callable) of one compressed-tensors layer; bits
    from the packed width (``_ct_bits``), an FP8 block from the config's block_structure,
    FP4 (nvfp4-/mxfp4-pack-quantized) from the scale's dtype. ``written_by``: the library
    version the config names (None: not said)."""
    entry = tensors.entries[parts["weight"]]
    get = tensors.array
    want = OUT_DTYPES_NP[s.dtype]
    zero = parts.get("weight_zero_point")
    if tensors.entries[parts["scale"]].dtype in CT_FP4_SCALES and \
            parts["weight"].endswith("weight_packed"):
        return _plan_ct_fp4_layer(tensors, prefix, parts, s, quant)
    if parts["weight"].endswith(".weight_packed"):
        n, k = (int(v) for v in get(parts["weight_shape"]).reshape(-1))
        bits = _ct_bits(tensors, parts, n, k, quant)
        if written_by is not None and written_by < (0, 18) and 32 % bits:
            raise UnsupportedError(
                f"{parts['weight']}: {bits}-bit values from compressed-tensors "
                f"{'.'.join(map(str, written_by))} (the config's version), which packs "
                f"{32 // bits} to a word; dqgen reads the dense bit stream of 0.18 and later")
        g_idx = parts.get("weight_g_idx")

        def run():
            return compressed_tensors.dequantize_packed(
                get(parts["weight"]), get(parts["scale"]), (n, k),
                get(zero) if zero else None, bits,
                weight_g_idx=get(g_idx) if g_idx else None).astype(want, copy=False)
        return "compressed-tensors", (n, k), _naming(prefix, run)
    shape = tuple(_shape(tensors, parts["weight"], 2))
    if entry.dtype == "I8":
        def run():
            return compressed_tensors.dequantize_int8(
                get(parts["weight"]), get(parts["scale"]),
                get(zero) if zero else None).astype(want, copy=False)
        return "compressed-tensors", shape, _naming(prefix, run)
    blocks = {tuple(g.get("block_structure")) for g in quant.extra.get("groups", ())
              if g.get("block_structure")}
    block = blocks.pop() if len(blocks) == 1 else None

    scale_shape = tuple(tensors.entries[parts["scale"]].shape)
    if block is not None and scale_shape != tuple(-(-n // b) for n, b in zip(shape, block)):
        block = None  # a tensor's or a row's scale: fp8 reads it from the scale's shape

    def run():
        return fp8.dequantize(get(parts["weight"]), get(parts["scale"]), block, s.dtype)
    return "compressed-tensors", shape, _naming(prefix, run)


def _ct_bits(tensors, parts: dict[str, str], n: int, k: int, quant) -> int:
    """A pack-quantized layer's width: the one of 1 to 8 bits whose dense stream of K values
    is the row's word count (and of N values the packed zero points' rows), among the
    config's integer ``num_bits`` where a short row fits several."""
    name = parts["weight"]
    words = tensors.entries[name].shape[-1]
    fits = [b for b in compressed_tensors.PACKED_BITS
            if compressed_tensors.dense_words(k, b) == words]
    zero = tensors.entries.get(parts.get("weight_zero_point", ""))
    if zero is not None and zero.dtype == "I32" and len(zero.shape) == 2:
        fits = [b for b in fits if compressed_tensors.dense_words(n, b) == zero.shape[0]]
    said = sorted({int(g["num_bits"]) for g in quant.extra.get("groups", ())
                   if g.get("type", "int") == "int" and isinstance(g.get("num_bits"), int)})
    if said and fits:
        named = [b for b in fits if b in said]
        if not named:
            raise InvalidProblemError(
                f"{name} has {words} words a row for K={k}: {'/'.join(map(str, fits))}-bit "
                f"values, but {quant.source} names num_bits {'/'.join(map(str, said))}")
        fits = named
    if len(fits) == 1:
        return fits[0]
    if fits:
        raise InvalidProblemError(
            f"{name} has {words} words a row for K={k}, which fits "
            f"{'/'.join(map(str, fits))}-bit values alike; the config's num_bits does not say "
            "which")
    older = [b for b in compressed_tensors.PACKED_BITS
             if compressed_tensors.padded_words(k, b) == words]
    if older:
        raise UnsupportedError(
            f"{name} has {words} words a row for K={k}: {older[0]}-bit values "
            f"{32 // older[0]} to a word, the layout compressed-tensors wrote before 0.18; "
            "dqgen reads the dense bit stream (0.18 and later)")
    raise UnsupportedError(f"{name} has {words} words a row for K={k}: no width of 1 to 8 "
                           "bits packs K values densely into that many")


def ct_version(config: dict | None) -> tuple[int, ...] | None:
    """The compressed-tensors version a checkpoint's config names (``quantization_config.
    version``, e.g. "0.17.1"), as numbers; None where it names none or none that parses."""
    quant = (config or {}).get("quantization_config") or {}
    found = re.match(r"(\d+)\.(\d+)", str(quant.get("version") or "")) if \
        isinstance(quant, dict) else None
    return tuple(int(v) for v in found.groups()) if found else None


# compressed-tensors' FP4 formats: the scale's dtype says which (E4M3 with a global
# scale: NVFP4; E8M0 exponents: MXFP4), and the format each needs in the config.
CT_FP4_SCALES = {"F8_E4M3": "nvfp4", "U8": "mxfp4"}
CT_FP4_FORMATS = {"nvfp4": "nvfp4-pack-quantized", "mxfp4": "mxfp4-pack-quantized"}
CT_FP4_EXTRA = ("weight_global_scale", "input_global_scale")


def _plan_ct_fp4_layer(tensors, prefix: str, parts: dict[str, str], s, quant) -> LayerPlan:
    """An nvfp4-/mxfp4-pack-quantized layer: uint8 ``weight_packed`` [N, K / 2] and its
    block scales (NVFP4: E4M3 a block of 16 and ``weight_global_scale``; MXFP4: E8M0 a
    block of 32); the global and input scales are not copied."""
    fp4_kind = CT_FP4_SCALES[tensors.entries[parts["scale"]].dtype]
    fmt = CT_FP4_FORMATS[fp4_kind]
    formats = quant.extra.get("formats")
    if formats is not None and fmt not in formats:
        raise InvalidProblemError(
            f"{parts['weight']} is {fp4_kind.upper()} ({parts['scale']} is "
            f"{tensors.entries[parts['scale']].dtype}), but {quant.source} names no {fmt} "
            f"format (it names {', '.join(formats)})")
    if fp4_kind == "nvfp4" and "weight_global_scale" not in parts:
        raise InvalidProblemError(f"{parts['weight']} is NVFP4 but has no "
                                  f"{prefix}.weight_global_scale beside it")
    _check_fp4_rows(tensors, parts["weight"], parts["scale"], 16 if fp4_kind == "nvfp4" else 32)
    n, half = tensors.entries[parts["weight"]].shape
    get = tensors.array

    def run():
        if fp4_kind == "nvfp4":
            return compressed_tensors.dequantize_nvfp4(
                get(parts["weight"]), get(parts["scale"]), get(parts["weight_global_scale"]),
                dtype=s.dtype)
        return compressed_tensors.dequantize_mxfp4(get(parts["weight"]), get(parts["scale"]),
                                                   dtype=s.dtype)
    return LayerPlan("compressed-tensors", (n, 2 * half), _naming(prefix, run))


def _check_fp4_rows(tensors, weight: str, scale: str, block: int) -> None:
    """A uint8 ``weight`` [N, K / 2] of e2m1 pairs and its ``scale`` [N, K / block]."""
    entry = tensors.entries[weight]
    if entry.dtype != "U8" or len(entry.shape) != 2:
        raise InvalidProblemError(f"{weight} is {entry.dtype} {list(entry.shape)}; an FP4 "
                                  "weight is uint8 [N, K / 2], two e2m1 values a byte")
    n, half = entry.shape
    got = tuple(tensors.entries[scale].shape)
    if (2 * half) % block or got != (n, 2 * half // block):
        raise InvalidProblemError(f"{scale} has shape {list(got)}, expected "
                                  f"{[n, 2 * half // block]}: one a block of {block} values of "
                                  f"{weight} {[n, half]} (two values a byte)")


def find_mxfp4_layers(tensors) -> dict[str, dict[str, str]]:
    """gpt-oss MXFP4 experts: ``NAME_blocks`` with ``NAME_scales`` beside it -> the float
    ``NAME`` (as transformers names it); other tensors (biases, router, attention) are
    copied."""
    layers: dict[str, dict[str, str]] = {}
    for name, entry in tensors.entries.items():
        if name.endswith("_blocks"):
            base = name[:-len("_blocks")]
            if f"{base}_scales" not in tensors.entries:
                raise InvalidProblemError(f"{name} has no {base}_scales beside it")
            layers[base] = {"weight": name, "scales": f"{base}_scales"}
        elif name.endswith("_scales") and entry.dtype == "U8" and \
                f"{name[:-len('_scales')]}_blocks" not in tensors.entries:
            raise InvalidProblemError(f"{name} has no {name[:-len('_scales')]}_blocks beside it")
    if not layers:
        raise _none_found(tensors, "no MXFP4 experts (*_blocks with *_scales)")
    return layers


def _plan_mxfp4_layer(tensors, base: str, parts: dict[str, str], s, quant) -> LayerPlan:
    """gpt-oss experts: blocks uint8 [E, N, G, 16] and E8M0 scales [E, N, G] -> [E, G * 32,
    N], as transformers' convert_moe_packed_tensors returns them."""
    blocks, scales = (tensors.entries[parts[k]] for k in ("weight", "scales"))
    if blocks.dtype != "U8" or len(blocks.shape) != 4 or blocks.shape[-1] != 16:
        raise InvalidProblemError(f"{parts['weight']} is {blocks.dtype} {list(blocks.shape)}; "
                                  "gpt-oss MXFP4 blocks are uint8 [experts, N, G, 16]")
    if scales.dtype != "U8" or tuple(scales.shape) != tuple(blocks.shape[:-1]):
        raise InvalidProblemError(f"{parts['scales']} is {scales.dtype} {list(scales.shape)}, "
                                  f"expected uint8 {list(blocks.shape[:-1])}: one a block of "
                                  f"{parts['weight']} {list(blocks.shape)}")
    experts, rows, groups, _ = blocks.shape
    get = tensors.array

    def run():
        return fp4.dequantize_mxfp4(get(parts["weight"]), get(parts["scales"]), s.dtype)
    return LayerPlan("mxfp4", (experts, groups * 32, rows), _naming(base, run), base)


class TensorMapping(Mapping):
    """A checkpoint's tensors as a read-only mapping name -> array, each mapped when
    asked for (what ``bitsandbytes.from_state_dict`` reads a layer from)."""

    def __init__(self, tensors: Tensors) -> None:
        self._tensors = tensors

    def __getitem__(self, name: str):
        if name not in self._tensors.entries:
            raise KeyError(name)
        return self._tensors.array(name)

    def __contains__(self, name) -> bool:  # without mapping the tensor
        return name in self._tensors.entries

    def __iter__(self):
        return iter(self._tensors.entries)

    def __len__(self) -> int:
        return len(self._tensors.entries)


BNB_STATE = ".weight.quant_state.bitsandbytes__"
BNB_4BIT_PARTS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


def find_bnb_layers(tensors) -> dict[str, dict[str, str]]:
    """Prefix -> {part: tensor name} for every bitsandbytes layer: 4-bit (``P.weight`` with
    ``P.weight.absmax``, ``P.weight.quant_state.bitsandbytes__nf4|fp4`` and the optional
    ``quant_map`` and double-quantization tensors) or LLM.int8 (int8 ``P.weight`` with
    ``P.SCB`` and ``P.weight_format``); every such tensor is dropped from the output."""
    layers: dict[str, dict[str, str]] = {}
    entries = tensors.entries
    for name, entry in entries.items():
        if BNB_STATE in name:
            prefix = name[:name.index(BNB_STATE)]
            parts = {"weight": f"{prefix}.weight", "state": name}
            parts.update({k: f"{prefix}.weight.{k}" for k in BNB_4BIT_PARTS
                          if f"{prefix}.weight.{k}" in entries})
        elif name.endswith(".SCB"):
            prefix = name[:-len(".SCB")]
            parts = {"weight": f"{prefix}.weight", "scb": name}
            if f"{prefix}.weight_format" in entries:
                parts["weight_format"] = f"{prefix}.weight_format"
            if parts["weight"] in entries and entries[parts["weight"]].dtype != "I8":
                raise InvalidProblemError(f"{parts['weight']} is {entries[parts['weight']].dtype}"
                                          f" beside {name}; an LLM.int8 weight is I8")
        else:
            continue
        if prefix in layers:
            raise InvalidProblemError(f"layer {prefix} has both a 4-bit quant_state and an "
                                      "LLM.int8 SCB")
        missing = [n for n in (parts["weight"], parts.get("state") and f"{prefix}.weight.absmax")
                   if n and n not in entries]
        if missing:
            raise InvalidProblemError(f"{name} has no {missing[0]} beside it")
        layers[prefix] = parts
    owned = {n for parts in layers.values() for n in parts.values()}
    for name in entries:
        part = name.rpartition(".weight.")[2]
        if ".weight." in name and part in BNB_4BIT_PARTS and name not in owned:
            raise InvalidProblemError(f"{name} has no {name.rpartition('.weight.')[0]}"
                                      f"{BNB_STATE}nf4 (or fp4) beside it")
    if not layers:
        raise _none_found(tensors, "no bitsandbytes layers (no *.weight.quant_state."
                                   "bitsandbytes__nf4|fp4 or *.SCB)")
    return layers


def _plan_bnb_layer(tensors, prefix: str, parts: dict[str, str], s, quant) -> LayerPlan:
    """A 4-bit layer (shape, block size, type and double quantization from its packed
    quant_state) or an LLM.int8 one, checked against the config's load_in_4bit /
    load_in_8bit and bnb_4bit_quant_type."""
    named = TensorMapping(tensors)
    four = "state" in parts
    bits = 4 if four else 8
    if quant.method == "bitsandbytes" and quant.bits not in (None, bits):
        said = "load_in_4bit" if quant.bits == 4 else "load_in_8bit"
        raise InvalidProblemError(
            f"{parts['state' if four else 'scb']} is a bitsandbytes {bits}-bit layer, but "
            f"{quant.source} says {said}: the config contradicts the tensors")
    if not four:
        kwargs = _layer_args(prefix, lambda: bitsandbytes.int8_from_state_dict(named, prefix))
        shape = tuple(tensors.entries[parts["weight"]].shape)
        if len(shape) != 2 or tuple(tensors.entries[parts["scb"]].shape) not in (
                shape[:1], (shape[0], 1)):
            raise InvalidProblemError(f"{parts['scb']} has shape "
                                      f"{list(tensors.entries[parts['scb']].shape)}, expected "
                                      f"{list(shape[:1])}: one scale a row of {parts['weight']} "
                                      f"{list(shape)}")

        def run():
            args = bitsandbytes.int8_from_state_dict(named, prefix)
            return bitsandbytes.dequantize_int8(**args, dtype=s.dtype)
        return LayerPlan("bitsandbytes", shape, _naming(prefix, run), parts["weight"])
    kwargs = _layer_args(prefix, lambda: bitsandbytes.from_state_dict(named, prefix))
    _check_bnb_4bit_sizes(tensors, parts, kwargs)
    said = quant.extra.get("quant_type") if quant.method == "bitsandbytes" else None
    if said is not None and said != kwargs["quant_type"]:
        raise InvalidProblemError(f"{parts['state']} says quant_type {kwargs['quant_type']!r} "
                                  f"but {quant.source} says bnb_4bit_quant_type={said!r}: the "
                                  "config contradicts the tensors")

    def run():
        args = bitsandbytes.from_state_dict(named, prefix)
        return bitsandbytes.dequantize_4bit(**dict(args, dtype=s.dtype))
    return LayerPlan("bitsandbytes", tuple(kwargs["shape"]), _naming(prefix, run),
                     parts["weight"])


def _check_bnb_4bit_sizes(tensors, parts: dict[str, str], kwargs: dict) -> None:
    """The packed weight holds two values a byte of the quant_state's shape, and absmax
    one value a block."""
    numel = int(np.prod(kwargs["shape"]))
    entry = tensors.entries[parts["weight"]]
    nbytes = int(np.prod(entry.shape)) * DTYPES[entry.dtype].itemsize
    if nbytes != -(-numel // 2):
        raise InvalidProblemError(f"{parts['weight']} has {nbytes} bytes, expected "
                                  f"{-(-numel // 2)}: two 4-bit values a byte for shape "
                                  f"{list(kwargs['shape'])} ({parts['state']})")
    blocks = int(np.prod(tensors.entries[parts["absmax"]].shape))
    if blocks != -(-numel // kwargs["blocksize"]):
        raise InvalidProblemError(f"{parts['absmax']} has {blocks} values, expected "
                                  f"{-(-numel // kwargs['blocksize'])}: one a block of "
                                  f"{kwargs['blocksize']} of shape {list(kwargs['shape'])} "
                                  f"({parts['state']})")


def _layer_args(prefix: str, read):
    """``read()`` (a layer's arguments from its state dict), its errors naming the layer."""
    try:
        return read()
    except (InvalidProblemError, UnsupportedError) as exc:
        raise type(exc)(f"layer {prefix}: {exc}") from None


MODELOPT_DROPPED = ("weight_scale", "weight_scale_2", "input_scale")


def find_modelopt_layers(tensors) -> dict[str, dict[str, str]]:
    """ModelOpt NVFP4 layers: a uint8 ``weight`` with its ``weight_scale`` (E4M3) and
    ``weight_scale_2``; those and ``input_scale`` are not copied, other tensors are."""
    layers: dict[str, dict[str, str]] = {}
    for name, entry in tensors.entries.items():
        prefix, _, part = name.rpartition(".")
        if part != "weight" or entry.dtype != "U8":
            continue
        parts = {"weight": name}
        for key in MODELOPT_DROPPED:
            if f"{prefix}.{key}" in tensors.entries:
                parts[key] = f"{prefix}.{key}"
        missing = [k for k in MODELOPT_DROPPED[:2] if k not in parts]
        if missing:
            raise InvalidProblemError(f"{name} is {entry.dtype} (NVFP4) but has no "
                                      f"{' or '.join(f'{prefix}.{k}' for k in missing)} "
                                      "beside it")
        layers[prefix] = parts
    if not layers:
        raise _none_found(tensors, "no NVFP4 layers (a uint8 *.weight with *.weight_scale "
                                   "and *.weight_scale_2)")
    return layers


def _plan_modelopt_layer(tensors, prefix: str, parts: dict[str, str], s, quant) -> LayerPlan:
    """NVFP4: ``F(e2m1 * (f32(weight_scale) * weight_scale_2))``, blocks of 16 values."""
    scale = tensors.entries[parts["weight_scale"]]
    if scale.dtype != "F8_E4M3":
        raise InvalidProblemError(f"{parts['weight_scale']} is {scale.dtype}; an NVFP4 block "
                                  "scale is F8_E4M3")
    second = tensors.entries[parts["weight_scale_2"]]
    if second.dtype != "F32" or int(np.prod(second.shape)) != 1:
        raise InvalidProblemError(f"{parts['weight_scale_2']} is {second.dtype} "
                                  f"{list(second.shape)}; it is one F32 value for the tensor")
    _check_fp4_rows(tensors, parts["weight"], parts["weight_scale"], quant.group_size or 16)
    n, half = tensors.entries[parts["weight"]].shape
    get = tensors.array

    def run():
        return fp4.dequantize_nvfp4(get(parts["weight"]), get(parts["weight_scale"]),
                                    get(parts["weight_scale_2"]), s.dtype)
    return LayerPlan("nvfp4", (n, 2 * half), _naming(prefix, run))


def _check_gptq_shapes(tensors, parts: dict[str, str], bits: int) -> None:
    """qzeros [groups, N * bits / 32] and scales [groups, N] for qweight [K * bits / 32, N]."""
    qw, qz = tensors.entries[parts["qweight"]].shape, tensors.entries[parts["qzeros"]].shape
    sc = tensors.entries[parts["scales"]].shape
    want = (sc[0], qw[1] * bits // 32)
    if tuple(qz) != want:
        raise InvalidProblemError(f"{parts['qzeros']} has shape {list(qz)}, expected "
                                  f"{list(want)} for {bits}-bit {parts['qweight']} {list(qw)}")


def _naming(label: str, run):
    """``run`` with its dqgen errors prefixed by the layer they concern."""
    def named():
        try:
            return run()
        except (InvalidProblemError, UnsupportedError) as exc:
            raise type(exc)(f"layer {label}: {exc}") from None
    return named


@dataclass
class _Shard:
    """One output file: its path, metadata, and (name, dtype, shape, layer or None) in order."""

    path: Path
    metadata: dict
    items: list

    @property
    def nbytes(self) -> int:
        return sum(int(np.prod(shape)) * DTYPES[dtype].itemsize for _, dtype, shape, _ in self.items)


def _output_items(tensors: Tensors, layers, plans, dtype: str) -> list[tuple[Reader, list]]:
    """Per input shard, its output tensors in its data order, each layer's weight where its
    qweight was."""
    owned = {name: prefix for prefix, parts in layers.items() for name in parts.values()}
    out = []
    for reader in tensors.readers:
        items = []
        for name, entry in sorted(reader.entries.items(), key=lambda kv: kv[1].begin):
            prefix = owned.get(name)
            if prefix is None:
                items.append((name, entry.dtype, entry.shape, None))
            elif name == main_part(layers[prefix]):
                plan = plans[prefix]
                out_name = plan.name if isinstance(plan, LayerPlan) and plan.name else (
                    f"{prefix}.weight")
                items.append((out_name, OUT_DTYPES[dtype], plan[1], prefix))
        out.append((reader, items))
    return out


def _layout(ckpt: Checkpoint, per_input, output: Path,
            max_bytes: int | None) -> tuple[list[_Shard], Path | None]:
    """The output shards and index: the input's own shards (and index) unless
    ``max_bytes`` asks for new ones."""
    to_dir = _writes_directory(ckpt)
    if max_bytes is None:
        if to_dir:
            shards = [_Shard(output / r.path.name, r.metadata, items) for r, items in per_input]
            return shards, (output / INDEX_NAME) if ckpt.index is not None else None
        (reader, items), = per_input
        return [_Shard(_file_output(output), reader.metadata, items)], None
    runs: list[list] = [[]]
    size = 0
    for _, items in per_input:
        for item in items:
            nbytes = int(np.prod(item[2])) * DTYPES[item[1]].itemsize
            if runs[-1] and size + nbytes > max_bytes:
                runs.append([])
                size = 0
            runs[-1].append(item)
            size += nbytes
    dst = output / "model.safetensors" if to_dir else _file_output(output)
    paths, index = shard_paths(dst, len(runs))
    if to_dir and index is not None:
        index = output / INDEX_NAME
    metadata = per_input[0][0].metadata
    return [_Shard(p, metadata, items) for p, items in zip(paths, runs)], index


def _writes_directory(ckpt: Checkpoint) -> bool:
    """A directory or an index in, a directory out."""
    return ckpt.index is not None or ckpt.from_directory


def _file_output(output: Path) -> Path:
    return output / "model.safetensors" if output.is_dir() else output


def _index_json(shards: list[_Shard]) -> bytes:
    weight_map = {name: shard.path.name for shard in shards for name, *_ in shard.items}
    total = sum(shard.nbytes for shard in shards)
    return json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                      indent=2).encode() + b"\n"


def _side_files(ckpt: Checkpoint, output: Path, dtype: str) -> list[PendingFile]:
    """``config.json`` without its quantization config, and the directory's other files."""
    pending = []
    for path in sorted(ckpt.directory.iterdir()):
        if not path.is_file() or path.name in NOT_COPIED or path.name.endswith(
                (".safetensors", ".index.json")) or path.name.startswith("."):
            continue
        if path.name == "config.json" and ckpt.config is not None:
            config = {k: v for k, v in ckpt.config.items()
                      if k not in ("quantization_config", "quantization")}
            config["torch_dtype"] = TORCH_DTYPES[dtype]
            data = json.dumps(config, indent=2, ensure_ascii=False).encode() + b"\n"
        else:
            data = path.read_bytes()
        pending.append(PendingFile(output / path.name, data))
    return pending


def _same_place(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def run(args: argparse.Namespace) -> int:
    """The ``dqgen convert`` command; raises ``DqgenError`` on bad input. Ctrl-C leaves
    nothing behind and ends it with one line and status 130."""
    try:
        if str(args.input).lower().endswith(".gguf"):
            if getattr(args, "shards", None) is not None:
                raise InvalidProblemError("--shards splits a safetensors checkpoint's shards; "
                                          "a .gguf file converts in one run")
            from . import gguf_convert
            return gguf_convert.run(args)
        return _convert_checkpoint(args)
    except KeyboardInterrupt:
        print("dqgen: interrupted", file=sys.stderr)
        return 130


def _base(ckpt: Checkpoint, output: Path) -> Path:
    """The file shards are named after (``model.safetensors`` in a directory)."""
    return output / "model.safetensors" if _writes_directory(ckpt) else _file_output(output)


@contextlib.contextmanager
def _kernel_threads(jobs: int | None):
    """Kernels run on ``jobs`` threads meanwhile (DQGEN_NUM_THREADS, which plans read)."""
    old = os.environ.get(env.NUM_THREADS)
    if jobs is not None:
        os.environ[env.NUM_THREADS] = str(jobs)
    try:
        yield
    finally:
        if jobs is not None:
            if old is None:
                os.environ.pop(env.NUM_THREADS, None)
            else:
                os.environ[env.NUM_THREADS] = old


def parse_slice(text) -> tuple[int, int] | None:
    """``--shards I/N`` as (I, N), I counted from 1 (a Slurm array's ``--array=1-N``
    task id as it is; a 0-based index passes I+1); None when not given."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*([0-9]+)\s*/\s*([0-9]+)\s*", str(text))
    if not m:
        raise InvalidProblemError(f"--shards {text!r} is not I/N, slice I of N counted from 1 "
                                  "(1/3, 2/3, 3/3)")
    index, count = int(m.group(1)), int(m.group(2))
    if count < 1:
        raise InvalidProblemError(f"--shards {text}: N={count} must be at least 1")
    if not 1 <= index <= count:
        raise InvalidProblemError(f"--shards {text}: I={index} must be 1 to {count} (slices "
                                  "are counted from 1; with a 0-based task index pass I+1)")
    return index, count


def slice_of(shards: list, index: int, count: int) -> list:
    """The ``index``-th (from 1) of ``count`` contiguous runs of ``shards``, as even in
    number as can be (empty where there are fewer shards than slices)."""
    return shards[(index - 1) * len(shards) // count:index * len(shards) // count]


def _plan_layers(tensors: Tensors, s: Settings, ckpt: Checkpoint) -> tuple[dict, dict]:
    """Every quantized layer (prefix -> parts) and its plan (format, output shape,
    dequantize callable), every shape checked; nothing is read but headers and the
    small tensors that give shapes."""
    find, plan = {"mlx": (find_mlx_layers, _plan_mlx_layer),
                  "compressed-tensors": (find_ct_layers, functools.partial(
                      _plan_ct_layer, written_by=ct_version(ckpt.config))),
                  "fp8": (find_fp8_layers, _plan_fp8_layer),
                  "mxfp4": (find_mxfp4_layers, _plan_mxfp4_layer),
                  "modelopt": (find_modelopt_layers, _plan_modelopt_layer),
                  "bitsandbytes": (find_bnb_layers, _plan_bnb_layer),
                  }.get(s.format, (None, None))
    if find is None:
        layers = find_layers(tensors, s.format)
        return layers, {prefix: _plan_layer(tensors, parts, s) for prefix, parts in layers.items()}
    layers = find(tensors)
    return layers, {prefix: plan(tensors, prefix, parts, s, ckpt.quant)
                    for prefix, parts in layers.items()}


def _conversion_key(ckpt: Checkpoint, s: Settings, shards: list[_Shard], index,
                    count: int) -> str:
    """What makes two slices parts of one conversion: the input (its shards' names and
    sizes, its index and configs), the settings, the output's layout and the slice
    count; the same on every machine that sees the same files."""
    def digest(path: Path) -> str | None:
        return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
    configs = [ckpt.index] if ckpt.index is not None else []
    configs += [ckpt.directory / name for name in (*CONFIG_FILES, "hf_quant_config.json")]
    what = {"input": [[f.name, f.stat().st_size] for f in ckpt.files],
            "configs": [[p.name, digest(p)] for p in configs],
            "settings": {k: v for k, v in asdict(s).items() if k != "format_source"},
            "layout": [[sh.path.name, sh.metadata, [list(item[:3]) for item in sh.items]]
                       for sh in shards],
            "index": index.name if index is not None else None, "slices": count}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=list).encode()).hexdigest()


def _write_shards(shards: list[_Shard], tensors: Tensors, plans: dict, progress: Progress,
                  pending: list) -> None:
    """Write ``shards`` (added to ``pending``, finished, not yet in place)."""
    done = 0
    for shard in shards:
        writer = Writer(shard.path, [item[:3] for item in shard.items], shard.metadata)
        pending.append(writer)
        for name, _, _, prefix in shard.items:
            if prefix is None:
                writer.put(name, tensors.raw(name))
                continue
            weight = plans[prefix][2]()  # the output's shape and dtype
            writer.put(name, weight)
            done += 1
            progress.step(done, f"{prefix} {list(weight.shape)}")
            # dropped before the next layer is made, so one result is alive at a time
            # (and a dropped one is recycled for the next: dqgen.output_pool)
            del weight
        writer.finish()


def _final_files(ckpt: Checkpoint, shards: list[_Shard], index, output: Path,
                 dtype: str) -> list[PendingFile]:
    """The index and side files, written once every shard is in place."""
    pending = []
    try:
        if index is not None:
            pending.append(PendingFile(index, _index_json(shards)))
        if _writes_directory(ckpt):
            pending += _side_files(ckpt, output, dtype)
    except BaseException:
        for item in pending:
            item.abort()
        raise
    return pending


def _convert_checkpoint(args: argparse.Namespace) -> int:
    """Convert the checkpoint ``args.input`` into ``args.output`` (one slice of it with
    ``--shards``)."""
    part = parse_slice(getattr(args, "shards", None))
    ckpt = open_checkpoint(args.input)
    output = Path(args.output)
    tensors = Tensors(ckpt)
    s = settings(args, ckpt, tensors)
    layers, plans = _plan_layers(tensors, s, ckpt)
    max_bytes = None
    if getattr(args, "max_shard_size", None) is not None:
        max_bytes = parse_size(args.max_shard_size)
    shards, index = _layout(ckpt, _output_items(tensors, layers, plans, s.dtype),
                            output, max_bytes)
    if _writes_directory(ckpt) and _same_place(output, ckpt.directory):
        raise InvalidProblemError(f"OUT must differ from IN: {output} is the checkpoint's "
                                  "own directory")
    for shard in shards:
        if any(_same_place(shard.path, f) for f in ckpt.files):
            raise InvalidProblemError(f"OUT must differ from IN: it would overwrite {shard.path}")
    jobs = kernel_jobs(getattr(args, "jobs", None))
    mine = shards if part is None else slice_of(shards, *part)
    where = Destination(_base(ckpt, output), [sh.path for sh in shards], index,
                        _writes_directory(ckpt) or output.is_dir(),
                        getattr(args, "force", False), keep=ckpt.files, sliced=part is not None)
    mine_layers = sum(1 for sh in mine for item in sh.items if item[3] is not None)
    progress = Progress(mine_layers, args.quiet)
    pending: list = []
    try:
        where.prepare()
        with _kernel_threads(jobs):
            _write_shards(mine, tensors, plans, progress, pending)
        if part is None:
            pending += _final_files(ckpt, shards, index, output, s.dtype)
        for item in pending:  # shards first, the index and config after: never a dangling name
            item.commit()
    except BaseException:
        for item in pending:
            item.abort()
        where.failed()
        raise
    finally:
        progress.finish()
    if part is None:
        where.finished()
        finish = ""
    else:
        finish = _finish_slice(ckpt, s, shards, index, output, where, part)
    if not args.quiet:
        _report(args, ckpt, s, plans, shards, index, mine, mine_layers, part, finish)
    return 0


def _finish_slice(ckpt: Checkpoint, s: Settings, shards: list[_Shard], index, output: Path,
                  where: Destination, part: tuple[int, int]) -> str:
    """Record this slice done; the slice that finds every slice done writes the index
    and side files and removes the earlier output's leftovers. Returns what to say."""
    count = part[1]
    ledger = SliceLedger(_base(ckpt, output))
    with ledger.record(_conversion_key(ckpt, s, shards, index, count), part[0]) as done:
        missing = [i for i in range(1, count + 1) if i not in done]
        if missing:
            shown = ", ".join(map(str, missing[:8])) + (", ..." if len(missing) > 8 else "")
            return (f"; slice{'s' if len(missing) > 1 else ''} {shown} of {count} not done "
                    "yet (the last to finish writes the index and config)")
        stale = where.leftovers()
        pending = _final_files(ckpt, shards, index, output, s.dtype)
        try:
            for item in pending:
                item.commit()
        except BaseException:
            for item in pending:
                item.abort()
            raise
        where.finished(stale)
        ledger.remove()
    written = [what for what, there in (("index", index is not None),
                                        ("config", _writes_directory(ckpt))) if there]
    return f"; all {count} slices done" + (f": {' and '.join(written)} written" if written else "")


def _report(args, ckpt: Checkpoint, s: Settings, plans: dict, shards: list[_Shard], index,
            mine: list[_Shard], mine_layers: int, part, finish: str) -> None:
    """The line that says what was written."""
    output = args.output
    formats = sorted({plan[0] for plan in plans.values()})
    source = f" (config: {ckpt.quant.source})" if ckpt.quant.source else ""
    copied = sum(len(sh.items) for sh in mine) - mine_layers
    if part is not None:
        print(f"{output}: slice {part[0]}/{part[1]}: {len(mine)} of {len(shards)} shards, "
              f"{mine_layers} {'/'.join(formats)} layers dequantized to {s.dtype}, {copied} "
              f"other tensors copied{source}{finish}")
        return
    shown = output if len(shards) == 1 and index is None else (
        f"{output} ({len(shards)} shards{' and an index' if index else ''})")
    print(f"{shown}: {mine_layers} {'/'.join(formats)} layers dequantized to {s.dtype}, "
          f"{copied} other tensors copied{source}")
