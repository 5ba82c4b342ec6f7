"""The block's fused backward pass (activation gradient + bias gradient), beside ``z + g``.

``grad_bias`` reads the pre-activation ``z`` and the upstream gradient ``g`` and writes ``dz``, and
sums ``dz`` per channel on the way: the same two reads and one write as ``torch.add(z, g)``, whose
same-run time is the floor. ``eager`` is what autograd through the eager block would do instead:
the double Mish's backward then cuDNN-style ``dz.sum`` for the bias (two passes over ``dz``). Shapes
are the reference conv output (64 x 128 x 254 x 254) on a GPU, NCHW and channels_last.
"""

import pytest
import torch

from benchmarks.conftest import DEVICE, DTYPES, QUICK, REFERENCE_SHAPE
from mishops import dispatch, registry
from mishops.tuning import CannotTake

SHAPE = (2, 8, 30, 30) if QUICK else REFERENCE_SHAPE
IMPLS = ["copy", "auto", "cuda", "triton", "eager"]


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_grad_bias(benchmark, bench, dtype, impl, layout):
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    z = (torch.randn(SHAPE, device=DEVICE) * 3).to(DTYPES[dtype]).contiguous(memory_format=fmt)
    g = torch.randn_like(z)
    if impl == "copy":
        fn = lambda: torch.add(z, g)  # noqa: E731
    elif impl == "auto":  # as the block's backward calls it: the tuner's choice, tuned during warm-up
        fn = lambda: dispatch.run("grad_bias", z, g)  # noqa: E731
    else:
        backend = registry.get(impl)
        if not registry.availability(impl):
            pytest.skip(f"{impl}: {registry.availability(impl).reason}")
        fn = lambda: backend.grad_bias(z, g, 2)  # noqa: E731
        try:
            fn()
        except CannotTake as exc:
            pytest.skip(f"{impl}: {exc}")
    info = {}
    if impl != "copy":  # dz against float64 on the first elements (logical order), as the backward rows
        info["max_abs_err"] = bench.backward_error(fn()[0], z, g)
    touched = 3 * z.nbytes
    benchmark.group = f"grad_bias {dtype} {layout}"
    timing = bench.time(benchmark, fn, touched)
    key = ("grad_bias", dtype, layout)
    if impl == "copy":
        bench.yardstick_ms[key] = timing.median_ms
    yardstick_ms = bench.yardstick(key, lambda: torch.add(z, g), touched)
    benchmark.extra_info.update({"op": "grad_bias", "impl": impl, "dtype": dtype, "layout": layout,
                                 "numel": z.numel(), "shape": list(z.shape), "device": str(z.device)}
                                | info | timing.as_info() | bench.bandwidth_info(timing, touched, yardstick_ms))
