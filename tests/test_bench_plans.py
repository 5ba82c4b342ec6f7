"""The plan benchmark runs on CPU with tiny shapes, so a broken script shows before a GPU call is spent on it."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _rows(markdown: str, section: str) -> list[list[str]]:
    """The table rows (cells) under the first heading that contains ``section``."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("#") and section in line)
    rows = []
    for line in lines[start + 1:]:
        if line.startswith("#"):
            break
        if line.startswith("| ") and not line.startswith("| case") and "---" not in line:
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_bench_plans_smoke_on_cpu(tmp_path):
    out = tmp_path / "plans.md"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_plans.py"), "--device", "cpu", "--shapes",
         "2x3x4x12x12,1x3x4x10x10", "--cases", "1,6,7", "--reps", "3", "--no-compile", "--train", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, MISHOPS_CACHE_DIR=str(tmp_path / "cache")))
    assert done.returncode == 0, done.stderr
    text = out.read_text()
    assert "## N2, 3->4, 12x12, k3: copy bandwidth" in text and "## N1, 3->4, 10x10, k3" in text

    inference = _rows(text, "N2, 3->4, 12x12, k3: copy bandwidth")
    cases = {row[0] for row in inference}
    assert cases == {"fp32 TF32, NCHW module, NCHW input", "bf16 autocast, channels_last module, channels_last input",
                     "fp16 autocast, NCHW module, NCHW input"}
    by_what = {(row[0], row[1].split(":")[0]): row for row in inference}
    eager = by_what[("fp32 TF32, NCHW module, NCHW input", "eager Model")]
    assert eager[4] == "1.00x" and eager[6].endswith("%") and eager[8] == "float32 contiguous"
    assert float(eager[7]) < 1e-5  # fp32 on CPU: no TF32
    auto = by_what[("fp16 autocast, NCHW module, NCHW input", "run_block auto")]
    assert ("torch_conv" in auto[1] or "eager" in auto[1]) and auto[8] == "float16 contiguous" and float(auto[2]) > 0
    assert by_what[("bf16 autocast, channels_last module, channels_last input", "eager Model")][8] == \
        "bfloat16 channels_last"
    alternating = [row for row in inference if "calls alternating" in row[1]]
    assert len(alternating) == len(cases)  # one per case, eager's time in its label, auto's and the ratio beside
    assert all(float(row[2]) > 0 and row[4].endswith("x") for row in alternating)

    training = _rows(text, "N2, 3->4, 12x12, k3: training step")
    for config in ("w,b", "x,w,b"):  # both training configurations, each with its own eager baseline
        rows = {row[2]: row for row in training if row[1] == config}
        assert set(rows) >= {"eager Model", "plan torch_conv (store)", "plan cudnn_fused (recompute)"}, rows
        assert rows["eager Model"][5] == "1.00x"
        assert any("calls alternating" in what and rows[what][5].endswith("x") for what in rows)
        store = rows["plan torch_conv (store)"]
        assert float(store[3]) > 0 and float(store[8]) < 1e-2
