"""Shared fixtures: every test gets its own tuning-cache directory and a tuner that remembers nothing."""


import pytest
import torch

from mishops import cache, plans, registry, tuning
from mishops.backends import cuda

HAS_GPU = torch.cuda.is_available()
#: the extensions' builds, shared by every test (and every pytest process) as users share theirs: each
#: test's own tuning cache would otherwise cost each test file a minute of compiling per extension.
BUILD_DIR = str(cache.build_root())


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_GPU:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def isolated_mishops(tmp_path, monkeypatch):
    """A private tuning cache, the shared build directory, no env overrides from outside, no
    remembered choices or failures."""
    for var in ("MISHOPS_BACKEND", "MISHOPS_AUTOTUNE", "MISHOPS_LOG", "MISHOPS_DIST_SYNC", "MISHOPS_TUNE_BUDGET_MS",
                "MISHOPS_PLAN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MISHOPS_CACHE_DIR", str(tmp_path / "mishops-cache"))
    monkeypatch.setenv("MISHOPS_BUILD_DIR", BUILD_DIR)
    tuning.TUNER.clear()
    for counters in (tuning.stats, cuda.stats):
        for counter in counters:
            counters[counter] = 0
    saved = {r: dict(r.failed) for r in (registry.BACKENDS, plans.PLANS)}
    plans.PLANS.failed.clear()
    yield
    tuning.TUNER.clear()
    for r, failed in saved.items():
        r.failed.clear()
        r.failed.update(failed)
        r.per_device.clear()
