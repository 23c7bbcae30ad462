"""The peers' own packers and dequantizers (GPTQModel, AutoGPTQ, AutoAWQ), as oracles.

Installed with ``pip install --no-deps gptqmodel auto-gptq autoawq``; their packages
import transformers/accelerate at the top, which the tests do not install. So each
helper loads only the one source file it needs, straight from the installed package:
GPTQModel's v1 <-> v2 zero conversions and its packer are taken out of
``gptqmodel/utils/model.py`` and ``nn_modules/qlinear/__init__.py`` function by function
(the modules' other imports are heavy), AutoGPTQ's ``QuantLinear``
and AutoAWQ's ``WQLinear_GEMM`` are loaded from their files with placeholder modules for
the names those files import but these code paths never use. A helper skips the test,
naming the reason, when its package is not installed.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import sys
import types
from functools import lru_cache
from pathlib import Path

import pytest


def _package_dir(name: str) -> Path:
    """The installed package's directory, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"{name} is not installed (pip install --no-deps "
                    f"{ {'gptqmodel': 'gptqmodel', 'auto_gptq': 'auto-gptq', 'awq': 'autoawq'}[name] })")
    return Path(list(spec.submodule_search_locations)[0])


@contextlib.contextmanager
def _placeholders(modules: dict[str, types.ModuleType]):
    """``modules`` in sys.modules while a file loads, the previous entries back after."""
    saved = {name: sys.modules.get(name) for name in modules}
    sys.modules.update(modules)
    try:
        yield
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old


def _load(path: Path, name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _module(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    return module


def _transformers_placeholder() -> types.ModuleType:
    """``transformers.pytorch_utils.Conv1D`` is only tested with isinstance."""
    conv1d = type("Conv1D", (), {})
    return _module("transformers", pytorch_utils=types.SimpleNamespace(Conv1D=conv1d))


@lru_cache(maxsize=None)
def gptqmodel_zero_conversions():
    """``(v2_to_v1, v1_to_v2)``: GPTQModel's own ``convert_gptq_v2_to_v1_format_module``
    (what it runs to export v1) and ``convert_gptq_v1_to_v2_format_module`` (what it runs
    on load), each as a function of an int32 torch ``qzeros`` and ``bits``."""
    import torch
    source_path = _package_dir("gptqmodel") / "utils" / "model.py"
    defs = _functions(source_path, {"convert_gptq_v2_to_v1_format_module",
                                    "convert_gptq_v1_to_v2_format_module"})

    class BaseQuantLinear(torch.nn.Module):
        def __init__(self, qzeros, bits):
            super().__init__()
            self.register_buffer("qzeros", qzeros.clone())
            self.bits, self.pack_dtype = bits, torch.int32

        def qzero_format(self, format=None):
            self.format = format

    class Once:
        def once(self, *args, **kwargs):
            pass

    class Log:
        info = Once()

    class QuantizeConfig:
        def __init__(self, bits):
            self.bits, self.pack_dtype = bits, torch.int32

    namespace = {"torch": torch, "nn": torch.nn, "BaseQuantLinear": BaseQuantLinear,
                 "QuantizeConfig": QuantizeConfig, "log": Log(), "Dict": dict, "Optional": None}
    code = compile(ast.Module(body=defs, type_ignores=[]), str(source_path), "exec")
    exec(code, namespace)

    def v2_to_v1(qzeros, bits):
        module = BaseQuantLinear(qzeros, bits)
        namespace["convert_gptq_v2_to_v1_format_module"](module, QuantizeConfig(bits))
        return module.qzeros

    def v1_to_v2(qzeros, bits):
        module = BaseQuantLinear(qzeros, bits)
        namespace["convert_gptq_v1_to_v2_format_module"](module, bits, torch.int32)
        return module.qzeros
    return v2_to_v1, v1_to_v2


def _functions(path: Path, names: set[str], cls: str | None = None) -> list[ast.FunctionDef]:
    """The definitions of ``names`` in ``path`` (methods of ``cls`` when given), without
    their decorators."""
    tree = ast.parse(path.read_text())
    body = tree.body
    if cls is not None:
        body = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls).body
    defs = [n for n in body if isinstance(n, ast.FunctionDef) and n.name in names]
    assert {d.name for d in defs} == names, f"{path} no longer defines {names}"
    for d in defs:
        d.decorator_list = []
    return defs


@lru_cache(maxsize=None)
def gptqmodel_pack():
    """GPTQModel's own packer, ``PackableQuantLinear.pack_original`` (v2 zeros, as it
    keeps them before a v1 export), as ``pack(linear, scales, zeros, g_idx, bits)`` ->
    ``(qweight, qzeros, scales f16, g_idx)`` torch tensors; int32 words."""
    import math

    import numpy as np
    import torch
    path = _package_dir("gptqmodel") / "nn_modules" / "qlinear" / "__init__.py"
    (pack_original,) = _functions(path, {"pack_original"}, "PackableQuantLinear")

    class ThreadpoolCtl:
        @staticmethod
        def threadpool_limits(limits):
            return contextlib.nullcontext()

    namespace = {"t": torch, "nn": torch.nn, "np": np, "math": math,
                 "_ConvNd": torch.nn.modules.conv._ConvNd, "transformers":
                 _transformers_placeholder(), "THREADPOOLCTL": ThreadpoolCtl()}
    exec(compile(ast.Module(body=[pack_original], type_ignores=[]), str(path), "exec"),
         namespace)

    class Packable(torch.nn.Module):
        def __init__(self, bits, g_idx):
            super().__init__()
            self.bits, self.planar, self.maxq = bits, False, (1 << bits) - 1
            self.pack_dtype, self.pack_dtype_bits = torch.int32, 32
            self.pack_factor = 32 // bits
            self.pack_np_dtype, self.pack_np_math_dtype = np.int32, np.uint32
            self.register_buffer("g_idx", g_idx)

    def pack(linear, scales, zeros, g_idx, bits):
        module = Packable(bits, g_idx)
        namespace["pack_original"](module, linear, scales, zeros, g_idx)
        return module.qweight, module.qzeros, module.scales, module.g_idx
    return pack


@lru_cache(maxsize=None)
def autogptq_quant_linear():
    """AutoGPTQ's ``QuantLinear`` (``qlinear_cuda_old``: its ``pack``, and its torch
    dequant in ``forward`` when the CUDA extension is absent)."""
    import logging
    path = _package_dir("auto_gptq") / "nn_modules" / "qlinear" / "qlinear_cuda_old.py"
    logging.getLogger("peer_auto_gptq_qlinear_cuda_old").disabled = True  # "CUDA extension not installed"
    with _placeholders({"transformers": _transformers_placeholder()}):
        return _load(path, "peer_auto_gptq_qlinear_cuda_old").QuantLinear


def autogptq_weight(layer):
    """The [K, N] f16 weight AutoGPTQ's ``QuantLinear.forward`` builds (its torch path,
    taken as it passes to torch.matmul, so nothing else rounds it)."""
    import torch
    from unittest import mock
    seen, matmul = [], torch.matmul

    def spy(x, weight):
        seen.append(weight.clone())
        return matmul(x, weight)
    with mock.patch.object(torch, "matmul", spy), torch.no_grad():
        layer(torch.zeros((1, layer.infeatures), dtype=torch.float16))
    (weight,) = seen
    return weight


@lru_cache(maxsize=None)
def autoawq_gemm():
    """``(WQLinear_GEMM, dequantize_gemm)`` from AutoAWQ's ``modules/linear/gemm.py`` and
    ``utils/packing_utils.py`` (the package ``__init__`` imports transformers)."""
    root = _package_dir("awq")
    packing = _load(root / "utils" / "packing_utils.py", "awq.utils.packing_utils")
    fake = {"awq": _module("awq", __path__=[str(root)]),
            "awq.utils": _module("awq.utils", __path__=[str(root / "utils")]),
            "awq.utils.module": _load(root / "utils" / "module.py", "awq.utils.module"),
            "awq.utils.utils": _module("awq.utils.utils", get_best_device=lambda: "cpu"),
            "awq.utils.packing_utils": packing,
            "awq.modules": _module("awq.modules", __path__=[str(root / "modules")]),
            "awq.modules.triton": None}  # None: "not importable", so no triton path
    with _placeholders(fake):
        gemm = _load(root / "modules" / "linear" / "gemm.py", "peer_awq_gemm")
    return gemm.WQLinear_GEMM, packing.dequantize_gemm
