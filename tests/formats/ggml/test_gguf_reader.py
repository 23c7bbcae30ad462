"""dqgen's GGUF container reader (``dqgen.formats.gguf_reader``, behind ``gguf.open``):
equal to gguf-py's ``GGUFReader`` on files gguf-py's ``GGUFWriter`` writes (every
metadata value, every tensor's name, type, shape, offset and bytes), metadata arrays
read only when asked for, and truncated or lying files (every truncation of the header,
hand-made lies, hypothesis's byte patches) failing with one ``GgufFileError`` /
``UnsupportedError`` line naming the file, never an IndexError, MemoryError or hang."""

from __future__ import annotations

import itertools
import math
import struct

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dqgen.errors import DqgenError, UnsupportedError
from dqgen.formats import gguf_reader

gguf = pytest.importorskip("gguf", reason="llama.cpp's gguf package writes the files and is "
                           "the oracle")
from dqgen.formats import gguf as gguf_file  # noqa: E402
from dqgen.formats.gguf_reader import GgufFileError  # noqa: E402

V = gguf.GGUFValueType
T = gguf.GGMLQuantizationType
_names = itertools.count()

# --- writing files -------------------------------------------------------------------

SCALARS = {V.UINT8: st.integers(0, 2**8 - 1), V.INT8: st.integers(-2**7, 2**7 - 1),
           V.UINT16: st.integers(0, 2**16 - 1), V.INT16: st.integers(-2**15, 2**15 - 1),
           V.UINT32: st.integers(0, 2**32 - 1), V.INT32: st.integers(-2**31, 2**31 - 1),
           V.UINT64: st.integers(0, 2**64 - 1), V.INT64: st.integers(-2**63, 2**63 - 1),
           V.FLOAT32: st.floats(width=32, allow_nan=False), V.FLOAT64: st.floats(allow_nan=False),
           V.BOOL: st.booleans(),
           V.STRING: st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)}
# Arrays of arrays of one type (the writer types each inner array from its first value;
# gguf-py reads every inner array as the first one's type).
NESTED = st.one_of(*[st.lists(st.lists(SCALARS[t], min_size=1, max_size=3), min_size=1,
                              max_size=3) for t in (V.INT32, V.STRING, V.FLOAT32)])
TYPED_VALUES = st.one_of(
    *[s.map(lambda v, t=t: (t, None, v)) for t, s in SCALARS.items()],
    *[st.lists(s, min_size=1, max_size=6).map(lambda v, t=t: (V.ARRAY, t, v))
      for t, s in SCALARS.items()],
    NESTED.map(lambda v: (V.ARRAY, V.ARRAY, v)))
KEYS = st.text(st.characters(min_codepoint=33, max_codepoint=0x24F), min_size=1,
               max_size=20).filter(lambda k: not k.startswith(("GGUF.", "general.a")))
TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_K", "I8", "I32", "F64", "Q1_0")


def write(path, metadata=(), tensors=(), alignment=None):
    """A file by gguf-py's writer: ``metadata`` (key, type, sub type, value) and
    ``tensors`` (name, GGML type name, GGUF-order dims, rng seed) with random bytes."""
    w = gguf.GGUFWriter(str(path), "llama")
    if alignment is not None:
        w.add_custom_alignment(alignment)
    for key, vtype, sub_type, value in metadata:
        w.add_key_value(key, value, vtype, sub_type)
    for name, qtype, dims, seed in tensors:
        values, nbytes = gguf.GGML_QUANT_SIZES[T[qtype]]
        byte_shape = (*reversed(dims[1:]), dims[0] // values * nbytes)
        data = np.random.default_rng(seed).integers(0, 256, byte_shape, dtype=np.uint8)
        w.add_tensor(name, data, raw_dtype=T[qtype])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def fresh(tmp_dir, stem="f"):
    """A path never used before (a file still mapped is never rewritten under its map)."""
    return tmp_dir / f"{stem}{next(_names)}.gguf"


@pytest.fixture(scope="module")
def tmp_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("gguf_reader")


ALL_VALUES = [
    ("u8", V.UINT8, None, 255), ("i8", V.INT8, None, -128), ("u16", V.UINT16, None, 65535),
    ("i16", V.INT16, None, -32768), ("u32", V.UINT32, None, 2**32 - 1),
    ("i32", V.INT32, None, -2**31), ("u64", V.UINT64, None, 2**64 - 1),
    ("i64", V.INT64, None, -2**63), ("f32", V.FLOAT32, None, 0.1), ("f64", V.FLOAT64, None, 0.1),
    ("bool", V.BOOL, None, True), ("str", V.STRING, None, "é ✓ 😀"),
    ("empty", V.STRING, None, ""),
    ("tokens", V.ARRAY, V.STRING, ["<s>", "", "é", "a" * 300]),
    ("scores", V.ARRAY, V.FLOAT32, [0.5, -1.25, 3e38]),
    ("types", V.ARRAY, V.INT32, [1, 2, 3]), ("flags", V.ARRAY, V.BOOL, [True, False]),
    ("u64s", V.ARRAY, V.UINT64, [0, 2**64 - 1]), ("f64s", V.ARRAY, V.FLOAT64, [1e300]),
    ("u8s", V.ARRAY, V.UINT8, [0, 255]), ("nested", V.ARRAY, V.ARRAY, [[1, 2], [3]]),
    ("nested.str", V.ARRAY, V.ARRAY, [["a", "bc"], ["d"]]),
]
ALL_TENSORS = [("w.f32", "F32", (64, 3), 1), ("w.f16", "F16", (32,), 2),
               ("w.bf16", "BF16", (16, 2), 3), ("w.q8_0", "Q8_0", (64, 3, 2), 4),
               ("w.q4_k", "Q4_K", (256, 2), 5), ("w.i8", "I8", (8,), 6),
               ("w.i32", "I32", (4, 2), 7), ("w.f64", "F64", (2,), 8),
               ("w.q1_0", "Q1_0", (128,), 9)]


@pytest.fixture(scope="module")
def every_kind(tmp_dir):
    """A file with a value of every metadata type, arrays of them, nested arrays, and a
    tensor of several GGML types, with 64-byte alignment."""
    return write(fresh(tmp_dir, "every"), [(f"m.{k}", t, s, v) for k, t, s, v in ALL_VALUES],
                 ALL_TENSORS, alignment=64)


# --- gguf-py as the oracle -----------------------------------------------------------

def _flat(value):
    """gguf-py's reading of an array of arrays: every innermost element in one list."""
    if isinstance(value, list) and any(isinstance(v, list) for v in value):
        return [x for v in value for x in _flat(v)]
    return value


def assert_equals_gguf_py(path) -> None:
    """Every metadata value (type too), the layout, and every tensor's name, type, shape,
    offset, byte count and bytes as gguf-py's GGUFReader reads them."""
    theirs = gguf.GGUFReader(str(path))
    f = gguf_file.open(path)
    want = {k: v.contents() for k, v in theirs.fields.items() if not k.startswith("GGUF.")}
    assert list(f.metadata) == list(want)
    for key, value in f.metadata.items():
        assert _flat(value) == want[key], key
        assert [type(v) for v in _flat(value)] == [type(v) for v in want[key]] \
            if isinstance(value, list) else type(value) is type(want[key]), key
    assert f.version == theirs.fields["GGUF.version"].contents()
    assert (f.alignment, f._reader.data_offset) == (theirs.alignment, theirs.data_offset)
    assert list(f.tensors) == [t.name for t in theirs.tensors]
    for t in theirs.tensors:
        info = f.tensors[t.name]
        assert (info.type, info.shape, info.offset, info.nbytes) == (
            t.tensor_type.name, tuple(reversed(t.shape.tolist())), t.data_offset, t.n_bytes)
        assert f.array(t.name).tobytes() == np.asarray(t.data).tobytes(), t.name


def test_every_value_type_and_tensor_equal_gguf_py(every_kind):
    assert_equals_gguf_py(every_kind)
    meta = gguf_file.open(every_kind).metadata
    assert meta["m.nested"] == [[1, 2], [3]]  # arrays of arrays keep their structure
    assert meta["m.f32"] == np.float32(0.1) and meta["general.alignment"] == 64


def test_version_2_equals_gguf_py(every_kind, tmp_dir):
    path = fresh(tmp_dir)
    raw = bytearray(every_kind.read_bytes())
    struct.pack_into("<I", raw, 4, 2)
    path.write_bytes(bytes(raw))
    assert gguf_file.open(path).version == 2
    assert_equals_gguf_py(path)


@given(metadata=st.dictionaries(KEYS, TYPED_VALUES, max_size=6),
       tensors=st.lists(st.tuples(st.sampled_from(TENSOR_TYPES), st.integers(1, 2),
                                  st.integers(1, 3), st.integers(0, 2**32 - 1)), max_size=4),
       alignment=st.sampled_from([None, 1, 8, 64]))
def test_written_files_equal_gguf_py(tmp_dir, metadata, tensors, alignment):
    """Any metadata gguf-py writes and tensors of several types read as gguf-py reads them."""
    path = write(fresh(tmp_dir), [(k, t, s, v) for k, (t, s, v) in metadata.items()],
                 [(f"t{i}", q, (gguf.GGML_QUANT_SIZES[T[q]][0] * blocks, rows), seed)
                  for i, (q, blocks, rows, seed) in enumerate(tensors)], alignment)
    assert_equals_gguf_py(path)
    path.unlink()


def test_empty_array_equals_gguf_py(tmp_dir):
    """An empty array (gguf-py's writer refuses one; other writers do not)."""
    path = fresh(tmp_dir)
    path.write_bytes(build([kv("empty", V.ARRAY, struct.pack("<IQ", V.STRING, 0)),
                            kv("after", V.UINT8, b"\x07")]))
    assert_equals_gguf_py(path)
    assert dict(gguf_file.open(path).metadata) == {"empty": [], "after": 7}


def test_type_table_equals_gguf_py():
    """dqgen's GGML type table is gguf-py's (ids, names, block sizes), every type
    dequantize reads among them."""
    ours = {i: (name, (values, nbytes)) for i, (name, values, nbytes)
            in gguf_reader.GGML_TYPES.items()}
    newer = {42: ("Q2_0", (64, 18))}  # llama.cpp's, after gguf-py 0.19 (ggml-common.h)
    assert ours == {t.value: (t.name, gguf.GGML_QUANT_SIZES[t]) for t in T} | newer
    from dqgen.formats import ggml
    assert set(ggml.TYPES) <= set(gguf_file.supported_types())
    assert gguf_file.block_size("Q4_K") == (256, 144)
    with pytest.raises(UnsupportedError, match="qtype='Q9_9' is not a GGML type"):
        gguf_file.block_size("Q9_9")


# --- lazy metadata -------------------------------------------------------------------

def test_metadata_arrays_are_read_when_asked_for(every_kind, monkeypatch):
    """Opening and reading one scalar parses no array; an array is parsed once, when
    first asked for."""
    read = []
    real = gguf_reader._read_value
    monkeypatch.setattr(gguf_reader, "_read_value",
                        lambda buf, vtype, pos: (read.append(vtype), real(buf, vtype, pos))[1])
    f = gguf_file.open(every_kind)
    f.array("w.q8_0")
    assert read == []
    meta = f.metadata
    assert meta["m.str"] == "é ✓ 😀" and read == [V.STRING]
    assert "m.tokens" in meta and len(meta) == len(ALL_VALUES) + 2  # + architecture, alignment
    assert read == [V.STRING]
    assert meta["m.tokens"] == ["<s>", "", "é", "a" * 300]
    assert meta["m.tokens"] is meta["m.tokens"] and read == [V.STRING, V.ARRAY]
    with pytest.raises(KeyError):
        meta["nope"]
    assert meta.get("nope", 5) == 5 and "nope" not in meta


def test_metadata_that_is_not_utf8_fails_when_read(tmp_dir):
    path = fresh(tmp_dir)
    path.write_bytes(build([kv("ok", V.UINT8, b"\x01"), kv("bad", V.STRING, text(b"\xff\xfe"))]))
    meta = gguf_file.open(path).metadata
    assert meta["ok"] == 1
    with pytest.raises(GgufFileError, match=rf"{path}: metadata 'bad' cannot be read "
                                            r"\(UnicodeDecodeError"):
        meta["bad"]


# --- damaged and lying files ---------------------------------------------------------

def text(raw: bytes) -> bytes:
    return struct.pack("<Q", len(raw)) + raw


def kv(key, vtype: int, payload: bytes) -> bytes:
    return text(key.encode() if isinstance(key, str) else key) + struct.pack("<I", vtype) + payload


def tensor(name, dims, type_id: int = 0, offset: int = 0) -> bytes:
    return (text(name.encode()) + struct.pack(f"<I{len(dims)}Q", len(dims), *dims)
            + struct.pack("<IQ", type_id, offset))


def build(kvs=(), tensors=(), *, version=3, tensor_count=None, kv_count=None,
          data=b"", alignment=32) -> bytes:
    """A GGUF file from raw parts; the counts as given (a lie) or as they are."""
    head = b"GGUF" + struct.pack("<IQQ", version,
                                 len(tensors) if tensor_count is None else tensor_count,
                                 len(kvs) if kv_count is None else kv_count)
    body = head + b"".join(kvs) + b"".join(tensors)
    return body + b"\0" * (-len(body) % alignment) + data


def fails(path, pattern, error=GgufFileError):
    """Opening (and reading everything) raises ``error``: one line naming the file."""
    with pytest.raises(error) as caught:
        f = gguf_file.open(path)
        dict(f.metadata)
        for name in f.tensors:
            f.array(name)
    message = str(caught.value)
    assert message.startswith(f"{path}: ") and "\n" not in message, message
    assert caught.match(pattern), message


ONE_F32 = tensor("w", [4], 0, 0)
LIES = {
    # 5c: the count the header claims, against what the file can hold
    "huge tensor count": (build([kv("a", V.UINT8, b"\x01")], [ONE_F32], tensor_count=2**40,
                                data=bytes(16)),
                          r"not a valid GGUF file: the header claims 1099511627776 tensors but "
                          r"the file has room for at most 3 after its metadata"),
    "huge metadata count": (build([kv("a", V.UINT8, b"\x01")], kv_count=2**63),
                            r"the header claims 9223372036854775808 metadata entries but the "
                            r"file has room for at most \d+"),
    "huge key length": (build([struct.pack("<Q", 2**64 - 1) + b"k"]),
                        r"metadata key 0 of 1 \(18446744073709551615 bytes\) needs "
                        r"18446744073709551615 bytes at byte 32 but the file ends at byte 64"),
    "huge string value": (build([kv("s", V.STRING, struct.pack("<Q", 2**62) + b"abc")]),
                          r"metadata 's' needs 4611686018427387904 bytes"),
    "huge array count": (build([kv("a", V.ARRAY, struct.pack("<IQ", V.UINT32, 2**61))]),
                         r"metadata 'a' claims 2305843009213693952 elements \(uint32\) but "
                         r"the file has room for at most \d+"),
    "huge string in an array": (build([kv("t", V.ARRAY, struct.pack("<IQ", V.STRING, 3)
                                          + text(b"ab") + struct.pack("<Q", 2**40) + b"x"
                                          + text(b"c"))]),
                                r"metadata 't': string 1 of its 3 runs past the end of the file"),
    "unknown value type": (build([kv("x", 13, b"\0" * 8)]),
                           r"metadata 'x' has value type 13, not one of GGUF's \(13 types, 0-12\)"),
    "unknown array type": (build([kv("x", V.ARRAY, struct.pack("<IQ", 99, 1))]),
                           r"metadata 'x' is an array of value type 99"),
    "arrays nested too deep": (build([kv("x", V.ARRAY, struct.pack("<IQ", V.ARRAY, 1) * 40)]),
                               r"metadata 'x' nests arrays more than 16 deep"),
    "alignment zero": (build([kv("general.alignment", V.UINT32, struct.pack("<I", 0))]),
                       r"general.alignment is 0, not a power of two"),
    "alignment not a power of two": (
        build([kv("general.alignment", V.UINT32, struct.pack("<I", 48))], [ONE_F32],
              data=bytes(64)), r"general.alignment is 48, not a power of two"),
    "alignment of the wrong type": (
        build([kv("general.alignment", V.UINT64, struct.pack("<Q", 32))]),
        r"general.alignment is a uint64, not a uint32"),
    "huge dimension count": (build([], [text(b"w") + struct.pack("<I", 2**32 - 1)
                                        + bytes(40)]),
                             r"the 4294967295 dimensions of tensor 'w' needs 34359738360 bytes"),
    "huge dimensions": (build([], [tensor("w", [2**62, 2**62])], data=bytes(32)),
                        r"tensor 'w' \(F32, shape \[4611686018427387904, 4611686018427387904\]\) "
                        r"needs bytes \[96, \d+\) but the file ends at byte 128"),
    "offset past the end": (build([], [tensor("w", [4], 0, 2**64 - 1)], data=bytes(16)),
                            r"tensor 'w' \(F32, shape \[4\]\) starts at byte \d+, past the end"),
    "duplicate key": (build([kv("a", V.UINT8, b"\x01"), kv("a", V.UINT8, b"\x02")]),
                      r"metadata key 'a' appears twice"),
    "duplicate tensor": (build([], [ONE_F32, tensor("w", [4], 0, 16)], data=bytes(32)),
                         r"tensor name 'w' appears twice"),
    "key not utf-8": (build([kv(b"\xff", V.UINT8, b"\x01")]),
                      r"metadata key 0 of 1 is not UTF-8"),
    "tensor name not utf-8": (build([], [text(b"\xc3") + struct.pack("<IQIQ", 1, 4, 0, 0)]),
                              r"the name of tensor 0 of 1 is not UTF-8"),
    "bad magic": (b"GGML" + bytes(60),
                  r"not a valid GGUF file: it starts with b'GGML', not b'GGUF'"),
    "empty": (b"", r"not a valid GGUF file: the file is empty"),
    "header cut short": (b"GGUF\x03\0\0\0\0", r"the tensor count needs 8 bytes at byte 8 but "
                         r"the file ends at byte 9"),
}


@pytest.mark.parametrize("case", LIES)
def test_lying_headers_say_what_is_wrong(tmp_dir, case):
    raw, pattern = LIES[case]
    path = fresh(tmp_dir)
    path.write_bytes(raw)
    fails(path, pattern)


@pytest.mark.parametrize("version, pattern", [
    (1, r"GGUF version 1; dqgen reads versions 2 and 3"),
    (4, r"GGUF version 4; dqgen reads versions 2 and 3"),
    (3 << 24, r"byte order is not this machine's \(a big-endian GGUF file\)")])
def test_versions_dqgen_does_not_read(tmp_dir, version, pattern):
    path = fresh(tmp_dir)
    path.write_bytes(build([kv("a", V.UINT8, b"\x01")], version=version))
    fails(path, pattern, UnsupportedError)


def test_every_truncation_of_the_header_fails_cleanly(every_kind, tmp_dir):
    """The file cut at every byte before its tensor data: one GgufFileError line each."""
    raw = every_kind.read_bytes()
    end = gguf_file.open(every_kind)._reader.data_offset
    path = fresh(tmp_dir)
    for cut in range(end + 1):
        path.write_bytes(raw[:cut])
        fails(path, "not a valid GGUF file" if cut < end - 64 else "GGUF file|truncated")
        path.unlink()  # the next cut is a new file, never one still mapped


PATCH_VALUES = st.one_of(st.sampled_from([0, 1, 2, 3, 7, 8, 9, 12, 13, 255, 2**31, 2**32 - 1,
                                          2**40, 2**63, 2**64 - 1]),
                         st.integers(0, 2**64 - 1))


@given(patches=st.lists(st.tuples(st.integers(0, 10**6), PATCH_VALUES,
                                  st.sampled_from([1, 4, 8])), min_size=1, max_size=3),
       cut=st.one_of(st.none(), st.integers(0, 10**6)))
def test_patched_headers_fail_cleanly_or_read_as_gguf_py(every_kind, tmp_dir, patches, cut):
    """Counts, lengths, types and offsets overwritten with any value (huge ones most of
    all), the file maybe cut: dqgen either reads it as gguf-py does or raises one line
    naming the file; never another exception, never a hang."""
    raw = bytearray(every_kind.read_bytes())
    end = gguf_file.open(every_kind)._reader.data_offset  # header, metadata, tensor table
    for at, value, width in patches:
        at %= end - width
        raw[at:at + width] = (value % (1 << 8 * width)).to_bytes(width, "little")
    if cut is not None:
        raw = raw[:cut % len(raw)]
    path = fresh(tmp_dir)
    path.write_bytes(bytes(raw))
    try:
        f = gguf_file.open(path)
        dict(f.metadata)
        for name in f.tensors:
            f.array(name)
    except DqgenError as exc:
        message = str(exc)
        assert message.startswith(f"{path}: ") and "\n" not in message, message
        assert isinstance(exc, (GgufFileError, UnsupportedError)), message
    else:
        theirs = gguf.GGUFReader(str(path))
        assert [(t.name, t.data_offset, t.n_bytes) for t in theirs.tensors] == \
            [(i.name, i.offset, i.nbytes) for i in f.tensors.values()]
        want = {k: v.contents() for k, v in theirs.fields.items() if not k.startswith("GGUF.")}
        assert list(f.metadata) == list(want)
        for key, value in f.metadata.items():
            if not any(isinstance(v, float) and math.isnan(v) for v in _flat([value])):
                assert _flat(value) == want[key], key
    path.unlink()
