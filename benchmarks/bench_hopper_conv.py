"""Build, check and time the hopper_conv plan in one GPU call.

Checks: each case on fresh random inputs against a float64 block computed from the same inputs,
into an output poisoned with NaN first (an element left unwritten stays NaN and fails), against
2x the eager block's own error under the same TF32 / dtype setting; planted NaN/inf propagate
like the eager block. Timing: ``mishops.tuning.time_ms`` (the project's one timer: CUDA events, L2
flushed before each call, median and 20-80% spread after a warm-up), at the reference shape, beside
the eager block and cuDNN's channels_last conv alone in the same run.

    python benchmarks/bench_hopper_conv.py [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, ".")
from mishops import tuning  # noqa: E402
from mishops.plans import hopper_conv as hc  # noqa: E402
from mishops.plans import triton_conv as tc  # noqa: E402

CL = torch.channels_last
results = {"checks": [], "timings": []}
#: the config of checks that name none (``--configs``' first, else the plan's first)
DEFAULT = {"config": None}


def block_ref(x, w, b, padding, dilation, mish_count, stride=(1, 1)):
    z = F.conv2d(x, w, b, stride, padding, dilation)
    for _ in range(mish_count):
        z = F.mish(z)
    return z


def max_err(y, ref):
    d = (y.double() - ref).abs()
    return float(d.nan_to_num(nan=0.0).max()) if d.numel() else 0.0


def check(name, n, cin, cout, h, w, k, padding=(0, 0), dilation=(1, 1), dtype=torch.float32, cl=False,
          bias=True, mish_count=2, config=None, ref_images=None, special=False, stride=(1, 1)):
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cuda.matmul.allow_tf32 = True
    x = torch.randn(n, cin, h, w, device="cuda")
    wt = torch.randn(cout, cin, *k, device="cuda") * (2.0 / (cin * k[0] * k[1]) ** 0.5)
    b = torch.randn(cout, device="cuda") * 0.5 if bias else None
    if special:
        flat = x.view(-1)
        idx = torch.randint(0, flat.numel(), (6,), device="cuda")
        flat[idx] = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e4, -1e4, 100.0], device="cuda")
    if cl:
        x = x.to(memory_format=CL)
    xd, wd, bd = x.to(dtype), wt.to(dtype), None if b is None else b.to(dtype)
    fmt = CL if cl else torch.contiguous_format
    oh = (h + 2 * padding[0] - dilation[0] * (k[0] - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (k[1] - 1) - 1) // stride[1] + 1
    out = torch.full((n, cout, oh, ow), float("nan"), dtype=dtype, device="cuda").contiguous(memory_format=fmt)
    hc.conv_mish(xd, wd, bd, padding, dilation, mish_count, fmt, config or DEFAULT["config"], out=out, stride=stride)
    torch.cuda.synchronize()
    eager = block_ref(xd, wd, bd, padding, dilation, mish_count, stride)
    m = ref_images or n
    ref = block_ref(xd[:m].double(), wd.double(), None if bd is None else bd.double(), padding, dilation, mish_count,
                    stride)
    ok_fmt = out.is_contiguous(memory_format=fmt)
    if special:
        # NaN where eager has NaN; elsewhere finite parts compared
        nan_ours, nan_eager = out.isnan(), eager.isnan()
        inf_ok = bool(((out == eager) | ~eager.isinf()).all())
        same_nan = bool((nan_ours == nan_eager).all())
        fin = ~(nan_eager | eager.isinf())
        err = float((out.double() - eager.double()).abs()[fin].max())
        passed = same_nan and inf_ok and ok_fmt
        row = dict(name=name, passed=passed, same_nan=same_nan, inf_ok=inf_ok, diff_vs_eager=err,
                   nan_count=int(nan_eager.sum()))
    else:
        err = max_err(out[:m], ref)
        eager_err = max_err(eager[:m], ref)
        floor = 0.0
        if dtype == torch.float32:  # what TF32 operands rounded to nearest cost, whatever eager picked
            rx, rw = tc.tf32_rounded(xd[:m].contiguous()), tc.tf32_rounded(wd.contiguous())
            floor = max_err(block_ref(rx.double(), rw.double(), None if bd is None else bd.double(), padding,
                                      dilation, mish_count, stride), ref)
        unwritten = int(out.isnan().sum())
        tol = 2 * max(eager_err, floor) + 1e-6 * float(ref.abs().max())
        passed = unwritten == 0 and err <= tol and ok_fmt
        row = dict(name=name, passed=passed, err=err, eager_err=eager_err, tf32_floor=floor, unwritten=unwritten,
                   fmt_ok=ok_fmt)
        if not passed:  # where it is wrong: which channels, columns and rows of image 0
            bad = ((out[:1].double() - ref[:1]).abs().nan_to_num(nan=1e30) > 10 * tol)[0]
            row["bad_fraction"] = float(bad.double().mean())
            row["bad_channels"] = bad.any(2).any(1).nonzero().flatten()[:24].tolist()
            row["bad_cols"] = bad.any(1).any(0).nonzero().flatten()[:24].tolist()
            row["bad_rows"] = bad.any(2).any(0).nonzero().flatten()[:24].tolist()
            row["sample_ours_ref"] = [out[0, 0, 0, :6].float().tolist(), ref[0, 0, 0, :6].float().tolist()]
    results["checks"].append(row)
    print(("PASS " if row["passed"] else "FAIL ") + json.dumps(row), flush=True)
    del x, out, eager, ref
    torch.cuda.empty_cache()


def timeit(fn, reps=20):
    """(median, 20-80% spread) in ms of ``reps`` calls: the project's one timer (L2 flushed before each)."""
    timing = tuning.time_ms(fn, torch.device("cuda"), budget_s=math.inf, max_reps=reps, min_reps=reps)
    return timing.median_ms, timing.spread_ms


def timing(quick, configs):
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    n, cin, cout, h, w = 64, 64, 128, 256, 256
    x = torch.rand(n, cin, h, w, device="cuda")
    wt = torch.randn(cout, cin, 3, 3, device="cuda") * (1 / 24)
    b = torch.randn(cout, device="cuda") * 0.1
    reps = 10 if quick else 15
    flop = 2 * n * 254 * 254 * cout * cin * 9
    for setting in ("fp32_nchw", "fp32_cl", "bf16_nchw", "bf16_cl"):
        dtype = torch.bfloat16 if setting.startswith("bf16") else torch.float32
        cl = setting.endswith("cl")
        fmt = CL if cl else torch.contiguous_format
        xs = x.to(memory_format=fmt)
        wd, bd = wt.to(dtype), b.to(dtype)
        xd = xs.to(dtype)  # bf16: the cast autocast would do, timed separately below
        rows = {}
        rows["eager_block"] = timeit(lambda: F.mish(F.mish(F.conv2d(xd, wd, bd))), reps)
        xcl, wcl = xd.to(memory_format=CL), wd.to(memory_format=CL)
        rows["cudnn_cl_conv_only"] = timeit(lambda: F.conv2d(xcl, wcl), reps)
        chan = hc.padded_channels(cin, dtype)
        rows["pad_pass"] = timeit(lambda: hc.padded_input(xs, (0, 0), chan, dtype), reps)
        xp = hc.padded_input(xs, (0, 0), chan, dtype)
        wk = hc.packed_weight(wd, chan)
        ext = hc.extension()
        out = torch.empty((n, cout, 254, 254), dtype=dtype, device="cuda", memory_format=fmt)
        for cfg in (c for c in configs if c.fits(wd, 1, cl)):
            def kern(cfg=cfg, mish_count=2, mode=0):
                msg = ext.conv_mish(xp, wk, bd, out, 3, 3, 1, 1, 1, 1, mish_count, cl, *cfg.kernel_args, mode)
                if msg:
                    raise RuntimeError(msg)
            rows[f"kernel_{cfg.name}"] = timeit(kern, reps)
            rows[f"kernel_{cfg.name}_mish1"] = timeit(lambda cfg=cfg: kern(cfg, 1), reps)
            for mode, what in ((1, "nostore"), (2, "mainloop")):
                rows[f"kernel_{cfg.name}_{what}"] = timeit(lambda cfg=cfg, mode=mode: kern(cfg, 2, mode), reps)
            rows[f"plan_{cfg.name}"] = timeit(
                lambda cfg=cfg: hc.conv_mish(xs, wd, bd, (0, 0), (1, 1), 2, fmt, cfg),
                reps)
        for k, v in rows.items():
            row = dict(setting=setting, what=k, median_ms=round(v[0], 4), spread_ms=round(v[1], 4))
            if k.startswith("kernel") or k.startswith("plan") or k.startswith("cudnn"):
                row["tflops"] = round(flop / v[0] / 1e9, 1)
            results["timings"].append(row)
            print("TIME " + json.dumps(row), flush=True)
        del xp, wk, out, xs, xd, xcl
        torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-time", action="store_true")
    ap.add_argument("--cases", default="", help="comma-separated case names to run alone")
    ap.add_argument("--configs", default="", help="comma-separated config names to time (default: all)")
    args = ap.parse_args()
    props = torch.cuda.get_device_properties(0)
    print(f"device {props.name} sms {props.multi_processor_count} torch {torch.__version__} "
          f"cuda {torch.version.cuda}", flush=True)
    t0 = time.time()
    hc.extension()
    print(f"build/import {time.time() - t0:.1f} s", flush=True)
    torch.manual_seed(0)
    cases = [
        # several tiles a CTA, so each consumer takes several (run 2 hung here before the consumers'
        # main loops were made to alternate strictly)
        ("multitile_fp32_single", dict(n=1, cin=64, cout=128, h=256, w=256, k=(3, 3), config=hc.HopperConfig(6, 1))),
        ("multitile_fp32_pingpong", dict(n=1, cin=64, cout=128, h=256, w=256, k=(3, 3),
                                         config=hc.HopperConfig(6, 2))),
        ("multitile_bf16_cl_s4", dict(n=2, cin=64, cout=128, h=130, w=256, k=(3, 3), config=hc.HopperConfig(4, 2),
                                      dtype=torch.bfloat16, cl=True)),
        ("small_fp32_nchw", dict(n=2, cin=64, cout=128, h=20, w=150, k=(3, 3))),
        ("small_fp32_cl", dict(n=2, cin=64, cout=128, h=20, w=150, k=(3, 3), cl=True)),
        ("small_bf16_nchw", dict(n=2, cin=64, cout=128, h=20, w=150, k=(3, 3), dtype=torch.bfloat16)),
        ("small_fp16_cl", dict(n=2, cin=64, cout=128, h=20, w=150, k=(3, 3), dtype=torch.float16, cl=True)),
        ("c8_24_37x53_pad1", dict(n=3, cin=8, cout=24, h=37, w=53, k=(3, 3), padding=(1, 1))),
        ("c8_24_37x53_pad1_cl_bf16", dict(n=3, cin=8, cout=24, h=37, w=53, k=(3, 3), padding=(1, 1), cl=True,
                                          dtype=torch.bfloat16)),
        ("k5_dil2_nobias", dict(n=2, cin=40, cout=64, h=33, w=41, k=(5, 5), padding=(2, 2), dilation=(2, 2),
                                bias=False)),
        ("k1_cout256", dict(n=2, cin=96, cout=256, h=17, w=300, k=(1, 1))),
        ("k7_cin3", dict(n=2, cin=3, cout=16, h=40, w=40, k=(7, 7), padding=(3, 3))),
        ("mish1_fp32", dict(n=2, cin=64, cout=128, h=12, w=254, k=(3, 3), mish_count=1)),
        ("mish1_fp16_cl", dict(n=2, cin=64, cout=128, h=12, w=254, k=(3, 3), mish_count=1, dtype=torch.float16,
                               cl=True)),
        ("special_fp32", dict(n=2, cin=64, cout=128, h=20, w=150, k=(3, 3), special=True)),
        ("batch1_ref", dict(n=1, cin=64, cout=128, h=256, w=256, k=(3, 3))),
    ]
    for cfg in hc.CONFIGS:  # fp32 where it fits, else bf16 (a ring and staging too deep for fp32)
        fp32 = cfg.fits(torch.empty(128, 64, 3, 3), 1, False)
        cases.append((f"small_{'fp32' if fp32 else 'bf16'}_{cfg.name}",
                      dict(n=2, cin=64, cout=128, h=20, w=150, k=(3, 3), config=cfg,
                           dtype=torch.float32 if fp32 else torch.bfloat16)))
    for epilogue in ("staged", "split"):
        # the buffered epilogues: rows' ends, odd widths (NCHW), clipped rows and channels (channels_last)
        stages = {"staged": 4, "split": 5}[epilogue]  # the deepest ring beside each one's fp32 buffer
        cfg, flat = hc.HopperConfig(stages, 2, True, epilogue), hc.HopperConfig(stages, 2, False, epilogue)
        cases += [(f"{name}_{epilogue}", dict(kw, config=kw.get("config", cfg))) for name, kw in (
            ("multitile_fp32", dict(n=1, cin=64, cout=128, h=256, w=256, k=(3, 3))),
            ("multitile_bf16_cl", dict(n=2, cin=64, cout=128, h=130, w=256, k=(3, 3), dtype=torch.bfloat16, cl=True)),
            ("small_bf16_nchw", dict(n=2, cin=64, cout=128, h=20, w=150, k=(3, 3), dtype=torch.bfloat16)),
            ("c8_24_37x53_pad1_cl_bf16", dict(n=3, cin=8, cout=24, h=37, w=53, k=(3, 3), padding=(1, 1), cl=True,
                                              dtype=torch.bfloat16)),
            ("c8_24_37x53_pad1_fp32", dict(n=3, cin=8, cout=24, h=37, w=53, k=(3, 3), padding=(1, 1))),
            ("k1_cout256", dict(n=2, cin=96, cout=256, h=17, w=300, k=(1, 1), config=flat)),
            ("k1_cout256_cl_fp16", dict(n=2, cin=96, cout=256, h=17, w=300, k=(1, 1), cl=True, dtype=torch.float16,
                                        config=flat)),
            ("special_fp32", dict(n=2, cin=64, cout=128, h=20, w=150, k=(3, 3), special=True)),
            ("mish1_fp16_cl", dict(n=2, cin=64, cout=128, h=12, w=254, k=(3, 3), mish_count=1, dtype=torch.float16,
                                   cl=True)),
            ("stride2_bf16_cl", dict(n=2, cin=64, cout=128, h=75, w=300, k=(3, 3), padding=(1, 1), stride=(2, 2),
                                     dtype=torch.bfloat16, cl=True, config=flat)),
            ("stride2_fp32_nchw", dict(n=3, cin=8, cout=24, h=37, w=53, k=(3, 3), padding=(1, 1), stride=(2, 2),
                                       config=flat)),
            ("ref_fp32_nchw", dict(n=64, cin=64, cout=128, h=256, w=256, k=(3, 3), ref_images=2)),
            ("ref_fp32_cl", dict(n=64, cin=64, cout=128, h=256, w=256, k=(3, 3), ref_images=2, cl=True)),
            ("ref_bf16_nchw", dict(n=64, cin=64, cout=128, h=256, w=256, k=(3, 3), ref_images=2,
                                   dtype=torch.bfloat16)),
        )]
    cases.append(("multitile_fp32_single_split", dict(n=1, cin=64, cout=128, h=256, w=256, k=(3, 3),
                                                      config=hc.HopperConfig(5, 1, True, "split"))))
    rowbox = hc.HopperConfig(6, 2, True)
    cases += [  # row boxes on the shapes that exercise their shifts, ring hold and guards
        ("multitile_fp32_rowbox", dict(n=1, cin=64, cout=128, h=256, w=256, k=(3, 3), config=rowbox)),
        ("multitile_bf16_cl_s4_rowbox", dict(n=2, cin=64, cout=128, h=130, w=256, k=(3, 3), dtype=torch.bfloat16,
                                             cl=True, config=hc.HopperConfig(4, 2, True))),
        ("c8_24_37x53_pad1_rowbox", dict(n=3, cin=8, cout=24, h=37, w=53, k=(3, 3), padding=(1, 1), config=rowbox)),
        ("k5_dil2_nobias_rowbox", dict(n=2, cin=40, cout=64, h=33, w=41, k=(5, 5), padding=(2, 2), dilation=(2, 2),
                                       bias=False, config=rowbox)),
        ("mish1_fp16_cl_rowbox", dict(n=2, cin=64, cout=128, h=12, w=254, k=(3, 3), mish_count=1,
                                      dtype=torch.float16, cl=True, config=rowbox)),
        ("special_fp32_rowbox", dict(n=2, cin=64, cout=128, h=20, w=150, k=(3, 3), special=True, config=rowbox)),
        ("ref_fp32_nchw_rowbox", dict(n=64, cin=64, cout=128, h=256, w=256, k=(3, 3), ref_images=2, config=rowbox)),
    ]
    cases += [  # strides: odd padded widths (a zero column added), unequal strides, 1x1 and dilated kernels
        ("stride2_fp32_nchw", dict(n=2, cin=64, cout=128, h=75, w=301, k=(3, 3), padding=(1, 1), stride=(2, 2))),
        ("stride_2x3_k5_dil2_fp16", dict(n=2, cin=40, cout=64, h=33, w=41, k=(5, 5), padding=(2, 2), dilation=(2, 2),
                                         stride=(2, 3), dtype=torch.float16, bias=False)),
        ("stride2_k1_fp32_cl", dict(n=2, cin=96, cout=256, h=17, w=300, k=(1, 1), stride=(2, 2), cl=True)),
        ("ref_fp32_nchw", dict(n=64, cin=64, cout=128, h=256, w=256, k=(3, 3), ref_images=2)),
        ("ref_fp32_cl", dict(n=64, cin=64, cout=128, h=256, w=256, k=(3, 3), ref_images=2, cl=True)),
        ("ref_bf16_nchw", dict(n=64, cin=64, cout=128, h=256, w=256, k=(3, 3), ref_images=2, dtype=torch.bfloat16)),
    ]
    if args.configs:
        DEFAULT["config"] = next(c for c in hc.CONFIGS if c.name == args.configs.split(",")[0])
        print(f"checks without a config use {DEFAULT['config'].name}", flush=True)
    if args.cases:
        cases = [c for c in cases if c[0] in args.cases.split(",")]
    for name, kw in cases:
        try:
            check(name, **kw)
        except Exception as exc:
            results["checks"].append(dict(name=name, passed=False, error=f"{type(exc).__name__}: {exc}"))
            print(f"FAIL {name}: {type(exc).__name__}: {exc}", flush=True)
            traceback.print_exc()
            if "illegal" in str(exc) or "launch" in str(exc).lower():
                break
    passed = sum(r["passed"] for r in results["checks"])
    print(f"checks passed {passed}/{len(results['checks'])}", flush=True)
    if not args.no_time and passed == len(results["checks"]):
        timing(args.quick, [c for c in hc.CONFIGS if not args.configs or c.name in args.configs.split(",")])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    print("\n=== summary ===")
    for r in results["checks"]:
        print(f"{'PASS' if r['passed'] else 'FAIL'} {r['name']} "
              + " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()
                         if k not in ("name", "passed")))
    for r in results["timings"]:
        print(f"{r['setting']:10s} {r['what']:28s} {r['median_ms']:8.3f} ms  (spread {r['spread_ms']:.3f})"
              + (f"  {r['tflops']} TFLOP/s" if "tflops" in r else ""))


if __name__ == "__main__":
    main()
