"""Structure rules of the package that no other test sees.

The stages hand values down (ir -> lower -> render -> build -> cache -> runtime ->
plans): a module that imports one above it, even inside a function, couples the two
both ways and hides the order. These tests parse every module of ``dqgen/`` (imports at
any depth, ``from . import x`` included) and fail on any cycle, naming it, and on a
private name (``_x``) imported from another module: an interface gets a public name.
(A private module, ``formats/_inputs.py``, serves its package's siblings.) Packages are
layered too: the core (the compiler, the format registry in ``layouts/``, the runtime,
plans, cache and bundles) never imports the user-facing layer (``dqgen.formats``,
``api``, ``torch`` and ``torch_nn``, ``cli``, the package's ``__init__``).

``tests/`` mirrors the package (a folder per layer: ``core/``, ``formats/``, ``linear/``,
``torch/``, ``cuda/``, ``reliability/``), so the tests of a module are found by its name:
every module of ``dqgen/`` has a test file whose path names it, or an entry of
``TESTED_IN`` saying which file tests it and why that file is named otherwise.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "dqgen"
TESTS = Path(__file__).resolve().parents[1]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, modules: set) -> set:
    """The ``dqgen`` modules that ``path`` imports, at module or function level."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            # ``from pkg import mod`` imports the submodule when there is one.
            targets = [f"{stem}.{alias.name}" if f"{stem}.{alias.name}" in modules
                       else stem for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports_of(p, modules) for p in paths}


def cycles(graph: dict) -> list:
    """Every strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph[node]):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def edges_within(graph: dict, component: list) -> list:
    members = set(component)
    return [f"{a} -> {b}" for a in component for b in sorted(graph[a]) if b in members]


def test_no_import_cycle():
    graph = import_graph()
    found = cycles(graph)
    assert not found, "import cycles in dqgen/:\n" + "\n".join(
        "  " + ", ".join(c) + "\n    " + "\n    ".join(edges_within(graph, c))
        for c in found)


def test_no_private_name_imported_across_modules():
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    found = []
    for path in paths:
        name = module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.ImportFrom) or not (node.level or
                                                            (node.module or "").startswith("dqgen")):
                continue
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            stem = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                private = alias.name.startswith("_") and not alias.name.startswith("__")
                if private and f"{stem}.{alias.name}" not in modules:
                    found.append(f"{name} imports {alias.name} from {stem}")
    assert not found, "private names imported across modules:\n  " + "\n  ".join(found)


USER_FACING = ("dqgen", "dqgen.api", "dqgen.torch", "dqgen.torch_nn", "dqgen.cli")


def is_user_facing(module: str) -> bool:
    return module in USER_FACING or module.startswith("dqgen.formats")


def layering_violations(graph: dict) -> list:
    return sorted(f"{a} -> {b}" for a, deps in graph.items() if not is_user_facing(a)
                  for b in deps if is_user_facing(b))


def test_core_never_imports_the_user_facing_layer():
    found = layering_violations(import_graph())
    assert not found, "core modules importing the user-facing layer:\n  " + "\n  ".join(found)


def test_layering_check_sees_a_violation():
    graph = {"dqgen.lower": {"dqgen.formats.gptq"}, "dqgen.formats.gptq": {"dqgen.lower"},
             "dqgen.cli": {"dqgen.jit"}}
    assert layering_violations(graph) == ["dqgen.lower -> dqgen.formats.gptq"]


def descriptor_class_tests(path: Path, names: set) -> list:
    """``isinstance(x, <descriptor class>)`` and ``type(x) is/in ...`` over descriptor
    classes in ``path``: what the format registry answers instead."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance":
            classes = node.args[1:2]
            if classes and isinstance(classes[0], ast.Tuple):
                classes = classes[0].elts
            hits = [c.id for c in classes if isinstance(c, ast.Name) and c.id in names]
            if hits:
                found.append(f"{path.name}:{node.lineno} isinstance(..., {', '.join(hits)})")
    return found


def test_no_chain_of_descriptor_classes_outside_the_registry():
    """Formats are looked up in the registry (dqgen/layouts/), never told apart by class."""
    import dqgen.ir as ir
    names = {n for n in dir(ir) if n.endswith("Descriptor")}
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if "layouts" in path.relative_to(PACKAGE).parts or path.name == "ir.py":
            continue
        found += descriptor_class_tests(path, names)
    assert not found, "descriptor classes told apart outside the registry:\n  " + "\n  ".join(found)


def test_descriptor_class_check_sees_one(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f(d):\n    return isinstance(d, (GptqDequantizeDescriptor, int))\n")
    assert descriptor_class_tests(probe, {"GptqDequantizeDescriptor"}) == [
        "probe.py:2 isinstance(..., GptqDequantizeDescriptor)"]


# Modules whose tests are named after what the module serves, not after the module: where
# they are (under tests/), and why. An entry goes once a test file names its module.
TESTED_IN = {
    "arguments.py": ("core/test_argument_errors.py", "its argument order and shapes are what "
                     "every plan runs; the refusals name them"),
    "build/cc.py": ("reliability/test_reliability_environment.py", "the C compiler found, "
                    "missing or misbehaving; its flags: core/test_render.py"),
    "build/nvrtc.py": ("cuda/test_cuda_infra.py", "the CUDA plumbing, NVRTC builds first"),
    "env.py": ("core/test_threads.py", "each DQGEN_* setting is tested where it acts"),
    "layouts/ggml_int8.py": ("linear/test_linear_int8.py", "the int8 linear's GGML decode is "
                             "checked bit for bit there, on every type it reads"),
    "layouts/ggml_reads.py": ("linear/test_linear_int8.py", "the codes and scales the int8 "
                              "dot reads from a GGML block are tested bit for bit there, and its "
                              "word shifts exhaustively"),
    "layouts/family_int8.py": ("linear/test_linear_int8.py", "the int8 linear's decode of the "
                               "family is checked bit for bit there, every storage"),
    "formats/gguf_convert.py": ("formats/ggml/test_gguf_file.py", "GGUF files converted"),
    "formats/pack.py": ("formats/gptq_awq/test_formats_gptq_awq.py", "the GPTQ/AWQ writer of "
                        "the tests' checkpoints, read back bit for bit"),
    "formats/plan.py": ("formats/test_formats_out.py", "every format's plan; out= on all"),
    "formats/progress.py": ("formats/ggml/test_gguf_file.py", "convert's progress lines"),
    "formats/safetensors_io.py": ("formats/convert/test_convert_output.py", "the files "
                                  "convert writes"),
    "formats/weight.py": ("linear/test_linear.py", "QuantizedWeight and linear are the "
                          "fused linear's user side"),
    "formats/weight_readers.py": ("linear/test_linear_formats.py", "each format's weight "
                                  "reader, in the linear"),
    "formats/weight_repack.py": ("linear/test_linear_gptq_awq.py", "GPTQ/AWQ repacked for "
                                 "the linear"),
    "isa.py": ("core/test_cpu_kernels.py", "every kernel on every ISA level of the host"),
    "layouts/family.py": ("core/test_cpu_kernels.py", "the family's four ops"),
    "layouts/ggml_blocks.py": ("formats/ggml/test_formats_gguf_types.py", "every GGML block "
                               "type's table"),
    "layouts/ggml_integers.py": ("linear/test_linear_int8.py", "the int8 linear's GGML rows"),
    "layouts/ggml_knobs.py": ("formats/ggml/test_formats_gguf_types.py", "every GGML block "
                              "type's knobs"),
    "layouts/matrix.py": ("formats/gptq_awq/test_formats_gptq_awq.py", "the GPTQ/AWQ schedule"),
    "layouts/own_loop.py": ("formats/test_fp8.py", "shared by the layouts with a loop of "
                            "their own: fp8, fp4, mlx, bitsandbytes, each tested by name"),
    "layouts/per_group.py": ("core/test_cpu_kernels.py", "the family's schedule, every knob "
                             "on every ISA; its spec: core/test_lower.py"),
    "layouts/registry.py": ("core/test_aot_formats.py", "what every format's kind answers "
                            "(aot, verify); core/test_verify.py"),
    "reference.py": ("core/test_cpu_kernels.py", "the oracle every kernel test compares with"),
    "signature.py": ("core/test_targets.py", "each target's entry convention; the header: "
                     "core/test_aot_bundle.py"),
    "spec.py": ("core/test_lower.py", "the KernelSpec lower makes"),
    "targets/base.py": ("core/test_targets.py", "the Backend every target defines"),
    "targets/c.py": ("core/test_targets.py", "each target's backend, side by side"),
    "torch_nn.py": ("linear/test_torch_linear.py", "QuantLinear and the linear's torch ops"),
    "version.py": ("core/test_cli.py", "the version string (--version); in cache keys: "
                   "reliability/test_reliability_keys.py"),
}


def path_words(path: Path) -> list:
    """The words of a path's folders and file stem (split at ``_``), ``test`` dropped."""
    parts = path.with_suffix("").parts
    return [w for part in parts for w in part.split("_") if w and w != "test"]


def names_module(test: Path, module: Path) -> bool:
    """Whether the test file's path (under tests/) names the module: the module's words
    appear together in it (``aot_selection.py``: ``core/test_aot_selection.py``)."""
    wanted, words = path_words(Path(module.name)), path_words(test)
    return any(words[i:i + len(wanted)] == wanted for i in range(len(words)))


def package_modules() -> list:
    return sorted(p.relative_to(PACKAGE) for p in PACKAGE.rglob("*.py") if p.name != "__init__.py")


def all_test_files() -> list:
    return sorted(p.relative_to(TESTS) for p in TESTS.rglob("test_*.py"))


def modules_without_a_named_test(modules: list, tests: list) -> list:
    return [m for m in modules if not any(names_module(t, m) for t in tests)]


def test_every_module_has_a_test_file_named_after_it():
    missing = [str(m) for m in modules_without_a_named_test(package_modules(), all_test_files())
               if str(m) not in TESTED_IN]
    assert not missing, ("modules of dqgen/ with no test file named after them (add "
                         "tests/<layer>/test_<module>.py, or an entry of TESTED_IN):\n  "
                         + "\n  ".join(missing))


def test_tested_in_names_real_files_and_only_unnamed_modules():
    modules, tests = package_modules(), all_test_files()
    unnamed = {str(m) for m in modules_without_a_named_test(modules, tests)}
    stale = [f"{module}: no such module" for module in TESTED_IN
             if not (PACKAGE / module).is_file()]
    stale += [f"{module}: tests/{test} does not exist"
              for module, (test, _why) in TESTED_IN.items() if not (TESTS / test).is_file()]
    stale += [f"{module}: a test file names it now" for module in TESTED_IN
              if (PACKAGE / module).is_file() and module not in unnamed]
    assert not stale, "stale TESTED_IN entries:\n  " + "\n  ".join(stale)


def test_named_test_check_sees_a_missing_one():
    modules = [Path("lower.py"), Path("aot_selection.py"), Path("formats/gguf_reader.py"),
               Path("targets/c.py"), Path("cache.py")]
    tests = [Path("core/test_lower.py"), Path("core/test_aot.py"),
             Path("formats/ggml/test_gguf_reader.py"), Path("core/test_targets.py"),
             Path("core/test_jit_cache_reuse.py")]
    assert modules_without_a_named_test(modules, tests) == [Path("aot_selection.py"),
                                                            Path("targets/c.py")]


def test_test_file_names_are_unique():
    """Test modules are imported by file name (tests/conftest.py), so two files of one
    name in different folders would shadow each other."""
    seen = {}
    for test in all_test_files():
        seen.setdefault(test.name, []).append(str(test))
    twins = [paths for paths in seen.values() if len(paths) > 1]
    assert not twins, f"test files sharing a name: {twins}"


if __name__ == "__main__":
    g = import_graph()
    for c in cycles(g):
        print(", ".join(c))
        for e in edges_within(g, c):
            print("   ", e)
