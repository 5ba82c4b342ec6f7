"""``mish2``: the functional entry point, and the ``mishops::mish2`` custom op behind autograd and compile.

The custom op is opaque to ``torch.compile``: the dispatcher chooses at run time inside it, never
in traced code, and its fake implementation gives the output's shape and strides. Its backward is
a second custom op that recomputes from the saved input alone (d/dx mish(mish(x)) needs nothing
else), in one fused pass on the kernel backends. That op is differentiable too (double backward,
``torch.autograd.gradgradcheck``): its own gradient is the fused op again for the upstream
gradient, and torch ops for the second derivative in x.

Calls that need neither autograd nor tracing skip the custom-op machinery: its Python overhead is
several times the dispatcher's, and a cached call must stay within a few microseconds of calling
the chosen backend directly. Eager calls that need autograd go through a plain
``torch.autograd.Function`` with the same forward and backward: the first call of any
``torch.library.custom_op`` imports ``torch._dynamo`` (about a second on a CPU), which only
tracing needs (it also works under ``torch.func.grad``, which the custom op does not). Under
``torch.compile`` or a dispatch mode (fake tensors, ``make_fx``) the custom op is used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mishops import dispatch


@torch.library.custom_op("mishops::mish2", mutates_args=())
def _mish2_op(x: torch.Tensor, backend: str) -> torch.Tensor:
    return dispatch.run("forward", x, backend=backend)


@_mish2_op.register_fake
def _(x: torch.Tensor, backend: str) -> torch.Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("mishops::mish2_backward", mutates_args=())
def _mish2_backward_op(x: torch.Tensor, grad_out: torch.Tensor, backend: str) -> torch.Tensor:
    return dispatch.run("backward", x, grad_out, backend=backend)


@_mish2_backward_op.register_fake
def _(x: torch.Tensor, grad_out: torch.Tensor, backend: str) -> torch.Tensor:
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    x, backend = inputs
    ctx.save_for_backward(x)
    ctx.backend = backend


def _backward(ctx, grad_out):
    (x,) = ctx.saved_tensors
    return _mish2_backward_op(x, grad_out, ctx.backend), None


_mish2_op.register_autograd(_backward, setup_context=_setup_context)


def _mish_slopes(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mish(v), mish'(v), mish''(v)) in differentiable torch ops, with t = tanh(softplus(v)) and
    s = sigmoid(v): mish' = t + v s (1 - t^2), and since dt/dv = s (1 - t^2),
    mish'' = s (1 - t^2) (2 + v (1 - s) - 2 v t s)."""
    t = torch.tanh(F.softplus(v))
    s = torch.sigmoid(v)
    sech2 = 1 - t * t
    return v * t, t + v * s * sech2, s * sech2 * (2 + v * (1 - s) - 2 * v * t * s)


def _setup_backward_context(ctx, inputs, output):
    x, grad_out, backend = inputs
    ctx.save_for_backward(x, grad_out)
    ctx.backend = backend


def _backward_of_backward(ctx, grad_grad_in):
    """Double backward. mish2_backward(x, g) = g f'(x) with f = mish o mish, so its gradient is
    f'(x) gg for g (the fused op again) and g f''(x) gg for x, where
    f'' = mish''(mish(x)) mish'(x)^2 + mish'(mish(x)) mish''(x). Torch ops, so higher orders follow."""
    x, grad_out = ctx.saved_tensors
    inner, inner_slope, inner_curve = _mish_slopes(x)
    _, outer_slope, outer_curve = _mish_slopes(inner)
    curve = outer_curve * inner_slope * inner_slope + outer_slope * inner_curve
    grad_x = grad_grad_in * grad_out * curve if ctx.needs_input_grad[0] else None
    grad_g = _mish2_backward_op(x, grad_grad_in, ctx.backend) if ctx.needs_input_grad[1] else None
    return grad_x, grad_g, None


_mish2_backward_op.register_autograd(_backward_of_backward, setup_context=_setup_backward_context)


class _Mish2Eager(torch.autograd.Function):
    """``mishops::mish2`` and its registered backward, for eager autograd without the custom op."""

    @staticmethod
    def forward(x: torch.Tensor, backend: str) -> torch.Tensor:
        return dispatch.run("forward", x, backend=backend)

    @staticmethod
    def setup_context(ctx, inputs, output):  # a separate setup_context lets torch.func.grad use it too
        x, backend = inputs
        ctx.save_for_backward(x)
        ctx.backend = backend

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (x,) = ctx.saved_tensors
        if torch.is_grad_enabled() and not _functorch_active():
            # create_graph (double backward): the backward op, whose own backward is registered
            return _mish2_backward_op(x, grad_out, ctx.backend), None
        return dispatch.run("backward", x, grad_out, backend=ctx.backend), None


_functorch_active = torch._C._are_functorch_transforms_active


def _plain_eager(x: torch.Tensor) -> bool:
    """True when nothing traces this call: a plain tensor and no dispatch mode (fake tensors, make_fx)."""
    if type(x) is not torch.Tensor and type(x) is not torch.nn.Parameter:
        return False
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    return _get_current_dispatch_mode() is None


def mish2(x: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """``F.mish(F.mish(x))`` in one pass, by the fastest correct backend for this input.

    ``backend`` names one (``mishops.registered_backends()`` lists them) or is ``"auto"``; the
    ``MISHOPS_BACKEND`` environment variable overrides it. Differentiable, and safe inside
    ``torch.compile`` and CUDA graphs.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"mish2 expects a torch.Tensor, got {type(x).__name__}")
    if torch.compiler.is_compiling():
        return _mish2_op(x, backend)
    if (x.requires_grad and torch.is_grad_enabled()) or _functorch_active():
        return _Mish2Eager.apply(x, backend) if _plain_eager(x) else _mish2_op(x, backend)
    return dispatch.run("forward", x, backend=backend)
