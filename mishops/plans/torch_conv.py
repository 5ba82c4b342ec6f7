"""PyTorch's own conv, then ``mish2``: runs on every device, dtype, layout and conv setting.

Where a double-Mish kernel runs it saves the ``eager`` plan's second pass over the conv output; in
training it stores the pre-activation for the backward. Its output has whatever memory format PyTorch's conv gives, which
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
    stores_preactivation = True
    autocasts = True

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, spec: ConvSpec,
                backend: str = "auto") -> torch.Tensor:
        return activation(conv2d(x, weight, bias, spec), spec, backend)
