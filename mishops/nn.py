"""Modules for models built with mishops: ``Conv2d`` followed by one or two Mish, as one block.

``ConvMish2d`` is an ``nn.Conv2d`` (same parameters, same ``state_dict`` keys, ``isinstance`` still
true) whose forward is ``mish(conv(x))`` by the fastest correct plan for the input
(``mishops.plans.run_block`` with ``mish_count=1``); ``ConvMishMish2d`` applies Mish twice, the
block of ``ModelNew``. ``mishops.fuse(model)`` puts these in place of the convs it fuses.
"""

from __future__ import annotations

import torch
from torch import nn

from mishops import plans

__all__ = ["ConvMish2d", "ConvMishMish2d", "check_backend"]


def check_backend(backend, parameter: str = "backend") -> str:
    """``backend`` as the dispatcher names it: ``"auto"`` or a registered backend's name, any case.

    Not a string: ``TypeError`` naming ``parameter``; an unknown name: one-line ``ValueError``
    that lists the valid ones."""
    if not isinstance(backend, str):
        raise TypeError(f"mishops: {parameter} must be a string (a backend name or 'auto'), "
                        f"not {type(backend).__name__} {backend!r}")
    wanted = backend.strip().lower()
    if wanted == "auto":
        return "auto"
    from mishops import registry

    names = list(registry.backends())
    for name in names:
        if name.lower() == wanted:
            return name
    raise ValueError(f"mishops: unknown {parameter} {backend!r}; valid: auto, {', '.join(names)}")


def _capturing(x: torch.Tensor) -> bool:
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


class ConvMish2d(nn.Conv2d):
    """``nn.Conv2d`` followed by Mish (``mish_count`` times, 1 or 2), run as one block.

    Takes ``nn.Conv2d``'s parameters, plus ``backend`` (``"auto"``: the fastest correct plan; a
    backend name: PyTorch's conv, then that double-Mish backend) and ``mish_count``. Differentiable;
    works under ``torch.compile`` (there it is PyTorch's conv followed by the ``mishops::mish2``
    custom op or ``F.mish``) and CUDA graphs."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None, *,
                 backend: str = "auto", mish_count: int = 1):
        if mish_count not in (1, 2):
            raise ValueError(f"mishops: mish_count must be 1 or 2, not {mish_count!r}")
        backend = check_backend(backend)
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device, dtype)
        self.backend = backend
        self.mish_count = mish_count

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, *, backend: str = "auto", mish_count: int | None = None) -> ConvMish2d:
        """A block with ``conv``'s hyper-parameters and its very ``weight`` and ``bias`` Parameters
        (so optimizers and tied weights keep pointing at them)."""
        count = cls._default_mish_count if mish_count is None else mish_count
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                  conv.groups, conv.bias is not None, conv.padding_mode, device="meta", dtype=conv.weight.dtype,
                  backend=backend, mish_count=count)
        new.weight = conv.weight
        new.bias = conv.bias
        new.train(conv.training)
        return new

    _default_mish_count = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling() or _capturing(x):  # what run_block does there, without calling self
            spec = plans.ConvSpec.of(self, self.mish_count)
            return plans.activation(self._conv_forward(x, self.weight, self.bias), spec, self.backend)
        return plans.run_block(x, self, self.backend, mish_count=self.mish_count, where=type(self).__name__)

    def extra_repr(self) -> str:
        extra = super().extra_repr() + f", mish_count={self.mish_count}"
        return extra + (f", backend={self.backend!r}" if self.backend != "auto" else "")


class ConvMishMish2d(ConvMish2d):
    """``nn.Conv2d`` followed by Mish twice, as one block (``ConvMish2d`` with ``mish_count=2``)."""

    _default_mish_count = 2

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None, *,
                 backend: str = "auto", mish_count: int = 2):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device, dtype, backend=backend, mish_count=mish_count)
