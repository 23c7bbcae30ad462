"""The compiler half of every format: how each descriptor lowers to a ``KernelSpec``, the
shapes of its kernel's arrays, its oracle and its AOT names, one module a format, found
through ``registry.kind_of``. Every module of this package is imported here, and each
format module registers its kind on import: a new format is a new module. Nothing here
imports the user-facing ``dqgen.formats``."""

from __future__ import annotations

import importlib
import pkgutil

from .registry import FormatKind, aot_ops, kind_for_op, kind_of, kinds

# The family first, so its ops lead dqgen aot's list; the rest by name.
for _module in ["family"] + sorted(m.name for m in pkgutil.iter_modules(__path__)
                                   if m.name != "family"):
    importlib.import_module(f"{__name__}.{_module}")

__all__ = ["FormatKind", "aot_ops", "kind_for_op", "kind_of", "kinds"]
