"""The reference block itself: ``F.conv2d``, then ``F.mish`` once or twice, nothing of ours in between.

Every block key has it as a candidate, so the tuner can never choose something slower than the
model it replaces (at batch 1, say, where launches and host work decide), and every other plan is
checked against its answer. Autograd differentiates it as it would the reference ``Model``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mishops.plans import ConvSpec, Plan, conv2d, register_plan


@register_plan
class EagerPlan(Plan):
    name = "eager"
    priority = 1000
    differentiable = True
    autocasts = True

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, spec: ConvSpec) -> torch.Tensor:
        y = conv2d(x, weight, bias, spec)
        for _ in range(spec.mish_count):
            y = F.mish(y)
        return y
