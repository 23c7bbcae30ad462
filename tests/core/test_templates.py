"""The templates print the schedule's knobs: none tests a dtype, op, layout, helper or
intrinsic name (the schedule answers such questions with a knob, so a new format or ISA
never needs a template's string compared), and none glues C text from string fragments
with Jinja's ``~`` (the C a template emits is written out in it, values printed into it,
so it can be read there). Checked on the templates' source."""

from __future__ import annotations

import re

import jinja2
import pytest

from dqgen.render import TEMPLATE_DIR

TEMPLATES = sorted(TEMPLATE_DIR.rglob("*.j2"))
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


# Where a `~` stays, and why: the tag it is in, by template (none today).
CONCATENATION_KEPT: dict[str, list[str]] = {}
CONCATENATION_CHECKED = sorted(TEMPLATE_DIR.rglob("*.j2"))


def concatenations(text: str) -> list[str]:
    """Each Jinja tag of a template's ``text`` that joins strings with ``~`` (Jinja's own
    lexer tells the operator from C's ``~`` in the text and in string literals), as
    ``line N: tag``."""
    found, tag, line, joins = [], [], 0, False
    for lineno, kind, value in jinja2.Environment().lex(text):
        if kind in ("variable_begin", "block_begin"):
            tag, line, joins = [], lineno, False
        tag.append(value)
        joins = joins or (kind == "operator" and value == "~")
        if kind in ("variable_end", "block_end") and joins:
            found.append(f"line {line}: {''.join(tag)}")
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


@pytest.mark.parametrize("path", CONCATENATION_CHECKED, ids=lambda p: p.relative_to(TEMPLATE_DIR).as_posix())
def test_no_template_glues_c_text(path):
    name = path.relative_to(TEMPLATE_DIR).as_posix()
    kept = CONCATENATION_KEPT.get(name, [])
    assert [t for t in concatenations(path.read_text()) if t.split(": ", 1)[1] not in kept] == []


def test_each_kept_concatenation_is_still_there():
    for name, tags in CONCATENATION_KEPT.items():
        found = [t.split(": ", 1)[1] for t in concatenations((TEMPLATE_DIR / name).read_text())]
        assert sorted(found) == sorted(tags), name


@pytest.mark.parametrize("tag", [
    '{{ "load" ~ spec.register_lanes ~ "(q + " ~ i ~ ")" }}',
    '{% set v = "(" ~ v ~ " - " ~ f.offset ~ ")" if f.offset else v %}',
    '{{ dst(i, diff(i)~" * s") }}',
    '{{ base.header(spec, version, "/*", "*/", "blocks of " ~ k.block\n ~ " values") }}',
])
def test_the_check_sees_a_concatenation(tag):
    assert concatenations(f"text\n{tag}\ntext\n") == [f"line 2: {tag}"]


@pytest.mark.parametrize("text", [
    "const int64_t pairs_end = begin + ((end - begin) & ~(int64_t)1);",
    "load_f16_n({{ src }}, {{ dst }}, ({{ n }}) & ~(int64_t)7);",
    '{{ "x & ~7" if spec.packed_q }}', "{% set at %}({{ s_row }} + n0){% endset %}",
    '{{ pointers | map(attribute="name") | join(", ") }}',
])
def test_the_check_passes_printed_c(text):
    assert concatenations(f"{text}\n") == []
