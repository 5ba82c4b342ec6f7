"""PyTorch's own ``F.mish`` twice: runs everywhere, and is the oracle the kernels are checked against."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mishops.registry import FLOAT_DTYPES, Backend, register


@register
class EagerBackend(Backend):
    name = "eager"
    devices = None
    dtypes = FLOAT_DTYPES
    any_strides = True
    priority = 1000  # the fallback: any kernel that ties with it is preferred
    ops = frozenset({"forward", "backward", "grad_bias"})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.mish(F.mish(x))

    def backward(self, x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
        # aten's own mish_backward, twice: exactly what autograd through F.mish computes, and it
        # also runs inside the custom op's backward, where autograd itself is switched off.
        grad_mid = torch.ops.aten.mish_backward(grad_out, F.mish(x))
        return torch.ops.aten.mish_backward(grad_mid, x)

    def grad_bias(self, z: torch.Tensor, grad_out: torch.Tensor, mish_count: int) -> tuple[torch.Tensor, torch.Tensor]:
        if mish_count == 2:
            dz = self.backward(z, grad_out)
        else:
            dz = torch.ops.aten.mish_backward(grad_out, z)
        return dz, dz.sum(dim=(0, 2, 3), dtype=torch.promote_types(dz.dtype, torch.float32))
