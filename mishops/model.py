"""``ModelNew``: the reference ``Conv2d -> Mish -> Mish`` block, run by the fastest correct plan."""

from __future__ import annotations

import torch
from torch import nn

from mishops.nn import check_backend
from mishops.plans import run_block


class ModelNew(nn.Module):
    """Drop-in for the reference ``Model``: same first three parameters and a ``conv`` attribute,
    so a reference ``state_dict()`` loads unchanged. The conv options are ``nn.Conv2d``'s, keyword
    only, with its defaults.

    ``backend="auto"`` makes the whole block one dispatched op whose candidates are plans (PyTorch's
    conv followed by the fastest double-Mish backend, or one of the fused plans that
    ``mishops info`` lists); naming a backend (or setting ``MISHOPS_BACKEND``) means PyTorch's conv
    followed by that double-Mish backend. ``backend`` is checked here, not at the first call: a
    string, ``"auto"`` or a registered name, any case. The output has the memory format PyTorch's
    conv would give (channels_last when the input or the weight is)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, backend: str = "auto", *, stride=1,
                 padding=0, dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 device=None, dtype=None):
        super().__init__()
        self.backend = check_backend(backend)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                              dilation=dilation, groups=groups, bias=bias, padding_mode=padding_mode,
                              device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_block(x, self.conv, self.backend, where="ModelNew")

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"
