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
