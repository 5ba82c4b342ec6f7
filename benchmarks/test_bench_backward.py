"""Double Mish backward per backend, dtype and size, beside ``x + g`` (the same two reads and one write).

Each backend's ``backward(x, grad_out)`` is called directly: one pass that reads ``x`` and
``grad_out`` and writes ``grad_in``.
"""

import torch


def test_mish2_backward(benchmark, bench, backward_case):
    case = backward_case
    x, grad_out = bench.inputs(case.dtype, case.numel, count=2)
    if case.impl == "copy":
        fn = lambda: torch.add(x, grad_out)  # noqa: E731
    else:
        backend = bench.backend(case.impl, x)
        fn = lambda: backend.backward(x, grad_out)  # noqa: E731

    touched = 3 * x.nbytes  # x and grad_out read, grad_in written
    info = {"op": "backward", "impl": case.impl, "dtype": case.dtype, "numel": x.numel(),
            "shape": list(x.shape), "device": str(x.device)}
    if case.impl != "copy":
        info["max_abs_err"] = bench.backward_error(bench.first_call(case.impl, fn), x, grad_out)

    benchmark.group = f"mish2 backward {case.dtype}"
    timing = bench.time(benchmark, fn, touched)
    key = ("backward", case.dtype, case.numel)
    if case.impl == "copy":
        bench.yardstick_ms[key] = timing.median_ms
    yardstick_ms = bench.yardstick(key, lambda: torch.add(x, grad_out), touched)
    benchmark.extra_info.update(info | timing.as_info() | bench.bandwidth_info(timing, touched, yardstick_ms))
