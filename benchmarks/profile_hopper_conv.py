"""Launch the hopper_conv kernel at the reference shape a few times, for a profiler to watch.

``benchmarks/profile_hopper_conv.sh`` runs this under ``ncu``; on its own it prints each launch's time
(CUDA events), which says whether the profiled launches are representative.

    python benchmarks/profile_hopper_conv.py --config s6_pingpong [--mode 0] [--dtype fp32] [--cl]
"""

from __future__ import annotations

import argparse
import sys

import torch

sys.path.insert(0, ".")
from mishops.plans import hopper_conv as hc  # noqa: E402

CONFIGS = {c.name: c for c in hc.CONFIGS}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=hc.CONFIGS[0].name, choices=sorted(CONFIGS))
    ap.add_argument("--mode", type=int, default=0, help="the kernel's mode: 0 block, 1 no stores, 2 main loop")
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--cl", action="store_true", help="channels_last output")
    ap.add_argument("--launches", type=int, default=3)
    args = ap.parse_args()
    cfg = CONFIGS[args.config]
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    n, cin, cout, h, w = 64, 64, 128, 256, 256
    x = torch.rand(n, cin, h, w, device="cuda")
    wt = (torch.randn(cout, cin, 3, 3, device="cuda") / 24).to(dtype)
    b = (torch.randn(cout, device="cuda") * 0.1).to(dtype)
    chan = hc.padded_channels(cin, dtype)
    xp, wk = hc.padded_input(x, (0, 0), chan, dtype), hc.packed_weight(wt, chan)
    fmt = torch.channels_last if args.cl else torch.contiguous_format
    out = torch.empty((n, cout, h - 2, w - 2), dtype=dtype, device="cuda", memory_format=fmt)
    ext = hc.extension()
    for _ in range(args.launches):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        msg = ext.conv_mish(xp, wk, b, out, 3, 3, 1, 1, 1, 1, 2, args.cl, *cfg.kernel_args, args.mode)
        end.record()
        torch.cuda.synchronize()
        if msg:
            raise SystemExit(msg)
        print(f"{cfg.name} mode {args.mode} {args.dtype}{' cl' if args.cl else ''}: {start.elapsed_time(end):.3f} ms")


if __name__ == "__main__":
    main()
