"""Rendering: ``KernelSpec`` -> source text, deterministic byte for byte.

Templates see only the spec (validated enums, integers and fixed strings from the
schedule) and the package version; a missing variable is an error (StrictUndefined).
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

import jinja2

from .spec import KernelSpec
from .targets import backend
from .version import __version__

TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "templates"
if not TEMPLATE_DIR.is_dir():  # installed as a wheel: templates ship inside the package
    TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"


@dataclass(frozen=True)
class Source:
    """Rendered kernel text and what a build needs to know about it."""

    text: str
    language: str
    entry: str
    spec: KernelSpec

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


class _TemplateBytecodeCache(jinja2.FileSystemBytecodeCache):
    """Compiled templates kept in dqgen's private cache dir.

    Compiling the templates costs a new process far more than rendering them; Jinja2
    keys each entry by the template source's checksum and the Python version and writes
    it atomically. A damaged entry is ignored and recompiled, never trusted.
    """

    def load_bytecode(self, bucket: jinja2.bccache.Bucket) -> None:
        try:
            super().load_bytecode(bucket)
        except (OSError, EOFError, ValueError, TypeError):
            bucket.reset()

    def dump_bytecode(self, bucket: jinja2.bccache.Bucket) -> None:
        try:
            super().dump_bytecode(bucket)
        except OSError:
            pass  # an unwritable cache only costs the next process a compile


def _bytecode_cache() -> jinja2.BytecodeCache | None:
    from . import cache
    try:
        directory = cache.private_subdir("templates")
    except Exception:  # any cache problem is reported where kernels are cached
        return None
    return _TemplateBytecodeCache(str(directory))


@functools.lru_cache(maxsize=1)
def template_texts() -> dict[str, str]:
    """Every template file, read once per process.

    Rendering and the template hash both use this one snapshot, so a cache key always
    describes the text that was rendered, and a process that later loses access to the
    checkout (a dropped privilege, a deleted clone) still renders.
    """
    return {path.relative_to(TEMPLATE_DIR).as_posix(): path.read_text(encoding="utf-8")
            for path in sorted(TEMPLATE_DIR.rglob("*.j2"))}


@functools.lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.DictLoader(template_texts()),
        undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
        trim_blocks=True, lstrip_blocks=True, autoescape=False,
        bytecode_cache=_bytecode_cache())
    # a global, so imported macro files see it too: the one spelling of the entry point
    env.globals["entry_signature"] = lambda spec: backend(spec.target).entry_signature(spec)
    # a kernel that contains another's (the fused linear holds its weight's decode)
    env.globals["render_spec"] = lambda spec: render(spec).text
    return env


@functools.lru_cache(maxsize=None)
def template_hash(target: str) -> str:
    """sha256 over every template file a target can use (part of cache keys and SKUs)."""
    digest = hashlib.sha256()
    for rel, text in sorted(template_texts().items()):
        if rel.startswith(f"{target}/") or "/" not in rel:
            digest.update(rel.encode() + b"\0" + text.encode("utf-8") + b"\0")
    return digest.hexdigest()


def reload_templates() -> None:
    """Forget the template snapshot (after the files changed); the next render rereads."""
    template_texts.cache_clear()
    environment.cache_clear()
    template_hash.cache_clear()


def render(spec: KernelSpec) -> Source:
    """Render ``spec`` with its target's template (the family's, or the layout's own
    loop that ``spec.template`` names)."""
    target = backend(spec.target)
    text = environment().get_template(target.template(spec)).render(spec=spec,
                                                                    version=__version__)
    return Source(text=text, language=target.name, entry=spec.entry, spec=spec)
