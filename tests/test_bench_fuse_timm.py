"""benchmarks/bench_fuse_timm.py without timm (CI): a clear skip, exit 0. With timm (the GPU machine)
benchmarks/run_gpu.sh runs it."""

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_fuse_timm.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_fuse_timm", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_without_timm_it_says_so_and_exits_0(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    assert _load().main(["--device", "cpu", "--small"]) == 0
    assert "skipped: timm is not installed" in capsys.readouterr().out


@pytest.mark.slow
def test_small_run_on_cpu_writes_the_table(tmp_path):
    pytest.importorskip("timm")
    out = tmp_path / "fuse.md"
    assert _load().main(["--device", "cpu", "--small", "--out", str(out)]) == 0
    text = out.read_text()
    assert "| fp32 | eager |" in text and "blocks" in text


def test_block_choices_lists_each_key_with_its_winner_and_eager(tmp_path, monkeypatch):
    """The report's view of the tuner: one line per block key, the winner's and eager's medians."""
    import torch

    import mishops
    from mishops import tuning

    monkeypatch.setenv("MISHOPS_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("MISHOPS_TUNE_BUDGET_MS", "20")
    tuning.TUNER.clear()
    try:
        with torch.no_grad():
            mishops.ModelNew(4, 8, 3)(torch.randn(1, 4, 9, 9))
            mishops.ModelNew(8, 8, 1)(torch.randn(1, 8, 9, 9))
        head, *keys = _load().block_choices()
    finally:
        tuning.TUNER.clear()
    assert head.startswith("2 block keys: ") and len(keys) == 2
    assert all(line.startswith("  - `block|") and " ms, eager " in line for line in keys)
