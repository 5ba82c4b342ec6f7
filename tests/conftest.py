"""Shared fixtures: every test gets its own tuning-cache directory and a clean dispatcher."""


import pytest
import torch

from mishops import dispatch, plans, registry

HAS_GPU = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_GPU:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def isolated_mishops(tmp_path, monkeypatch):
    """A private cache directory, no env overrides from outside, no remembered choices or failures."""
    for var in ("MISHOPS_BACKEND", "MISHOPS_AUTOTUNE", "MISHOPS_LOG", "MISHOPS_DIST_SYNC", "MISHOPS_TUNE_BUDGET_MS",
                "MISHOPS_PLAN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MISHOPS_CACHE_DIR", str(tmp_path / "mishops-cache"))
    dispatch.clear_memory()
    plans.clear_memory()
    for counter in dispatch.stats:
        dispatch.stats[counter] = 0
    saved_failed = dict(registry._failed)
    yield
    dispatch.clear_memory()
    registry._failed.clear()
    registry._failed.update(saved_failed)
