"""From descriptor to a loaded kernel: lower, render, then a bundle, the cache or a build.

This module only sequences the stages; each stage lives in its own module. Bundles
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
from dataclasses import dataclass
from pathlib import Path

import jinja2

from . import bundle, cache, env
from .build import cc
from .errors import CacheError, DqgenError, MissingKernelError, UnsupportedError
from .lower import lower
from .render import Source, render, template_hash
from .runtime.cpu import CpuKernel
from .runtime.cuda import CudaKernel
from .aot_selection import OP_NAMES, command_for_record, make_descriptor
from .spec import KernelSpec
from .version import __version__

ELF_MAGIC = b"\x7fELF"
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
class Kernel:
    """A ready-to-call kernel and the identities that describe it.

    ``origin`` says where the binary came from: ``bundle``, ``cache`` or ``built``.
    """

    spec: KernelSpec
    source: Source
    key: str
    template_hash: str
    entry_dir: Path | None
    compiled: bool
    runner: object
    origin: str = "cache"


@dataclass(frozen=True)
class CacheEntry:
    """A built binary in the disk cache (not loaded), as ``dqgen aot`` copies it."""

    spec: KernelSpec
    source: Source
    key: str
    entry_dir: Path
    built: bool
    files: dict[str, str]      # kind ("so", "ptx", "cubin") -> file name in entry_dir
    toolchain: dict            # compiler identity and flags, for bundle manifests


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


def cpu_cache_key(source: Source, toolchain: cc.Toolchain, isa: str) -> str:
    """Everything that can change the binary: source, compiler, flags, ISA, versions."""
    fields = {
        "cache_format": cache.CACHE_FORMAT, "dqgen": __version__, "target": "c", "isa": isa,
        "source_sha256": source.sha256, "templates": template_hash("c"),
        "compiler": toolchain.identity, "flags": list(toolchain.flags(isa)),
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def cuda_toolchain(arch: str) -> dict:
    """NVRTC's identity and the code-generating flags for ``arch`` (no local paths)."""
    from .build import nvrtc
    return {"compiler": f"nvrtc {nvrtc.nvrtc_version()}", "headers": nvrtc.header_identity(),
            "flags": list(nvrtc.default_options(arch))}


def cuda_cache_key(source: Source, arch: str) -> str:
    """The CUDA counterpart of ``cpu_cache_key``: source, NVRTC version, headers, flags."""
    fields = {
        "cache_format": cache.CACHE_FORMAT, "dqgen": __version__, "target": "cuda",
        "arch": arch, "source_sha256": source.sha256, "templates": template_hash("cuda"),
        **cuda_toolchain(arch),
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


def _persisted_toolchain() -> cc.Toolchain:
    return cc.toolchain(memo=lambda fingerprint, compute: cache.memo_json("cc", fingerprint, compute))


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


def ensure_cpu_binary(spec: KernelSpec, source: Source | None = None,
                      descriptor: dict | None = None) -> CacheEntry:
    """The C kernel's shared object in the cache, compiled only when it is not there
    (``descriptor``: its ``descriptor_record``, kept in the entry's metadata)."""
    source = source or render_source(spec)
    try:
        toolchain = _persisted_toolchain()
    except UnsupportedError as exc:
        if jit_disabled():
            raise missing_kernel(spec, f" (and no C compiler: {exc})", descriptor) from None
        raise
    key = cpu_cache_key(source, toolchain, spec.arch)

    def produce(tmp: Path) -> dict:
        src = tmp / "kernel.c"
        src.write_text(source.text)
        command = cc.compile_shared(toolchain, src, tmp / "kernel.so", spec.arch)
        return {"uri": spec.uri, "entry": spec.entry, "target": "c", "isa": spec.arch,
                "compiler": toolchain.identity, "command": command, "descriptor": descriptor}

    entry, _, built = _ensure(f"c-{spec.arch}", key, spec, produce, ("kernel.so",), descriptor)
    return CacheEntry(spec, source, key, entry, built, {"so": "kernel.so"},
                      {"compiler": toolchain.identity.rsplit("|", 1)[-1],
                       "identity": toolchain.identity, "flags": list(toolchain.flags(spec.arch))})


def ensure_cuda_binary(spec: KernelSpec, source: Source | None = None,
                       descriptor: dict | None = None) -> CacheEntry:
    """The CUDA kernel's PTX (and cubin for ``sm_XX``) in the cache, built by NVRTC only
    when it is not there. Needs NVRTC, not a GPU."""
    from .build import nvrtc
    source = source or render_source(spec)
    try:
        key = cuda_cache_key(source, spec.arch)
    except UnsupportedError as exc:
        if jit_disabled():
            raise missing_kernel(spec, f" (and no NVRTC: {exc})", descriptor) from None
        raise

    def produce(tmp: Path) -> dict:
        art = nvrtc.compile_cuda(source.text, name=spec.uri, arch=spec.arch)
        (tmp / "kernel.cu").write_text(source.text)
        (tmp / "kernel.ptx").write_bytes(art.ptx)
        if art.cubin:
            (tmp / "kernel.cubin").write_bytes(art.cubin)
        return {"uri": spec.uri, "entry": spec.entry, "target": "cuda", "arch": spec.arch,
                **cuda_toolchain(spec.arch), "descriptor": descriptor}

    entry, meta, built = _ensure(f"cuda-{spec.arch}", key, spec, produce, ("kernel.ptx",),
                                 descriptor)
    files = {kind: f"kernel.{kind}" for kind in ("ptx", "cubin")
             if f"kernel.{kind}" in meta.get("files", {})}
    return CacheEntry(spec, source, key, entry, built, files, cuda_toolchain(spec.arch))


def _build_cpu(spec: KernelSpec, desc) -> Kernel:
    hit = ensure_cpu_binary(spec, descriptor=descriptor_record(desc))
    return Kernel(spec, hit.source, hit.key, template_hash("c"), hit.entry_dir, hit.built,
                  CpuKernel(spec, hit.entry_dir / "kernel.so"),
                  origin="built" if hit.built else "cache")


def _asm(source: Source, ptx: bytes | None, cubin: bytes | None) -> dict:
    """The texts behind a CUDA kernel, as Triton's ``asm``: ``cu``, ``ptx``, ``cubin``."""
    asm: dict = {"cu": source.text}
    if ptx:
        asm["ptx"] = ptx.decode(errors="replace")
    if cubin:
        asm["cubin"] = cubin
    return asm


def build_cuda_kernel(spec: KernelSpec, source: Source, descriptor: dict | None = None) -> Kernel:
    """The ``Kernel`` for ``spec`` (target ``cuda``), from the cache or built by NVRTC
    (``descriptor``: its ``descriptor_record``, kept in the cache entry).

    The runner loads the cubin (the PTX for a ``compute_XX`` arch) on first launch, so a
    kernel can be built, inspected and bundled on a machine without a GPU.
    """
    hit = ensure_cuda_binary(spec, source, descriptor)
    ptx = (hit.entry_dir / hit.files["ptx"]).read_bytes() if "ptx" in hit.files else None
    cubin = (hit.entry_dir / hit.files["cubin"]).read_bytes() if "cubin" in hit.files else None
    image = cubin or ptx
    if not image or (spec.arch.startswith("sm_") and not cubin):
        raise CacheError(f"cache entry {hit.entry_dir} holds no "
                         f"{'cubin' if spec.arch.startswith('sm_') else 'PTX'} for {spec.uri}")
    runner = CudaKernel(spec, image, asm=_asm(source, ptx, cubin))
    return Kernel(spec, source, hit.key, template_hash("cuda"), hit.entry_dir, hit.built,
                  runner, origin="built" if hit.built else "cache")


def kernel_from_image(spec: KernelSpec, source: Source, *, image: bytes, key: str,
                      entry_dir: Path | None = None) -> Kernel:
    """A ``Kernel`` around an already built cubin or PTX image (e.g. from a bundle)."""
    is_cubin = image[:4] == ELF_MAGIC
    runner = CudaKernel(spec, image, asm=_asm(source, None if is_cubin else image,
                                              image if is_cubin else None))
    return Kernel(spec, source, key, template_hash("cuda"), entry_dir, False, runner,
                  origin="bundle")


def _build_cuda(spec: KernelSpec, desc) -> Kernel:
    return build_cuda_kernel(spec, render_source(spec), descriptor_record(desc))


def _from_bundles(desc, spec: KernelSpec) -> Kernel | None:
    """The kernel from the first bundle that holds it (a compatible ISA for C), or None.

    A bundled source must equal what this dqgen renders, else the entry is stale and
    skipped with a warning; a binary that fails its hash raises ``BundleError``.
    """
    bundles = bundle.active_bundles()
    if not bundles:
        return None
    for arch in bundle.compatible_archs(spec.target, spec.arch):
        for b in bundles:
            record = b.get(spec.uri, spec.target, arch)
            if record is None:
                continue
            cand = spec if arch == spec.arch else lower(desc, spec.target, arch)
            source = render_source(cand)
            if record.source["sha256"] != source.sha256:
                bundle.warn_stale(b, record)
                continue
            if spec.target == "c":
                if "so" not in record.binaries:
                    continue
                path, _ = b.read_checked(record.binaries["so"])
                return Kernel(cand, source, record.cache_key, record.template_hash,
                              path.parent, False, CpuKernel(cand, path), origin="bundle")
            kind = "cubin" if "cubin" in record.binaries else "ptx"
            if kind not in record.binaries:
                continue
            path, image = b.read_checked(record.binaries[kind])
            return kernel_from_image(cand, source, image=image, key=record.cache_key,
                                     entry_dir=path.parent)
    return None


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
            kernel = _from_bundles(desc, spec)
            if kernel is None:
                if target == "c":
                    kernel = _build_cpu(spec, desc)
                elif target == "cuda":
                    kernel = _build_cuda(spec, desc)
                else:
                    raise UnsupportedError(f"target {target!r} has no runtime here")
            _memo[ident] = kernel
    return kernel

