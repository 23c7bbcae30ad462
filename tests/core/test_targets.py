"""Targets as backends: each target is one object (``dqgen.targets``) answering everything
the pipeline asks of it, and ``jit`` runs one sequence for any of them.

The cache key values are pinned to the fields the keys have always hashed, so existing
caches and bundles stay valid whatever shape the code that computes them takes.
"""

from __future__ import annotations

import ast
import hashlib
import json
from pathlib import Path

import pytest

from dqgen import cache, jit, render, targets
from dqgen.build import cc
from dqgen.errors import UnsupportedError
from dqgen.ir import DequantizePerGroupDescriptor
from dqgen.isa import host_isa
from dqgen.lower import lower
from dqgen.plans import PlanPreference
from dqgen.version import __version__

PACKAGE = Path(jit.__file__).resolve().parent
DESC = DequantizePerGroupDescriptor(2, 128, 64, "bf16", "s8")
TOOLCHAIN = cc.Toolchain(("gcc",), "gcc|/usr/bin/gcc-12|1000|1|gcc (Debian 12.2.0-14) 12.2.0")
CUDA_TOOLCHAIN = {"compiler": "nvrtc 13.0", "headers": "bundled-13.0",
                  "flags": ["--std=c++17", "--fmad=false", "-arch=sm_90"]}


def test_every_target_is_registered_by_name():
    assert targets.names() == ("c", "cuda")
    for name in targets.names():
        backend = targets.backend(name)
        assert backend.name == name and targets.find(name) is backend


@pytest.mark.parametrize("name", ["rocm", "C", "", "metal"])
def test_an_unknown_target_names_itself(name):
    with pytest.raises(UnsupportedError, match=f"target {name!r} is not supported; "
                       "expected 'c' or 'cuda'"):
        targets.backend(name)
    with pytest.raises(UnsupportedError, match=f"target {name!r} is not supported"):
        lower(DESC, name, "generic")
    assert targets.find(name) is None


def test_parse_target_names_backend_and_arch():
    assert targets.parse_target("c:avx2") == ("c", "avx2")
    assert targets.parse_target(" CUDA:SM_90 ") == ("cuda", "sm_90")
    assert targets.parse_target("cuda") == ("cuda", "sm_90")
    assert targets.parse_target("c") == ("c", host_isa())
    with pytest.raises(UnsupportedError, match=r"target 'rocm:gfx90a' is not known; "
                       r"expected c\[:ISA\] or cuda\[:sm_XX\]"):
        targets.parse_target("rocm:gfx90a")
    with pytest.raises(UnsupportedError, match=r"CUDA arch 'sm90' is not of the form sm_XX "
                       r"or compute_XX \(e\.g\. sm_90\)"):
        targets.parse_target("cuda:sm90")


def test_each_backend_checks_its_own_arch():
    targets.backend("c").check_arch("generic")
    targets.backend("cuda").check_arch("compute_80")
    with pytest.raises(UnsupportedError, match="ISA 'sm_90' is not known"):
        targets.backend("c").check_arch("sm_90")
    with pytest.raises(UnsupportedError, match="CUDA arch 'avx2' is not of the form"):
        targets.backend("cuda").check_arch("avx2")


def test_compatible_archs_are_the_backends():
    c = targets.backend("c")
    assert c.compatible_archs("generic") == ["generic"]
    assert c.compatible_archs(host_isa())[-1] == "generic"
    assert targets.backend("cuda").compatible_archs("sm_90") == ["sm_90"]


def test_each_backend_answers_its_cache_key_fields():
    """The fields each target adds to the key, exactly as the keys have always had them."""
    c = targets.backend("c")
    assert c.key_fields(TOOLCHAIN, "avx2") == {
        "isa": "avx2", "compiler": TOOLCHAIN.identity, "flags": list(TOOLCHAIN.flags("avx2"))}
    assert targets.backend("cuda").key_fields(CUDA_TOOLCHAIN, "sm_90") == {
        "arch": "sm_90", **CUDA_TOOLCHAIN}


@pytest.mark.parametrize("name, arch, toolchain, arch_field", [
    ("c", "avx2", TOOLCHAIN, "isa"), ("cuda", "sm_90", CUDA_TOOLCHAIN, "arch")])
def test_cache_keys_hash_the_fields_existing_caches_were_keyed_by(name, arch, toolchain,
                                                                  arch_field):
    """The key is sha256 of the same sorted JSON as before targets were objects, so every
    existing cache entry and bundle is still found."""
    backend = targets.backend(name)
    source = render.render(lower(DESC, name, arch))
    own = ({"compiler": toolchain.identity, "flags": list(toolchain.flags(arch))}
           if name == "c" else dict(toolchain))
    fields = {"cache_format": cache.CACHE_FORMAT, "dqgen": __version__, "target": name,
              arch_field: arch, "source_sha256": source.sha256,
              "templates": render.template_hash(name), **own}
    want = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
    assert jit.cache_key(backend, source, arch, toolchain) == want
    if name == "c":
        assert jit.cpu_cache_key(source, toolchain, arch) == want


def test_templates_and_entry_convention_are_the_backends():
    c, cuda = targets.backend("c"), targets.backend("cuda")
    c_spec, cuda_spec = lower(DESC, "c", "generic"), lower(DESC, "cuda", "sm_90")
    assert c.template(c_spec) == "c/kernel.c.j2" and cuda.template(cuda_spec) == "cuda/kernel.cu.j2"
    assert c.entry_signature(c_spec).endswith(", int32_t num_threads)")
    assert "__restrict__ " in cuda.entry_signature(cuda_spec)
    assert c.prototype(c_spec) == f"void {c.entry_signature(c_spec)};"
    assert cuda.prototype(cuda_spec) == ""  # not in the bundle's C header


def test_schedule_knobs_do_not_overlap():
    c, cuda = targets.backend("c"), targets.backend("cuda")
    assert c.schedule_knobs and cuda.schedule_knobs
    assert not c.schedule_knobs & cuda.schedule_knobs


def test_plans_ask_the_device_s_backend_for_its_arch():
    assert targets.for_device("cpu").name == "c"
    assert targets.for_device("cuda:0").name == "cuda"
    assert targets.for_device("cpu").device_arch("cpu", PlanPreference(isa="generic")) == "generic"


def test_a_c_kernel_carries_its_asm():
    """One record from render to launch: the kernel is loaded from its artifact and
    carries the texts behind it for C as for CUDA."""
    kernel = jit.get_kernel(DESC, "c", "generic")
    assert isinstance(kernel.artifact, jit.Artifact) and kernel.spec is kernel.artifact.spec
    assert kernel.asm["c"] == kernel.source.text and kernel.asm["isa"] == "generic"
    assert kernel.asm["flags"] == kernel.artifact.toolchain["flags"]
    assert kernel.artifact.files == {"so": "kernel.so"}


def _target_branches(path: Path) -> list[str]:
    """Comparisons of a target name with a string literal (``target == "c"``,
    ``spec.target != "cuda"``, ``x.target in ("c", ...)``) in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Compare):
            continue
        operands = [node.left, *node.comparators]
        names = [o for o in operands if (isinstance(o, ast.Name) and o.id == "target")
                 or (isinstance(o, ast.Attribute) and o.attr == "target")]
        literals = [o for o in operands if isinstance(o, ast.Constant) and isinstance(o.value, str)
                    or isinstance(o, (ast.Tuple, ast.List, ast.Set))]
        if names and literals:
            found.append(f"{path.name}:{node.lineno}")
    return found


# The modules that run the pipeline for every target; the schedules in layouts/ pick
# their knobs per target and are not among them.
PIPELINE = ("jit.py", "lower.py", "render.py", "signature.py", "bundle.py", "aot.py",
            "aot_selection.py", "plans.py", "verify.py", "cache.py")


@pytest.mark.parametrize("name", PIPELINE)
def test_the_pipeline_has_no_per_target_branch(name):
    assert _target_branches(PACKAGE / name) == []


def test_the_branch_check_sees_one(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text('def f(spec, target):\n    if target == "c":\n        return 1\n'
                     '    return spec.target in ("cuda",)\n')
    assert _target_branches(probe) == ["probe.py:2", "probe.py:4"]
