"""What every compile target answers: the ``Backend`` a target module defines one of.

The pipeline asks a target's backend, never its name: ``lower`` its arch check and
storage types, ``render`` its templates and entry convention, ``jit`` its toolchain, cache
key fields, build, the files its binary is made of and how they load, ``bundle`` its
header declarations, ``plans`` the arch of a device, ``dqgen verify`` how to run a
binary once. A target is one module of ``dqgen.targets`` defining a ``Backend`` and its
templates under ``templates/<name>/``.
"""

from __future__ import annotations

from pathlib import Path

from ..signature import EntryConvention, entry_signature
from ..spec import KernelSpec


class Backend:
    """One target's answers; a subclass sets the attributes and the methods marked so.

    ``name``: ``KernelSpec.target``, the templates' directory and the first part of
    cache and bundle directories (``<name>-<arch>``). ``syntax``: how ``--target`` names
    it. ``arch_field``: what cache keys and entry metadata call its arch. ``device``: the
    plan device it runs on (``cpu``, ``cuda``). ``source_suffix``: the source file's
    extension (and the templates' middle one). ``storage``: each dtype's C spelling.
    ``convention``: the entry's pointer qualifier and trailing parameters.
    ``binary_kinds``: the files a build makes, by extension, in load preference order;
    ``required_files`` the ones a cache entry must hold; ``executable_kinds`` those a
    bundle writes executable; ``loads_by_path``: the runner opens its binary by path
    (else it takes the image's bytes). ``toolchain_name``: what is missing when
    ``toolchain`` fails. ``schedule_knobs``: the ``KernelSpec`` fields only this target's
    schedule fills (``dqgen emit --ir`` leaves the other targets' out).
    """

    name: str
    syntax: str
    arch_field: str = "arch"
    device: str
    source_suffix: str
    storage: dict
    convention: EntryConvention = EntryConvention()
    binary_kinds: tuple[str, ...]
    required_files: tuple[str, ...]
    executable_kinds: frozenset = frozenset()
    loads_by_path: bool = False
    toolchain_name: str
    schedule_knobs: frozenset = frozenset()

    # --- archs ---------------------------------------------------------------------

    def default_arch(self) -> str:
        """The arch a target named without one means (subclass)."""
        raise NotImplementedError

    def parse_arch(self, text: str) -> str:
        """The arch a ``--target NAME:ARCH`` names ("" for the default)."""
        return text or self.default_arch()

    def check_arch(self, arch: str) -> None:
        """Raise ``UnsupportedError`` naming ``arch`` unless kernels can be lowered for it
        (subclass)."""
        raise NotImplementedError

    def compatible_archs(self, arch: str) -> list[str]:
        """The archs whose bundled kernels may serve a request for ``arch``, best first."""
        return [arch]

    def device_arch(self, device: str, preference) -> str:
        """The arch a plan on ``device`` (``cpu``, ``cuda:N``) runs (subclass)."""
        raise NotImplementedError

    # --- source --------------------------------------------------------------------

    def template(self, spec: KernelSpec) -> str:
        """The template of ``spec``: the family's ``kernel`` or the layout's own loop."""
        return f"{self.name}/{spec.template or 'kernel'}.{self.source_suffix}.j2"

    def entry_signature(self, spec: KernelSpec) -> str:
        return entry_signature(spec, self.convention)

    def prototype(self, spec: KernelSpec) -> str:
        """The C declaration a bundle's header gives the entry ("" when C cannot link
        it)."""
        return ""

    # --- build ---------------------------------------------------------------------

    def toolchain(self, arch: str):
        """The compiler's identity for ``arch``; ``UnsupportedError`` when there is none
        (subclass)."""
        raise NotImplementedError

    def key_fields(self, toolchain, arch: str) -> dict:
        """The cache key's fields this target adds: the arch and the toolchain (subclass)."""
        raise NotImplementedError

    def toolchain_record(self, toolchain, arch: str) -> dict:
        """The toolchain as a bundle manifest records it (subclass)."""
        raise NotImplementedError

    def build(self, spec: KernelSpec, source_path: Path, toolchain, out: Path) -> dict:
        """Compile ``source_path`` into ``out``'s ``kernel.<kind>`` files; return what the
        cache entry's metadata records of the build (subclass)."""
        raise NotImplementedError

    # --- load and run --------------------------------------------------------------

    def load(self, artifact, binaries: dict[str, bytes] | None = None) -> tuple[object, dict]:
        """The runner of ``artifact`` (``jit.Artifact``) and its ``asm`` texts.
        ``binaries``: the files' bytes already read and hash-checked (a bundle's), else
        they are in ``artifact.entry_dir`` (subclass)."""
        raise NotImplementedError

    def unrunnable(self, arch: str) -> str:
        """Why this machine cannot run ``arch``'s binaries ("" when it may)."""
        return ""

    def run_once(self, spec: KernelSpec, binary: Path | bytes, arrays: dict, arguments,
                 scalars, elements: int) -> None:
        """Run a built binary once over host ``arrays`` (``dqgen verify``), writing the
        output in place; ``LookupError`` when this machine cannot (subclass)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<dqgen target {self.name}>"
