import subprocess
import sys

from mishops.cli import main


def test_info_lists_every_backend_with_reason(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for name in ("eager", "cuda", "triton", "cupy"):
        assert name in out
    assert "available" in out and "tuning cache" in out


def test_bench_prints_table_and_runs_model(capsys):
    assert main(["bench", "--shape", "2x4x10x10", "--budget-ms", "50"]) == 0
    out = capsys.readouterr().out
    assert "copy (yardstick)" in out and "eager" in out and "GB/s" in out
    assert "ModelNew(64, 4, 3" in out and "output (2, 4, 10, 10)" in out


def test_bench_default_shape_says_it_is_small_on_cpu(capsys):
    assert main(["bench", "--budget-ms", "20"]) == 0
    assert "no CUDA GPU: using a small CPU shape" in capsys.readouterr().out


def test_tune_stores_choices(capsys):
    assert main(["tune", "--shape", "3x5", "--dtype", "float32", "--dtype", "bfloat16", "--backward"]) == 0
    out = capsys.readouterr().out
    assert out.count("│ forward") == 2 and out.count("│ backward") == 2


def test_module_entry_point_and_bad_shape():
    ok = subprocess.run([sys.executable, "-m", "mishops", "info"], capture_output=True, text=True)
    assert ok.returncode == 0 and "eager" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "mishops", "bench", "--shape", "64xx"], capture_output=True, text=True)
    assert bad.returncode == 2 and "shape must look like" in bad.stderr
