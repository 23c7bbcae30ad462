"""Injection: nothing a caller passes can reach a template or the compiler unvalidated.

Hypothesis feeds every field of the four per-group descriptors (and the plain functions'
scalar arguments) arbitrary values: C and Jinja snippets, floats, bools, huge ints,
numpy scalars, None, and hostile objects (lying ``__class__``, ``__int__``/``__index__``
tricks, reprs that raise). Every input is either refused with a ``DqgenError`` (and
nothing else), or normalised to enums and plain ints, in which case the source handed
to the compiler is exactly what the canonical descriptor renders.
"""

from __future__ import annotations

import dataclasses
import fractions
import re
from decimal import Decimal
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dqgen
from dqgen.build import cc
from dqgen.ir import DESCRIPTORS, DType
from dqgen.isa import host_isa
from dqgen.lower import lower
from dqgen.render import render
from test_reliability_support import needs_cc, reset_process_state

pytestmark = needs_cc

CODE = [
    '0; system("rm -rf ~");', "*/ #include </etc/passwd> /*", "f32\n#define float double",
    "{{ 7 * 7 }}", "{% raw %}", "128) { abort(); } (", "s8'", "\x00", "f32; int x",
    "u8 */ void evil(void) {} /*", "g128", "128", " 64 ", "0x80", "1e3", "-1", "",
]
DTYPE_WORDS = ["s8", "u8", "S8", " u8 ", "int8", "uint8", "f16", "F32", "bf16", "bfloat16",
               "float", "double", "half", "f64", "i32", "int32", "s4", "u4", "fp8", "float8"]
HUGE = st.integers(min_value=2**31 - 2, max_value=2**80) | st.integers(max_value=-(2**31) + 2,
                                                                       min_value=-(2**80))


class LyingClass:
    """Claims to be an int through ``__class__``; carries C code in its text."""

    __class__ = int  # isinstance(obj, int) is True

    def __repr__(self):
        return "128; abort()"


class IndexCode:
    """Converts to 64 through ``__index__``/``__int__`` but prints as C code."""

    def __index__(self):
        return 64

    __int__ = __index__

    def __str__(self):
        return "64) { abort(); } ("

    __repr__ = __format__ = lambda self, *a: str(self)


class CodeInt(int):
    """A real int subclass whose text is C code: only its value may ever be used."""

    def __str__(self):
        return "64 /* */ ; abort();"

    __repr__ = __str__

    def __format__(self, spec):
        return str(self)


class ReprRaises:
    def __repr__(self):
        raise RuntimeError("repr exploded")

    __str__ = __repr__


class DtypeAttrRaises:
    @property
    def dtype(self):
        raise RuntimeError("dtype exploded")


class CodeStr(str):
    """A str subclass that strips to a valid name but is C code."""

    def strip(self, *a):
        return "f32"


OBJECTS = [object(), [], {}, (64,), [64], {"names": ["a"], "formats": ["u1"]}, 1j,
           Decimal(64), fractions.Fraction(64, 1), b"s8", bytearray(b"f32"), np.array(64),
           np.array([64]), np.float32, np.int8, np.uint8, float, int, bool, str,
           ml_dtypes.bfloat16, np.dtype("int32"), np.dtype("S8"), np.dtype([("a", "u1")]),
           LyingClass(), IndexCode(), CodeInt(64), ReprRaises(), DtypeAttrRaises(),
           CodeStr("f32; abort();"), type("T", (), {})]

anything = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-3, max_value=300), HUGE,
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([64.0, 128.0, -0.0]),
    st.text(max_size=20), st.sampled_from(CODE), st.sampled_from(DTYPE_WORDS),
    st.sampled_from(list(DType)),
    st.integers(min_value=-(2**63), max_value=2**63 - 1).map(np.int64),
    st.integers(min_value=0, max_value=2**64 - 1).map(np.uint64),
    st.integers(min_value=-128, max_value=127).map(np.int8),
    st.sampled_from([np.float32(64), np.float64(128), np.bool_(True), np.float16(1)]),
    st.sampled_from(OBJECTS),
)


HOSTILE = OBJECTS + CODE + [None, True, False, 64.0, float("nan"), 2**63, -(2**63) - 1, 2**64,
                          np.uint64(2**64 - 1), np.float64(64), np.bool_(False)]


def mostly(valid: st.SearchStrategy) -> st.SearchStrategy:
    """``valid`` eight times in ten, else a hostile value or anything: enough examples
    pass every check to reach the compiler, and every field is attacked."""
    return st.integers(0, 9).flatmap(
        lambda n: anything if n == 0 else st.sampled_from(HOSTILE) if n == 1 else valid)


plausible_int = mostly(st.sampled_from([0, 1, 4, 64, 128, 256]))
plausible_dtype = mostly(st.sampled_from(DTYPE_WORDS + list(DType)))

FIELD_STRATEGY = {
    "outer": plausible_int, "axis": plausible_int, "group_size": plausible_int,
    "float_dtype": plausible_dtype, "int_dtype": plausible_dtype,
    "q_min": mostly(st.sampled_from([None, -128, 0, 15])),
    "q_max": mostly(st.sampled_from([None, 127, 255, 100])),
}
URI = re.compile(r"^[a-z0-9_]+$")


class ReachedCompiler(Exception):
    """Raised by the stand-in compiler with the source it was given."""

    def __init__(self, source: str) -> None:
        super().__init__("reached the compiler")
        self.source = source


@pytest.fixture(scope="module", autouse=True)
def stand_in_compiler(tmp_path_factory):
    """Every compilation in this module is intercepted; nothing is built or cached."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DQGEN_CACHE_DIR", str(tmp_path_factory.mktemp("injection") / "cache"))
        for name in ("DQGEN_BUNDLE", "DQGEN_DISABLE_JIT", "DQGEN_ISA"):
            mp.delenv(name, raising=False)
        reset_process_state(mp)

        def compile_shared(tc, source_path: Path, output_path: Path, isa: str):
            raise ReachedCompiler(source_path.read_text())

        mp.setattr(cc, "compile_shared", compile_shared)
        yield


def canonical(desc):
    """The same descriptor rebuilt from plain values read off the normalised fields."""
    values = {f.name: getattr(desc, f.name) for f in dataclasses.fields(desc)}
    plain = {k: (v.value if isinstance(v, DType) else int(v)) for k, v in values.items()}
    return type(desc)(**plain)


def assert_normalised(desc) -> None:
    for f in dataclasses.fields(desc):
        value = getattr(desc, f.name)
        assert type(value) in (int, DType), f"{f.name} kept a {type(value).__name__}"
    assert URI.match(desc.uri), desc.uri
    assert canonical(desc) == desc


def select_reaches_compiler_with_canonical_source(plan_type, desc) -> None:
    """``select`` may only hand the compiler what the canonical descriptor renders."""
    try:
        plan_type.select(desc)
    except ReachedCompiler as reached:
        expected = render(lower(canonical(desc), "c", host_isa())).text
        assert reached.source == expected
    except dqgen.DqgenError:
        pass  # e.g. a problem too large for this machine's plans


PLANS = {dqgen.DequantizePerGroupDescriptor: dqgen.DequantizePerGroupPlan,
         dqgen.QuantizePerGroupDescriptor: dqgen.QuantizePerGroupPlan,
         dqgen.DequantizePerGroupBackwardDescriptor: dqgen.DequantizePerGroupBackwardPlan,
         dqgen.QuantizePerGroupBackwardDescriptor: dqgen.QuantizePerGroupBackwardPlan}
counts = {"refused": 0, "accepted": 0}


@pytest.mark.parametrize("desc_type", DESCRIPTORS, ids=lambda t: t.__name__)
@settings(max_examples=max(150, settings.default.max_examples))
@given(data=st.data())
def test_arbitrary_descriptor_fields(desc_type, data):
    names = [f.name for f in dataclasses.fields(desc_type)]
    fields = {name: data.draw(FIELD_STRATEGY[name], label=name) for name in names}
    try:
        desc = desc_type(**fields)
    except dqgen.DqgenError as exc:
        counts["refused"] += 1
        str(exc)  # the message itself must be printable
        return
    counts["accepted"] += 1
    for name, raw in fields.items():  # what may be accepted, by field kind
        if name.endswith("dtype"):
            # numpy scalars name their dtype (numpy's own rule); bare Python values do not
            assert raw is not None and (isinstance(raw, np.generic)
                                        or not isinstance(raw, (bool, int, float))), raw
        elif raw is not None:
            assert type(raw) is not bool and isinstance(raw, (int, np.integer)), raw
    assert_normalised(desc)
    select_reaches_compiler_with_canonical_source(PLANS[desc_type], desc)


VALID = {"outer": 4, "axis": 256, "group_size": 64, "float_dtype": "f32", "int_dtype": "u8",
         "q_min": 0, "q_max": 100}


@pytest.mark.parametrize("desc_type", DESCRIPTORS, ids=lambda t: t.__name__)
def test_every_hostile_value_in_every_field(desc_type):
    """The deterministic sweep behind the fuzzing: each hostile value, each field."""
    names = [f.name for f in dataclasses.fields(desc_type)]
    for name in names:
        for value in HOSTILE:
            fields = {n: VALID[n] for n in names}
            fields[name] = value
            try:
                desc = desc_type(**fields)
            except dqgen.DqgenError as exc:
                str(exc)
                continue
            assert_normalised(desc)
            select_reaches_compiler_with_canonical_source(PLANS[desc_type], desc)


# Values forced into a constructed descriptor; None means the value is valid after
# normalisation (the compiler then gets exactly the canonical source).
MUTATIONS = [("float_dtype", "f32; abort();", dqgen.UnsupportedError),
             ("float_dtype", None, dqgen.UnsupportedError),
             ("float_dtype", ReprRaises(), dqgen.UnsupportedError),
             ("int_dtype", "i32", dqgen.UnsupportedError),
             ("group_size", "64", dqgen.InvalidProblemError),
             ("group_size", LyingClass(), dqgen.InvalidProblemError),
             ("outer", -1, dqgen.InvalidProblemError),
             ("axis", 100, dqgen.InvalidProblemError),
             ("group_size", CodeInt(64), None),
             ("float_dtype", "bfloat16", None)]


@pytest.mark.parametrize("field, value, error", MUTATIONS,
                         ids=[f"{f}-{type(v).__name__}-{i}"
                              for i, (f, v, _) in enumerate(MUTATIONS)])
def test_fields_forced_past_the_frozen_dataclass_are_caught_at_select(field, value, error):
    desc = dqgen.DequantizePerGroupDescriptor(4, 256, 64, "f32", "u8")
    object.__setattr__(desc, field, value)  # what no constructor would let through
    if error is not None:
        with pytest.raises(error):
            dqgen.DequantizePerGroupPlan.select(desc)
    else:
        with pytest.raises(ReachedCompiler) as reached:
            dqgen.DequantizePerGroupPlan.select(desc)
        assert_normalised(desc)
        assert reached.value.source == render(lower(canonical(desc), "c", host_isa())).text


@pytest.mark.parametrize("obj", [None, "DequantizePerGroupDescriptor", object(), 64,
                                 dqgen.QuantizePerGroupDescriptor(1, 64, 64, "f32", "s8")])
def test_select_refuses_what_is_not_its_descriptor(obj):
    with pytest.raises(dqgen.UnsupportedError):
        dqgen.DequantizePerGroupPlan.select(obj)


@settings(max_examples=max(150, settings.default.max_examples))
@given(group_size=plausible_int, dtype=plausible_dtype, q_min=FIELD_STRATEGY["q_min"],
       q_max=FIELD_STRATEGY["q_max"])
def test_plain_function_scalars(group_size, dtype, q_min, q_max):
    x = np.linspace(-2, 2, 4 * 128, dtype=np.float32).reshape(4, 128)
    scale = np.full((4, 2), 0.05, np.float32)
    zp = np.zeros((4, 2), np.int32)
    try:
        dqgen.quantize_per_group(x, scale, zp, group_size, dtype=dtype, q_min=q_min, q_max=q_max)
    except ReachedCompiler as reached:
        counts["accepted"] += 1
        storage = "s8" if dtype is None else dtype  # None: not given, the default storage
        desc = dqgen.QuantizePerGroupDescriptor(4, 128, group_size, "f32", storage, q_min, q_max)
        assert reached.source == render(lower(canonical(desc), "c", host_isa())).text
    except dqgen.DqgenError:
        counts["refused"] += 1


def test_fuzzing_exercised_both_outcomes():
    """Guards the fuzz tests above against strategies that only ever hit one branch."""
    if not counts["accepted"] or not counts["refused"]:
        pytest.skip("run together with the fuzz tests above")
    print(f"fuzzing: {counts['accepted']} inputs accepted, {counts['refused']} refused")
    assert counts["accepted"] >= 10 and counts["refused"] >= 100, counts
