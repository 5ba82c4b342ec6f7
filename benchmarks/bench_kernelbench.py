"""KernelBench's own check of ``mishops.ModelNew`` against the reference ``Model``: correctness, then speed.

    python benchmarks/bench_kernelbench.py --out kernelbench.md        # on a GPU: the reference problem
    python benchmarks/bench_kernelbench.py --batch 8 --trials 2        # a smaller batch

It follows KernelBench's evaluation, so that the number it prints is the one KernelBench would:

* both models are built from ``get_init_inputs()`` on the CPU under the same seed, then moved to the GPU in
  fp32; ModelNew also loads the reference's ``state_dict``, so the weights are equal by construction;
* ``torch.backends`` is left as PyTorch sets it (KernelBench changes no flag: TF32 convs are on); the
  flags are recorded in the report;
* correctness: ``--trials`` inputs made like ``get_inputs()`` (``torch.rand`` on the CPU, then moved), each
  after seeding with a trial seed drawn from seed 42, both models under ``torch.no_grad``; a trial passes
  when ``torch.allclose(atol=1e-4, rtol=1e-4)`` holds; its max |difference| is reported either way;
* timing: grad mode on (KernelBench times without ``torch.no_grad``), a few warm-up calls, then ``--reps``
  calls of each model, each between CUDA events with the L2 flushed before it: the project's one timer,
  ``mishops.tuning.time_ms``. KernelBench reports the mean; that timer keeps the median and the 20-80%
  spread, so those are reported.

Beyond KernelBench: the first trial's outputs are compared with the float64 block on the first
``--f64-images`` images (float64 convolution is slow), eager's own error beside ModelNew's, so a reader can
see whether a failed allclose is TF32's doing (both may run TF32 convs, by different algorithms). The
report also names the plans the tuner chose and the first call's time (where the tuning happens), apart
from the timed calls. By default the tuning cache is a new empty one, so that first call tunes from scratch.

Exit status: 0 when every trial passes, 1 when one fails, 2 without a CUDA GPU. Standalone: not collected
by pytest (``tests/test_bench_kernelbench.py`` runs its comparison on the CPU).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a script: the checkout's mishops and tests
import mishops  # noqa: E402
from mishops import ModelNew, tuning  # noqa: E402
from tests import reference  # noqa: E402
from tests.reference import Model  # noqa: E402

#: KernelBench's seed: the models' weights, the trial seeds and the timing input all come from it.
SEED = 42
#: KernelBench's fp32 tolerance, absolute and relative.
TOLERANCE = 1e-4
#: KernelBench's warm-up calls before timing.
WARMUP = 3


@dataclass(frozen=True)
class TrialResult:
    seed: int
    max_diff: float
    passed: bool


@dataclass
class Result:
    trials: list[TrialResult]
    eager_f64_error: float
    new_f64_error: float
    timings: dict[str, tuning.Timing]
    first_call_s: dict[str, float]  # "no_grad" (the first correctness trial) and "grad" (the first timed model's)
    choices: list[tuple[str, tuning.Choice]]  # (phase, choice) for every choice the tuner made

    @property
    def passed(self) -> bool:
        return all(t.passed for t in self.trials)


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive number")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=positive, default=reference.batch_size)
    parser.add_argument("--in-channels", type=positive, default=reference.in_channels)
    parser.add_argument("--out-channels", type=positive, default=reference.out_channels)
    parser.add_argument("--height", type=positive, default=reference.height)
    parser.add_argument("--width", type=positive, default=reference.width)
    parser.add_argument("--kernel", type=positive, default=reference.kernel_size)
    parser.add_argument("--trials", type=positive, default=5, help="correctness trials (KernelBench: 5)")
    parser.add_argument("--reps", type=positive, default=100, help="timed calls of each model (KernelBench: 100)")
    parser.add_argument("--f64-images", type=positive, default=4,
                        help="images of the first trial compared with the float64 block")
    parser.add_argument("--keep-cache", action="store_true",
                        help="use MISHOPS_CACHE_DIR (or the user's tuning cache) instead of a new empty one")
    parser.add_argument("--out", type=Path, help="also write the markdown report here")
    return parser.parse_args(argv)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def trial_seeds(count: int) -> list[int]:
    """KernelBench's: drawn one by one from ``torch.manual_seed(SEED)``."""
    torch.manual_seed(SEED)
    return [int(torch.randint(0, 2**32 - 1, (1,))) for _ in range(count)]


def make_input(args, seed: int, device: torch.device) -> torch.Tensor:
    """``get_inputs()`` at ``args``' shape after KernelBench's ``set_seed``: ``torch.rand`` on the CPU, moved."""
    torch.manual_seed(seed)
    return torch.rand(args.batch, args.in_channels, args.height, args.width).to(device)


def build_models(args, device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module]:
    init = [args.in_channels, args.out_channels, args.kernel]  # get_init_inputs()
    with torch.no_grad():
        torch.manual_seed(SEED)
        ref = Model(*init)
        torch.manual_seed(SEED)
        new = ModelNew(*init)
        new.load_state_dict(ref.state_dict())
    return ref.to(device=device, dtype=torch.float32), new.to(device=device, dtype=torch.float32)


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| in the wider of the two dtypes (KernelBench's fp32 difference; float64 against y64)."""
    return float((a - b).abs().max())


def timed_first_call(fn, device: torch.device) -> tuple[torch.Tensor, float]:
    sync(device)
    started = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - started


def made_since(decided_before: int) -> list[tuning.Choice]:
    made = tuning.TUNER.decided - decided_before
    return tuning.TUNER.last_choices()[-made:] if made else []


def run(args, device: torch.device) -> Result:
    """The whole check on ``device`` (any device: the CPU test runs it on a small shape)."""
    ref, new = build_models(args, device)
    trials, choices, first_call_s = [], [], {}
    eager_f64 = new_f64 = math.nan
    decided = tuning.TUNER.decided
    with torch.no_grad():
        for trial, seed in enumerate(trial_seeds(args.trials)):
            x = make_input(args, seed, device)
            y_ref = ref(x)
            y_new, first_s = timed_first_call(lambda: new(x), device)
            if trial == 0:
                first_call_s["no_grad"] = first_s
                n = min(args.f64_images, args.batch)
                y64 = copy.deepcopy(ref).double()(x[:n].double())
                eager_f64, new_f64 = max_abs(y_ref[:n], y64), max_abs(y_new[:n], y64)
                del y64
            if y_new.shape != y_ref.shape:
                trials.append(TrialResult(seed, math.inf, False))
            else:
                passed = torch.allclose(y_ref, y_new, atol=TOLERANCE, rtol=TOLERANCE)
                trials.append(TrialResult(seed, max_abs(y_ref, y_new), bool(passed)))
            del x, y_ref, y_new
    choices += [("no_grad", c) for c in made_since(decided)]

    decided = tuning.TUNER.decided
    x = make_input(args, SEED, device)
    timings = {}
    with torch.enable_grad():  # KernelBench times in grad mode: the weights require grad
        for name, model in (("ModelNew", new), ("eager Model", ref)):  # KernelBench's order
            _, first_s = timed_first_call(lambda: model(x), device)
            if model is new:
                first_call_s["grad"] = first_s
            for _ in range(WARMUP - 2):  # the first call, these, and time_ms's own warm-up call
                model(x)
            timings[name] = tuning.time_ms(lambda: model(x), device, budget_s=math.inf, max_reps=args.reps,
                                           min_reps=args.reps)
    choices += [("grad mode", c) for c in made_since(decided)]
    return Result(trials, eager_f64, new_f64, timings, first_call_s, choices)


# --- the report ----------------------------------------------------------------------------------


def flags() -> dict[str, object]:
    return {"cudnn.benchmark": torch.backends.cudnn.benchmark, "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
            "cudnn.deterministic": torch.backends.cudnn.deterministic,
            "cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "float32_matmul_precision": torch.get_float32_matmul_precision()}


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        where = f"{props.name} ({props.total_memory / 2**30:.0f} GiB, sm{props.major}{props.minor})"
        libs = f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
    else:
        where, libs = f"CPU ({platform.processor() or platform.machine()})", ""
    try:
        import triton

        libs += f"Triton {triton.__version__}, "
    except ImportError:
        pass
    return f"- device: {where}\n- torch {torch.__version__}, {libs}mishops {mishops.__version__}, " \
           f"Python {platform.python_version()}"


def describe(choice: tuning.Choice) -> str:
    op = choice.op
    if op == "block":
        op += " (training)" if "|train=" in choice.key else " (inference)"
    ranked = ", ".join(f"{n} {m.median_ms:.3f}" if m.ok else f"{n} out ({m.reason[:80].replace('|', '/')})"
                       for n, m in choice.ranked())
    return f"| {op} | {choice.winner} | {choice.how} | {choice.tuning_s:.2f} | {ranked} |"


def report(args, device: torch.device, result: Result, flags_before: dict, cache: str) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    shape = f"batch {args.batch}, {args.in_channels}->{args.out_channels}, {args.height}x{args.width}, " \
            f"kernel {args.kernel}, float32"
    flags_after = flags()
    changed = {k: v for k, v in flags_after.items() if flags_before[k] != v}
    passed = sum(t.passed for t in result.trials)
    lines = ["# KernelBench check: mishops.ModelNew against the reference Model", "",
             f"- run: {now}, commit {commit()}", versions(device), f"- problem: {shape}",
             "- torch.backends, as KernelBench leaves them: " + ", ".join(f"{k}={v}" for k, v in flags_before.items())
             + (f" (changed during the run: {changed})" if changed else ""),
             f"- tuning cache: {cache}", "",
             f"## Correctness: {passed}/{len(result.trials)} trials pass "
             f"(torch.allclose, atol=rtol={TOLERANCE:g}, under torch.no_grad)", "",
             "| trial | seed | max abs diff | allclose |", "|---:|---:|---:|---|"]
    lines += [f"| {i} | {t.seed} | {t.max_diff:.3e} | {'pass' if t.passed else 'FAIL'} |"
              for i, t in enumerate(result.trials, 1)]
    ratio = result.new_f64_error / result.eager_f64_error if result.eager_f64_error > 0 else math.nan
    verdict = "n/a" if math.isnan(ratio) else "within 2x" if ratio <= 2 else "MORE than 2x"
    n = min(args.f64_images, args.batch)
    lines += ["", f"Against the float64 block (trial 1, first {n} image(s)): eager Model max abs error "
                  f"{result.eager_f64_error:.3e}, ModelNew {result.new_f64_error:.3e} ({ratio:.2f}x eager's: "
                  f"{verdict}).", ""]
    timer = "CUDA events, L2 flushed before each call" if device.type == "cuda" else "perf_counter"
    eager, ours = result.timings["eager Model"], result.timings["ModelNew"]
    lines += [f"## Speed: {eager.median_ms / ours.median_ms:.2f}x over eager (grad mode on, {WARMUP} warm-up calls, "
              f"{ours.reps} timed calls each, {timer}; median, as mishops.tuning.time_ms keeps no mean)", "",
              "| model | median ms | 20-80% spread ms |", "|---|---:|---:|"]
    lines += [f"| {name} | {t.median_ms:.3f} | {t.spread_ms:.3f} |" for name, t in (("eager Model", eager),
                                                                                ("ModelNew", ours))]
    lines += ["", f"ModelNew's first call (where the tuner chooses), apart from the timed calls: "
                  f"{result.first_call_s['no_grad']:.2f} s under torch.no_grad, "
                  f"{result.first_call_s['grad']:.2f} s in grad mode.", "",
              "## The tuner's choices", "", "| phase | op | chosen | how | tuning s | candidates, median ms |",
              "|---|---|---|---|---:|---|"]
    lines += [f"| {phase} {describe(choice)}" for phase, choice in result.choices]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    flags_before = flags()
    with tempfile.TemporaryDirectory(prefix="mishops-kernelbench-") as fresh:
        if args.keep_cache:
            cache = f"kept ({os.environ.get('MISHOPS_CACHE_DIR', 'the user cache')})"
        else:  # the builds stay where they are: a fresh tuning cache, not a fresh toolchain
            os.environ["MISHOPS_BUILD_DIR"] = str(mishops.cache.build_root())
            os.environ["MISHOPS_CACHE_DIR"] = fresh
            cache = "a new empty one (the first call tunes from scratch; the extensions' builds kept)"
        result = run(args, device)
    text = report(args, device, result, flags_before, cache)
    print(text, end="")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
