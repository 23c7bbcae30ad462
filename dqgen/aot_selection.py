"""What a kernel selection names: op names, defaults, ``KernelRequest``s and descriptor
records.

A selection (``dqgen aot`` flags or a manifest entry) expands to a product (ops x dtypes
x group sizes x the formats' knobs x targets), narrowed by globs on the kernel URI,
deduplicated and sorted so the same request always lists the same kernels. A knob an op
does not take is ignored for it, a value it cannot take is skipped for it, and an op left
with no kernel is an error. This sits below the pipeline (``jit`` names the ``dqgen aot``
command that builds a missing kernel from here) and below ``aot``, which builds what it
enumerates.
"""

from __future__ import annotations

import fnmatch
import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from . import ir
from .errors import DqgenError, InvalidProblemError, UnsupportedError
from .ir import FLOAT_DTYPES, check_int
from .layouts import aot_ops, kind_for_op, kind_of, kinds
from .layouts.family import OP_NAMES, OPS, make_descriptor, op_class  # noqa: F401  (dqgen.aot's)
from .layouts.ggml import ggml_type_names
from .layouts.linear import COMPUTES
from .layouts.registry import descriptor_from_record as registry_descriptor_from_record
from .lower import lower
from .spec import KernelSpec
from .targets import parse_target
from .targets.cuda import DEFAULT_ARCH as DEFAULT_CUDA_ARCH  # noqa: F401  (dqgen.aot's)

# Every op name: the family's, then each format's (``packed`` is the family's dequantize
# and quantize on 4-bit storage).
ALL_OPS = aot_ops()
FORMAT_OPS = tuple(op for op in ALL_OPS if op not in OPS)
# What an unspecified selection key means, for flags and manifests alike. Without an
# op, the family's four are built (the formats are asked for by name).
DEFAULTS = {"op": tuple(OPS), "int": ("s8", "u8"),
            "float": tuple(d.value for d in FLOAT_DTYPES), "group_size": (128,),
            "target": ("c",)}
# The formats' knobs. GPTQ checkpoints are mostly 4-bit v1 files with f16 scales, with
# and without act-order (g_idx in row order runs the plain kernel, so both are used),
# read as GPTQModel (and so transformers) reads v1 zeros.
FORMAT_DEFAULTS = {"bits": (4,), "checkpoint_format": ("gptq",), "act_order": (False, True),
                   "scale": ("f16",), "v1_zeros": (ir.GPTQ_V1_ZEROS[0],),
                   "ggml_type": None,  # ggml_type: every supported type
                   # floatzp: the q range whose midpoint the kernel subtracts (None: the
                   # int dtype's whole range)
                   "q_min": (None,), "q_max": (None,),
                   # FP8: the block a scale covers (rows x cols, 0 the whole axis), the encoding
                   "block": ("128x128",), "fp8": ("e4m3",),
                   # linear: the format of the weight (an op name: ggml, dequantize, packed, fp8)
                   # and its arithmetic (f32, or int8: x quantized a block, GGML weights)
                   "weight": ("ggml",), "compute": ("f32",)}
# Per-op defaults of the shared keys where the family's would not fit (models run in
# f16/bf16, GGML blocks dequantize to f32/f16/bf16, packed storage is u4/s4): each
# format's own.
OP_DEFAULTS = {op: dict(values) for kind in kinds() for op, values in kind.aot_defaults.items()}
SELECTION_KEYS = tuple(DEFAULTS) + tuple(FORMAT_DEFAULTS) + ("filter",)


def ggml_types() -> tuple[str, ...]:
    """Every GGML block type this dqgen dequantizes ("Q4_0", ...), from the block table, so
    a new type is built without a change here."""
    return ggml_type_names()


def _op_name(name: str) -> str:
    """A family or format op name, normalised; unknown names are refused."""
    text = str(name).strip().lower()
    if text in FORMAT_OPS:
        return text
    text = text.replace("_", "-")
    if text not in OPS:
        raise UnsupportedError(f"op {name!r} is not known; expected one of: "
                               f"{', '.join(ALL_OPS)}")
    return text


@dataclass(frozen=True, order=True)
class KernelRequest:
    """One kernel to build: sorted by URI, then target and arch.

    ``op`` is a family op name or a format's (``gptq``, ``awq``, ``ggml``, ``floatzp``,
    ``hqq``);
    ``knobs`` are the format descriptor's other fields, as sorted (name, value) pairs.
    Runtime sizes are 0; an act-order GPTQ kernel serves every group size (0 here).
    """

    uri: str
    target: str
    arch: str
    op: str
    int_dtype: str | None
    float_dtype: str
    group_size: int
    knobs: tuple = ()

    @property
    def label(self) -> str:
        return f"{self.uri} ({self.target}:{self.arch})"

    def descriptor(self):
        return kind_for_op(self.op).aot_descriptor(self.op, self.int_dtype, self.float_dtype,
                                                   self.group_size, dict(self.knobs))

    def spec(self) -> KernelSpec:
        return lower(self.descriptor(), self.target, self.arch)


def request_of(desc, target: str, arch: str) -> KernelRequest:
    """The request that builds ``desc``'s kernel (its runtime sizes play no part)."""
    op, int_dtype, group, knobs = kind_of(desc).aot_request(desc)
    return KernelRequest(desc.uri, target, arch, op, int_dtype, desc.float_dtype.value,
                         group, tuple(sorted(knobs.items())))


def _as_list(value, key: str) -> list:
    """A manifest/flag value as a list; comma-separated strings are split."""
    items = value if isinstance(value, (list, tuple)) else [value]
    out = []
    for item in items:
        if isinstance(item, str):
            out += [part.strip() for part in item.split(",") if part.strip()]
        elif isinstance(item, int) and (not isinstance(item, bool) or key == "act_order"):
            out.append(item)
        else:
            raise InvalidProblemError(f"{key}: {item!r} is not a string or integer")
    if not out:
        raise InvalidProblemError(f"{key} is empty")
    return out


def _integer(value, key: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise InvalidProblemError(f"{key} {value!r} is not an integer") from None


def _group_sizes(values: list) -> list[int]:
    sizes = []
    for v in values:
        try:
            sizes.append(int(v))
        except (TypeError, ValueError):
            raise InvalidProblemError(f"group_size {v!r} is not an integer") from None
    return sizes


_TRUTH = {"true": True, "yes": True, "1": True, "on": True,
          "false": False, "no": False, "0": False, "off": False}


def _act_orders(values: list) -> list[bool]:
    out = []
    for v in values:
        text = str(v).strip().lower()
        if isinstance(v, bool):
            out.append(v)
        elif text == "both":
            out += [False, True]
        elif text in _TRUTH:
            out.append(_TRUTH[text])
        else:
            raise InvalidProblemError(f"act_order {v!r} is not one of yes, no, both")
    return sorted(set(out))


def _v1_zeros(values: list) -> list[str]:
    """GPTQ v1 zero-point rules, each one of ``GPTQ_V1_ZEROS``."""
    out = [str(v).strip().lower() for v in values]
    for v, text in zip(values, out):
        if text not in ir.GPTQ_V1_ZEROS:
            raise InvalidProblemError(f"v1_zeros {v!r} is not one of "
                                      f"{', '.join(ir.GPTQ_V1_ZEROS)}")
    return list(dict.fromkeys(out))


def _dtypes(values: list, key: str) -> list[str]:
    """Dtype names, each one dqgen knows (which op takes it is checked per op)."""
    out = []
    for v in values:
        member = ir.dtype_from_any(v)
        if member is None or member is ir.DType.I32:
            raise UnsupportedError(f"{key}={v!r} is not a dtype dqgen knows; expected one of: "
                                   + ", ".join(d.value for d in ir.DType if d is not ir.DType.I32))
        out.append(member.value)
    return out


def _pick(selection: dict) -> dict:
    """The selection's values, parsed and checked on their own (``None``: not given)."""
    pick = {k: _as_list(v, k) if v is not None else None for k, v in selection.items()
            if k != "filter"}
    if pick.get("op"):
        pick["op"] = list(dict.fromkeys(_op_name(op) for op in pick["op"]))
    for key in ("int", "float", "scale"):
        if pick.get(key):
            pick[key] = _dtypes(pick[key], key)
    if pick.get("group_size"):
        pick["group_size"] = _group_sizes(pick["group_size"])
    if pick.get("bits"):
        pick["bits"] = [check_int(int(b) if str(b).isdigit() else b, "bits") for b in pick["bits"]]
    if pick.get("act_order"):
        pick["act_order"] = _act_orders(pick["act_order"])
    if pick.get("v1_zeros"):
        pick["v1_zeros"] = _v1_zeros(pick["v1_zeros"])
    for key in ("q_min", "q_max"):
        if pick.get(key):
            pick[key] = [_integer(v, key) for v in pick[key]]
    if pick.get("block"):
        pick["block"] = [_block(v) for v in pick["block"]]
    if pick.get("fp8"):
        pick["fp8"] = [str(v).strip().lower() for v in pick["fp8"]]
    if pick.get("weight"):
        pick["weight"] = list(dict.fromkeys(_op_name(op) for op in pick["weight"]))
    if pick.get("compute"):
        pick["compute"] = _computes(pick["compute"])
    if pick.get("ggml_type"):
        pick["ggml_type"] = [ir.parse_ggml_type(t).value[len("ggml_"):].upper()
                             for t in pick["ggml_type"]]
    return pick


def _computes(values: list) -> list[str]:
    """``compute`` values: f32, int8, or both."""
    out = []
    for v in values:
        text = str(v).strip().lower()
        named = COMPUTES if text == "both" else (text,)
        if not set(named) <= set(COMPUTES):
            raise InvalidProblemError(f"compute={v!r} is not one of: {', '.join(COMPUTES)}, both")
        out.extend(named)
    return list(dict.fromkeys(out))


def _block(value) -> tuple[int, int]:
    """``"128x128"`` -> (128, 128): the rows and columns a scale covers (0: all)."""
    rows, sep, cols = str(value).strip().lower().partition("x")
    try:
        if not sep:
            raise ValueError
        return int(rows), int(cols)
    except ValueError:
        raise InvalidProblemError(f"block {value!r} is not ROWSxCOLS (e.g. 128x128)") from None


def _value(pick: dict, op: str, key: str) -> list:
    if pick.get(key):
        return pick[key]
    if key in OP_DEFAULTS.get(op, {}):
        return list(OP_DEFAULTS[op][key])
    if key == "ggml_type":
        return list(ggml_types())
    values = list(DEFAULTS[key] if key in DEFAULTS else FORMAT_DEFAULTS[key])
    return [_block(v) for v in values] if key == "block" else values


def _candidates(op: str, pick: dict):
    """Every descriptor one op's share of a selection names (some may be invalid). A kind
    whose kernels hold another op's (linear: its weight's) asks for that op's values."""
    return kind_for_op(op).aot_candidates(
        op, lambda key, for_op=None: _value(pick, for_op or op, key))


def expand(selection: dict) -> list[KernelRequest]:
    """Every kernel one selection names (missing keys take their defaults), deduplicated.

    A value an op cannot take (f64 for GGML, s8 for ``packed``) is skipped for that op;
    an op that is left with no kernel raises the first reason.
    """
    unknown = sorted(set(selection) - set(SELECTION_KEYS))
    if unknown:
        raise InvalidProblemError(f"unknown selection key(s) {', '.join(unknown)}; expected "
                                  f"{', '.join(SELECTION_KEYS)}")
    pick = _pick(selection)
    targets = [parse_target(t) for t in _value(pick, "", "target")]
    filters = _as_list(selection["filter"], "filter") if selection.get("filter") else []
    found = set()
    for op in _value(pick, "", "op"):
        descs, first_error = [], None
        for make in _candidates(op, pick):
            try:
                descs.append(make())
            except (InvalidProblemError, UnsupportedError) as exc:
                first_error = first_error or exc
        if not descs:
            raise type(first_error)(f"op {op}: {first_error}")
        if op == "ggml" and pick.get("ggml_type"):  # a type asked for by name must build
            built = {request_of(d, "c", "generic").knobs for d in descs}
            for name in pick["ggml_type"]:
                if not any(("qtype", name) in k for k in built):
                    raise UnsupportedError(f"op ggml: ggml_type {name} has no kernel for "
                                           f"float {', '.join(_value(pick, op, 'float'))}")
        for desc in descs:
            if filters and not any(fnmatch.fnmatchcase(desc.uri, f) for f in filters):
                continue
            for target, arch in targets:
                # validates the arch now, not mid-build; the schedule may name a lower ISA
                # level whose code is the same (one kernel, one bundle entry)
                found.add(request_of(desc, target, lower(desc, target, arch).arch))
    return sorted(found)


def read_manifest(path: str | Path) -> tuple[list[dict], list[str]]:
    """The selections of a manifest file and its top-level filters.

    Selections are the top level and each ``[[kernels]]`` table, with the keys (all
    optional, scalars or lists) of ``SELECTION_KEYS``: op, int, float, group_size, target,
    the formats' bits, checkpoint_format, act_order, scale, v1_zeros, ggml_type, q_min
    and q_max, and filter. A
    top-level ``filter`` narrows the union of all selections.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise InvalidProblemError(f"manifest {path} cannot be read: {exc}") from exc
    kind = "JSON" if path.suffix.lower() == ".json" else "TOML"
    try:
        data = json.loads(text) if kind == "JSON" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise InvalidProblemError(f"manifest {path} is not valid {kind}: {exc}") from exc
    if not isinstance(data, dict):
        raise InvalidProblemError(f"manifest {path} must be a table/object at the top level")
    tables = data.pop("kernels", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise InvalidProblemError(f"manifest {path}: \"kernels\" must be a list of tables")
    filters = _as_list(data.pop("filter"), "filter") if data.get("filter") else []
    selections = ([data] if data else []) + tables
    if not selections:
        raise InvalidProblemError(f"manifest {path} selects no kernels (give op, int, float, "
                                  "group_size, target, or [[kernels]] tables)")
    return selections, filters


def narrow(requests: Iterable[KernelRequest], filters: Iterable[str]) -> list[KernelRequest]:
    """The requests whose URI matches any glob in ``filters`` (all when there are none)."""
    filters = list(filters)
    return sorted(r for r in requests
                  if not filters or any(fnmatch.fnmatchcase(r.uri, f) for f in filters))


def enumerate_kernels(selections: Iterable[dict]) -> list[KernelRequest]:
    """The union of ``selections``, deduplicated and sorted."""
    found = set()
    for sel in selections:
        try:
            found.update(expand(sel))
        except DqgenError as exc:
            raise type(exc)(f"in selection {sel}: {exc}") from None
    return sorted(found)


def command_for_record(record: dict, target: str, arch: str) -> str:
    """The ``dqgen aot`` command line that builds the kernel ``record`` (a
    ``descriptor_record``) describes, or "" when no flags name it."""
    try:
        request = request_of(descriptor_from_record(record), target, arch)
    except (DqgenError, TypeError, ValueError):
        return ""
    knobs = dict(request.knobs)
    if request.op == "linear":
        return _linear_command(record, request, target, arch)
    if request.op == "floatzp":  # the range only where it is not the int dtype's own
        whole = kind_for_op("floatzp").aot_descriptor("floatzp", request.int_dtype,
                                                      request.float_dtype, request.group_size, {})
        if (knobs.get("q_min"), knobs.get("q_max")) == (whole.q_min, whole.q_max):
            knobs = {k: v for k, v in knobs.items() if k not in ("q_min", "q_max")}
    flags = {"op": request.op, "int": request.int_dtype, "float": request.float_dtype,
             "group_size": request.group_size or None, "bits": knobs.get("bits"),
             "checkpoint_format": knobs.get("checkpoint_format"),
             "act_order": {True: "yes", False: "no"}.get(knobs.get("act_order")),
             "scale": knobs.get("scale_dtype"), "ggml_type": knobs.get("qtype"),
             "v1_zeros": None if knobs.get("v1_zeros") in (None, *FORMAT_DEFAULTS["v1_zeros"])
             else knobs["v1_zeros"], "q_min": knobs.get("q_min"), "q_max": knobs.get("q_max"),
             "block": (f"{knobs['block_rows']}x{knobs['block_cols']}"
                       if "block_rows" in knobs else None), "fp8": knobs.get("fp8"),
             "target": f"{target}:{arch}"}
    flags = {k: v for k, v in flags.items() if v is not None}
    if request.op == "ggml":
        flags.pop("group_size", None)
    try:
        if request not in expand(flags):
            return ""
    except DqgenError:
        return ""
    return "dqgen aot " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in flags.items()) \
        + " -o BUNDLE"


def _linear_command(record: dict, request: KernelRequest, target: str, arch: str) -> str:
    """``dqgen aot --op linear --weight OP ...``: the weight's own flags, the x dtype as
    ``--float`` (a selection's linear kernels take y in x's dtype)."""
    inner = command_for_record(record["weight"], target, arch)
    knobs = dict(request.knobs)
    if not inner or knobs.get("x_dtype") != request.float_dtype:
        return ""
    words = inner.split()
    words[words.index("--op") + 1:words.index("--op") + 2] = ["linear", "--weight",
                                                             words[words.index("--op") + 1]]
    if "--float" in words:
        words[words.index("--float") + 1] = request.float_dtype
    else:
        words[words.index("-o"):words.index("-o")] = ["--float", request.float_dtype]
    command = " ".join(words)
    flags = _flags_of_command(words)
    try:
        return command if request in expand(flags) else ""
    except DqgenError:
        return ""


def _flags_of_command(words: list) -> dict:
    """A ``dqgen aot`` command's words back as a selection."""
    flags, key = {}, None
    for word in words[2:]:
        if word.startswith("--"):
            key = word[2:].replace("-", "_")
        elif key is not None and word != "BUNDLE":
            flags[key] = word
            key = None
    flags.pop("o", None)
    return flags


def descriptor_from_record(record: dict, **sizes):
    """The descriptor a ``descriptor_record`` describes (``layouts.registry``'s reading)."""
    return registry_descriptor_from_record(record, **sizes)
