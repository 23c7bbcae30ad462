"""Test-wide settings: a private cache per session and hypothesis profiles."""

import os
import sys
import tempfile
import types

import pytest
from hypothesis import HealthCheck, settings

_HERE = os.path.dirname(os.path.abspath(__file__))


def _test_folders(top: str) -> list[str]:
    """Every folder under ``top`` that holds a test file, in a stable order."""
    return sorted(root for root, _dirs, files in os.walk(top)
                  if any(f.startswith("test_") and f.endswith(".py") for f in files))


# Test modules are imported by their file name (pytest's prepend import mode, so file names
# are unique across tests/), and some import another's helpers by that name (the CUDA
# emulation harness of cuda/test_formats_cuda.py, the reliability support, ...): put this
# directory (the shared helpers: strategies, formats_util, oracles) and every folder of
# tests on the path, whichever files a run collects.
for _folder in [_HERE] + _test_folders(_HERE):
    if _folder not in sys.path:
        sys.path.append(_folder)

# A peer's wheel (auto-gptq) installs a top-level package named ``tests``, which would
# shadow this directory's helper packages (tests.cuda_emu, tests.oracles): bind the name
# to this directory before any test module imports it.
if _HERE not in list(getattr(sys.modules.get("tests"), "__path__", [])):
    _package = types.ModuleType("tests", "dqgen's test helpers")
    _package.__path__ = [_HERE]
    sys.modules["tests"] = _package

settings.register_profile("ci", max_examples=60, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("thorough", max_examples=1000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

if "DQGEN_CACHE_DIR" not in os.environ:
    os.environ["DQGEN_CACHE_DIR"] = tempfile.mkdtemp(prefix="dqgen-test-cache-")


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """A private, empty cache dir for tests that inspect cache behaviour."""
    path = tmp_path / "cache"
    monkeypatch.setenv("DQGEN_CACHE_DIR", str(path))
    return path
