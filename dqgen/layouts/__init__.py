"""The compiler half of every format: how each descriptor lowers to a ``KernelSpec``, the
shapes of its kernel's arrays, its oracle and its AOT names, one module a format, found
through ``registry.kind_of``. The per-group family (``family``, with packed storage),
float zero points (``floatzp``), HQQ (``hqq``), GPTQ (``gptq``), AWQ (``awq``) and GGML
blocks (``ggml``, its block data in ``ggml_blocks``). Nothing here imports the
user-facing ``dqgen.formats``."""

from __future__ import annotations

from . import awq, family, floatzp, ggml, gptq, hqq  # noqa: F401  (each registers its kind)
from .registry import FormatKind, kind_of, kinds

__all__ = ["FormatKind", "kind_of", "kinds"]
