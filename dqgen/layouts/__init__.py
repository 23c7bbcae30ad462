"""The compiler half of every format: how each descriptor lowers to a ``KernelSpec``, the
shapes of its kernel's arrays, its oracle and its AOT names, one module a format, found
through ``registry.kind_of``. The per-group family (``family``, with packed storage),
float zero points (``floatzp``), HQQ (``hqq``), GPTQ (``gptq``), AWQ (``awq``) and GGML
blocks (``ggml``, its block data in ``ggml_blocks``). Nothing here imports the
user-facing ``dqgen.formats``."""

from __future__ import annotations

# each registers its kind; the family first, so its ops lead dqgen aot's list
from . import family, gptq, awq, ggml, floatzp, hqq  # noqa: F401  isort: skip
from .registry import FormatKind, aot_ops, kind_for_op, kind_of, kinds

__all__ = ["FormatKind", "aot_ops", "kind_for_op", "kind_of", "kinds"]
