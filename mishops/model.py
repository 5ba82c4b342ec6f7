"""``ModelNew``: the reference ``Conv2d -> Mish -> Mish`` block with the double Mish dispatched."""

from __future__ import annotations

import torch
from torch import nn

from mishops.ops import mish2


class ModelNew(nn.Module):
    """Drop-in for the reference ``Model``: same first three parameters and a ``conv`` attribute,
    so a reference ``state_dict()`` loads unchanged; ``backend`` picks the double-Mish backend
    (``"auto"``: the fastest correct one for each input; ``MISHOPS_BACKEND`` overrides it)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, backend: str = "auto"):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mish2(self.conv(x), self.backend)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"
