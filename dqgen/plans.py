"""The public Plan classes (SPEC.md §5): select once, check and run many times.

Plans only glue stages together: the descriptor validates, ``jit`` lowers, renders,
builds or loads, and the runtime launches. No code generation happens here.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar

import numpy as np

from . import env, targets
from .arguments import arguments, launch_elements
from .arrays import check_array, check_no_overlap, shape_of, to_numpy
from .errors import UnsupportedError
from .ir import (DequantizePerGroupBackwardDescriptor, DequantizePerGroupDescriptor,
                 QuantizePerGroupBackwardDescriptor, QuantizePerGroupDescriptor)
from .jit import Kernel, get_kernel
from .runtime import cpu as cpu_runtime
from .runtime import cuda as cuda_runtime
from .runtime.cpu import num_threads
from .version import __version__


@dataclass(frozen=True)
class PlanPreference:
    """Optional choices a caller may make; ``None`` means dqgen decides."""

    num_threads: int | None = None
    isa: str | None = None


@dataclass(frozen=True)
class PrecisionGuarantee:
    math_precision: str
    accumulator: str
    deterministic: bool
    bit_stable: bool


def precision_of(kernel: Kernel) -> PrecisionGuarantee:
    """Every dqgen kernel computes in its compute type with one rounding per operation and
    no reduction, so it is deterministic and bit-stable across runs and thread counts."""
    compute = kernel.spec.compute_dtype.value
    return PrecisionGuarantee(math_precision=compute, accumulator=compute,
                              deterministic=True, bit_stable=True)


@dataclass(frozen=True)
class KernelSku:
    """A kernel's identity: stable across processes, printable."""

    op: str
    uri: str
    int_dtype: str | None
    float_dtype: str
    group_size: int
    target: str
    arch: str
    template_hash: str
    cache_key: str
    dqgen_version: str

    def __str__(self) -> str:
        dtypes = f"{self.int_dtype}->{self.float_dtype}" if self.int_dtype else self.float_dtype
        return (f"{self.uri} [{self.op} {dtypes} g{self.group_size}] on {self.target}:{self.arch} "
                f"key={self.cache_key[:16]} templates={self.template_hash[:12]} dqgen={self.__dict__['dqgen_version']}")


# A plan's arguments: plain records (a frozen one costs three times as much to build,
# and a plain function builds one every call).
@dataclass
class DequantizePerGroupArgs:
    input: Any
    scale: Any
    zero_point: Any
    output: Any


@dataclass
class QuantizePerGroupArgs:
    input: Any
    scale: Any
    zero_point: Any
    output: Any


@dataclass
class DequantizePerGroupBackwardArgs:
    d_output: Any
    scale: Any
    d_input: Any


@dataclass
class QuantizePerGroupBackwardArgs:
    d_output: Any
    input: Any
    scale: Any
    zero_point: Any
    d_input: Any


def parse_device(device: str) -> str:
    """``cpu`` or ``cuda:N`` (``cuda`` means ``cuda:0``; a torch.device works too)."""
    text = str(device).strip().lower()
    if text == "cpu":
        return "cpu"
    if text == "cuda" or text.startswith("cuda:"):
        index = text[5:] if text.startswith("cuda:") else "0"
        if not index.isdigit():
            raise UnsupportedError(f"device={device!r}: expected 'cuda' or 'cuda:N' with N a "
                                   "device number")
        return f"cuda:{int(index)}"
    raise UnsupportedError(f"device={device!r} is not supported; expected 'cpu' or 'cuda[:N]'")


# Plans are immutable once built, so a repeated select returns the same object.
# Bounded: plain functions select a plan per shape, and shapes may be unbounded.
_plan_memo: dict[tuple, object] = {}
_PLAN_MEMO_LIMIT = 4096


def memoized_select(cls, desc, device, preference):
    """The plan ``cls.select`` returns: the one memoised under the descriptor, device,
    preference and the environment knobs that change the kernel or its threads, else
    ``cls._build(...)`` (which validates), remembered for next time."""
    try:
        key = (cls, desc, device, preference, env.text(env.ISA), env.text(env.NUM_THREADS))
        plan = _plan_memo.get(key)
    except TypeError:  # a field forced to an unhashable value: validate() names it
        key, plan = None, None
    if plan is None:
        plan = cls._build(desc, device, preference)
        if key is not None:
            if len(_plan_memo) >= _PLAN_MEMO_LIMIT:  # many shapes: start over, stay bounded
                _plan_memo.clear()
            _plan_memo[key] = plan
    return plan


class Plan:
    """What every plan shares, the family's and the checkpoint formats': ``select`` once
    (validate, then ``get_kernel`` for this CPU's ISA or the CUDA device's arch), then
    ``can_implement``/``run`` many times over the arguments of the kernel's parameter
    list (``arguments.arguments``: one order and one table of shapes for all)."""

    def __init__(self, desc, device: str, preference: PlanPreference, kernel: Kernel) -> None:
        self.descriptor = desc
        self.device = device
        self.preference = preference
        self._kernel = kernel
        self._threads = num_threads(preference.num_threads)
        self._ordinal = int(device[5:]) if device.startswith("cuda:") else None
        self.arguments, self._scalars = arguments(desc, kernel.spec)
        self._elements = launch_elements(desc)
        names = self._argument_names()
        # (name the caller's arguments use, numpy dtype, shape, is output) in the kernel's
        # parameter order; the dtype object numpy arrays carry, so run() tests it by identity
        self._layout = tuple((names[i], np.empty(0, a.dtype).dtype, a.shape, a.is_out)
                             for i, a in enumerate(self.arguments))
        self._out_index = next(i for i, item in enumerate(self._layout) if item[3])
        self._in_indices = tuple(i for i, item in enumerate(self._layout) if not item[3])
        self._pointers = None  # ArgumentPointers, made at the first CPU run

    def _argument_names(self) -> list[str]:
        """What the caller's arguments are called, in the kernel's parameter order."""
        return [a.name for a in self.arguments]

    @classmethod
    def select(cls, desc, device: str = "cpu", preference: PlanPreference | None = None):
        """Validate ``desc`` and return a plan with its kernel built or loaded: for the
        CPU, or for ``cuda[:N]`` the cubin of that device's architecture (a repeated
        select returns the same plan)."""
        return memoized_select(cls, desc, device, preference)

    def _launch_cpu(self, get, args, caller=None) -> None:
        """Run the CPU kernel over the arrays ``get(args, name)`` gives, in kernel order;
        the GIL is released.

        The checks are ``can_implement``'s, written for the common case (numpy arrays that
        fit, each owning its memory) so a reused plan costs a few microseconds; anything
        else takes ``can_implement``, which raises naming the problem.
        """
        remembered = self._pointers
        if remembered is None:
            remembered = self._pointers = cpu_runtime.ArgumentPointers(self._kernel.runner,
                                                                       len(self._layout))
        slots = remembered.slots
        pointers = []
        arrays = []
        i = 0
        # Arrays whose memory belongs to distinct arrays (themselves, or the base of a view
        # that owns its memory) cannot overlap; anything else (a view of a view, two views
        # of one array, a repeated array) takes the exact overlap check.
        all_own = True
        owners = []
        for name, dtype, shape, is_out in self._layout:
            arr = get(args, name)
            # carray: C-contiguous, aligned and writeable (a read-only input takes the
            # full check, which accepts it)
            if not (type(arr) is np.ndarray and arr.dtype is dtype and arr.shape == shape
                    and (flags := arr.flags).carray):
                self.can_implement(args, caller)
                arr = to_numpy(arr, name)
                flags = arr.flags
            if flags.owndata:
                owners.append(arr)
            else:
                base = arr.base
                if type(base) is np.ndarray and base.flags.owndata:
                    owners.append(base)
                else:
                    all_own = False
            ref, pointer = slots[i]
            if ref() is not arr:
                pointer = remembered.remember(i, arr)
            pointers.append(pointer)
            arrays.append(arr)
            i += 1
        if all_own:
            out = owners[self._out_index]
            for i in self._in_indices:
                if owners[i] is out:
                    all_own = False
        if not all_own:  # every array already checked above: only the overlap is left
            self._check_overlap(arrays, caller)
        if self._elements:
            threads = 1 if cpu_runtime.forked_child else self._threads
            self._kernel.runner.function(*pointers, *self._scalars, threads)

    def _check_overlap(self, arrays: list, caller=None) -> None:
        """The output must not share memory with an input (kernels are not in-place)."""
        names = [item[0] for item in self._layout]
        out = self._out_index
        check_no_overlap(arrays[out], names[out], {names[i]: arrays[i] for i in self._in_indices})

    @classmethod
    def _build(cls, desc, device, preference):
        desc.validate()
        preference = preference or PlanPreference()
        target_device = parse_device(device)
        target = targets.for_device(target_device)  # the device's target answers its arch
        kernel = get_kernel(desc, target.name, target.device_arch(target_device, preference))
        return cls(desc, target_device, preference, kernel)

    def workspace_size(self) -> int:
        """Bytes of scratch memory: none for any dqgen kernel."""
        return 0

    def precision_guarantee(self) -> PrecisionGuarantee:
        return precision_of(self._kernel)

    def _sku_op(self) -> str:
        return self._kernel.spec.op.name.lower()

    def sku(self) -> KernelSku:
        k = self._kernel
        s = k.spec
        return KernelSku(op=self._sku_op(), uri=s.uri,
                         int_dtype=s.int_dtype.value if s.int_dtype else None,
                         float_dtype=s.float_dtype.value, group_size=s.group_size,
                         target=s.target, arch=s.arch, template_hash=k.template_hash,
                         cache_key=k.key, dqgen_version=__version__)

    def source(self) -> str:
        """The exact source text of the kernel this plan runs."""
        return self._kernel.source.text

    @property
    def kernel(self) -> Kernel:
        """The loaded kernel this plan runs (spec, source, cache key, where it came from)."""
        return self._kernel

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.descriptor}, device={self.device!r})"


class _PerGroupPlan(Plan):
    """The family's plans: arguments as a dataclass (``args_type``), whose fields follow
    the kernel's parameters; subclasses name their descriptor and argument types."""

    descriptor_type: ClassVar[type]
    args_type: ClassVar[type]

    def _argument_names(self) -> list[str]:
        return [f.name for f in fields(self.args_type)]  # the dataclass follows the kernel

    @classmethod
    def select(cls, desc, device: str = "cpu", preference: PlanPreference | None = None):
        """Validate ``desc`` and return a plan with its kernel built or loaded."""
        if type(desc) is not cls.descriptor_type:
            raise UnsupportedError(f"{cls.__name__}.select needs a {cls.descriptor_type.__name__}, "
                                   f"got {type(desc).__name__}")
        return memoized_select(cls, desc, device, preference)

    def _check_args_type(self, args) -> None:
        if not isinstance(args, self.args_type):
            raise UnsupportedError(f"{type(self).__name__} needs {self.args_type.__name__}, "
                                   f"got {type(args).__name__}")

    def _terms(self, caller) -> list[tuple[str, tuple | None]]:
        """Each argument's name and ``(shape the caller passed, caller's leading dims)`` for
        messages: the plan's own field names, or the caller's (see ``run``)."""
        if not caller:
            return [(item[0], None) for item in self._layout]
        first = caller.get(self._layout[0][0], (None, None))[1]
        lead = shape_of(first)[:-1] if first is not None else None
        terms = []
        for field, *_ in self._layout:
            name, obj = caller.get(field, (field, None))
            terms.append((name, None if obj is None else (shape_of(obj), lead)))
        return terms

    def _arrays(self, args, caller=None) -> list[np.ndarray]:
        self._check_args_type(args)
        arrays = []
        for (name, shown), (field, dtype, shape, is_out) in zip(self._terms(caller),
                                                                  self._layout):
            arr = to_numpy(getattr(args, field), name)
            check_array(arr, name, dtype, shape, writable=is_out, caller=shown)
            arrays.append(arr)
        return arrays

    def _cuda_views(self, args, caller=None) -> list:
        """The device views of ``args`` for a CUDA plan, each checked (``can_implement``)."""
        self._check_args_type(args)
        terms = self._terms(caller)
        views = []
        for (name, _), (field, dtype, shape, is_out) in zip(terms, self._layout):
            view = cuda_runtime.device_view(getattr(args, field), name, self._ordinal)
            cuda_runtime.check_device_array(view, name, dtype, shape, self._ordinal,
                                            writable=is_out)
            views.append(view)
        out = self._out_index
        cuda_runtime.check_device_no_overlap(
            views[out], terms[out][0], {terms[i][0]: v for i, v in enumerate(views) if i != out})
        return views

    def _run_cuda(self, args, stream, caller=None) -> None:
        """Check ``args`` and launch on ``stream`` (None: the legacy default stream);
        asynchronous, like any CUDA launch."""
        ptrs = None
        if type(args) is self.args_type:  # torch tensors that fit: a few attribute reads
            ptrs = cuda_runtime.torch_pointers([getattr(args, item[0]) for item in self._layout],
                                               self._layout, self._ordinal)
        if ptrs is None:
            ptrs = [v.ptr for v in self._cuda_views(args, caller)]
        cuda_runtime.stream_handle(stream)  # reject a bad stream even for an empty problem
        self._kernel.runner.launch(ptrs + list(self._scalars), self._elements, self._ordinal,
                                   stream)

    def can_implement(self, args, caller=None) -> None:
        """Raise naming the first argument that does not fit the descriptor (``caller``:
        as ``run``)."""
        if self._ordinal is not None:
            self._cuda_views(args, caller)
            return
        arrays = self._arrays(args, caller)
        out_index = self._out_index
        names = [name for name, _ in self._terms(caller)]
        check_no_overlap(arrays[out_index], names[out_index],
                         {names[i]: a for i, a in enumerate(arrays) if i != out_index})

    def run(self, args, workspace=None, stream=None, caller=None) -> None:
        """Check ``args`` (as ``can_implement``) and run the kernel; the GIL is released.

        The checks are the same as ``can_implement``'s, written for the common case (numpy
        arrays that fit) so a reused plan costs a few microseconds; anything unusual takes
        the full path, which raises naming the problem. A CUDA plan takes CUDA arrays
        (torch, CuPy, ``__cuda_array_interface__``, DLPack) and launches asynchronously on
        ``stream``: None is the legacy default stream; a ``torch.cuda.Stream``, a CuPy
        stream or a raw ``CUstream`` handle (int) name another.

        ``caller``: for a plain function that reshaped its caller's arrays into ``args``,
        ``{field: (the caller's name, the object the caller passed)}`` (the object None
        for one the function made): errors then name the arguments and show the shapes
        as the caller passed them (``q``, ``out``, a 1-D ``scale``), not ``args``'.
        """
        if self._ordinal is not None:
            return self._run_cuda(args, stream, caller)
        if stream is not None:
            raise UnsupportedError("stream= applies to CUDA plans; this plan runs on the CPU")
        if type(args) is not self.args_type:
            self.can_implement(args, caller)
        self._launch_cpu(getattr, args, caller)

    def _check_overlap(self, arrays: list, caller=None) -> None:
        names = [name for name, _ in self._terms(caller)]
        out = self._out_index
        check_no_overlap(arrays[out], names[out], {names[i]: arrays[i] for i in self._in_indices})


class DequantizePerGroupPlan(_PerGroupPlan):
    """``y = F(C(q - zp) * C(scale))``: int8/uint8 groups back to floating point."""

    descriptor_type = DequantizePerGroupDescriptor
    args_type = DequantizePerGroupArgs


class QuantizePerGroupPlan(_PerGroupPlan):
    """``q = clamp(rint(x / scale) + zp, q_min, q_max)``."""

    descriptor_type = QuantizePerGroupDescriptor
    args_type = QuantizePerGroupArgs


class DequantizePerGroupBackwardPlan(_PerGroupPlan):
    """Gradient of dequantize with respect to its input: ``dq = dy * scale``."""

    descriptor_type = DequantizePerGroupBackwardDescriptor
    args_type = DequantizePerGroupBackwardArgs


class QuantizePerGroupBackwardPlan(_PerGroupPlan):
    """Straight-through estimator of quantize (inclusive range mask)."""

    descriptor_type = QuantizePerGroupBackwardDescriptor
    args_type = QuantizePerGroupBackwardArgs
