"""What the dispatcher costs per call once its choice is cached: host time of ``mishops.mish2(x)``
minus that of calling the chosen backend's ``forward(x)`` directly, on a tiny tensor.

The two are timed in alternating rounds of many calls each (so clock drift and frequency changes
hit both alike); the overhead is the difference of the medians of the per-call times. On GPU only
the host side is timed, as a training loop sees it: the kernels run asynchronously, and the GPU
is synchronized between rounds, outside the timed region. The goal is at most 5 us; this
records what is seen and asserts nothing.
"""

import statistics
import time

import pytest
import torch

import mishops

CALLS_PER_ROUND = 200
ROUNDS = 25


def _per_call_us(fn, x) -> float:
    started = time.perf_counter_ns()
    for _ in range(CALLS_PER_ROUND):
        fn(x)
    return (time.perf_counter_ns() - started) / CALLS_PER_ROUND / 1e3


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_dispatch_overhead(benchmark, bench, device):
    if device == "cuda" and bench.device.type != "cuda":
        pytest.skip("GPU rows need a GPU and full mode (MISHOPS_BENCH_QUICK unset)")
    x = torch.randn(4, 32, device=device)
    mishops.mish2(x)  # the cold call: profiles and caches the choice
    chosen = mishops.dispatch.choose("forward", x)

    def synchronize():
        if device == "cuda":
            torch.cuda.synchronize()

    direct, dispatched = [], []
    for _ in range(ROUNDS):
        direct.append(_per_call_us(chosen.forward, x))
        synchronize()
        dispatched.append(_per_call_us(mishops.mish2, x))
        synchronize()
    mish2_us, direct_us = statistics.median(dispatched), statistics.median(direct)

    benchmark.group = "dispatch overhead"
    benchmark.pedantic(mishops.mish2, args=(x,), rounds=ROUNDS, iterations=CALLS_PER_ROUND)
    synchronize()
    benchmark.extra_info.update({"op": "overhead", "impl": "auto", "device": device, "dtype": "fp32",
                                 "numel": x.numel(), "chosen": chosen.name, "mish2_us": mish2_us,
                                 "direct_us": direct_us, "overhead_us": mish2_us - direct_us,
                                 "calls_per_round": CALLS_PER_ROUND, "rounds": ROUNDS})
