"""The templates print the schedule's knobs: none tests a dtype, op, layout, helper or
intrinsic name (the schedule answers such questions with a knob, so a new format or ISA
never needs a template's string compared). Checked on the templates' source."""

from __future__ import annotations

import re

import pytest

from dqgen.render import TEMPLATE_DIR

# The fused linear's templates are checked apart (their own knobs are on their way).
TEMPLATES = sorted(p for p in TEMPLATE_DIR.rglob("*.j2") if not p.name.startswith("linear."))
# A Jinja statement or expression tag, over several lines if need be.
TAG = re.compile(r"\{[%{](.*?)[%}]\}", re.S)
# A string compared, a filter's comparison test, membership in a literal list of names,
# or a name's prefix or suffix tested.
NAME_TEST = re.compile(
    r"""(==|!=)\s*["']"""
    r"""|["']\s*(==|!=)"""
    r"""|\b(select|reject|selectattr|rejectattr)\(\s*(["'][^"']*["']\s*,\s*)?["']"""
    r"""(eq|ne|equalto|sameas|in|==|!=|<|>)["']"""
    r"""|\bin\s*[\[(]\s*["']"""
    r"""|\.(startswith|endswith)\(""")


def name_tests(text: str) -> list[str]:
    """Each Jinja tag of a template's ``text`` that tests a name, with its line number."""
    found = []
    for tag in TAG.finditer(text):
        if NAME_TEST.search(tag.group(1)):
            line = text.count("\n", 0, tag.start()) + 1
            found.append(f"line {line}: {tag.group(0)[:120]}")
    return found


def test_the_templates_are_found():
    names = {p.relative_to(TEMPLATE_DIR).as_posix() for p in TEMPLATES}
    assert {"c/kernel.c.j2", "cuda/kernel.cu.j2", "base.j2", "c/convert.j2"} <= names


@pytest.mark.parametrize("path", TEMPLATES, ids=lambda p: p.relative_to(TEMPLATE_DIR).as_posix())
def test_no_template_tests_a_name(path):
    assert name_tests(path.read_text()) == []


@pytest.mark.parametrize("tag", [
    '{% if kind == "ps512" %}', "{% elif a.role != 'out' %}", '{{ "x" if "f16" == t }}',
    '{% for a in s if a.role == "in" %}',
    '{% set p = spec.params | selectattr("name", "eq", "absmax") | first %}',
    '{% set p = spec.params | selectattr("role", "ne", "scalar") | list %}',
    '{% if types | select("in", ["load_f16", "store_f16"]) | list %}',
    '{% if name in ["q_min", "q_max"] %}', '{% if spec.arch.startswith("avx") %}',
])
def test_the_check_sees_a_name_test(tag):
    assert name_tests(f"text\n{tag}\ntext\n") == [f"line 2: {tag}"]


@pytest.mark.parametrize("tag", [
    '{% for kind, flag in (("streaming", 1), ("cached", 0)) %}', "{% for half in (0, 1) %}",
    '{{ "q_odd" if half else "q_even" }}', '{% if spec.simd_f16 and not spec.tail_mask %}',
    '{{ vector_store(spec.stores.register, "dst", "h") | trim | indent(4) }}',
])
def test_the_check_passes_knobs(tag):
    assert name_tests(f"{tag}\n") == []
