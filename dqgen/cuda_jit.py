"""CUDA kernels: NVRTC build, cached per arch, wrapped as a launchable ``CudaKernel``.

Building needs NVRTC only (no GPU, no driver): ``dqgen.jit.ensure_cuda_binary`` renders,
keys (source sha256, NVRTC version, code-generating flags, header identity, arch, dqgen
version, template hash) and compiles into the cache, leaving ``kernel.cu``,
``kernel.ptx`` and, for ``sm_XX``, ``kernel.cubin``. Loading onto a device happens on the
first launch, so a kernel can be built, inspected and bundled on a machine without a GPU.
"""

from __future__ import annotations

from pathlib import Path

from .errors import CacheError
from .lower import KernelSpec
from .render import Source, template_hash
from .runtime.cuda import CudaKernel

ELF_MAGIC = b"\x7fELF"


def _asm(source: Source, ptx: bytes | None, cubin: bytes | None) -> dict:
    """The texts behind a kernel, as Triton's ``asm``: ``cu``, ``ptx``, ``cubin``."""
    asm: dict = {"cu": source.text}
    if ptx:
        asm["ptx"] = ptx.decode(errors="replace")
    if cubin:
        asm["cubin"] = cubin
    return asm


def build_cuda_kernel(spec: KernelSpec, source: Source, descriptor: dict | None = None):
    """The ``Kernel`` for ``spec`` (target ``cuda``), from the cache or built by NVRTC
    (``descriptor``: its ``jit.descriptor_record``, kept in the cache entry).

    The runner loads the cubin (the PTX for a ``compute_XX`` arch) on first launch.
    """
    from .jit import Kernel, ensure_cuda_binary  # jit imports this module lazily
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
                      entry_dir: Path | None = None):
    """A ``Kernel`` around an already built cubin or PTX image (e.g. from a bundle)."""
    from .jit import Kernel
    is_cubin = image[:4] == ELF_MAGIC
    runner = CudaKernel(spec, image, asm=_asm(source, None if is_cubin else image,
                                              image if is_cubin else None))
    return Kernel(spec, source, key, template_hash("cuda"), entry_dir, False, runner,
                  origin="bundle")
