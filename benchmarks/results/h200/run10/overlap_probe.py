"""Run 10's probe: does the pad pass overlap the hopper_conv kernel if the batch goes in chunks, each
chunk's pad on a side stream while the previous chunk's conv runs? Reference shape, fp32 and bf16,
NCHW; the pad kernel's warps as a parameter (the conv's CTA leaves 4096 registers and ~22 KB of shared
memory an SM, so only a small pad block can sit beside it). Times with the project's timer; checks that
the chunked output equals the plain plan's bit for bit. A probe, not library code: it launches
triton_conv's pad kernel itself."""

import sys

import torch

sys.path.insert(0, ".")
from mishops import tuning  # noqa: E402
from mishops.plans import hopper_conv as hc, triton_conv as tc  # noqa: E402

torch.backends.cudnn.allow_tf32 = True
dev = torch.device("cuda")
n, cin, cout, h, w = 64, 64, 128, 256, 256
x = torch.rand(n, cin, h, w, device=dev)
wt = torch.randn(cout, cin, 3, 3, device=dev) / 24
bias = torch.randn(cout, device=dev) * 0.1
cfg = hc.CONFIGS[0]
ext = hc.extension()
side = torch.cuda.Stream()
pad_kernel, _ = tc._kernels(False)


def chunked(dtype, chunks, warps, out, xp, wk, b):
    cur = torch.cuda.current_stream()
    side.wait_stream(cur)
    per = n // chunks
    chan = xp.shape[3]
    block_c = min(64, 1 << (chan - 1).bit_length())
    block_w = min(max(1, 4096 // block_c), 256)
    events = []
    with torch.cuda.stream(side):
        for k in range(chunks):
            xs = x[k * per:(k + 1) * per]
            pad_kernel[((256 + block_w - 1) // block_w, 256, per)](
                xs, xp[k * per:(k + 1) * per], cin, h, w, 256, 256, chan, 0, 0, *xs.stride(),
                ROUND_TF32=dtype == torch.float32, BLOCK_W=block_w, BLOCK_C=block_c, num_warps=warps)
            ev = torch.cuda.Event()
            ev.record(side)
            events.append(ev)
    for k in range(chunks):
        cur.wait_event(events[k])
        msg = ext.conv_mish(xp[k * per:(k + 1) * per], wk, b, out[k * per:(k + 1) * per], 3, 3, 1, 1, 1, 1, 2,
                            False, *cfg.kernel_args)
        assert not msg, msg
    cur.wait_stream(side)


for dtype in (torch.float32, torch.bfloat16):
    wd, bd = wt.to(dtype), bias.to(dtype)
    chan = hc.padded_channels(cin, dtype)
    wk = hc.packed_weight(wd, chan)
    ref = hc.conv_mish(x, wd, bd, (0, 0), (1, 1), 2, torch.contiguous_format, cfg)
    xp = torch.empty((n, 256, 256, chan), dtype=dtype, device=dev)
    out = torch.empty_like(ref)
    fns = {"plan": lambda: hc.conv_mish(x, wd, bd, (0, 0), (1, 1), 2, torch.contiguous_format, cfg)}
    for chunks in (4, 8, 16):
        for warps in (4, 1):
            fns[f"chunks{chunks}_warps{warps}"] = (
                lambda chunks=chunks, warps=warps: chunked(dtype, chunks, warps, out, xp, wk, bd))
    for name, fn in fns.items():
        out.fill_(float("nan"))
        fn()
        torch.cuda.synchronize()
        same = name == "plan" or torch.equal(out, ref)
        t = tuning.time_ms(fn, dev, budget_s=0.2, max_reps=15, min_reps=15)
        print(f"{str(dtype)[6:]:9s} {name:18s} {t.median_ms:7.3f} ms (spread {t.spread_ms:.3f}) same={same}", flush=True)
