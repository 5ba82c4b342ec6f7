"""PyTorch's own conv, then ``mish2``: runs on every device, dtype, layout and conv setting.

It is the plan the others are checked against (with the eager double Mish) and the fallback
when none of them applies. Its output has whatever memory format PyTorch's conv gives, which
is by definition the expected one; autograd, ``torch.compile`` and CUDA graphs go through the
``mishops::mish2`` custom op.
"""

from __future__ import annotations

import torch

from mishops.plans import ConvSpec, Plan, activation, conv2d, register_plan


@register_plan
class TorchConvPlan(Plan):
    name = "torch_conv"
    priority = 100
    differentiable = True

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, spec: ConvSpec,
                backend: str = "auto") -> torch.Tensor:
        return activation(conv2d(x, weight, bias, spec), spec, backend)
