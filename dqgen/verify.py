"""``dqgen verify``: run every kernel of a bundle (or of the cache) against the oracle.

Each kernel's descriptor is rebuilt from the record its bundle manifest or cache entry
keeps (``jit.descriptor_record``), given a small problem of its own, and fed random
inputs with the values that matter for bit-exactness (zeros of both signs, subnormals,
infinities, NaN, extreme zero points); its output, written over a filled buffer so that
a skipped element shows, must equal the oracle bit for bit (NaN equals any NaN). The
oracle and the small problem are the format's (``layouts.kind_of``): ``dqgen.reference``
for the family, the formulas of FORMATS.md written out in numpy for GPTQ, AWQ, packed
storage, float zero points and HQQ (sharing no code with the templates), and the
``gguf`` package for GGML blocks. The binary run is the one
on disk (hash-checked), not a rebuild: a damaged or mislabelled kernel is reported, never
hidden.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import bundle as bundle_mod
from . import cache, jit, targets
from .aot import descriptor_from_record
from .errors import DqgenError
from .layouts import kind_of
from .layouts.registry import descriptor_classes
from .lower import lower

OK, MISMATCH, FAILED, SKIPPED = "ok", "mismatch", "could not run", "skipped"
FAILURES = (MISMATCH, FAILED)
FILL = 0x5A  # the output's bytes before a run: an element the kernel skips differs
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


@dataclass(frozen=True)
class Outcome:
    """One kernel's verdict: ``status`` is one of OK, MISMATCH, FAILED, SKIPPED."""

    label: str
    status: str
    detail: str = ""

    @property
    def failed(self) -> bool:
        return self.status in FAILURES

    def __str__(self) -> str:
        return f"{self.status:<13} {self.label}" + (f": {self.detail}" if self.detail else "")


# --- a small problem and its inputs ---------------------------------------------------

def small_problem(record: dict):
    """The descriptor of ``record`` with sizes small enough to check in milliseconds yet
    covering several groups (its format's choice)."""
    desc = descriptor_from_record(record)
    return kind_of(desc).small_problem(
        desc, lambda **sizes: descriptor_from_record(record, **sizes))


def _floats(rng, shape, dtype: np.dtype) -> np.ndarray:
    """Mostly ordinary values, one in eight a special one of the float type."""
    specials = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, 6e-8, 1e-40, 65504.0,
                         3e38], np.float64)
    values = rng.standard_normal(shape) * 4
    pick = rng.random(shape) < 0.125
    values = np.where(pick, rng.choice(specials, shape), values)
    with np.errstate(all="ignore"):
        return values.astype(dtype)


def random_inputs(desc, arguments, rng) -> dict:
    """An array for every argument: inputs random (or what the format needs valid, an
    index table), the output filled with ``FILL``."""
    arrays, kind = {}, kind_of(desc)
    for arg in arguments:
        special = None if arg.is_out else kind.random_input(desc, arg.name, arg.shape, rng)
        if special is not None:
            arrays[arg.name] = special
        elif arg.is_out:
            raw = np.full(math.prod(arg.shape) * arg.dtype.itemsize, FILL, np.uint8)
            arrays[arg.name] = raw.view(arg.dtype).reshape(arg.shape)
        elif arg.dtype.kind == "f" or arg.dtype.name == "bfloat16":
            arrays[arg.name] = _floats(rng, arg.shape, arg.dtype)
        else:  # packed words, block bytes, stored values: any bits
            info = np.iinfo(arg.dtype)
            arrays[arg.name] = rng.integers(info.min, info.max, arg.shape, dtype=arg.dtype,
                                            endpoint=True)
    return arrays


# --- the oracles ----------------------------------------------------------------------

def expected(desc, arrays: dict) -> np.ndarray:
    """What the kernel of ``desc`` must write, from its format's oracle."""
    return kind_of(desc).oracle(desc, arrays)


def first_difference(got: np.ndarray, want: np.ndarray) -> str:
    """"" when equal bit for bit (any NaN equals any NaN), else where and how they differ."""
    if got.shape != want.shape or got.dtype != want.dtype:
        return f"result is {got.dtype} {got.shape}, the oracle's {want.dtype} {want.shape}"
    view = _UINT[got.dtype.itemsize]
    differ = got.view(view) != want.view(view)
    if got.dtype.kind == "f" or got.dtype.name == "bfloat16":
        g, w = got.astype(np.float64), want.astype(np.float64)
        differ &= ~(np.isnan(g) & np.isnan(w))
    if not differ.any():
        return ""
    idx = tuple(int(i) for i in np.argwhere(differ)[0])
    return (f"{int(differ.sum())} of {differ.size} values differ; first at {list(idx)}: "
            f"kernel {got[idx]!r}, oracle {want[idx]!r}")


# --- running one kernel ---------------------------------------------------------------

def check_kernel(record: dict, target: str, arch: str, binary: Path | bytes, label: str,
                 source_sha256: str | None = None, seed: int = 0,
                 stale: str = FAILED) -> Outcome:
    """Run one built kernel (a C shared object's path, or a CUDA image or its path) on
    random inputs and compare with the oracle (its target runs it: ``run_once``). ``source_sha256``: the source it was built from; one
    that differs from what this dqgen renders is reported as ``stale``, not run."""
    from .arguments import arguments as kernel_arguments, launch_elements
    if record is None:
        return Outcome(label, SKIPPED, "no descriptor recorded (built by an older dqgen: "
                       "rebuild it to verify it)")
    if record.get("class") not in descriptor_classes():
        return Outcome(label, SKIPPED, f"no oracle here for {record.get('class')} kernels")
    try:
        desc = small_problem(record)
        spec = lower(desc, target, arch)
    except (DqgenError, TypeError, ValueError, KeyError) as exc:
        return Outcome(label, FAILED, f"its descriptor cannot be rebuilt: {exc}")
    if source_sha256 is not None and jit.render_source(spec).sha256 != source_sha256:
        return Outcome(label, stale, "stale: built from a source that differs from what "
                       "this dqgen emits (so it is never used); rebuild it")
    backend = targets.backend(target)
    why_not = backend.unrunnable(arch)
    if why_not:
        return Outcome(label, SKIPPED, why_not)
    arguments, scalars = kernel_arguments(desc, spec)
    arrays = random_inputs(desc, arguments, np.random.default_rng(seed))
    try:
        want = expected(desc, arrays)
    except LookupError as exc:
        return Outcome(label, SKIPPED, str(exc))
    try:
        backend.run_once(spec, binary, arrays, arguments, scalars, launch_elements(desc))
    except LookupError as exc:
        return Outcome(label, SKIPPED, str(exc))
    except Exception as exc:  # noqa: BLE001 - a damaged binary may fail any way
        return Outcome(label, FAILED, f"could not load or run it: {type(exc).__name__}: {exc}")
    out = next(a.name for a in arguments if a.is_out)
    diff = first_difference(arrays[out], want)
    shape = "x".join(map(str, arrays[out].shape))
    return Outcome(label, MISMATCH, diff) if diff else Outcome(label, OK, f"{shape} bit-exact")


# --- bundles and the cache -----------------------------------------------------------

def verify_bundle(b: bundle_mod.Bundle, seed: int = 0) -> list[Outcome]:
    """Every kernel of bundle ``b``, each file hash-checked before it is loaded."""
    outcomes = []
    for kernel in b.kernels.values():
        label = kernel.describe()
        backend = targets.find(kernel.target)
        if backend is None:
            outcomes.append(Outcome(label, FAILED, f"target {kernel.target!r} is not known "
                                    "here"))
            continue
        kind = next((k for k in backend.binary_kinds if k in kernel.binaries),
                    backend.binary_kinds[-1])
        if kind not in kernel.binaries:
            outcomes.append(Outcome(label, FAILED, f"the manifest lists no {kind} binary"))
            continue
        try:
            path, data = b.read_checked(kernel.binaries[kind])
        except (DqgenError, OSError) as exc:
            outcomes.append(Outcome(label, FAILED, f"could not load it: {exc}"))
            continue
        outcomes.append(check_kernel(kernel.record.get("descriptor"), kernel.target,
                                     kernel.arch, path if backend.loads_by_path else data, label,
                                     kernel.source["sha256"], seed))
    return outcomes


def verify_cache(seed: int = 0) -> list[Outcome]:
    """Every entry of this dqgen version's cache whose files match their hashes (damaged
    entries are reported; the runtime would rebuild them)."""
    outcomes = []
    root = cache.version_dir()
    for meta_path in sorted(root.glob(f"*/??/*/{cache.META}")):
        entry = meta_path.parent
        meta = cache.check_entry(entry, quiet=True)
        label = f"{entry.relative_to(root)}"
        if meta is None:
            outcomes.append(Outcome(label, FAILED, "damaged: its files do not match "
                                    f"{cache.META} (the runtime rebuilds it)"))
            continue
        target = meta.get("target", "")
        backend = targets.find(target)
        if backend is None:
            outcomes.append(Outcome(f"{meta.get('uri', '?')} ({target}) [{entry.name[:12]}]",
                                    FAILED, f"target {target!r} is not known here"))
            continue
        arch = meta.get(backend.arch_field)
        label = f"{meta.get('uri', '?')} ({target}:{arch}) [{entry.name[:12]}]"
        found = [entry / f"kernel.{kind}" for kind in backend.binary_kinds
                 if (entry / f"kernel.{kind}").is_file()]
        source = entry / f"kernel.{backend.source_suffix}"
        if not found or not source.is_file():
            outcomes.append(Outcome(label, FAILED, "the entry holds no binary or source"))
            continue
        sha = cache.sha256_file(source)
        binary = found[0] if backend.loads_by_path else found[0].read_bytes()
        # a stale cache entry is only unused (its key no longer comes up), not wrong
        outcomes.append(check_kernel(meta.get("descriptor"), target, arch, binary, label,
                                     sha, seed, stale=SKIPPED))
    return outcomes
