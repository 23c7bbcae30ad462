"""The semantics the code cites live in the repository: every "SPEC.md §N" (or "section
N") names a section of docs/SPEC.md, every relative link of the docs names a file and,
with an anchor, a heading there."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
CITING = [p for d in ("dqgen", "tests", "tools", "templates", "docs") for p in (ROOT / d).rglob("*")
          if p.suffix in {".py", ".j2", ".md", ".sh"} and p.is_file()] + [ROOT / "README.md"]
SECTION = re.compile(r"SPEC\.md (?:§|sections? )([0-9][0-9\-, and]*)")
LINK = re.compile(r"\]\(([^)#\s]*)(?:#([^)\s]+))?\)")


def _sections() -> set[int]:
    text = (DOCS / "SPEC.md").read_text()
    return {int(n) for n in re.findall(r"^## ([0-9]+)\. ", text, flags=re.M)}


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_spec_and_formats_are_in_the_repository():
    assert (DOCS / "SPEC.md").is_file() and (DOCS / "FORMATS.md").is_file()
    assert _sections() >= set(range(1, 8))


def _cited_sections(text: str) -> set[int]:
    found = set()
    for match in SECTION.finditer(text):
        for part in re.split(r",|and", match.group(1)):
            bounds = [int(n) for n in re.findall(r"[0-9]+", part)]
            if len(bounds) == 2:
                found.update(range(bounds[0], bounds[1] + 1))
            found.update(bounds)
    return found


def test_every_cited_section_exists():
    sections, missing = _sections(), []
    for path in CITING:
        for n in _cited_sections(path.read_text(errors="replace")):
            if n not in sections:
                missing.append(f"{path.relative_to(ROOT)}: SPEC.md §{n}")
    assert not missing, missing


def test_citation_parser_sees_ranges_and_lists():
    assert _cited_sections("SPEC.md §3-4, SPEC.md sections 3 and 5") == {3, 4, 5}
    assert _cited_sections("no citation here") == set()


@pytest.mark.parametrize("doc", sorted(p.name for p in DOCS.glob("*.md")) + ["../README.md"])
def test_relative_links_resolve(doc):
    path = (DOCS / doc).resolve()
    broken = []
    for target, anchor in LINK.findall(path.read_text()):
        if "://" in target or target.startswith("mailto:"):
            continue
        dest = (path.parent / target).resolve() if target else path
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", dest.read_text(), flags=re.M)
            if anchor not in {_anchor(h) for h in headings}:
                broken.append(f"{target}#{anchor}")
    assert not broken, broken
