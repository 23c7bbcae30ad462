"""Ahead-of-time builds: enumerate kernels, build them in parallel, write a bundle.

Enumeration is a product (ops x int dtypes x float dtypes x group sizes x targets) from
command-line flags or a manifest file (TOML or JSON), narrowed by globs on the kernel
URI, deduplicated and sorted so the same request always lists the same kernels. Builds
go through the disk cache exactly as JIT builds do (``jit.ensure_cpu_binary`` /
``jit.ensure_cuda_binary``), in worker processes for ``jobs > 1``; the results are
copied into a bundle by ``bundle.write_bundle``.
"""

from __future__ import annotations

import concurrent.futures as futures
import fnmatch
import json
import multiprocessing
import re
import threading
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from . import __version__, bundle, errors, jit
from .errors import CompileError, DqgenError, InvalidProblemError, UnsupportedError
from .ir import (DequantizePerGroupBackwardDescriptor, DequantizePerGroupDescriptor,
                 FLOAT_DTYPES, QuantizePerGroupBackwardDescriptor,
                 QuantizePerGroupDescriptor, check_int)
from .isa import host_isa
from .lower import KernelSpec, lower

# Command-line op names and the descriptor each one builds.
OPS = {
    "dequantize": DequantizePerGroupDescriptor,
    "quantize": QuantizePerGroupDescriptor,
    "dequantize-backward": DequantizePerGroupBackwardDescriptor,
    "quantize-backward": QuantizePerGroupBackwardDescriptor,
}
OP_NAMES = {cls.op: name for name, cls in OPS.items()}
DEFAULT_CUDA_ARCH = "sm_90"
_CUDA_ARCH = re.compile(r"^(sm|compute)_\d{2,3}[af]?$")
# What an unspecified selection key means, for flags and manifests alike.
DEFAULTS = {"op": tuple(OPS), "int": ("s8", "u8"),
            "float": tuple(d.value for d in FLOAT_DTYPES), "group_size": (128,),
            "target": ("c",)}
SELECTION_KEYS = tuple(DEFAULTS) + ("filter",)


def op_class(name: str) -> type:
    cls = OPS.get(str(name).strip().lower().replace("_", "-"))
    if cls is None:
        raise UnsupportedError(f"op {name!r} is not known; expected one of: {', '.join(OPS)}")
    return cls


def make_descriptor(op: str, int_dtype: str | None, float_dtype: str, group_size: int):
    """The descriptor of one kernel. ``outer``/``axis`` are runtime arguments (0 here);
    ops without a storage dtype ignore ``int_dtype``; quantize-backward's range is a
    runtime argument too, so any valid one names the same kernel."""
    cls = op_class(op)
    group_size = check_int(group_size, "group_size", minimum=1, maximum=2**31 - 1)
    if cls is DequantizePerGroupDescriptor or cls is QuantizePerGroupDescriptor:
        if int_dtype is None:
            raise InvalidProblemError(f"op {op!r} needs an int dtype (--int s8 or u8)")
        return cls(0, 0, group_size, float_dtype, int_dtype)
    if cls is QuantizePerGroupBackwardDescriptor:
        return cls(0, 0, group_size, float_dtype, -128, 127)
    return cls(0, 0, group_size, float_dtype)


def parse_target(text: str) -> tuple[str, str]:
    """``c`` (this machine's ISA), ``c:avx2``, ``cuda`` (sm_90) or ``cuda:sm_90``."""
    target, _, arch = str(text).strip().lower().partition(":")
    if target == "c":
        return "c", arch or host_isa()
    if target == "cuda":
        arch = arch or DEFAULT_CUDA_ARCH
        if not _CUDA_ARCH.match(arch):
            raise UnsupportedError(f"CUDA arch {arch!r} is not of the form sm_XX or compute_XX "
                                   "(e.g. sm_90)")
        return "cuda", arch
    raise UnsupportedError(f"target {text!r} is not known; expected c[:ISA] or cuda[:sm_XX]")


@dataclass(frozen=True, order=True)
class KernelRequest:
    """One kernel to build: sorted by URI, then target and arch."""

    uri: str
    target: str
    arch: str
    op: str
    int_dtype: str | None
    float_dtype: str
    group_size: int

    @property
    def label(self) -> str:
        return f"{self.uri} ({self.target}:{self.arch})"

    def descriptor(self):
        return make_descriptor(self.op, self.int_dtype, self.float_dtype, self.group_size)

    def spec(self) -> KernelSpec:
        return lower(self.descriptor(), self.target, self.arch)


def _as_list(value, key: str) -> list:
    """A manifest/flag value as a list; comma-separated strings are split."""
    items = value if isinstance(value, (list, tuple)) else [value]
    out = []
    for item in items:
        if isinstance(item, str):
            out += [part.strip() for part in item.split(",") if part.strip()]
        elif isinstance(item, int) and not isinstance(item, bool):
            out.append(item)
        else:
            raise InvalidProblemError(f"{key}: {item!r} is not a string or integer")
    if not out:
        raise InvalidProblemError(f"{key} is empty")
    return out


def _group_sizes(values: list) -> list[int]:
    sizes = []
    for v in values:
        try:
            sizes.append(int(v))
        except (TypeError, ValueError):
            raise InvalidProblemError(f"group_size {v!r} is not an integer") from None
    return sizes


def expand(selection: dict) -> list[KernelRequest]:
    """Every kernel one selection names (missing keys take ``DEFAULTS``), deduplicated."""
    unknown = sorted(set(selection) - set(SELECTION_KEYS))
    if unknown:
        raise InvalidProblemError(f"unknown selection key(s) {', '.join(unknown)}; expected "
                                  f"{', '.join(SELECTION_KEYS)}")
    pick = {k: _as_list(selection[k], k) if selection.get(k) is not None else list(DEFAULTS[k])
            for k in DEFAULTS}
    targets = [parse_target(t) for t in pick["target"]]
    filters = _as_list(selection["filter"], "filter") if selection.get("filter") else []
    found = set()
    for op in pick["op"]:
        takes_int = op_class(op) in (DequantizePerGroupDescriptor, QuantizePerGroupDescriptor)
        for int_dtype in (pick["int"] if takes_int else [None]):
            for float_dtype in pick["float"]:
                for group_size in _group_sizes(pick["group_size"]):
                    desc = make_descriptor(op, int_dtype, float_dtype, group_size)
                    if filters and not any(fnmatch.fnmatchcase(desc.uri, f) for f in filters):
                        continue
                    for target, arch in targets:
                        lower(desc, target, arch)  # validates the arch now, not mid-build
                        found.add(KernelRequest(
                            desc.uri, target, arch, OP_NAMES[desc.op],
                            desc.int_type.value if desc.int_type else None,
                            desc.float_dtype.value, desc.group_size))
    return sorted(found)


def read_manifest(path: str | Path) -> tuple[list[dict], list[str]]:
    """The selections of a manifest file and its top-level filters.

    Selections are the top level and each ``[[kernels]]`` table, with the keys (all
    optional, scalars or lists) op, int, float, group_size, target and filter. A
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


# --- building -----------------------------------------------------------------------

@dataclass(frozen=True)
class BuildResult:
    request: KernelRequest
    entry: jit.CacheEntry
    seconds: float


def _build_one(request: KernelRequest) -> jit.CacheEntry:
    spec = request.spec()
    source = jit.render_source(spec)
    if request.target == "c":
        return jit.ensure_cpu_binary(spec, source)
    return jit.ensure_cuda_binary(spec, source)


def _worker(request: KernelRequest) -> dict:
    """Run in a worker process: build one kernel; errors come back as plain data."""
    start = time.perf_counter()
    try:
        entry = _build_one(request)
    except (DqgenError, OSError) as exc:
        answer = {"error": type(exc).__name__, "message": str(exc)}
        if isinstance(exc, CompileError):
            answer.update(message=exc.args[0], command=exc.command, log=exc.log,
                          source=exc.source)
        return answer
    return {"entry_dir": str(entry.entry_dir), "key": entry.key, "built": entry.built,
            "files": entry.files, "toolchain": entry.toolchain,
            "source_sha256": entry.source.sha256, "seconds": time.perf_counter() - start}


def _mp_context():
    """fork where it is safe (no other Python thread can hold a lock the child would
    inherit; workers never use OpenMP), else spawn."""
    if "fork" in multiprocessing.get_all_start_methods() and threading.active_count() == 1:
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def _result(request: KernelRequest, data: dict) -> BuildResult:
    """Turn a worker's answer back into a ``CacheEntry`` (the source is rendered here)."""
    spec = request.spec()
    source = jit.render_source(spec)
    if source.sha256 != data["source_sha256"]:
        raise DqgenError(f"{request.label}: a worker rendered a different source than this "
                         "process (did the templates change during the build?)")
    entry = jit.CacheEntry(spec, source, data["key"], Path(data["entry_dir"]), data["built"],
                           data["files"], data["toolchain"])
    return BuildResult(request, entry, data["seconds"])


ProgressFn = Callable[[int, int, KernelRequest, dict], None]


def build(requests: list[KernelRequest], jobs: int = 1,
          progress: ProgressFn | None = None) -> list[BuildResult]:
    """Build every request (through the cache); ``jobs > 1`` uses worker processes.

    All requests are attempted; if any fails, one ``DqgenError`` lists every failure
    (a single failure is re-raised as its own type with its full log).
    """
    jobs = max(1, int(jobs))
    answers: dict[KernelRequest, dict] = {}

    def record(request, data):
        answers[request] = data
        if progress is not None:
            progress(len(answers), len(requests), request, data)

    if jobs == 1 or len(requests) <= 1:
        for request in requests:
            record(request, _worker(request))
    else:
        with futures.ProcessPoolExecutor(max_workers=min(jobs, len(requests)),
                                         mp_context=_mp_context()) as pool:
            pending = {pool.submit(_worker, r): r for r in requests}
            try:
                for fut in futures.as_completed(pending):
                    record(pending[fut], fut.result())
            except BaseException:
                pool.shutdown(wait=False, cancel_futures=True)
                raise
    failures = [(r, answers[r]) for r in requests if "error" in answers[r]]
    if failures:
        if len(failures) == 1:
            request, data = failures[0]
            if data["error"] == "CompileError":
                raise CompileError(f"{request.label}: {data['message']}", command=data["command"],
                                   log=data["log"], source=data["source"])
            cls = getattr(errors, data["error"], None)
            if not (isinstance(cls, type) and issubclass(cls, DqgenError)):
                cls = DqgenError
            raise cls(f"{request.label}: {data['message']}")
        lines = "\n".join(f"  {r.label}: {d['error']}: {d['message'].splitlines()[0]}"
                          for r, d in failures)
        raise DqgenError(f"{len(failures)} of {len(requests)} kernels failed to build:\n{lines}")
    return [_result(r, answers[r]) for r in requests]


def build_bundle(requests: list[KernelRequest], out: str | Path, jobs: int = 1,
                 progress: ProgressFn | None = None) -> tuple[Path, list[BuildResult]]:
    """Build ``requests`` and write them as a bundle at ``out`` (replacing an old bundle
    there); returns the bundle path and the build results."""
    if not requests:
        raise InvalidProblemError("nothing to build: the selection matches no kernel")
    results = build(requests, jobs, progress)
    items = [bundle.BundleItem(r.request.op, r.entry) for r in results]
    return bundle.write_bundle(Path(out), items, __version__), results
