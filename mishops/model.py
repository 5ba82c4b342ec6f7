"""``ModelNew``: the reference ``Conv2d -> Mish -> Mish`` block, run by the fastest correct plan."""

from __future__ import annotations

import torch
from torch import nn

from mishops.plans import run_block


class ModelNew(nn.Module):
    """Drop-in for the reference ``Model``: same first three parameters and a ``conv`` attribute,
    so a reference ``state_dict()`` loads unchanged. With ``backend="auto"`` the whole block is one
    dispatched op whose candidates are plans (PyTorch conv + the fastest double-Mish backend, or a
    fused cuDNN conv + bias + Mish + Mish); naming a backend (or ``MISHOPS_BACKEND``) means PyTorch's
    conv followed by that double-Mish backend. The output has the memory format PyTorch's conv
    would give (channels_last when the input or the weight is)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, backend: str = "auto"):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_block(x, self.conv, self.backend)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"
