"""The block's training path: a forward that keeps what the backward needs, and a fused backward.

Backward, whatever the forward saved:
1. one pass over the pre-activation ``z`` and the upstream gradient ``g`` writes
   ``dz = g * d/dz act(z)`` and sums it per channel into the bias gradient (``grad_bias``: the
   ``cuda`` backend's kernel, else Triton's, else two eager steps). cuDNN's own bias gradient would
   be a second pass over the 2 GB ``dz`` at the reference shape;
2. cuDNN's weight and input gradients (``aten.convolution_backward`` with the bias left out of its
   output mask, so nothing is summed twice), optionally after moving ``dz`` and ``x`` to
   channels_last (``MISHOPS_TRAIN_BACKWARD_LAYOUT``): cuDNN's NHWC kernels are about twice as fast
   as its NCHW ones on Hopper in the forward, which may or may not repay the two copies; measured,
   not assumed. The weight gradient may instead come from a Triton kernel of ours
   (``MISHOPS_TRAIN_WGRAD=triton``): with 128 x 576 outputs and a 4M-long reduction it is a skinny
   GEMM, the shape cuDNN's weight-gradient kernels handle worst.

Forward, by plan (``forward``):
- a plan that ``stores_preactivation`` runs ``Plan.forward_storing``, which returns ``z`` beside
  the output (``torch_conv``: PyTorch's conv, then the fastest double-Mish backend;
  ``triton_conv`` and ``cudnn_conv_epilogue_triton``: their epilogue writes ``z`` as well), and saves ``z``: the
  backward reads it and recomputes nothing;
- a fused plan that is not differentiable saves nothing but its inputs and recomputes ``z`` with
  one conv in the backward, which costs a conv and saves 2 GB of memory;
- a differentiable plan (``eager``) trains through its own autograd graph.
Which is faster at a shape is the tuner's call: training candidates are timed as forward +
backward (``mishops.plans.block``'s ``|train=`` keys).
Storing won at the reference shape on the H200, and neither the channels_last copies nor the Triton
weight gradient paid for themselves there, so both stay opt-in (``benchmarks/results/h200/train.md``).

Double backward goes through neither: these functions are ``once_differentiable``.
"""

from __future__ import annotations

import logging
import os

import torch

from mishops import dispatch, registry
from mishops.plans.base import ConvSpec, Plan, conv2d

log = logging.getLogger("mishops")
#: opt-in kernels that failed in this process, with the reason (their callers fall back to cuDNN's)
_broken: dict[str, str] = {}


def forward(plan: Plan, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            spec: ConvSpec, training: bool) -> torch.Tensor:
    """The block's output by ``plan``; when ``training``, tracked by autograd with the fused backward above."""
    if not uses_fused_backward(plan, training):
        return plan.forward(x, weight, bias, spec)
    return _Block.apply(x, weight, bias, plan, spec)


def uses_fused_backward(plan: Plan, training: bool) -> bool:
    """Whether ``forward`` runs through the fused backward's autograd Function (else through
    ``plan.forward`` itself, which autograd differentiates if it can)."""
    return training and not (plan.differentiable and not plan.stores_preactivation)


def grad_bias(z: torch.Tensor, grad: torch.Tensor, spec: ConvSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(dz, dbias in float32, float64 for float64): ``grad * d/dz act(z)`` with z's strides, and its
    sum over N, H, W per channel, by the backend the tuner chose for the ``grad_bias`` op."""
    return dispatch.run("grad_bias", z, grad, mish_count=spec.mish_count)


def differentiated(*tensors: torch.Tensor | None) -> list[torch.Tensor]:
    return [t for t in tensors if t is not None and t.requires_grad]


def grads_wanted(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[bool, ...] | None:
    """Which of x, weight, bias this call differentiates, or None when it trains nothing: a
    training call is chosen for, and timed as, a forward and a backward."""
    if not torch.is_grad_enabled():
        return None
    wanted = (x.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
    return wanted if any(wanted) else None


def vjp(y: torch.Tensor, inputs: list[torch.Tensor], grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The gradients of ``inputs`` for the upstream gradient ``grad`` of ``y``, as the scalar
    ``sum(y * grad)``'s: autograd's check of an explicit ``grad_outputs`` imports sympy (about 0.4 s,
    once a process), which a first training call on a small input would otherwise pay."""
    return torch.autograd.grad(torch.sum(y * grad), inputs)


def forward_backward(plan: Plan, x, weight, bias, spec: ConvSpec, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One training step of the block by ``plan``: the output, then the gradients of the inputs
    that require them for the upstream gradient ``grad``."""
    with torch.enable_grad():
        y = forward(plan, x, weight, bias, spec, training=True)
        return (y.detach(), *vjp(y, differentiated(x, weight, bias), grad))


def backward_layout() -> str:
    """``MISHOPS_TRAIN_BACKWARD_LAYOUT`` (read at call time): ``as_is`` runs cuDNN's weight and
    input gradients in the layout the tensors have; ``channels_last`` first copies an NCHW ``dz``
    and ``x`` to NHWC."""
    value = os.environ.get("MISHOPS_TRAIN_BACKWARD_LAYOUT", "as_is").strip().lower()
    if value not in ("as_is", "channels_last"):
        raise ValueError(f"MISHOPS_TRAIN_BACKWARD_LAYOUT must be as_is or channels_last, not {value!r}")
    return value


def conv_backward(dz: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, spec: ConvSpec,
                  need_x: bool, need_weight: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(dx, dweight) of the conv for its output gradient ``dz``, each None where not needed."""
    if not (need_x or need_weight):
        return None, None
    if spec.padding_mode != "zeros" or isinstance(spec.padding, str) or dz.dim() != 4:
        return _conv_backward_by_autograd(dz, x, weight, spec, need_x, need_weight)
    if backward_layout() == "channels_last" and dz.is_cuda and not dz.is_contiguous(memory_format=torch.channels_last):
        dz = dz.contiguous(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    dweight = None
    if need_weight and weight_grad_by() == "triton" and _triton_weight_grad_applies(dz, spec):
        from mishops.backends import triton as triton_backend

        try:
            dweight = triton_backend.conv_weight_grad(x, dz, weight.shape, spec.stride, spec.padding, spec.dilation)
        except Exception as exc:  # cuDNN's from now on, with the reason logged once
            _broken["triton-wgrad"] = f"{type(exc).__name__}: {exc}"
            log.warning("the Triton weight gradient failed, using cuDNN's: %s", _broken["triton-wgrad"])
        if dweight is not None:
            dweight = dweight.to(weight.dtype)
            need_weight = False
    if need_x or need_weight:
        dx, found, _ = torch.ops.aten.convolution_backward(
            dz, x, weight, None, list(spec.stride), list(spec.padding), list(spec.dilation), False, [0, 0],
            spec.groups, [need_x, need_weight, False])
        dweight = found if need_weight else dweight
    else:
        dx = None
    return dx, dweight


def weight_grad_by() -> str:
    """``MISHOPS_TRAIN_WGRAD`` (read at call time): ``cudnn`` (``aten.convolution_backward``) or
    ``triton`` (``mishops.backends.triton.conv_weight_grad``, fp32 with TF32 on, where it applies)."""
    value = os.environ.get("MISHOPS_TRAIN_WGRAD", "cudnn").strip().lower()
    if value not in ("cudnn", "triton"):
        raise ValueError(f"MISHOPS_TRAIN_WGRAD must be cudnn or triton, not {value!r}")
    return value


def _triton_weight_grad_applies(dz: torch.Tensor, spec: ConvSpec) -> bool:
    """The Triton weight gradient rounds fp32 to TF32, as cuDNN does only while TF32 is allowed."""
    return (dz.is_cuda and spec.groups == 1 and dz.dtype == torch.float32 and torch.backends.cudnn.allow_tf32
            and "triton-wgrad" not in _broken and bool(registry.availability("triton")))


def _conv_backward_by_autograd(dz, x, weight, spec, need_x, need_weight):
    """Any padding ``nn.Conv2d`` accepts (``"same"``, reflect, ...): autograd through the conv."""
    with torch.enable_grad():
        xs = x.detach().requires_grad_(need_x)
        ws = weight.detach().requires_grad_(need_weight)
        z = conv2d(xs, ws, None, spec)
        leaves = [t for t, need in ((xs, need_x), (ws, need_weight)) if need]
        found = iter(torch.autograd.grad(z, leaves, dz))
    return (next(found) if need_x else None), (next(found) if need_weight else None)


class _Block(torch.autograd.Function):
    """Forward: ``plan``'s, saving its pre-activation ``z`` where it ``stores_preactivation``.
    Backward: the fused activation + bias gradient, then cuDNN's weight and input gradients."""

    @staticmethod
    def forward(ctx, x, weight, bias, plan: Plan, spec: ConvSpec):
        ctx.spec = spec
        ctx.bias_dtype = None if bias is None else bias.dtype
        if plan.stores_preactivation:
            y, z = plan.forward_storing(x, weight, bias, spec)
            ctx.save_for_backward(x, weight, z)
            ctx.stored = True
            return y
        ctx.save_for_backward(x, weight, bias)
        ctx.stored = False
        return plan.forward(x, weight, bias, spec)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, weight, third = ctx.saved_tensors
        need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
        x_conv = x.to(weight.dtype)  # a plan that casts its input got it uncast (casts_input)
        if ctx.stored:
            z = third
        else:
            with torch.no_grad():
                z = conv2d(x_conv, weight, third, ctx.spec)
        dz, dbias = grad_bias(z, grad, ctx.spec)
        del z
        dx, dweight = conv_backward(dz, x_conv, weight, ctx.spec, need_x, need_weight)
        if dx is not None and dx.dtype != x.dtype:
            dx = dx.to(x.dtype)
        dbias = dbias.to(ctx.bias_dtype) if ctx.bias_dtype is not None and need_bias else None
        return dx, dweight, dbias, None, None
