"""benchmarks/bench_kernelbench.py on the CPU: its arguments, its exit without a GPU, and its comparison run for
real on a small shape, so a broken script shows before a GPU run is spent on it."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "bench_kernelbench.py"
SMALL = ["--batch", "2", "--in-channels", "4", "--out-channels", "8", "--height", "10", "--width", "10",
         "--trials", "2", "--reps", "3", "--f64-images", "1"]


def _load():
    spec = importlib.util.spec_from_file_location("bench_kernelbench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_without_a_gpu_it_says_so_in_one_line_and_exits_2():
    done = subprocess.run([sys.executable, str(SCRIPT), "--trials", "1"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))  # no GPU, on any machine
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == "needs a CUDA GPU" and done.stdout == ""


def test_arguments_default_to_the_reference_problem_and_are_checked(capsys):
    bench = _load()
    args = bench.parse_args([])
    assert (args.batch, args.in_channels, args.out_channels, args.height, args.width, args.kernel) == \
        (64, 64, 128, 256, 256, 3)
    assert (args.trials, args.reps, args.out, args.keep_cache) == (5, 100, None, False)
    with pytest.raises(SystemExit) as exited:
        bench.parse_args(["--reps", "0"])
    assert exited.value.code == 2 and "--reps: 0 is not a positive number" in capsys.readouterr().err


def test_small_run_on_cpu_passes_and_reports(tmp_path):
    bench = _load()
    args = bench.parse_args(SMALL)
    result = bench.run(args, torch.device("cpu"))
    assert result.passed and len(result.trials) == 2
    assert len({t.seed for t in result.trials}) == 2  # a fresh seed each trial
    assert all(t.max_diff < 1e-5 for t in result.trials)
    assert result.eager_f64_error < 1e-5 and result.new_f64_error <= 2 * result.eager_f64_error + 1e-7
    assert set(result.timings) == {"eager Model", "ModelNew"} and result.timings["ModelNew"].reps == 3
    assert {phase for phase, choice in result.choices if choice.op == "block"} == {"no_grad", "grad mode"}

    text = bench.report(args, torch.device("cpu"), result, bench.flags(), "a test's")
    assert "## Correctness: 2/2 trials pass" in text and "batch 2, 4->8, 10x10, kernel 3, float32" in text
    assert "cudnn.allow_tf32=" in text and "| no_grad | block (inference) |" in text
    assert "| grad mode | block (training) |" in text and "over eager" in text


def test_a_wrong_model_fails_its_trials(monkeypatch):
    bench = _load()

    class Wrong(bench.ModelNew):
        def forward(self, x):
            return super().forward(x) + 1e-3

    monkeypatch.setattr(bench, "ModelNew", Wrong)
    result = bench.run(bench.parse_args(SMALL), torch.device("cpu"))
    assert not result.passed and all(not t.passed and t.max_diff > 5e-4 for t in result.trials)
