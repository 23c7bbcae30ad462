"""tools/regen.py: generated/ matches the templates byte for byte, and --check notices
any missing, extra or changed file, including one caused by a template edit."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

from dqgen import render

ROOT = Path(__file__).resolve().parents[2]


def _load_regen():
    spec = importlib.util.spec_from_file_location("regen", ROOT / "tools" / "regen.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


regen = _load_regen()


@pytest.fixture
def templates_copy(tmp_path, monkeypatch):
    """A private copy of templates/ that rendering uses instead of the real one."""
    copy = tmp_path / "templates"
    shutil.copytree(render.TEMPLATE_DIR, copy)
    monkeypatch.setattr(render, "TEMPLATE_DIR", copy)
    render.reload_templates()
    yield copy
    monkeypatch.undo()
    render.reload_templates()


def test_committed_generated_sources_are_up_to_date(capsys):
    status = regen.main(["--check"])
    out, err = capsys.readouterr()
    assert status == 0, f"generated/ is stale; run `python tools/regen.py`:\n{out}{err}"
    assert "up to date" in out


def test_generated_index_lists_every_source():
    files = regen.expected_files(with_cuda=True)
    index = files["README.md"]
    sources = [p for p in files if p != "README.md"]
    assert all(f"]({p})" in index for p in sources)
    uris = {Path(p).stem for p in sources}
    # dequantize: 2 ints x 4 floats x 3 group sizes; the three other ops at group 128
    assert len(uris) == 24 + 8 + 4 + 4
    assert sum(p.startswith("c/generic/") for p in sources) == len(uris)
    assert sum(p.startswith("cuda/sm_90/") for p in sources) == len(uris)


def test_check_lists_missing_extra_and_changed_files(tmp_path, capsys):
    target = tmp_path / "generated"
    assert regen.main(["--dir", str(target)]) == 0
    assert regen.main(["--check", "--dir", str(target)]) == 0
    capsys.readouterr()
    (target / "c" / "generic" / "dequant_pg_s8_f32_g32.c").unlink()
    (target / "c" / "generic" / "old_kernel.c").write_text("/* gone */\n")
    changed = target / "README.md"
    changed.write_bytes(changed.read_bytes() + b" ")
    assert regen.main(["--check", "--dir", str(target)]) == 1
    out, err = capsys.readouterr()
    assert "missing" in out and "dequant_pg_s8_f32_g32.c" in out
    assert "extra" in out and "old_kernel.c" in out
    assert "changed" in out and "README.md" in out
    assert "3 file(s)" in err
    assert regen.main(["--dir", str(target)]) == 0  # rewriting repairs all three
    assert regen.main(["--check", "--dir", str(target)]) == 0


def test_check_fails_when_a_template_changes(templates_copy, tmp_path, capsys):
    target = tmp_path / "generated"
    assert regen.main(["--dir", str(target)]) == 0
    capsys.readouterr()
    kernel = templates_copy / "c" / "kernel.c.j2"
    kernel.write_text(kernel.read_text() + "/* an edit that changes every C kernel */\n")
    render.reload_templates()
    assert regen.main(["--check", "--dir", str(target)]) == 1
    out, _ = capsys.readouterr()
    changed = [line.split()[1] for line in out.splitlines() if line.strip().startswith("changed")]
    assert any("/c/generic/dequant_pg_s8_bf16_g128.c" in p for p in changed)
    assert not any("/cuda/" in p for p in changed)  # CUDA kernels use another template


def test_cuda_is_skipped_only_without_its_template(templates_copy, tmp_path, capsys):
    (templates_copy / regen.CUDA_TEMPLATE).unlink()
    assert regen.main(["--dir", str(tmp_path / "g")]) == 0
    err = capsys.readouterr().err
    assert "skipping CUDA" in err
    assert not (tmp_path / "g" / "cuda").exists()
    assert (tmp_path / "g" / "c" / "generic").is_dir()


def test_avx2_sources_left_out_differ_only_in_the_isa_name():
    """generated/README.md says so; a template that branched on the ISA name itself
    (instead of the schedule) would make it false."""
    from dqgen.lower import lower
    files = regen.expected_files(with_cuda=False)
    skipped = 0
    for desc in regen.default_set():
        if f"c/avx2/{desc.uri}.c" in files:
            continue
        skipped += 1
        simd = render.render(lower(desc, "c", "avx2")).text
        assert simd.replace("c (avx2)", "c (generic)") == files[f"c/generic/{desc.uri}.c"]
    assert skipped > 0
