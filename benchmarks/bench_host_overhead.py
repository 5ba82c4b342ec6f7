"""What choosing costs a cached call: host time per call of ``mish2`` and ``ModelNew``, against calling
what the tuner chose directly, in inference (plain and under bf16 autocast) and in grad mode.

    python benchmarks/bench_host_overhead.py --out overhead.md          # on a GPU host
    python benchmarks/bench_host_overhead.py --device cpu --calls 2000  # a CPU smoke run

The inputs are small, so the GPU's work per call is shorter than the host's and a call's wall time (many
calls back to back, one synchronisation at the end) is the host's: the difference between the two columns
is what the library adds on top of the chosen kernel. Standalone: not collected by pytest.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a script: the checkout's mishops
import mishops  # noqa: E402
from mishops import dispatch, plans  # noqa: E402
from mishops.plans import ConvSpec, training  # noqa: E402


def per_call_us(fn, device: torch.device, calls: int, rounds: int = 7) -> float:
    """Median over rounds of the mean wall time per call, in microseconds."""
    for _ in range(min(calls, 200)):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    results = []
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(calls):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        results.append((time.perf_counter() - started) / calls * 1e6)
    return statistics.median(results)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--out", help="also write the markdown table here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)

    rows = []
    x = torch.randn(4096, device=device)
    mishops.mish2(x)  # tunes and caches the choice
    backend = dispatch.choose("forward", x)
    rows.append(("mish2, inference", backend.name, per_call_us(lambda: mishops.mish2(x), device, args.calls),
                 per_call_us(lambda: backend.forward(x), device, args.calls)))

    model = mishops.ModelNew(16, 16, 3).to(device)
    inp = torch.randn(1, 16, 12, 12, device=device)
    spec = ConvSpec.of(model.conv)
    w, b = model.conv.weight, model.conv.bias
    with torch.no_grad():
        model(inp)
        plan = plans.choose(inp, w, b, spec)
        rows.append(("ModelNew, inference", plan.name, per_call_us(lambda: model(inp), device, args.calls),
                     per_call_us(lambda: plan.forward(inp, w, b, spec), device, args.calls)))
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        model(inp)
        low = [t.to(torch.bfloat16) for t in (inp, w, b)]
        amp_plan = plans.choose(*low, spec, amp=torch.bfloat16, source=inp)
        # the chosen plan as run_block runs it: on the caller's tensors under autocast (``autocasts``),
        # else on casts made once here, so the column leaves out the casts run_block makes per call
        given = (inp, w, b) if amp_plan.autocasts else low
        ours = per_call_us(lambda: model(inp), device, args.calls)
        with torch.autocast(device.type, enabled=amp_plan.autocasts):
            rows.append(("ModelNew, bf16 autocast inference", amp_plan.name, ours,
                         per_call_us(lambda: amp_plan.forward(*given, spec), device, args.calls)))
    model(inp)
    grads_of = training.grads_wanted(inp, w, b)
    trained = plans.choose(inp, w, b, spec, grads_of=grads_of)
    rows.append(("ModelNew, grad mode (forward only)", trained.name, per_call_us(lambda: model(inp), device, args.calls),
                 per_call_us(lambda: training.forward(trained, inp, w, b, spec, True), device, args.calls)))
    # where a grad-mode call's host time goes: each step of ModelNew's path, outermost first (the
    # outermost and innermost are the row above's two columns)
    _, _, whole, plan_alone = rows[-1]
    step_rows = [("ModelNew(x)", whole),
                 ("run_block(x, conv): ModelNew less the module call",
                  per_call_us(lambda: plans.run_block(inp, model.conv), device, args.calls)),
                 ("plans.choose(...): the cached lookup alone (key, environment, memory)",
                  per_call_us(lambda: plans.choose(inp, w, b, spec, grads_of=grads_of), device, args.calls)),
                 ("training.forward(plan, ...): the chosen plan, as run_block calls it", plan_alone)]

    lines = [f"Host time per cached call on {mishops.tuning.device_label(device)} (torch {torch.__version__}), "
             f"{args.calls} calls a round, median of 7 rounds", "",
             "| call | chosen | through mishops, us | the chosen one directly, us | overhead, us |", "|---|---|---:|---:|---:|"]
    for what, chosen, ours, direct in rows:
        lines.append(f"| {what} | {chosen} | {ours:.1f} | {direct:.1f} | {ours - direct:.1f} |")
    lines += ["", "Grad mode, step by step (each timed alone, same inputs):", "", "| step | us |", "|---|---:|"]
    lines += [f"| {what} | {us:.1f} |" for what, us in step_rows]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
