"""Test-wide settings: a private cache per session and hypothesis profiles."""

import os
import tempfile

import pytest
from hypothesis import HealthCheck, settings

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
