"""Diagnostic (not committed): where the host time of a cached call goes on the GPU host, and the batch-1 autocast gap."""
import cProfile, pstats, io, sys, time, statistics, torch, mishops
from mishops import plans, tuning
from mishops.plans import ConvSpec, training
dev = torch.device("cuda")
torch.backends.cudnn.benchmark = True
def per_call(fn, calls=3000):
    for _ in range(200): fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(calls): fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / calls * 1e6
def interleaved(fns, rounds=9, calls=2000):
    res = {k: [] for k in fns}
    for f in fns.values():
        per_call(f, 200)
    for _ in range(rounds):
        for k, f in fns.items():
            res[k].append(per_call(f, calls))
    return {k: round(statistics.median(v), 1) for k, v in res.items()}
def prof(label, fn, n=3000):
    for _ in range(200): fn()
    torch.cuda.synchronize()
    p = cProfile.Profile(); p.enable()
    for _ in range(n): fn()
    torch.cuda.synchronize(); p.disable()
    s = io.StringIO(); pstats.Stats(p, stream=s).sort_stats("tottime").print_stats(22)
    print(f"===== {label}\n" + s.getvalue()[-4500:])
F = torch.nn.functional
m = mishops.ModelNew(16, 16, 3).to(dev)
x = torch.randn(1, 16, 12, 12, device=dev)
ref = lambda: F.mish(F.mish(m.conv(x)))
spec = ConvSpec.of(m.conv); w, b = m.conv.weight, m.conv.bias
with torch.no_grad():
    m(x); plan = plans.choose(x, w, b, spec)
    print("inference", plan.name, interleaved({"ref": ref, "ModelNew": lambda: m(x), "run_block": lambda: plans.run_block(x, m.conv), "plan": lambda: plan.forward(x, w, b, spec)}))
    prof("inference ModelNew", lambda: m(x))
    with torch.autocast("cuda", torch.bfloat16):
        m(x)
        print("bf16 autocast inference", interleaved({"ref": ref, "ModelNew": lambda: m(x)}))
        prof("autocast ModelNew", lambda: m(x))
m(x)
gw = training.grads_wanted(x, w, b); tp = plans.choose(x, w, b, spec, grads_of=gw)
print("grad", tp.name, interleaved({"ref": ref, "ModelNew": lambda: m(x), "run_block": lambda: plans.run_block(x, m.conv), "choose": lambda: plans.choose(x, w, b, spec, grads_of=gw), "forward": lambda: training.forward(tp, x, w, b, spec, True)}))
prof("grad ModelNew", lambda: m(x))
# batch 1 at the reference channels under bf16 autocast: GPU-event timing as bench_plans does
big = torch.nn.Conv2d(64, 128, 3).to(dev); xb = torch.randn(1, 64, 256, 256, device=dev)
for amp in (None, torch.bfloat16, torch.float16):
    ctx = torch.autocast("cuda", amp) if amp else torch.autocast("cuda", enabled=False)
    with torch.no_grad(), ctx:
        plans.run_block(xb, big)
        eager = lambda: F.mish(F.mish(big(xb)))
        auto = lambda: plans.run_block(xb, big)
        t = tuning.time_interleaved({"eager": eager, "auto": auto}, dev, reps=50)
        print("batch1", amp, tuning.TUNER.memory and "", {k: round(v.median_ms, 4) for k, v in t.items()},
              "host us/call", interleaved({"eager": eager, "auto": auto}, rounds=5, calls=300))
