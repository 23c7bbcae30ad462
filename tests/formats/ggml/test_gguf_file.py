"""GGUF files: a file written by gguf-py's ``GGUFWriter`` with a tensor of every type dqgen
reads (``dqgen.formats.gguf.supported_types()``, so new block types are covered as they
come), read with ``dqgen.formats.gguf.open`` and converted with ``dqgen convert``, equal
bit for bit to gguf-py's own dequantize of the same file; metadata, shards, and each kind
of damaged file."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import weakref

import ml_dtypes
import numpy as np
import pytest

from dqgen import DqgenError
from dqgen.cli import main as cli
from dqgen.errors import InvalidProblemError, UnsupportedError
from dqgen.formats import ggml
from formats_util import FLOATS, assert_bits_equal
from oracles.llama_cpp import NEWER_THAN_GGUF_PY, llama_cpp_rows

gguf = pytest.importorskip("gguf", reason="llama.cpp's gguf package writes the files and is "
                           "the oracle")
safetensors = pytest.importorskip("safetensors.numpy", reason="convert output is checked with "
                                  "the safetensors package")
from dqgen.formats import gguf as gguf_file  # noqa: E402
from dqgen.formats import gguf_convert  # noqa: E402

T = gguf.GGMLQuantizationType
METADATA = {"general.name": "tiny", "llama.block_count": 2, "llama.rope.freq_base": 10000.5,
            "general.flag": True, "tokenizer.ggml.tokens": ["<s>", "a", "é"],
            "tokenizer.ggml.token_type": [1, 2, 3]}
# Two tensors whose dimension order only a correct reversal gets right.
EXTRA = {"x.q8_0.3d": ("Q8_0", (2, 3, 64)), "x.q4_0.1d": ("Q4_0", (96,))}


def _blocks(rng, qtype: str, shape) -> np.ndarray:
    """Block bytes of ``qtype`` for ``shape``: gguf's own quantizer where it has one (real
    scales), else random bytes (every field pattern, NaN/Inf scales included)."""
    values, nbytes = gguf.GGML_QUANT_SIZES[T[qtype]]
    x = rng.standard_normal(shape).astype(np.float32)
    try:
        return gguf.quants.quantize(x, T[qtype])
    except (NotImplementedError, gguf.quants.QuantError):
        byte_shape = (*shape[:-1], shape[-1] // values * nbytes)
        return rng.integers(0, 256, size=byte_shape, dtype=np.uint8)


def _tensors(rng) -> dict[str, tuple[str, np.ndarray]]:
    """name -> (type, what GGUFWriter.add_tensor takes) for one tensor of every type."""
    out = {}
    for qtype in gguf_file.supported_types():
        if not hasattr(T, qtype):  # newer than gguf-py, whose writer cannot name it
            continue
        values = gguf.GGML_QUANT_SIZES[T[qtype]][0]
        shape = (3, 2 * max(values, 32))
        if qtype == "F32":
            data = rng.standard_normal(shape).astype(np.float32)
        elif qtype == "F16":
            data = rng.standard_normal(shape).astype(np.float16)
        elif qtype == "BF16":
            data = rng.standard_normal(shape).astype(ml_dtypes.bfloat16).view(np.uint8)
        else:
            data = _blocks(rng, qtype, shape)
        out[f"t.{qtype.lower()}"] = (qtype, data)
    for name, (qtype, shape) in EXTRA.items():
        out[name] = (qtype, _blocks(rng, qtype, shape))
    out["t.i32"] = ("I32", np.arange(-3, 5, dtype=np.int32))
    return out


def write_gguf(path, tensors, metadata=METADATA) -> None:
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in metadata.items():
        if key == "general.name":
            w.add_name(value)
        elif isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        elif isinstance(value, list):
            w.add_array(key, value)
    for name, (qtype, data) in tensors.items():
        raw = None if qtype in ("F32", "F16", "I32") else T[qtype]
        w.add_tensor(name, data, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "model.gguf"
    write_gguf(path, _tensors(np.random.default_rng(7)))
    return path


def oracle(path) -> dict[str, np.ndarray]:
    """gguf-py's reading of every tensor: f32 values, in PyTorch order (int tensors as stored)."""
    out = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        if t.tensor_type == T.I32:
            out[t.name] = np.array(t.data)
        elif t.tensor_type.name in NEWER_THAN_GGUF_PY:  # llama.cpp's own rows
            out[t.name] = llama_cpp_rows(np.asarray(t.data), t.tensor_type.name).astype(
                np.float32)
        elif t.tensor_type == T.Q8_K:  # gguf-py has no Q8_K dequantize: ggml's f32 d * int8
            rows = np.asarray(t.data).reshape(-1, 292)
            with np.errstate(all="ignore"):
                y = rows[:, :4].copy().view(np.float32) * rows[:, 4:260].view(np.int8)
            out[t.name] = y.astype(np.float32).reshape(*t.data.shape[:-1], -1)
        else:
            out[t.name] = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
    return out


def run_cli(*argv) -> int:
    return cli(["convert", *map(str, argv), "--quiet"])


# --- reading -------------------------------------------------------------------------

def test_lists_tensors_and_metadata(model):
    f = gguf_file.open(model)
    written = _tensors(np.random.default_rng(7))
    assert list(f.tensors) == list(written)
    want = oracle(model)
    for name, info in f.tensors.items():
        assert info.type == written[name][0]
        assert info.shape == want[name].shape, name  # PyTorch order
        assert info.nbytes == written[name][1].nbytes
    assert f.tensors["x.q8_0.3d"].shape == (2, 3, 64)
    assert f.tensors["x.q4_0.1d"].shape == (96,)
    meta = f.metadata
    assert meta["general.architecture"] == "llama"
    for key, value in METADATA.items():
        assert meta[key] == (pytest.approx(value) if isinstance(value, float) else value), key
        assert type(meta[key]) is type(value), key
    assert not any(key.startswith("GGUF.") for key in meta)


def test_dequantize_equals_gguf(model):
    """Every type to f32 bit for bit; f16 and bf16 (rounded once from those f32 values) for
    the float tensors and two block types; into a torch tensor and a numpy array."""
    torch = pytest.importorskip("torch")
    f = gguf_file.open(model)
    want = oracle(model)
    for name, info in f.tensors.items():
        if info.type == "I32":
            continue
        assert_bits_equal(f.dequantize(name, "f32"), want[name])
    for name in ("t.f32", "t.f16", "t.bf16", "t.q8_0", "x.q4_0.1d"):
        for dtype in ("f16", "bf16"):
            assert_bits_equal(f.dequantize(name, dtype), want[name].astype(FLOATS[dtype]))
    out = torch.empty(f.tensors["t.q8_0"].shape, dtype=torch.bfloat16)
    assert f.dequantize("t.q8_0", "bf16", out=out) is out
    assert_bits_equal(out.view(torch.int16).numpy().view(ml_dtypes.bfloat16),
                      want["t.q8_0"].astype(ml_dtypes.bfloat16))
    buf = np.empty(f.tensors["t.f16"].shape, np.float32)
    assert f.dequantize("t.f16", "f32", out=buf) is buf
    assert_bits_equal(buf, want["t.f16"])


def test_dequantize_reads_the_map_without_a_copy(model, monkeypatch):
    f = gguf_file.open(model)
    seen = []
    real = ggml.dequantize
    monkeypatch.setattr(ggml, "dequantize", lambda data, *a, **k: (seen.append(data),
                                                                   real(data, *a, **k))[1])
    f.dequantize("t.q8_0", "f32")
    (data,) = seen
    assert np.shares_memory(data, f._reader.data)
    assert not f._reader.data.flags.writeable
    assert data.dtype == np.uint8 and data.shape == (3, 2 * 34)


def test_items_hold_one_result_at_a_time(model):
    f = gguf_file.open(model)
    previous = None
    names = []
    for name, array in f.items("f32"):
        assert previous is None or previous() is None  # the generator kept no reference
        previous = weakref.ref(array)
        names.append(name)
        del array
    assert names == [n for n, info in f.tensors.items() if info.supported]


def test_reader_errors(model):
    f = gguf_file.open(model)
    with pytest.raises(InvalidProblemError, match="no tensor 'nope'"):
        f.dequantize("nope")
    with pytest.raises(UnsupportedError, match=r"'t.i32' \(I32.*\.array\(name\)"):
        f.dequantize("t.i32")
    assert f.array("t.i32").tolist() == list(range(-3, 5))
    with pytest.raises(UnsupportedError, match="dtype"):
        f.dequantize("t.q8_0", "f64")
    with pytest.raises(InvalidProblemError, match="cannot read"):
        gguf_file.open(model.parent / "missing.gguf")
    with gguf_file.open(model) as g:
        pass
    with pytest.raises(InvalidProblemError, match="is closed"):
        g.dequantize("t.q8_0")


OPEN_WITHOUT_GGUF = """
import json, sys
sys.modules["gguf"] = None  # import gguf raises ImportError
from dqgen.formats import gguf
f = gguf.open(sys.argv[1])
print(json.dumps({"types": {n: i.type for n, i in f.tensors.items()}, "meta": dict(f.metadata),
                  "q8_0": gguf.open(sys.argv[1]).dequantize("t.q8_0", "f32").tolist()}))
"""


def test_opens_without_the_gguf_package(model):
    """Tensors, metadata and a Q8_0 tensor's values read with llama.cpp's gguf package
    unimportable: dqgen reads the container itself."""
    proc = subprocess.run([sys.executable, "-c", OPEN_WITHOUT_GGUF, str(model)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    f = gguf_file.open(model)
    assert got["types"] == {n: i.type for n, i in f.tensors.items()}
    assert got["meta"] == json.loads(json.dumps(dict(f.metadata)))
    assert_bits_equal(np.array(got["q8_0"], np.float32), oracle(model)["t.q8_0"])


# --- dqgen convert -------------------------------------------------------------------

def test_convert_equals_gguf(model, tmp_path, capsys):
    """Every tensor, through the command line: quantized ones as gguf-py reads them, float
    and integer ones copied as stored; GGUF metadata as safetensors metadata."""
    out = tmp_path / "model.safetensors"
    assert run_cli(model, out, "--dtype", "f32", "-j", "2") == 0
    got = safetensors.load_file(str(out))
    want = oracle(model)
    f = gguf_file.open(model)
    assert set(got) == set(f.tensors)
    for name, info in f.tensors.items():
        if info.type in gguf_file.FLOAT_TYPES or info.type == "I32":
            assert got[name].dtype == np.dtype(gguf_file.FLOAT_TYPES.get(info.type, np.int32))
            stored = np.asarray(f.array(name)).view(np.uint8)
            assert np.array_equal(got[name].view(np.uint8), stored)
        else:
            assert_bits_equal(got[name], want[name])
    from safetensors import safe_open
    with safe_open(str(out), "np") as st:
        meta = st.metadata()
    assert meta["format"] == "pt" and meta["general.architecture"] == "llama"
    for key, value in f.metadata.items():
        assert (meta[key] if isinstance(value, str) else json.loads(meta[key])) == value, key
    assert os.listdir(tmp_path) == ["model.safetensors"]


def test_convert_bf16_in_shards(tmp_path, capsys):
    """bf16 output split over shards with an index, equal to gguf-py's values rounded once;
    progress shown in MB."""
    rng = np.random.default_rng(3)
    tensors = {f"blk.{i}.w": ("Q8_0", _blocks(rng, "Q8_0", (64, 256))) for i in range(3)}
    tensors["norm"] = ("F32", rng.standard_normal(256).astype(np.float32))
    src = tmp_path / "m.gguf"
    write_gguf(src, tensors)
    out = tmp_path / "out" / "m.safetensors"
    assert cli(["convert", str(src), str(out), "--dtype", "bf16", "--max-shard-size", "40KB"]) == 0
    assert "MB" in capsys.readouterr().err
    index = json.loads((tmp_path / "out" / "m.safetensors.index.json").read_text())
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["m-00001-of-00003.safetensors", "m-00002-of-00003.safetensors",
                     "m-00003-of-00003.safetensors", "m.safetensors.index.json"]
    want = oracle(src)
    got = {}
    for name, shard in index["weight_map"].items():
        got[name] = safetensors.load_file(str(tmp_path / "out" / shard))[name]
    assert set(got) == set(tensors)
    for name in tensors:
        expect = want[name] if name == "norm" else want[name].astype(ml_dtypes.bfloat16)
        assert_bits_equal(got[name], expect)
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in got.values())
    mask = os.umask(0o022)
    os.umask(mask)
    for p in (tmp_path / "out").iterdir():  # as open() makes files, not mkstemp's 0o600
        assert p.stat().st_mode & 0o777 == 0o666 & ~mask, p


def test_convert_while_a_slow_disk_writes(tmp_path, monkeypatch):
    """Each piece is written while the next is dequantized: with writes made slow, no
    buffer is reused before its bytes are out (tensors of one piece and of several)."""
    import time
    rng = np.random.default_rng(11)
    tensors = {f"w{i}": ("Q8_0", _blocks(rng, "Q8_0", (4, 64))) for i in range(4)}
    tensors["big"] = ("Q4_0", _blocks(rng, "Q4_0", (8, 128)))
    tensors["norm"] = ("F32", rng.standard_normal(64).astype(np.float32))
    tensors["last"] = ("Q8_0", _blocks(rng, "Q8_0", (2, 64)))
    src = tmp_path / "m.gguf"
    write_gguf(src, tensors)
    monkeypatch.setattr(gguf_convert, "CHUNK_BYTES", 1024)  # "big" goes out in 4 pieces
    real = gguf_convert._ShardWriter.write
    monkeypatch.setattr(gguf_convert._ShardWriter, "write",
                        lambda self, chunk: (time.sleep(0.02), real(self, chunk))[1])
    out = tmp_path / "m.safetensors"
    gguf_convert.convert_file(src, out, "f32")
    got, want = safetensors.load_file(str(out)), oracle(src)
    for name in tensors:
        assert_bits_equal(got[name], want[name])


def test_convert_into_a_directory(model, tmp_path, capsys):
    assert run_cli(model, str(tmp_path) + os.sep, "--dtype", "f32") == 0
    assert os.listdir(tmp_path) == ["model.safetensors"]
    assert run_cli(model, tmp_path / "x.safetensors", "--format", "gptq", "--bits", "4") == 2
    assert "--format, --bits describe GPTQ/AWQ" in capsys.readouterr().err


def test_default_threads_leave_the_writer_a_cpu(monkeypatch):
    monkeypatch.delenv("DQGEN_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert gguf_convert.default_jobs() == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert gguf_convert.default_jobs() == 1
    monkeypatch.setenv("DQGEN_NUM_THREADS", "2")
    assert gguf_convert.default_jobs() is None


def test_output_paths(tmp_path):
    paths, index = gguf_convert.output_paths(tmp_path / "a.safetensors", 2)
    assert [p.name for p in paths] == ["a-00001-of-00002.safetensors",
                                       "a-00002-of-00002.safetensors"]
    assert index.name == "a.safetensors.index.json"
    assert gguf_convert.output_paths(tmp_path, 1) == ([tmp_path / "model.safetensors"], None)
    assert gguf_convert.output_paths(tmp_path, 2)[1] == tmp_path / "model.safetensors.index.json"


# --- damaged files -------------------------------------------------------------------

def _small(tmp_path, name="small.gguf"):
    rng = np.random.default_rng(5)
    tensors = {"blk.0.w": ("Q8_0", _blocks(rng, "Q8_0", (4, 64))),
               "blk.1.w": ("Q4_0", _blocks(rng, "Q4_0", (4, 64))),
               "norm": ("F32", np.ones(64, np.float32))}
    path = tmp_path / name
    write_gguf(path, tensors)
    return path


def _patch_info(path, tensor: str, *, dims=None, qtype=None, offset=None) -> None:
    """Rewrite fields of ``tensor``'s entry in the tensor table (name, dims, type, offset)."""
    field = next(t.field for t in gguf.GGUFReader(str(path)).tensors if t.name == tensor)
    raw = bytearray(path.read_bytes())
    pos = field.offset + 8 + len(tensor.encode())
    n_dims = struct.unpack_from("<I", raw, pos)[0]
    pos += 4
    if dims is not None:
        assert len(dims) == n_dims
        struct.pack_into(f"<{n_dims}Q", raw, pos, *dims)
    pos += 8 * n_dims
    if qtype is not None:
        struct.pack_into("<I", raw, pos, qtype)
    if offset is not None:
        struct.pack_into("<Q", raw, pos + 4, offset)
    path.write_bytes(bytes(raw))


def _fails(tmp_path, capsys, path, error, pattern) -> None:
    """open raises ``error`` matching ``pattern``; convert exits 2 with it and writes nothing."""
    with pytest.raises(error, match=pattern):
        gguf_file.open(path).dequantize("blk.1.w")
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    capsys.readouterr()
    assert run_cli(path, out / "o.safetensors") == 2
    err = capsys.readouterr().err
    assert err.startswith("dqgen: error: ") and str(path) in err
    assert list(out.iterdir()) == []


def test_truncated_in_the_tensor_data(tmp_path, capsys):
    path = _small(tmp_path)
    path.write_bytes(path.read_bytes()[:-100])
    _fails(tmp_path, capsys, path, gguf_file.GgufFileError,
           r"tensor 'norm' \(F32, shape \[64\]\) needs bytes .* file ends at byte .*truncated")


def test_truncated_in_the_header(tmp_path, capsys):
    path = _small(tmp_path)
    path.write_bytes(path.read_bytes()[:200])
    _fails(tmp_path, capsys, path, gguf_file.GgufFileError, "not a valid GGUF file")


def test_bytes_do_not_match_type_and_shape(tmp_path, capsys):
    path = _small(tmp_path)
    _patch_info(path, "blk.0.w", dims=[64, 8])  # twice the rows: runs into blk.1.w
    _fails(tmp_path, capsys, path, gguf_file.GgufFileError,
           r"'blk.0.w' \(Q8_0, shape \[8, 64\]\) needs 544 bytes but tensor 'blk.1.w' "
           r"\(Q4_0.* starts 288 bytes after it")


def test_rows_not_whole_blocks(tmp_path, capsys):
    path = _small(tmp_path)
    _patch_info(path, "blk.1.w", dims=[48, 4])
    _fails(tmp_path, capsys, path, gguf_file.GgufFileError,
           r"'blk.1.w' \(Q4_0, shape \[4, 48\]\) has rows of 48 values, not a multiple of "
           r"the 32-value Q4_0 block")


def test_offset_past_the_end(tmp_path, capsys):
    path = _small(tmp_path)
    _patch_info(path, "blk.1.w", offset=1 << 40)
    _fails(tmp_path, capsys, path, gguf_file.GgufFileError,
           r"'blk.1.w' \(Q4_0, shape \[4, 64\]\) starts at byte \d+, past the end")


def test_unknown_type(tmp_path, capsys):
    path = _small(tmp_path)
    _patch_info(path, "blk.1.w", qtype=250)
    _fails(tmp_path, capsys, path, UnsupportedError, r"'blk.1.w' has GGML type 250, unknown")


def test_unsupported_type(tmp_path, capsys, monkeypatch):
    """A type gguf knows but dqgen does not read: named, and convert creates no file."""
    path = _small(tmp_path)
    real = gguf_file.supports
    monkeypatch.setattr(gguf_file, "supports", lambda t: t != "Q4_0" and real(t))
    _fails(tmp_path, capsys, path, UnsupportedError,
           r"'blk.1.w' \(Q4_0, shape \[4, 64\]\): dqgen does not dequantize Q4_0")


@pytest.mark.parametrize("shard", [None, "1KB"])
def test_failure_midway_leaves_nothing(tmp_path, monkeypatch, shard):
    """A tensor failing after others were written: no output, no temporary file."""
    path = _small(tmp_path)
    real = ggml.dequantize

    def fail_on_q4(data, qtype, *a, **k):
        if qtype == "Q4_0":
            raise InvalidProblemError("injected")
        return real(data, qtype, *a, **k)

    monkeypatch.setattr(ggml, "dequantize", fail_on_q4)
    out = tmp_path / "out"
    out.mkdir()
    flags = ["--max-shard-size", shard] if shard else []
    with pytest.raises(DqgenError, match="injected"):
        gguf_convert.convert_file(path, out / "o.safetensors", "f16",
                                  max_shard_bytes=shard and 1000)
    assert run_cli(path, out / "o.safetensors", *flags) == 2
    assert list(out.iterdir()) == []


def test_same_input_and_output(tmp_path, capsys):
    path = _small(tmp_path, "same.gguf")
    before = path.read_bytes()
    assert run_cli(path, path) == 2
    assert "must differ" in capsys.readouterr().err
    assert path.read_bytes() == before
