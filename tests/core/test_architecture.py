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
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "dqgen"


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


if __name__ == "__main__":
    g = import_graph()
    for c in cycles(g):
        print(", ".join(c))
        for e in edges_within(g, c):
            print("   ", e)
