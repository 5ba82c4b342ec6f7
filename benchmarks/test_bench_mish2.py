"""Double Mish forward per backend, dtype and size, beside a clone of the same bytes (the copy yardstick).

``impl``: ``copy`` is ``x.clone()`` (reads and writes what the double Mish does); ``auto`` is
``mishops.mish2(x)`` as users call it (dispatcher included, tuned during warm-up); any other is
that backend's ``forward`` called directly, so the row is the kernel and nothing else.
"""

import mishops


def test_mish2_forward(benchmark, bench, forward_case):
    case = forward_case
    (x,) = bench.inputs(case.dtype, case.numel, count=1)
    if case.impl == "copy":
        fn = x.clone
    elif case.impl == "auto":
        fn = lambda: mishops.mish2(x)  # noqa: E731
    else:
        backend = bench.backend(case.impl, x)
        fn = lambda: backend.forward(x)  # noqa: E731

    touched = 2 * x.nbytes  # x read once, y written once
    info = {"op": "forward", "impl": case.impl, "dtype": case.dtype, "numel": x.numel(),
            "shape": list(x.shape), "device": str(x.device)}
    if case.impl != "copy":
        info["max_abs_err"] = bench.forward_error(bench.first_call(case.impl, fn), x)
    if case.impl == "auto":
        info["chosen"] = mishops.dispatch.choose("forward", x).name

    benchmark.group = f"mish2 forward {case.dtype}"
    timing = bench.time(benchmark, fn, touched)
    key = ("forward", case.dtype, case.numel)
    if case.impl == "copy":
        bench.yardstick_ms[key] = timing.median_ms
    yardstick_ms = bench.yardstick(key, x.clone, touched)
    benchmark.extra_info.update(info | timing.as_info() | bench.bandwidth_info(timing, touched, yardstick_ms))
