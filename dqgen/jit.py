"""From descriptor to a loaded kernel: lower, render, key, cache or build, load.

This module only sequences the stages; each stage lives in its own module. Loaded
kernels are memoised per (kernel identity, target, arch) in the process, so a repeated
``select`` costs a dictionary lookup.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from . import __version__, cache
from .build import cc
from .errors import MissingKernelError, UnsupportedError
from .lower import KernelSpec, lower
from .render import Source, render, template_hash
from .runtime.cpu import CpuKernel

_memo: dict[tuple, "Kernel"] = {}
_memo_lock = threading.Lock()
_key_locks: dict[tuple, threading.Lock] = {}


@dataclass(frozen=True)
class Kernel:
    """A ready-to-call kernel and the identities that describe it."""

    spec: KernelSpec
    source: Source
    key: str
    template_hash: str
    entry_dir: Path | None
    compiled: bool
    runner: object


def jit_disabled() -> bool:
    return os.environ.get("DQGEN_DISABLE_JIT", "").strip() not in ("", "0", "false", "no")


def cpu_cache_key(source: Source, toolchain: cc.Toolchain, isa: str) -> str:
    """Everything that can change the binary: source, compiler, flags, ISA, versions."""
    fields = {
        "cache_format": cache.CACHE_FORMAT, "dqgen": __version__, "target": "c", "isa": isa,
        "source_sha256": source.sha256, "templates": template_hash("c"),
        "compiler": toolchain.identity, "flags": list(toolchain.flags(isa)),
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def _persisted_toolchain() -> cc.Toolchain:
    return cc.toolchain(memo=lambda fingerprint, compute: cache.memo_json("cc", fingerprint, compute))


def _build_cpu(spec: KernelSpec) -> Kernel:
    source = render(spec)
    try:
        toolchain = _persisted_toolchain()
    except UnsupportedError:
        if jit_disabled():
            raise MissingKernelError(f"kernel {spec.uri} ({spec.arch}) is not in any bundle and "
                                     "JIT is disabled (DQGEN_DISABLE_JIT)") from None
        raise
    key = cpu_cache_key(source, toolchain, spec.arch)

    def produce(tmp: Path) -> dict:
        if jit_disabled():
            raise MissingKernelError(f"kernel {spec.uri} ({spec.arch}) is not in any bundle or "
                                     "the cache, and JIT is disabled (DQGEN_DISABLE_JIT)")
        src = tmp / "kernel.c"
        src.write_text(source.text)
        command = cc.compile_shared(toolchain, src, tmp / "kernel.so", spec.arch)
        return {"uri": spec.uri, "entry": spec.entry, "target": "c", "isa": spec.arch,
                "compiler": toolchain.identity, "command": command}

    entry, _, built = cache.ensure(f"c-{spec.arch}", key, produce)
    return Kernel(spec, source, key, template_hash("c"), entry, built,
                  CpuKernel(spec, entry / "kernel.so"))


def get_kernel(desc, target: str, arch: str) -> Kernel:
    """The loaded kernel for ``desc`` on ``target``/``arch``, built at most once."""
    ident = (type(desc), desc.uri, target, arch)
    kernel = _memo.get(ident)
    if kernel is not None:
        return kernel
    with _memo_lock:
        lock = _key_locks.setdefault(ident, threading.Lock())
    with lock:
        kernel = _memo.get(ident)
        if kernel is None:
            spec = lower(desc, target, arch)
            if target != "c":
                raise UnsupportedError(f"target {target!r} has no runtime here")
            kernel = _build_cpu(spec)
            _memo[ident] = kernel
    return kernel
