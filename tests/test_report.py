"""mishops.report: tables and plot from pytest-benchmark JSON, on synthetic files with known numbers
and on a real quick-mode run of ``benchmarks/`` (CPU)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mishops import report

REPO = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

GPU_ENV = {
    "date": "2026-01-02T03:04:05+00:00", "quick_mode": False, "timing": "cuda-events", "reps": [20, 50],
    "error_elements": 4194304, "model_error_images": 2, "python": "3.11.7", "mishops": "0.1.0",
    "torch": "2.11.0+cu130", "cuda": "13.0", "cudnn": 91900, "triton": "3.6.0", "cupy": "13.6.0",
    "cudnn_benchmark": False, "cudnn_allow_tf32": True, "matmul_allow_tf32": False,
    "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "gpu_memory_gib": 79.2, "l2_cache_mib": 50.0,
    "driver": "580.65.06",
    "backends": {"cuda": {"available": True, "reason": ""},
                 "cupy": {"available": False, "reason": "cupy is not installed"},
                 "eager": {"available": True, "reason": ""}},
}


def elementwise(op, impl, dtype, numel, median_ms, copy_ms, err=None, isolated_ms=None, **extra):
    nbytes = numel * {"fp32": 4, "bf16": 2, "fp16": 2}[dtype] * (2 if op == "forward" else 3)
    info = {"op": op, "impl": impl, "dtype": dtype, "numel": numel, "shape": [numel], "median_ms": median_ms,
            "bytes": nbytes, "gbps": nbytes / (median_ms * 1e-3) / 1e9, "yardstick_ms": copy_ms,
            "pct_of_copy": 100 * copy_ms / median_ms, **extra}
    if err is not None:
        info["max_abs_err"] = err
    return bench_entry(info, isolated_ms)


def bench_entry(info, isolated_ms=None):
    stats = {"median": isolated_ms / 1e3} if isolated_ms is not None else {}
    return {"group": "g", "name": f"test[{info['impl']}]", "extra_info": info, "stats": stats}


def model(mode, impl, median_ms, eager_ms, err, **extra):
    return bench_entry({"op": "model", "impl": impl, "mode": mode, "input_shape": [64, 64, 256, 256],
                        "output_shape": [64, 128, 254, 254], "median_ms": median_ms, "eager_ms": eager_ms,
                        "speedup": eager_ms / median_ms, "max_abs_err": err, "first_call_s": 0.5, **extra})


def write_json(path, benchmarks, env=GPU_ENV):
    path.write_text(json.dumps({"machine_info": {"mishops": env},
                                "commit_info": {"id": "0123456789abcdef", "dirty": True},
                                "benchmarks": benchmarks}))
    return path


@pytest.fixture
def synthetic(tmp_path):
    benchmarks = [
        elementwise("forward", "copy", "fp32", 10**8, 1.0, 1.0, isolated_ms=1.05),
        elementwise("forward", "cuda", "fp32", 10**8, 1.25, 1.0, err=1e-7, isolated_ms=1.3),
        elementwise("forward", "auto", "fp32", 10**8, 1.26, 1.0, err=1e-7, chosen="cuda"),
        elementwise("forward", "cuda", "fp32", 10**5, 0.004, 0.003, err=float("nan")),
        elementwise("forward", "copy", "fp32", 10**5, 0.003, 0.003),
        elementwise("forward", "cuda", "bf16", 10**8, 0.7, 0.65, err=3.9e-3),
        elementwise("backward", "cuda", "fp32", 10**8, 1.6, 1.5, err=2e-7),
        model("fp32", "reference", 8.6, 8.6, 4.3e-4),
        model("fp32", "auto", 4.3, 8.6, 4.3e-4, chosen="cuda"),
        model("fp32", "reference-compiled", 4.9, 8.6, 4.4e-4),
        bench_entry({"op": "overhead", "impl": "auto", "device": "cuda", "chosen": "cuda", "mish2_us": 7.5,
                     "direct_us": 4.25, "overhead_us": 3.25}),
        {"group": None, "name": "test_unrelated", "extra_info": {}, "stats": {"median": 1.0}},
    ]
    return write_json(tmp_path / "gpu.json", benchmarks)


def test_markdown_has_one_row_per_measurement_with_derived_numbers(synthetic, tmp_path):
    assert report.main([str(synthetic), "--out", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "report.md").read_text()
    # 2 bytes per element each way x 4 bytes x 1e8 elements in 1.25 ms = 640 GB/s; the copy took 1.0 ms: 80%
    assert "| cuda | 1e8 | 1.25 | 640 | 80.0 | 1.00e-07 | 1.3 |" in md
    assert "| copy | 1e8 | 1 | 800 | 100.0 | - | 1.05 |" in md
    assert "| auto → cuda | 1e8 | 1.26 |" in md
    assert "| cuda | 1e5 | 0.004 | 200 | 75.0 | NaN | - |" in md  # a NaN error is shown, not hidden
    assert "| cuda | 1e8 | 1.6 | 750 | 93.8 | 2.00e-07 |" in md  # backward: 3 x 4e8 bytes in 1.6 ms
    assert "| fp32 | ModelNew(auto) → cuda | 4.3 | 2.00x | 4.30e-04 | 0.50 |" in md
    assert "| fp32 | torch.compile(Model) | 4.9 | 1.76x |" in md
    assert "| cuda | cuda | 7.50 | 4.25 | 3.25 |" in md
    assert "test_unrelated" not in md


def test_markdown_orders_sections_sizes_and_yardsticks(synthetic, tmp_path):
    report.main([str(synthetic), "--out", str(tmp_path)])
    md = (tmp_path / "report.md").read_text()
    headings = [line for line in md.splitlines() if line.startswith("### ")]
    assert headings[:3] == ["### Double Mish forward, fp32", "### Double Mish forward, bf16",
                            "### Double Mish backward (reads x and grad_out, writes grad_in), fp32"]
    fp32 = md.split("### Double Mish forward, fp32")[1].split("###")[0]
    rows = [line.split("|")[1:3] for line in fp32.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [(impl.strip(), size.strip()) for impl, size in rows] == [
        ("copy", "1e5"), ("cuda", "1e5"), ("copy", "1e8"), ("auto → cuda", "1e8"), ("cuda", "1e8")]
    model_rows = md.split("### Conv2d")[1]
    assert model_rows.index("Model (eager reference)") < model_rows.index("torch.compile(Model)") \
        < model_rows.index("ModelNew(auto)")


def test_header_names_device_versions_date_commit_and_unavailable_backends(synthetic, tmp_path):
    report.main([str(synthetic), "--out", str(tmp_path)])
    md = (tmp_path / "report.md").read_text()
    for fact in ("NVIDIA H100 80GB HBM3", "compute capability 9.0", "driver 580.65.06", "torch 2.11.0+cu130",
                 "CUDA 13.0", "triton 3.6.0", "cupy 13.6.0", "2026-01-02T03:04:05+00:00", "commit 0123456789",
                 "uncommitted changes", "median of 20-50", "4,194,304 elements",
                 "| cupy | no | cupy is not installed |", "| cuda | yes |"):
        assert fact in md, fact
    assert "Quick mode" not in md


def test_plot_is_a_png_that_matplotlib_reads_back(synthetic, tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib import image

    report.main([str(synthetic), "--out", str(tmp_path)])
    png = tmp_path / "benchmark.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
    height, width, _ = image.imread(png).shape
    assert height > 300 and width > 600
    assert "![GB/s per backend and model times](benchmark.png)" in (tmp_path / "report.md").read_text()


def test_without_matplotlib_only_markdown_is_written(synthetic, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes the import fail
    assert report.main([str(synthetic), "--out", str(tmp_path)]) == 0
    assert not (tmp_path / "benchmark.png").exists()
    md = (tmp_path / "report.md").read_text()
    assert "benchmark.png" not in md and "| cuda | 1e8 | 1.25 |" in md


def test_several_files_are_merged(tmp_path):
    first = write_json(tmp_path / "a.json", [elementwise("forward", "cuda", "fp32", 10**6, 0.02, 0.018, err=1e-7)])
    second = write_json(tmp_path / "b.json", [model("fp32", "reference", 8.6, 8.6, 4.3e-4)], env={})
    assert report.main([str(first), str(second), "--out", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| cuda | 1e6 | 0.02 |" in md and "Model (eager reference)" in md and "NVIDIA H100" in md


def test_bad_inputs_fail_with_a_message_and_write_nothing(tmp_path, capsys):
    empty = write_json(tmp_path / "empty.json", [{"name": "test_x", "extra_info": {}, "stats": {}}])
    assert report.main([str(empty), "--out", str(tmp_path / "out")]) == 1
    assert "no mishops benchmark rows" in capsys.readouterr().err
    assert report.main([str(tmp_path / "missing.json"), "--out", str(tmp_path / "out")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("row", "label"), [
    ({"numel": 100_000}, "1e5"),
    ({"numel": 10**8, "shape": [10**8]}, "1e8"),
    ({"numel": 528_515_072, "shape": [64, 128, 254, 254]}, "528,515,072 (64x128x254x254)"),
    ({"numel": 1234, "shape": [1234]}, "1,234"),
])
def test_size_labels(row, label):
    assert report.size_label(row) == label


# --- a real quick run of benchmarks/ (CPU) -----------------------------------------------------


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """``pytest benchmarks/`` in quick mode, CPU only, into a JSON file (about 5-30 s on 2 cores)."""
    out = tmp_path_factory.mktemp("quick-bench")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MISHOPS_") and k != "TRITON_INTERPRET"}
    env.update(MISHOPS_BENCH_QUICK="1", CUDA_VISIBLE_DEVICES="", MISHOPS_CACHE_DIR=str(out / "cache"))
    result = subprocess.run([sys.executable, "-m", "pytest", "benchmarks/", "--benchmark-only", "-q",
                             "-p", "no:cacheprovider", f"--benchmark-json={out / 'bench.json'}"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return out / "bench.json"


@pytest.mark.slow
def test_quick_benchmark_json_has_every_row_with_sane_numbers(quick_run):
    data = json.loads(quick_run.read_text())
    rows = [b["extra_info"] for b in data["benchmarks"]]
    elementwise_rows = {(r["op"], r["impl"], r["dtype"], r["numel"])
                        for r in rows if r["op"] in ("forward", "backward")}
    for dtype in ("fp32", "bf16", "fp16"):
        for numel in (100_000, 1_000_000):
            for impl in ("copy", "auto", "eager"):
                assert ("forward", impl, dtype, numel) in elementwise_rows
            for impl in ("copy", "eager"):
                assert ("backward", impl, dtype, numel) in elementwise_rows
    models = {(r["mode"], r["impl"]) for r in rows if r["op"] == "model"}
    assert {("fp32", "reference"), ("fp32", "auto"), ("fp32", "eager"), ("bf16-autocast", "reference"),
            ("bf16-autocast", "eager")} <= models
    assert [r["device"] for r in rows if r["op"] == "overhead"] == ["cpu"]
    for r in rows:
        if r["op"] in ("forward", "backward"):
            assert r["median_ms"] > 0 and r["gbps"] > 0 and r["pct_of_copy"] > 0, r
        if r["op"] != "overhead" and r["impl"] != "copy":
            limit = 1e-5 if r.get("dtype", r.get("mode")) == "fp32" else 0.1
            assert 0 <= r["max_abs_err"] < limit, r
    env = data["machine_info"]["mishops"]
    assert env["quick_mode"] is True and env["torch"] and env["date"]
    assert env["backends"]["eager"] == {"available": True, "reason": ""}


@pytest.mark.slow
def test_report_of_the_quick_run(quick_run, tmp_path):
    pytest.importorskip("matplotlib")
    assert report.main([str(quick_run), "--out", str(tmp_path)]) == 0
    md = (tmp_path / "report.md").read_text()
    for dtype in ("fp32", "bf16", "fp16"):
        section = md.split(f"### Double Mish forward, {dtype}")[1].split("###")[0]
        for impl in ("copy", "auto → eager", "eager"):
            for size in ("1e5", "1e6"):
                assert f"| {impl} | {size} |" in section, (dtype, impl, size)
    assert "| fp32 | Model (eager reference) |" in md and "| bf16-autocast | ModelNew(eager) |" in md
    assert "| cpu | eager |" in md and "Quick mode" in md
    assert (tmp_path / "benchmark.png").read_bytes()[:8] == PNG_MAGIC
