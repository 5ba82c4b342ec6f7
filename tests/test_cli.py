import json
import logging
import subprocess
import sys

import pytest
import torch

from mishops import cli
from mishops.cli import main


def _one_line_error(capsys, argv, *, startswith):
    """The command fails with exit code 2 and exactly one line on stderr, no traceback."""
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(startswith), lines[0]
    assert "Traceback" not in err
    return lines[0]


def test_info_lists_every_backend_with_reason(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for name in ("eager", "cuda", "triton", "cupy"):
        assert name in out
    assert "available" in out and "tuning cache" in out


def test_bench_prints_table_and_times_and_checks_model(capsys):
    assert main(["bench", "--shape", "2x4x10x10", "--budget-ms", "20", "--in-channels", "3"]) == 0
    out = capsys.readouterr().out
    assert "copy (yardstick)" in out and "eager" in out and "GB/s" in out
    assert "ModelNew(3, 4, 3) on input (2, 3, 12, 12)" in out
    assert "reference (conv, F.mish twice)" in out and "backend='auto' (plan " in out
    assert out.count("ok (rtol 0.002, atol 0.002)") == 2 and "(2, 4, 10, 10) contiguous" in out


def test_bench_says_why_model_is_not_run(capsys):
    assert main(["bench", "--shape", "1000", "--budget-ms", "10"]) == 0
    assert "ModelNew not run: --shape 1000 is not a 4-D conv output" in capsys.readouterr().out


def test_bench_default_shape_says_it_is_small_on_cpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only default")
    assert main(["bench", "--budget-ms", "10", "--in-channels", "2"]) == 0
    assert "no CUDA GPU: using a small CPU shape" in capsys.readouterr().out


def test_bench_warns_before_a_long_cpu_run(capsys, monkeypatch):
    started = []

    class Stop(Exception):
        pass

    def stop(op, x):
        started.append(1)
        raise Stop  # the work would start here

    monkeypatch.setattr(cli.dispatch, "problem", stop)
    monkeypatch.setattr(cli.torch, "randn", lambda *a, **k: torch.empty(0))  # no 2 GB tensor in a test
    with pytest.raises(Stop):
        main(["bench", "--device", "cpu", "--shape", "64x128x254x254", "--dtype", "bfloat16"])
    err = capsys.readouterr().err
    assert err.startswith("mishops bench: warning: a 64x128x254x254 bfloat16 bench on CPU moves 529 M elements")
    assert "expect minutes" in err and started  # said before the work


def test_no_warning_for_a_small_cpu_run():
    assert cli._long_on_cpu((4, 16, 64, 64), torch.float32, 64) == ""


def test_tune_stores_choices(capsys):
    assert main(["tune", "--shape", "3x5", "--dtype", "float32", "--dtype", "bfloat16", "--backward"]) == 0
    out = capsys.readouterr().out
    assert out.count("mish2 forward") == 2 and out.count("mish2 backward") == 2


def test_tune_rows_show_their_own_key_when_a_shape_repeats(capsys):
    assert main(["tune", "--shape", "3x5", "--shape", "4x6", "--shape", "3x5"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if "mish2 forward" in line]
    assert [r.split("│")[1].strip() for r in rows] == ["mish2 forward float32 3x5", "mish2 forward float32 4x6",
                                                        "mish2 forward float32 3x5"]


def test_tune_under_a_named_backend_says_there_is_nothing_to_tune(capsys, monkeypatch):
    monkeypatch.setenv("MISHOPS_BACKEND", "eager")
    assert main(["tune", "--shape", "3x5"]) == 0
    out = capsys.readouterr().out
    assert "MISHOPS_BACKEND names the backend: nothing to tune" in out and "nothing new stored" in out


def test_tune_a_block_prints_every_candidate_and_stores_it(capsys):
    assert main(["tune", "--block", "2x3x10x10", "--out-channels", "4", "--kernel", "3", "--train"]) == 0
    out = capsys.readouterr().out
    assert "block 2x3x10x10->4 k3 float32 train" in out and "<- chosen" in out
    assert "eager" in out and "torch_conv" in out
    assert "stored 2 new measurement set(s)" in out  # the inference key and the training key
    assert main(["tune", "--block", "2x3x10x10", "--out-channels", "4", "--kernel", "3", "--train"]) == 0
    assert "already chosen in this process" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer without a CUDA GPU")
def test_bench_on_cuda_without_a_gpu(capsys):
    _one_line_error(capsys, ["bench", "--device", "cuda"],
                    startswith="mishops bench: error: argument --device: cuda: no CUDA GPU is visible to PyTorch")


@pytest.mark.parametrize("argv, first", [
    (["bench", "--device", "foo"], "mishops bench: error: argument --device: unknown device 'foo'"),
    (["bench", "--device", "mps"], "mishops bench: error: argument --device: device 'mps' is not supported"),
    (["bench", "--shape", "4x-1"], "mishops bench: error: argument --shape: shape must have positive sizes"),
    (["bench", "--shape", "64xx"], "mishops bench: error: argument --shape: shape must look like 64x128x254x254"),
    (["bench", "--dtype", "int8"], "mishops bench: error: argument --dtype: invalid choice: 'int8'"),
    (["bench", "--budget-ms", "abc"], "mishops bench: error: argument --budget-ms: must be a positive number"),
    (["bench", "--in-channels", "0"], "mishops bench: error: argument --in-channels: must be a positive whole"),
    (["cache", "wipe"], "mishops cache: error: argument action: invalid choice: 'wipe'"),
    (["frobnicate"], "mishops: error: argument COMMAND: invalid choice: 'frobnicate'"),
])
def test_bad_options_are_one_line_and_exit_2(capsys, argv, first):
    _one_line_error(capsys, argv, startswith=first)


def test_report_of_a_file_that_is_not_json(capsys, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{ not json")
    _one_line_error(capsys, ["report", str(bad)], startswith=f"mishops report: error: {bad}: not a JSON file")
    _one_line_error(capsys, ["report", str(tmp_path / "missing.json")],
                    startswith=f"mishops report: error: {tmp_path / 'missing.json'}: cannot read it")
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps([1, 2]))
    _one_line_error(capsys, ["report", str(wrong), "--out", str(tmp_path)],
                    startswith=f"mishops report: error: {wrong}: not a pytest-benchmark JSON file")


@pytest.mark.parametrize("var, value, first", [
    ("MISHOPS_TUNE_BUDGET_MS", "abc", "mishops bench: error: MISHOPS_TUNE_BUDGET_MS='abc': must be a positive number"),
    ("MISHOPS_TUNE_BUDGET_MS", "-5", "mishops bench: error: MISHOPS_TUNE_BUDGET_MS='-5': must be a positive number"),
    ("MISHOPS_AUTOTUNE", "yes", "mishops bench: error: MISHOPS_AUTOTUNE='yes': must be 0"),
    ("MISHOPS_BACKEND", "bogus", "mishops bench: error: unknown MISHOPS_BACKEND 'bogus'; valid: auto, "),
    ("MISHOPS_PLAN", "bogus", "mishops bench: error: MISHOPS_PLAN='bogus': unknown plan; valid: "),
    ("MISHOPS_LOG", "loud", "mishops bench: error: MISHOPS_LOG='loud': must be a logging level"),
    ("MISHOPS_CUDNN_CONFIGS", "x", "mishops bench: error: MISHOPS_CUDNN_CONFIGS='x': must be a positive whole number or 'all'"),
])
def test_bad_environment_values_are_one_line_and_exit_2(capsys, monkeypatch, var, value, first):
    monkeypatch.setenv(var, value)
    _one_line_error(capsys, ["bench", "--shape", "10", "--budget-ms", "5"], startswith=first)


def test_good_environment_values_pass():
    cli.check_environment({"MISHOPS_TUNE_BUDGET_MS": "50", "MISHOPS_AUTOTUNE": "0", "MISHOPS_BACKEND": "AUTO",
                           "MISHOPS_PLAN": "torch_conv", "MISHOPS_LOG": "info"})


def test_help_is_plain_text(capsys):
    for argv in (["--help"], ["bench", "--help"], ["report", "--help"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 0
        out = capsys.readouterr().out
        assert "``" not in out and "`" not in out and ":class:" not in out
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "Conv2d -> Mish -> Mish" in capsys.readouterr().out


def test_log_lines_carry_one_prefix():
    record = logging.LogRecord("mishops", logging.WARNING, __file__, 1, "mishops: plan %r rejected", ("x",), None)
    assert cli._Formatter("%(levelname)s %(name)s: %(message)s").format(record) == "WARNING mishops: plan 'x' rejected"


def test_module_entry_point_and_no_traceback_in_a_new_process():
    ok = subprocess.run([sys.executable, "-m", "mishops", "info"], capture_output=True, text=True)
    assert ok.returncode == 0 and "eager" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "mishops", "bench", "--device", "foo"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
