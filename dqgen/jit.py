"""From descriptor to a loaded kernel: lower, render, then a bundle, the cache or a build.

This module only sequences the stages, one sequence for every target: whatever differs
between C and CUDA is the target's backend's answer (``dqgen.targets``). Bundles
(``dqgen.bundle``) are searched first, then the disk cache, and only then is the kernel
compiled; ``DQGEN_DISABLE_JIT=1`` forbids that last step. Loaded kernels are memoised per
(kernel identity, target, arch) in the process, so a repeated ``select`` costs a
dictionary lookup.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import jinja2

from . import bundle, cache, env, targets
from .errors import DqgenError, MissingKernelError, UnsupportedError
from .lower import lower
from .render import Source, render, template_hash
from .aot_selection import OP_NAMES, command_for_record, make_descriptor
from .spec import KernelSpec
from .version import __version__

_memo: dict[tuple, "Kernel"] = {}
_memo_lock = threading.Lock()
_key_locks: dict[tuple, threading.Lock] = {}


def _reset_locks_after_fork() -> None:
    # A build in another thread holds its kernel's lock at fork time; in the child that
    # lock would never be released and selecting the same kernel would wait forever.
    global _memo_lock, _key_locks
    _memo_lock = threading.Lock()
    _key_locks = {}


os.register_at_fork(after_in_child=_reset_locks_after_fork)


@dataclass(frozen=True)
class Artifact:
    """A compiled kernel, not loaded: its spec and source, the cache key it was built
    under, and its binary files (``kind`` -> file name in ``entry_dir``: a cache entry's
    ``kernel.so``, ``kernel.ptx``/``kernel.cubin``, or a bundle's). ``built``: compiled
    by this call. ``toolchain``: the compiler identity and flags a bundle records. What
    ``dqgen aot`` copies into a bundle, and what a ``Kernel`` is loaded from.
    """

    spec: KernelSpec
    source: Source
    key: str
    entry_dir: Path | None
    built: bool
    files: dict[str, str]
    toolchain: dict


CacheEntry = Artifact  # the name ``dqgen aot`` and its callers have used


@dataclass(frozen=True)
class Kernel:
    """A ready-to-call kernel: the ``Artifact`` it was loaded from, its runner, where the
    binary came from (``origin``: ``bundle``, ``cache`` or ``built``), the templates'
    hash and ``asm``, the texts behind it as Triton's (C: ``c``, ``isa``, ``flags``;
    CUDA: ``cu``, ``ptx``, ``cubin``).
    """

    artifact: Artifact
    runner: object
    origin: str
    template_hash: str
    asm: dict = field(default_factory=dict)

    @property
    def spec(self) -> KernelSpec:
        return self.artifact.spec

    @property
    def source(self) -> Source:
        return self.artifact.source

    @property
    def key(self) -> str:
        return self.artifact.key

    @property
    def entry_dir(self) -> Path | None:
        return self.artifact.entry_dir

    @property
    def compiled(self) -> bool:
        return self.artifact.built


def jit_disabled() -> bool:
    return env.flag(env.DISABLE_JIT)


def render_source(spec: KernelSpec) -> Source:
    """``render(spec)``, with a target whose template is absent reported as unsupported
    and a text holding NUL characters refused."""
    try:
        source = render(spec)
    except jinja2.TemplateNotFound as exc:
        raise UnsupportedError(f"target {spec.target!r} has no kernel template here "
                               f"(templates/{exc.name} is missing)") from None
    if "\0" in source.text:  # never compile (or key, or bundle) a damaged text
        raise DqgenError(f"the rendered source of {spec.uri} contains NUL characters; "
                         "something in this process overwrote interpreter memory")
    return source


def cache_key(backend, source: Source, arch: str, toolchain) -> str:
    """Everything that can change the binary: the source, the templates, dqgen's and the
    cache's versions, and the target's own fields (its arch or ISA, the compiler's
    identity and flags)."""
    fields = {
        "cache_format": cache.CACHE_FORMAT, "dqgen": __version__, "target": backend.name,
        "source_sha256": source.sha256, "templates": template_hash(backend.name),
        **backend.key_fields(toolchain, arch),
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def descriptor_record(desc) -> dict:
    """``desc`` as JSON (its class and fields), kept in cache entries and bundles so that
    ``dqgen verify`` can rebuild the descriptor of any kernel it finds."""
    return {"class": type(desc).__name__, **desc.to_json()}


def aot_hint(spec: KernelSpec, descriptor: dict | None = None) -> str:
    """The ``dqgen aot`` command that builds ``spec``'s kernel into a bundle, or "" for a
    kernel that command cannot name."""
    if descriptor is not None:
        return command_for_record(descriptor, spec.target, spec.arch)
    try:
        int_dtype = spec.int_dtype.value if spec.int_dtype is not None else None
        desc = make_descriptor(OP_NAMES[spec.op], int_dtype, spec.float_dtype.value,
                               spec.group_size)
    except (KeyError, AttributeError, DqgenError):
        return ""
    if desc.uri != spec.uri:
        return ""
    ints = f" --int {int_dtype}" if int_dtype is not None else ""
    return (f"dqgen aot --op {OP_NAMES[spec.op]}{ints} --float {spec.float_dtype.value} "
            f"--group-size {spec.group_size} --target {spec.target}:{spec.arch} -o BUNDLE")


def missing_kernel(spec: KernelSpec, why: str = "",
                   descriptor: dict | None = None) -> MissingKernelError:
    """The error for a kernel that no bundle or cache entry holds while JIT is disabled."""
    bundles = [str(b.path) for b in bundle.active_bundles()]
    searched = (f"bundles searched: {', '.join(bundles)}" if bundles else
                "no bundle is loaded (set DQGEN_BUNDLE or call dqgen.load_bundle)")
    hint = aot_hint(spec, descriptor)
    return MissingKernelError(
        f"kernel {spec.uri} ({spec.target}:{spec.arch}) is not in any bundle or the cache, "
        f"and JIT is disabled (DQGEN_DISABLE_JIT); {searched}{why}"
        + (f". Build it ahead of time with: {hint}" if hint else ""))


def _ensure(target_dir: str, key: str, spec: KernelSpec, produce,
            required: tuple[str, ...], descriptor: dict | None = None) -> tuple[Path, dict, bool]:
    """``cache.ensure``, except that with JIT disabled only a valid entry is accepted."""
    if jit_disabled():
        entry = cache.entry_dir(target_dir, key)
        meta = cache.check_entry(entry, required)
        if meta is None:
            raise missing_kernel(spec, descriptor=descriptor)
        return entry, meta, False
    return cache.ensure(target_dir, key, produce, required)


def ensure_binary(spec: KernelSpec, source: Source | None = None,
                  descriptor: dict | None = None) -> Artifact:
    """The kernel's binary in the cache, compiled by its target's toolchain only when it
    is not there (``descriptor``: its ``descriptor_record``, kept in the entry's
    metadata). CUDA needs NVRTC, not a GPU."""
    backend = targets.backend(spec.target)
    source = source or render_source(spec)
    try:
        toolchain = backend.toolchain(spec.arch)
        key = cache_key(backend, source, spec.arch, toolchain)
    except UnsupportedError as exc:
        if jit_disabled():
            raise missing_kernel(spec, f" (and no {backend.toolchain_name}: {exc})",
                                 descriptor) from None
        raise

    def produce(tmp: Path) -> dict:
        source_path = tmp / f"kernel.{backend.source_suffix}"
        source_path.write_text(source.text)
        made = backend.build(spec, source_path, toolchain, tmp)
        return {"uri": spec.uri, "entry": spec.entry, "target": backend.name,
                backend.arch_field: spec.arch, **made, "descriptor": descriptor}

    entry, meta, built = _ensure(f"{backend.name}-{spec.arch}", key, spec, produce,
                                 backend.required_files, descriptor)
    files = {kind: f"kernel.{kind}" for kind in backend.binary_kinds
             if f"kernel.{kind}" in meta.get("files", {})}
    return Artifact(spec, source, key, entry, built, files,
                    backend.toolchain_record(toolchain, spec.arch))


def load(artifact: Artifact, origin: str, templates: str,
         binaries: dict[str, bytes] | None = None) -> Kernel:
    """``artifact`` loaded by its target's runner (``binaries``: its files' bytes,
    already hash-checked, when they come from a bundle)."""
    runner, asm = targets.backend(artifact.spec.target).load(artifact, binaries)
    return Kernel(artifact, runner, origin, templates, asm)


def build_kernel(spec: KernelSpec, source: Source | None = None,
                 descriptor: dict | None = None) -> Kernel:
    """The loaded kernel of ``spec``, from the cache or built (``descriptor``: its
    ``descriptor_record``, kept in the cache entry)."""
    artifact = ensure_binary(spec, source, descriptor)
    return load(artifact, "built" if artifact.built else "cache", template_hash(spec.target))


build_cuda_kernel = build_kernel  # the name CUDA callers have used


def _from_bundles(desc, spec: KernelSpec) -> Kernel | None:
    """The kernel from the first bundle that holds it (an arch its target lets stand in
    for ``spec.arch``: a lower ISA level for C), or None.

    A bundled source must equal what this dqgen renders, else the entry is stale and
    skipped with a warning; a binary that fails its hash raises ``BundleError``.
    """
    bundles = bundle.active_bundles()
    if not bundles:
        return None
    backend = targets.backend(spec.target)
    for arch in backend.compatible_archs(spec.arch):
        for b in bundles:
            record = b.get(spec.uri, spec.target, arch)
            if record is None:
                continue
            cand = spec if arch == spec.arch else lower(desc, spec.target, arch)
            source = render_source(cand)
            if record.source["sha256"] != source.sha256:
                bundle.warn_stale(b, record)
                continue
            kind = next((k for k in backend.binary_kinds if k in record.binaries), None)
            if kind is None:
                continue
            path, data = b.read_checked(record.binaries[kind])
            toolchain = record.record.get("toolchain")
            artifact = Artifact(cand, source, record.cache_key, path.parent, False,
                                {kind: path.name}, toolchain if isinstance(toolchain, dict) else {})
            return load(artifact, "bundle", record.template_hash, {kind: data})
    return None


def get_kernel(desc, target: str, arch: str) -> Kernel:
    """The loaded kernel for ``desc`` on ``target``/``arch``, built at most once: lower,
    render, a bundle, else the cache (built if missing), then load."""
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
            kernel = _from_bundles(desc, spec)
            if kernel is None:
                kernel = build_kernel(spec, render_source(spec), descriptor_record(desc))
            _memo[ident] = kernel
    return kernel


# The C target's key and toolchain under the names they had before targets were objects.

def cpu_cache_key(source: Source, toolchain, isa: str) -> str:
    """``cache_key`` of a C kernel built by ``toolchain`` (a ``cc.Toolchain``) for ``isa``."""
    return cache_key(targets.backend("c"), source, isa, toolchain)


def _persisted_toolchain():
    """The C compiler, its version probe kept in the cache."""
    return targets.backend("c").toolchain("")
