"""``dqgen convert IN.safetensors OUT.safetensors --format gptq|awq``: dequantize every
quantized linear layer of a checkpoint into a plain float ``*.weight``.

A layer is the tensors ``P.qweight``, ``P.qzeros``, ``P.scales`` (and GPTQ's optional
``P.g_idx``) sharing a prefix ``P``; it becomes ``P.weight`` shaped ``[out_features,
in_features]`` as ``torch.nn.Linear`` holds it (the transpose of the ``[K, N]`` that
GPTQ/AWQ pack). Every other tensor and the file's metadata are copied unchanged. One
layer is in memory at a time; the output appears only once complete.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from ..errors import InvalidProblemError
from ..ir import GPTQ_BITS, GPTQ_CHECKPOINT_FORMATS
from . import awq, gptq
from .safetensors_io import Reader, Writer

PARTS = ("qweight", "qzeros", "scales", "g_idx")
OUT_DTYPES = {"f16": "F16", "bf16": "BF16", "f32": "F32"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's arguments (the CLI wires them to a ``convert`` subcommand)."""
    parser.add_argument("input", metavar="IN.safetensors", help="quantized checkpoint")
    parser.add_argument("output", metavar="OUT.safetensors", help="file to write")
    parser.add_argument("--format", required=True, choices=("gptq", "awq"),
                        help="how the checkpoint's layers are packed")
    parser.add_argument("--dtype", default="f16", choices=tuple(OUT_DTYPES),
                        help="dtype of the dequantized weights (default f16)")
    parser.add_argument("--bits", type=int, choices=GPTQ_BITS, default=None,
                        help="GPTQ bits; default: inferred from qzeros and scales")
    parser.add_argument("--checkpoint-format", choices=GPTQ_CHECKPOINT_FORMATS, default=None,
                        help="GPTQ zero-point convention; default: the file's metadata "
                             "'checkpoint_format', else 'gptq' (v1, zeros stored minus one)")
    parser.add_argument("--group-size", type=int, default=None,
                        help="group size; default: inferred from the shapes")
    parser.add_argument("--quiet", action="store_true", help="no progress display")


def find_layers(reader: Reader, fmt: str) -> dict[str, dict[str, str]]:
    """Prefix -> {part: tensor name} for every quantized layer, checked complete."""
    layers: dict[str, dict[str, str]] = {}
    for name in reader.entries:
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
        if f"{prefix}.weight" in reader.entries:
            raise InvalidProblemError(f"layer {label} has both qweight and weight tensors")
    if not layers:
        raise InvalidProblemError(f"{reader.path}: no quantized layers (no *.qweight tensors)")
    return layers


def _gptq_bits(reader: Reader, parts: dict[str, str], requested) -> int:
    """Bits from the flag, else from how many values a qzeros word holds."""
    if requested is not None:
        return requested
    cols = reader.entries[parts["scales"]].shape[-1]
    words = reader.entries[parts["qzeros"]].shape[-1]
    if words and (32 * words) % cols == 0 and 32 * words // cols in GPTQ_BITS:
        return 32 * words // cols
    raise InvalidProblemError(f"cannot infer bits for {parts['qweight']}: qzeros has {words} "
                              f"words a row for {cols} columns; pass --bits")


def _plan_layer(reader: Reader, fmt: str, parts: dict[str, str], args) -> tuple:
    """(output shape, dequantize callable) for one layer, shapes checked up front."""
    qw = reader.entries[parts["qweight"]].shape
    if len(qw) != 2:
        raise InvalidProblemError(f"{parts['qweight']} has shape {list(qw)}, expected 2 dims")
    if fmt == "gptq":
        bits = _gptq_bits(reader, parts, args.bits)
        version = args.checkpoint_format or reader.metadata.get("checkpoint_format", "gptq")
        if version not in GPTQ_CHECKPOINT_FORMATS:
            raise InvalidProblemError(f"metadata checkpoint_format={version!r} is not one of "
                                      f"{', '.join(GPTQ_CHECKPOINT_FORMATS)}")
        shape = (qw[1], qw[0] * 32 // bits)

        def run():
            g_idx = reader.array(parts["g_idx"]) if "g_idx" in parts else None
            return gptq.dequantize(reader.array(parts["qweight"]), reader.array(parts["qzeros"]),
                                   reader.array(parts["scales"]), g_idx, bits=bits,
                                   checkpoint_format=version, dtype=args.dtype,
                                   group_size=args.group_size)
    else:
        shape = (qw[1] * 8, qw[0])

        def run():
            return awq.dequantize(reader.array(parts["qweight"]), reader.array(parts["qzeros"]),
                                  reader.array(parts["scales"]), dtype=args.dtype,
                                  group_size=args.group_size)
    return shape, run


class Progress:
    """A one-line progress bar on stderr (a line per layer when not a terminal)."""

    def __init__(self, total: int, quiet: bool) -> None:
        self.total, self.quiet, self.start = total, quiet, time.perf_counter()
        self.tty = sys.stderr.isatty()

    def step(self, done: int, label: str) -> None:
        if self.quiet:
            return
        width = 30
        filled = width * done // self.total
        line = (f"[{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} layers "
                f"{time.perf_counter() - self.start:5.1f}s {label}")
        if self.tty:
            sys.stderr.write("\r\033[K" + line)
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def finish(self) -> None:
        if self.tty and not self.quiet:
            sys.stderr.write("\n")


def run(args: argparse.Namespace) -> int:
    """Convert ``args.input`` into ``args.output``; raises ``DqgenError`` on bad input."""
    reader = Reader(args.input)
    try:
        same = reader.path.resolve() == type(reader.path)(args.output).resolve()
    except OSError:
        same = False
    if same:
        raise InvalidProblemError("OUT.safetensors must differ from IN.safetensors")
    layers = find_layers(reader, args.format)
    owned = {name: prefix for prefix, parts in layers.items() for name in parts.values()}
    plans = {prefix: _plan_layer(reader, args.format, parts, args)
             for prefix, parts in layers.items()}
    # Output order: the input's data order, each layer's weight where its qweight was.
    entries, jobs = [], []
    for name, entry in sorted(reader.entries.items(), key=lambda kv: kv[1].begin):
        prefix = owned.get(name)
        if prefix is None:
            entries.append((name, entry.dtype, entry.shape))
            jobs.append((name, None))
        elif name == layers[prefix]["qweight"]:
            entries.append((f"{prefix}.weight", OUT_DTYPES[args.dtype], plans[prefix][0]))
            jobs.append((f"{prefix}.weight", prefix))
    writer = Writer(args.output, entries, reader.metadata)
    progress = Progress(len(layers), args.quiet)
    done = 0
    try:
        for name, prefix in jobs:
            if prefix is None:
                writer.put(name, reader.raw(name))
                continue
            weight = plans[prefix][1]()  # [K, N]
            writer.put(name, np.ascontiguousarray(weight.T))
            done += 1
            progress.step(done, f"{prefix} [{weight.shape[1]}, {weight.shape[0]}]")
        writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        progress.finish()
    if not args.quiet:
        print(f"{args.output}: {len(layers)} {args.format} layers dequantized to {args.dtype}, "
              f"{len(jobs) - len(layers)} other tensors copied")
    return 0
