"""The block's backward: a plan's own (``differentiable``), or one supplied around a plan that has none.

``torch_conv`` and ``eager`` are tracked by autograd and store the pre-activation (the conv output).
The fused plans write only the block's output, so ``PlanFunction``'s backward recomputes the conv,
applies the activation's backward, and runs autograd through that conv -- the gradients autograd
would give, for every padding (``"same"``, reflect, ...) ``nn.Conv2d`` accepts. Which of storing and
recomputing is faster at a shape is measured by the tuner (training keys time forward + backward).
"""

from __future__ import annotations

import torch

from mishops.plans.base import ConvSpec, Plan, activation_backward, conv2d


class PlanFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, plan: Plan, spec: ConvSpec):
        ctx.save_for_backward(x, weight, bias)
        ctx.spec = spec
        return plan.forward(x, weight, bias, spec)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, weight, bias = ctx.saved_tensors
        wanted = [t is not None and need for t, need in zip((x, weight, bias), ctx.needs_input_grad[:3])]
        with torch.enable_grad():
            inputs = [t.detach().requires_grad_(w) if t is not None else None for t, w in zip((x, weight, bias), wanted)]
            x_conv = inputs[0].to(weight.dtype)  # a plan that casts its input got it uncast (casts_input)
            z = conv2d(x_conv, *inputs[1:], ctx.spec)
            grad_z = activation_backward(z.detach(), grad, ctx.spec)
            leaves = [t for t, w in zip(inputs, wanted) if w]
            found = iter(torch.autograd.grad(z, leaves, grad_z)) if leaves else iter(())
        return (*(next(found) if w else None for w in wanted), None, None)


def differentiated(*tensors: torch.Tensor | None) -> list[torch.Tensor]:
    return [t for t in tensors if t is not None and t.requires_grad]


def grads_wanted(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[bool, ...] | None:
    """Which of x, weight, bias this call differentiates, or None when it trains nothing: a
    training call is chosen for, and timed as, a forward and a backward."""
    if not torch.is_grad_enabled():
        return None
    wanted = (x.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
    return wanted if any(wanted) else None


def forward(plan: Plan, x, weight, bias, spec: ConvSpec, training: bool) -> torch.Tensor:
    """The plan's output, with a backward when ``training``: its own where it is differentiable,
    else ``PlanFunction``'s."""
    if training and not plan.differentiable:
        return PlanFunction.apply(x, weight, bias, plan, spec)
    return plan.forward(x, weight, bias, spec)


def forward_backward(plan: Plan, x, weight, bias, spec: ConvSpec, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One training step of the block by ``plan``: the output, then the gradients of the inputs
    that require them for the upstream gradient ``grad``."""
    with torch.enable_grad():
        y = forward(plan, x, weight, bias, spec, training=True)
        return (y.detach(), *torch.autograd.grad(y, differentiated(x, weight, bias), grad))
