"""The CUDA target: CUDA C++ built by NVRTC into PTX (and a cubin for ``sm_XX``),
launched through the driver API. Building needs NVRTC, not a GPU."""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import CacheError, UnsupportedError
from ..runtime import cuda as cuda_runtime
from ..signature import EntryConvention
from ..spec import CUDA_STORAGE, KernelSpec
from .base import Backend

DEFAULT_ARCH = "sm_90"
# KernelSpec fields only the CUDA schedule fills and reads: the launch shape, the vector
# streams, the CUDA headers.
SCHEDULE_KNOBS = frozenset({
    "threads_per_block", "vector_bytes", "vector_elems", "vector_streams",
    "vector_align_check", "grid_waves", "group_per_element", "cuda_float_headers",
    "int_to_compute", "int_diff_type", "int_diff_bits"})


# what a ``--target cuda:ARCH`` may name (lowering takes any sm_/compute_ number)
TARGET_ARCH = re.compile(r"^(sm|compute)_\d{2,3}[af]?$")


class CudaBackend(Backend):
    name = "cuda"
    syntax = "cuda[:sm_XX]"
    arch_field = "arch"
    device = "cuda"
    source_suffix = "cu"
    storage = CUDA_STORAGE
    # no aliasing promised, so loads may go through the read-only cache
    convention = EntryConvention("__restrict__ ", ())
    binary_kinds = ("cubin", "ptx")
    required_files = ("kernel.ptx",)
    toolchain_name = "NVRTC"
    schedule_knobs = SCHEDULE_KNOBS

    def default_arch(self) -> str:
        return DEFAULT_ARCH

    def parse_arch(self, text: str) -> str:
        arch = text or DEFAULT_ARCH
        if not TARGET_ARCH.match(arch):
            raise UnsupportedError(f"CUDA arch {arch!r} is not of the form sm_XX or compute_XX "
                                   "(e.g. sm_90)")
        return arch

    def check_arch(self, arch: str) -> None:
        if not (arch.startswith(("sm_", "compute_")) and arch.split("_", 1)[1].isdigit()):
            raise UnsupportedError(f"CUDA arch {arch!r} is not of the form sm_XX or compute_XX")

    def device_arch(self, device: str, preference) -> str:
        """The device's own arch (``preference.isa``/``num_threads`` are CPU knobs)."""
        return cuda_runtime.device_arch(int(device.partition(":")[2] or 0))

    def toolchain(self, arch: str) -> dict:
        """NVRTC's identity and the code-generating flags for ``arch`` (no local paths)."""
        from ..build import nvrtc
        return {"compiler": f"nvrtc {nvrtc.nvrtc_version()}", "headers": nvrtc.header_identity(),
                "flags": list(nvrtc.default_options(arch))}

    def key_fields(self, toolchain: dict, arch: str) -> dict:
        return {"arch": arch, **toolchain}

    def toolchain_record(self, toolchain: dict, arch: str) -> dict:
        return dict(toolchain)

    def build(self, spec: KernelSpec, source_path: Path, toolchain: dict, out: Path) -> dict:
        from ..build import nvrtc
        art = nvrtc.compile_cuda(source_path.read_text(), name=spec.uri, arch=spec.arch)
        (out / "kernel.ptx").write_bytes(art.ptx)
        if art.cubin:
            (out / "kernel.cubin").write_bytes(art.cubin)
        return dict(toolchain)

    def load(self, artifact, binaries: dict[str, bytes] | None = None) -> tuple[object, dict]:
        """The image (cubin, else PTX the driver compiles) loaded on first launch, so a
        kernel can be built, inspected and bundled on a machine without a GPU. A cache
        entry for a real ``sm_XX`` arch must hold its cubin."""
        spec = artifact.spec
        from_entry = binaries is None
        if from_entry:
            binaries = {kind: (artifact.entry_dir / name).read_bytes()
                        for kind, name in artifact.files.items()}
        cubin, ptx = binaries.get("cubin"), binaries.get("ptx")
        image = cubin or ptx
        if from_entry and (not image or (spec.arch.startswith("sm_") and not cubin)):
            raise CacheError(f"cache entry {artifact.entry_dir} holds no "
                             f"{'cubin' if spec.arch.startswith('sm_') else 'PTX'} for {spec.uri}")
        asm = self.asm(artifact.source.text, ptx, cubin)
        return cuda_runtime.CudaKernel(spec, image, asm=asm), asm

    @staticmethod
    def asm(text: str, ptx: bytes | None, cubin: bytes | None) -> dict:
        """The texts behind a CUDA kernel, as Triton's ``asm``: ``cu``, ``ptx``, ``cubin``."""
        asm: dict = {"cu": text}
        if ptx:
            asm["ptx"] = ptx.decode(errors="replace")
        if cubin:
            asm["cubin"] = cubin
        return asm

    def run_once(self, spec: KernelSpec, binary: Path | bytes, arrays: dict, arguments,
                 scalars, elements: int) -> None:
        """On this machine's CUDA device, through torch (which allocates and copies)."""
        import numpy as np
        rt = cuda_runtime
        if not rt.cuda_available():
            raise LookupError(f"no CUDA device ({rt.cuda_unavailable_reason()})")
        if rt.device_arch(0) != spec.arch and not spec.arch.startswith("compute_"):
            raise LookupError(f"built for {spec.arch}; this device is {rt.device_arch(0)}")
        try:
            import torch
        except ImportError:
            raise LookupError("running a CUDA kernel here needs torch with CUDA") from None
        image = binary.read_bytes() if isinstance(binary, Path) else binary
        tensors = {}
        for arg in arguments:
            raw = np.ascontiguousarray(arrays[arg.name]).view(np.uint8)
            tensors[arg.name] = torch.from_numpy(raw.copy()).to("cuda:0")
        kernel = rt.CudaKernel(spec, image)
        kernel.launch([tensors[a.name].data_ptr() for a in arguments] + list(scalars),
                      elements, 0)
        torch.cuda.synchronize()
        for arg in arguments:
            if arg.is_out:
                arrays[arg.name][...] = tensors[arg.name].cpu().numpy().view(
                    arg.dtype).reshape(arg.shape)


BACKEND = CudaBackend()
