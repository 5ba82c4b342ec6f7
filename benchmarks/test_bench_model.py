"""The whole block at the reference shape: ModelNew per backend and "auto" against the reference
eager Model and ``torch.compile(Model)``, in fp32 and under bf16 autocast.

Every model has the reference's weights; calls run under ``torch.no_grad()`` (inference).
Speed-up is over the reference eager Model in the same precision mode.
"""

import time

import pytest
import torch

import mishops


def _model(bench, case, reference):
    if case.impl == "reference":
        return reference
    if case.impl == "reference-compiled":
        if bench.device.type != "cuda":
            pytest.skip("torch.compile rows run on GPU only (compiling takes minutes on a CPU runner)")
        return torch.compile(reference)
    if case.impl != "auto":
        conv_dtype = torch.bfloat16 if case.mode == "bf16-autocast" else torch.float32
        bench.backend(case.impl, torch.empty(1, device=bench.device, dtype=conv_dtype))
    s = reference.conv
    model = mishops.ModelNew(s.in_channels, s.out_channels, s.kernel_size, backend=case.impl).to(bench.device)
    model.load_state_dict(reference.state_dict())
    return model.eval()


def test_model(benchmark, bench, model_case):
    case = model_case
    x = bench.model_input()
    model = _model(bench, case, bench.reference_model())

    def fn():
        with bench.model_precision(case.mode):
            return model(x)

    started = time.perf_counter()
    y = bench.first_call(case.impl, fn)
    if bench.device.type == "cuda":
        torch.cuda.synchronize(bench.device)
    first_call_s = time.perf_counter() - started
    touched = x.nbytes + y.nbytes
    info = {"op": "model", "impl": case.impl, "mode": case.mode, "device": str(x.device),
            "input_shape": list(x.shape), "output_shape": list(y.shape), "first_call_s": first_call_s,
            "max_abs_err": bench.model_error(y)}
    del y
    if case.impl == "auto":  # the plan the block dispatcher chose (its choices are logged with op "block")
        blocks = [c for c in mishops.last_choices() if c.op == "block"]
        info["chosen"] = blocks[-1].winner if blocks else "?"

    benchmark.group = f"model {case.mode}"
    timing = bench.time(benchmark, fn, touched)
    key = ("model", case.mode)
    if case.impl == "reference":
        bench.yardstick_ms[key] = timing.median_ms
    reference = bench.reference_model()

    def eager():
        with bench.model_precision(case.mode):
            return reference(x)

    eager_ms = bench.yardstick(key, eager, touched)
    speedup = {"eager_ms": eager_ms, "speedup": eager_ms / timing.median_ms}
    benchmark.extra_info.update(info | timing.as_info() | speedup)
