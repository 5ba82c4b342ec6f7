"""Test-only backends with controlled speed and behaviour, built on the eager math."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from mishops.registry import FLOAT_DTYPES, Availability, Backend


class EagerLike(Backend):
    devices = None
    dtypes = FLOAT_DTYPES
    any_strides = True
    delay_s = 0.0

    def forward(self, x):
        if self.delay_s:
            time.sleep(self.delay_s)
        return F.mish(F.mish(x))

    def backward(self, x, grad_out):
        if self.delay_s:
            time.sleep(self.delay_s)
        return torch.ops.aten.mish_backward(torch.ops.aten.mish_backward(grad_out, F.mish(x)), x)


class Slow(EagerLike):
    """Preferred by priority, but 20 ms slower per call: must never win a profiled choice."""

    name = "test_slow"
    priority = 0
    delay_s = 0.02


class Fast(EagerLike):
    name = "test_fast"
    priority = 50


class Wrong(EagerLike):
    """Fast and preferred, but computes one Mish instead of two."""

    name = "test_wrong"
    priority = 0

    def forward(self, x):
        return F.mish(x)


class Broken(EagerLike):
    """Raises at launch, as a kernel that fails to build would."""

    name = "test_broken"
    priority = 0

    def forward(self, x):
        raise RuntimeError("nvcc fatal: simulated build failure")

    backward = forward


class Unavailable(EagerLike):
    name = "test_unavailable"
    priority = 0

    def is_available(self):
        return Availability.no("needs a flux capacitor")


class Float16Only(EagerLike):
    name = "test_fp16only"
    dtypes = frozenset({torch.float16})


class Zeros(EagerLike):
    """Preferred and instant, but returns zeros: right only where the input is all zeros."""

    name = "test_zeros"
    priority = 0

    def forward(self, x):
        return torch.zeros_like(x)


class SlowNoisy(EagerLike):
    """Correct, best priority, but sleeps 0.5-8 ms per call: a spread wide enough to cover any gap."""

    name = "test_slow_noisy"
    priority = 0
    calls = 0

    def forward(self, x):
        type(self).calls += 1
        time.sleep((0.5, 8.0, 2.0, 4.0, 6.0)[type(self).calls % 5] / 1e3)
        return F.mish(F.mish(x))


class OomOnWide(EagerLike):
    """Fastest and preferred, but runs out of memory on inputs wider than 16 columns."""

    name = "test_oom_on_wide"
    priority = 0

    def forward(self, x):
        if x.shape[-1] > 16:
            raise torch.OutOfMemoryError("simulated: tried to allocate 80 GiB")
        return F.mish(F.mish(x))


class WrongOnNaN(EagerLike):
    """Right on finite inputs, but turns NaN into zero."""

    name = "test_wrong_on_nan"
    priority = 0

    def forward(self, x):
        return F.mish(F.mish(x)).nan_to_num(nan=0.0)
