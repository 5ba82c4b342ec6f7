"""Time the whole Conv2d -> Mish -> Mish block: the eager reference, each plan forced, and the automatic choice.

    python benchmarks/bench_plans.py                      # the reference shape: N64, 64->128, 256x256, k3
    python benchmarks/bench_plans.py --batch 8 --out benchmarks/results/plans.md

For every case (module and input memory format, fp32 with TF32 or bf16 autocast) it prints the median
of CUDA-event timings of whole calls (inputs prepared, outputs allocated by the call), the first call's
time (a plan's one-time search, e.g. building every cuDNN engine config), and the max |error| of the
first two images against a float64 reference of the whole block. Standalone: not collected by pytest.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a script: the checkout's mishops and tests
from mishops import dispatch, plans  # noqa: E402
from tests.reference import Model  # noqa: E402

CL = torch.channels_last
CASES = [  # label, module channels_last, input channels_last, autocast dtype
    ("fp32 TF32, NCHW module, NCHW input", False, False, None),
    ("fp32 TF32, channels_last module, NCHW input", True, False, None),
    ("fp32 TF32, channels_last module, channels_last input", True, True, None),
    ("bf16 autocast, channels_last module, NCHW input", True, False, torch.bfloat16),
    ("bf16 autocast, NCHW module, NCHW input", False, False, torch.bfloat16),
]


def time_ms(fn, reps: int) -> tuple[float, float]:
    """(first call in ms, median of ``reps`` later calls in ms)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    first = (time.perf_counter() - t0) * 1e3
    for _ in range(2):
        fn()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return first, statistics.median(s.elapsed_time(e) for s, e in events)


def versions() -> str:
    memory_gib = torch.cuda.get_device_properties(0).total_memory / 2**30
    lines = [f"- device: {torch.cuda.get_device_name()} ({memory_gib:.0f} GiB)",
             f"- torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
             f"Python {platform.python_version()}"]
    try:
        import cudnn

        lines.append(f"- nvidia-cudnn-frontend {cudnn.__version__} (cuDNN backend {cudnn.backend_version()})")
    except ImportError:
        lines.append("- nvidia-cudnn-frontend: not installed")
    return "\n".join(lines)


def run_case(label, module_cl, input_cl, amp, args) -> list[str]:
    torch.manual_seed(0)
    model = Model(args.cin, args.cout, args.kernel).cuda()
    model64 = Model(args.cin, args.cout, args.kernel).cuda().double()
    model64.load_state_dict(model.state_dict())
    x = torch.rand(args.batch, args.cin, args.size, args.size, device="cuda")
    if module_cl:
        model = model.to(memory_format=CL)
    if input_cl:
        x = x.contiguous(memory_format=CL)
    with torch.no_grad():
        ref = model64(x[:2].double())
    rows = []

    def measure(name, fn):
        try:
            first, median = time_ms(fn, args.reps)
            y = fn()
            err = float((y[:2].double() - ref).abs().max())
            layout = "channels_last" if y.is_contiguous(memory_format=CL) and not y.is_contiguous() else "contiguous"
            rows.append(f"| {label} | {name} | {median:.3f} | {first / 1e3:.2f} | {err:.2e} | {str(y.dtype)[6:]} "
                        f"{layout} |")
            del y
        except plans.NoPlanError as exc:
            rows.append(f"| {label} | {name} | n/a | | | {str(exc).split(': ', 2)[-1][:90]} |")
        print(rows[-1], flush=True)

    amp_ctx = torch.autocast("cuda", dtype=amp) if amp is not None else contextlib.nullcontext()
    with torch.no_grad(), amp_ctx:
        measure("eager Model", lambda: model(x))
        for name in plans.plans():
            os.environ["MISHOPS_PLAN"] = name
            measure(f"plan {name}", lambda: plans.run_block(x, model.conv))
        del os.environ["MISHOPS_PLAN"]
        plans.clear_memory()
        measure("run_block auto", lambda: plans.run_block(x, model.conv))
        chosen = [c for c in dispatch.last_choices() if c.op == "block"][-1]
        rows.append(f"| {label} | auto chose **{chosen.backend}** ({chosen.how}) | | | | |")
        print(rows[-1], flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--cin", type=int, default=64)
    parser.add_argument("--cout", type=int, default=128)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--kernel", type=int, default=3)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--cases", default="all", help="comma-separated case numbers (1-based) or 'all'")
    parser.add_argument("--no-cudnn-benchmark", action="store_true", help="leave torch.backends.cudnn.benchmark off")
    parser.add_argument("--out", help="also write the markdown here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = not args.no_cudnn_benchmark
    torch.backends.cudnn.allow_tf32 = True
    picked = CASES if args.cases == "all" else [CASES[int(i) - 1] for i in args.cases.split(",")]
    header = [f"Block N{args.batch}, {args.cin}->{args.cout}, {args.size}x{args.size}, k{args.kernel}; "
              f"cudnn.benchmark={torch.backends.cudnn.benchmark}; median of {args.reps} calls; error: max |y - y64| "
              "on the first 2 images", "", versions(), "",
              "| case | what | ms | first call s | error | output |", "|---|---|---|---|---|---|"]
    print("\n".join(header), flush=True)
    rows = []
    for case in picked:
        rows += run_case(*case, args)
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(header + rows) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
