"""Sweep the Triton conv plan's tile configs at one shape; print ms, TFLOP/s and the error of each.

    python benchmarks/sweep_triton_conv.py                     # reference shape, fp32 and bf16
    python benchmarks/sweep_triton_conv.py --batch 8 --dtypes fp32

Each row: the median of CUDA-event timings of ``conv_mish2`` (input pass + conv kernel, NCHW output), the
conv kernel alone, and the max |error| on the first two images against a float64 reference of the
block, next to the eager block's own error and time in the same run. Standalone: not collected by
pytest; the plan's own choice of config lives in ``mishops/plans/triton_conv.py``.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mishops import tuning  # noqa: E402
from mishops.plans import triton_conv  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CONFIGS = {  # (BLOCK_P, BLOCK_CO, BLOCK_K, num_warps, num_stages)
    torch.float32: [(128, 128, 32, 8, 3), (128, 128, 32, 8, 4), (128, 128, 32, 4, 3), (64, 128, 32, 4, 3),
                    (128, 128, 16, 8, 4), (128, 128, 64, 8, 3), (256, 128, 32, 8, 3)],
    torch.bfloat16: [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 32, 8, 3), (64, 128, 64, 4, 3),
                     (256, 128, 64, 8, 3)],
}
CONFIGS[torch.float16] = CONFIGS[torch.bfloat16]


def _record_launches() -> list:
    """The conv kernel's compiled objects as they launch: their registers and shared memory say how
    many programs fit on an SM."""
    launched = []
    jitted = triton_conv._kernels(False)[1]
    run = jitted.run
    jitted.run = lambda *a, **k: launched.append(run(*a, **k)) or launched[-1]
    return launched


def median_ms(fn, reps: int) -> float:
    """The project's one timer (``mishops.tuning.time_ms``), ``reps`` calls after its warm-up."""
    return tuning.time_ms(fn, torch.device("cuda"), budget_s=math.inf, max_reps=reps, min_reps=reps).median_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--cin", type=int, default=64)
    parser.add_argument("--cout", type=int, default=128)
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--channels-last", action="store_true", help="channels_last input")
    parser.add_argument("--padding", type=int, default=1,
                        help="1: 256x256 outputs; 0: the reference problem's 254x254 (rows TMA cannot store)")
    parser.add_argument("--configs", default="",
                        help="only these, e.g. 128x128x32x8x3,128x64x32x4x3x128 (BLOCK_P x BLOCK_CO x BLOCK_K x warps x "
                             "stages [x maxnreg])")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = True
    out_size = args.size + 2 * args.padding - 2
    flops = 2 * args.batch * args.cout * out_size**2 * args.cin * 9
    launched = _record_launches()
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}; N{args.batch} {args.cin}->{args.cout} "
          f"{args.size}x{args.size} k3 padding {args.padding}; {'channels_last' if args.channels_last else 'NCHW'} input")
    conv = torch.nn.Conv2d(args.cin, args.cout, 3, padding=args.padding).cuda()
    for name in args.dtypes.split(","):
        dtype = DTYPES[name]
        x = torch.rand(args.batch, args.cin, args.size, args.size, device="cuda")
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        w, b = conv.weight.detach(), conv.bias.detach()
        with torch.no_grad():
            y64 = F.mish(F.mish(F.conv2d(x[:2].double(), w.double(), b.double(), padding=args.padding)))
        xd, wd, bd = x.to(dtype), w.to(dtype), b.to(dtype)
        with torch.no_grad():
            eager = lambda: F.mish(F.mish(F.conv2d(xd, wd, bd, padding=args.padding)))  # noqa: E731
            eager_err = (eager()[:2].double() - y64).abs().max().item()
            eager_ms = median_ms(eager, args.reps)
        print(f"\n## {name}: eager block {eager_ms:.3f} ms, error {eager_err:.2e}\n")
        print("| BLOCK_P | BLOCK_CO | BLOCK_K | warps | stages | ms | input pass ms | conv ms | conv TFLOP/s | error "
              "| regs | shared KiB |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        channels = 64
        pass_ms = median_ms(lambda: triton_conv.padded_input(xd, (args.padding,) * 2, channels, dtype == torch.float32),
                            args.reps)
        chosen = [tuple(int(v) for v in c.split("x")) for c in args.configs.split(",") if c]
        for cfg in chosen or CONFIGS[dtype]:
            bp, bco, bk, warps, stages, *maxnreg = cfg
            config = triton_conv.TileConfig(bp, bco, bk, warps, stages, *maxnreg)
            stages = f"{stages}" + (f", maxnreg {maxnreg[0]}" if maxnreg else "")
            run = lambda: triton_conv.conv_mish2(xd, wd, bd, (args.padding,) * 2, (1, 1), config=config)  # noqa: E731
            try:
                err = (run()[:2].double() - y64).abs().max().item()
                ms = median_ms(run, args.reps)
            except Exception as exc:
                print(f"| {bp} | {bco} | {bk} | {warps} | {stages} | failed: {type(exc).__name__}: "
                      f"{' '.join(str(exc).split())[:400]} |||||||")
                continue
            conv_ms = ms - pass_ms
            kernel = launched[-1]
            print(f"| {bp} | {bco} | {bk} | {warps} | {stages} | {ms:.3f} | {pass_ms:.3f} | {conv_ms:.3f} | "
                  f"{flops / conv_ms / 1e9:.0f} | {err:.2e} | {kernel.n_regs} | {kernel.metadata.shared / 1024:.0f} |",
                  flush=True)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
