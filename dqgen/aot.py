"""Ahead-of-time builds: enumerate kernels, build them in parallel, write a bundle.

What a selection (flags or a manifest, TOML or JSON) names is ``dqgen.aot_selection``'s job
(re-exported here): the ops are the family's four and the checkpoint formats (``gptq``,
``awq``, ``ggml``, ``packed``, ``floatzp``, ``hqq``). Builds go through the disk cache
exactly as JIT builds do (``jit.ensure_binary``, for any target), in
worker processes for ``jobs > 1``; the results are copied into a bundle by
``bundle.write_bundle``.
"""

from __future__ import annotations

import concurrent.futures as futures
import multiprocessing
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import bundle, errors, jit
from .errors import CompileError, DqgenError, InvalidProblemError
from .version import __version__

# The selection's names, which ``dqgen.aot`` has always offered.
from .aot_selection import (  # noqa: F401
    OPS, OP_NAMES, FORMAT_OPS, ALL_OPS, DEFAULT_CUDA_ARCH, DEFAULTS, FORMAT_DEFAULTS,
    OP_DEFAULTS, SELECTION_KEYS, KernelRequest, command_for_record, descriptor_from_record,
    enumerate_kernels, expand, ggml_types, make_descriptor, narrow, op_class, parse_target,
    read_manifest, request_of)

# --- building -----------------------------------------------------------------------

@dataclass(frozen=True)
class BuildResult:
    request: KernelRequest
    entry: jit.Artifact
    seconds: float


descriptor_record = jit.descriptor_record  # the JSON that descriptor_from_record reads


def _build_one(request: KernelRequest) -> jit.Artifact:
    spec = request.spec()
    return jit.ensure_binary(spec, jit.render_source(spec),
                             descriptor=descriptor_record(request.descriptor()))


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
    """Turn a worker's answer back into an ``Artifact`` (the source is rendered here)."""
    spec = request.spec()
    source = jit.render_source(spec)
    if source.sha256 != data["source_sha256"]:
        raise DqgenError(f"{request.label}: a worker rendered a different source than this "
                         "process (did the templates change during the build?)")
    entry = jit.Artifact(spec, source, data["key"], Path(data["entry_dir"]), data["built"],
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
    items = [bundle.BundleItem(r.request.op, r.entry,
                               descriptor_record(r.request.descriptor())) for r in results]
    return bundle.write_bundle(Path(out), items, __version__), results
