"""The format registry: every descriptor class answers to one ``FormatKind``.

A kind is what the core knows of one format: how its descriptor lowers to a
``KernelSpec``, the exact shape of each array its kernel takes, how many values a CUDA
launch covers, a small problem and the oracle ``dqgen verify`` checks a built kernel
with, and the op names and knobs ``dqgen aot`` enumerates it by. The pipeline (lower,
arguments, verify, the AOT enumeration) looks a descriptor's kind up here and never
tests its class, so a new format is one module that registers its kind.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

from ..errors import UnsupportedError
from ..spec import KernelSpec, Param


@dataclass(frozen=True)
class RowSlice:
    """Where row ``n`` of a weight ``[N, K]`` starts in one of its arrays, in elements:
    ``(n / row_block) * (const + ceil(K * num / den))`` (``row_block`` 0: every row reads
    from the start, one value for the tensor)."""

    row_block: int = 1
    num: int = 1
    den: int = 1
    const: int = 0


@dataclass(frozen=True)
class LinearView:
    """How the fused linear kernel decodes one row of a weight ``[N, K]`` of this format
    with the format's own dequantize kernel: each input array's ``RowSlice``, each
    run-time size argument as ``K * num / den`` (``num`` 0: the value 1, one row; a third
    item, ``rows``, says whether the whole weight's is N times that, which by default a
    row count's is and a row length's is not), the
    multiple K must be, the descriptor of the decode (f32 out) and of the whole weight.
    A decode may also start at a column ``kb`` of the row (``kb * num / den`` further on):
    ``kb`` a multiple of ``chunk_multiple`` (0: of ``k_multiple``)."""

    slices: dict                   # input name -> RowSlice
    sizes: dict                    # scalar name -> (num, den) or (num, den, rows)
    k_multiple: int
    decode: object                 # the descriptor of the one-row decode kernel
    sized: Callable[[int, int], object]  # (N, K) -> the descriptor of the whole weight
    chunk_multiple: int = 0
    cuda_value: str = ""           # its per-element macro in cuda/values.j2 ("": C only)
    # values a block whose shared part the CUDA linear reads once a block (the macros
    # <cuda_value>_block and <cuda_value>_in_block); 0: value by value
    cuda_block_values: int = 0


def cuda_block_values(values: int) -> int:
    """A ``LinearView.cuda_block_values``: a block (group) of ``values`` whose header the
    CUDA linear reads once, where it is a whole number of the linear's 16-value steps."""
    return values if values % 16 == 0 else 0


@dataclass(frozen=True)
class Int8View:
    """How the int8 linear (SPEC.md §9) reads a weight ``[N, K]`` of this format: as int8
    integers with a scale (and a min) a run of ``sub`` values. ``template`` is the C macros
    that decode a chunk of a row (``templates/c/int8_*.j2``) and ``knobs`` what they print;
    ``parts(arrays, n, k)`` reads the same integers, scales and mins in numpy (the
    reference's input); K must be a multiple of ``k_multiple``. A view with a ``block``
    (GGML's super-blocks of 256, the family's groups of 64 to 256) is multiplied in §9's
    block order: ``block_parts(arrays, n, k)`` reads the integers, the sub-block scales'
    integers, each block's d, the mins' integers (``integer_mins``; else ones) and each
    block's min factor, as ``reference.linear_int8_blocks`` takes them."""

    template: str
    knobs: object
    sub: int
    has_min: bool
    k_multiple: int
    parts: Callable[[dict, int, int], tuple]
    name: str                      # the format, in the kernel's header comment
    helpers: tuple[str, ...] = ()  # conversions its decode calls (convert.j2's)
    block: int = 0                 # the block order's block (0: the quad order)
    block_parts: Callable[[dict, int, int], tuple] | None = None
    unsigned_codes: bool = False   # every integer is 0 to 127
    integer_mins: bool = True      # the block order's mins are integers (else one a block)
    slot_runs: tuple[int, ...] = ()  # the block order's stored order of runs of 32 (() natural)
    # the codes the dot reads straight from the weight, by register width (bytes), as the
    # decode's template reads them (a width in neither: decoded into a copy first): the block
    # order's registers of a block as one or two byte vectors each ...
    code_pieces: dict = dataclasses.field(default_factory=dict)
    # ... or as 128-bit lanes of a plane each (a codebook's runs of 16); the quad order's
    # register of whole blocks (one for all)
    lane_pieces: dict = dataclasses.field(default_factory=dict)


class FormatKind:
    """One format's answers to the pipeline (subclasses override what applies)."""

    #: The descriptor classes of this kind (a subclass answers to the nearest base).
    descriptors: tuple[type, ...] = ()
    #: ``dqgen aot --op`` names that enumerate this kind's kernels.
    aot_ops: tuple[str, ...] = ()

    def lower(self, desc, target: str, arch: str, storage: dict) -> KernelSpec:
        """The kernel's spec (target and arch already checked, ``storage`` its C types)."""
        raise NotImplementedError

    def array_shape(self, desc, param: Param) -> tuple[int, ...]:
        """The exact shape of ``param``'s array for the problem ``desc`` describes."""
        raise NotImplementedError

    def launch_elements(self, desc) -> int:
        """Values a CUDA launch covers (one thread each, grid-striding)."""
        raise NotImplementedError

    def small_problem(self, desc, remake: Callable[..., object]):
        """A problem of ``desc``'s kernel small enough to check in milliseconds yet covering
        every path; ``remake(**sizes)`` rebuilds the descriptor with other run-time sizes."""
        raise NotImplementedError

    def oracle(self, desc, arrays: dict) -> np.ndarray:
        """What the kernel of ``desc`` must write for ``arrays``, bit for bit."""
        raise NotImplementedError

    # --- dqgen aot: how a selection's values name this kind's kernels -----------------

    #: Defaults of the shared selection keys for this kind's ops where the global ones do
    #: not fit: ``{op: {key: values}}``.
    aot_defaults: dict = {}
    #: The selection keys (``dqgen aot``/``emit`` flags) each of this kind's ops takes
    #: beyond ``float`` and ``target``: ``{op: keys}``.
    aot_keys: dict = {}

    def aot_candidates(self, op: str, value: Callable[[str], list]) -> Iterable[Callable]:
        """Makers (no-argument callables) of every descriptor ``op`` names for a selection
        whose values ``value(key)`` gives; a maker raises for a combination not valid."""
        raise NotImplementedError

    def aot_descriptor(self, op: str, int_dtype, float_dtype, group_size: int, knobs: dict):
        """The descriptor a request names (run-time sizes 0)."""
        cls = self.descriptors[0]
        return cls(0, 0, max(int(group_size), 1), float_dtype=float_dtype, **knobs)

    def aot_request(self, desc) -> tuple[str, str | None, int, dict]:
        """``(op, int dtype, group size, knobs)`` naming ``desc``'s kernel in a request:
        the descriptor's fields less its run-time sizes and arguments."""
        record = desc.to_json()
        knobs = {k: v for k, v in record.items() if k not in _NOT_KNOBS}
        # a storage dtype the format's knobs imply (HQQ's words, from bits) is no flag of it
        int_dtype = desc.int_dtype.value if record.get("int_dtype") else None
        return self.aot_ops[0], int_dtype, desc.group_size, knobs

    def linear_view(self, desc) -> LinearView | None:
        """How the fused linear kernel reads a weight of ``desc``'s format (None: it does
        not yet)."""
        return None

    def int8_view(self, desc) -> Int8View | None:
        """How the int8 linear reads a weight of ``desc``'s format (None: it does not)."""
        return None

    def int8_names(self) -> tuple[str, ...]:
        """What of this kind the int8 linear reads, in a user's words (for messages)."""
        return ()

    def format_name(self, desc) -> str:
        """The name a user knows ``desc``'s format by, for messages."""
        layout = getattr(desc, "layout", None)
        return layout.value if layout is not None else type(desc).__name__

    def random_input(self, desc, name: str, shape: tuple[int, ...], rng) -> np.ndarray | None:
        """An input for ``dqgen verify`` that must hold valid values (an index table), or
        None where random bits of the array's dtype will do."""
        return None


# Descriptor fields that are no knob of a kernel: run-time sizes and arguments, and the
# fields a request names apart (group size, dtypes).
_NOT_KNOBS = ("op", "layout", "rows", "cols", "blocks", "outer", "axis", "group_size",
              "float_dtype", "int_dtype", "shift")

_KINDS: dict[type, FormatKind] = {}


def register(kind: FormatKind) -> FormatKind:
    """Make ``kind`` the answer for each of its descriptor classes."""
    for cls in kind.descriptors:
        if cls in _KINDS and _KINDS[cls] is not kind:
            raise RuntimeError(f"{cls.__name__} is registered twice")
        _KINDS[cls] = kind
    return kind


def kind_of(desc) -> FormatKind:
    """The kind of ``desc`` (by its class or the nearest registered base class)."""
    for cls in type(desc).__mro__:
        kind = _KINDS.get(cls)
        if kind is not None:
            return kind
    raise UnsupportedError(f"{type(desc).__name__} is not a format dqgen knows")


def kinds() -> tuple[FormatKind, ...]:
    """Every registered kind, once, in registration order."""
    return tuple(dict.fromkeys(_KINDS.values()))


def descriptor_classes() -> dict[str, type]:
    """Every registered descriptor class and its subclasses, by the name kernel records
    (bundle manifests, cache entries) give them."""
    found: dict[str, type] = {}
    for cls in _KINDS:
        stack = [cls]
        while stack:
            c = stack.pop()
            found.setdefault(c.__name__, c)
            stack.extend(c.__subclasses__())
    return found


def descriptor_from_record(record: dict, **sizes):
    """The descriptor a kernel record (``{"class": ..., fields}``) describes, with ``sizes``
    (e.g. ``outer=4``) replacing its run-time sizes; validated like any descriptor."""
    from ..errors import InvalidProblemError
    from ..ir import Layout
    classes = descriptor_classes()
    if not isinstance(record, dict) or record.get("class") not in classes:
        raise InvalidProblemError(f"descriptor record {record!r} names no descriptor class")
    cls = classes[record["class"]]
    fields = {f.name: record[f.name] for f in dataclasses.fields(cls) if f.name in record}
    if "qtype" in fields:
        fields["qtype"] = Layout(fields["qtype"])
    fields.update({k: v for k, v in sizes.items() if k in fields})
    return cls(**fields)


def kind_for_op(op: str) -> FormatKind:
    """The kind whose kernels ``dqgen aot --op op`` enumerates."""
    for kind in kinds():
        if op in kind.aot_ops:
            return kind
    raise UnsupportedError(f"op {op!r} is not known; expected one of: {', '.join(aot_ops())}")


def aot_ops() -> tuple[str, ...]:
    """Every ``dqgen aot`` op name, the family's first."""
    return tuple(op for kind in kinds() for op in kind.aot_ops)
