"""Whole-block plans for ``Conv2d -> Mish -> Mish``: the registry, and the names plans are built from.

A backend (``mishops.registry``) computes only the double Mish; a *plan* computes the whole block
from the input and the conv's parameters, so it may fuse the conv with its epilogue. Built-ins, one
file each: ``eager`` (the reference block's own ops, the answer every plan is checked against),
``torch_conv`` (PyTorch's conv, then the fastest double-Mish backend), ``cudnn_fused`` and
``cudnn_fused_nchw`` (one cuDNN graph: conv + bias + Mish + Mish, NHWC out, then a transpose for
NCHW), ``cudnn_conv_epilogue_cuda``/``_triton`` (cuDNN's conv to NHWC, then one pass that adds the
bias, applies the activation and writes NCHW), ``triton_conv`` (our own implicit-GEMM conv with
the epilogue fused, writing either layout). Other packages add plans through the entry-point group
``mishops.plans``, as backends do through ``mishops.backends``.

Where each concern lives:

* ``base``: ``ConvSpec`` (the conv's parameters and ``mish_count``), the ``Plan`` interface, and what
  plans share (``conv2d``, ``activation``, ``operand_reasons``);
* ``memory_format``: PyTorch's rule for the output's memory format;
* ``block``: the block op -- key, candidates, trial and reference for the tuner, ``run_block``;
* ``autocast``: the cast autocast would make, made once and only when needed;
* ``training``: the backward of plans that have none of their own.
"""

from __future__ import annotations

from mishops import registry
from mishops.plans.base import ConvSpec, Plan, activation, conv2d, operand_reasons
from mishops.plans.memory_format import expected_memory_format, format_name
from mishops.tuning import TUNER

ENTRY_POINT_GROUP = "mishops.plans"


def _import_builtin_plans() -> None:
    from mishops.plans import (  # noqa: F401  (registers them)
        cudnn_epilogue, cudnn_fused, cudnn_nchw, eager, hopper_conv, torch_conv, triton_conv)


def _forget_block_choices() -> None:
    TUNER.forget(keep=lambda mkey, choice: mkey[0] not in ("block", "config"))


PLANS = registry.Registry("plan", Plan, _import_builtin_plans, ENTRY_POINT_GROUP, on_change=_forget_block_choices)
register_plan, unregister_plan, plans, get_plan = PLANS.register, PLANS.unregister, PLANS.all, PLANS.get
availability, mark_failed = PLANS.availability, PLANS.mark_failed

from mishops.plans.block import (  # noqa: E402  (block needs PLANS)
    TOLERANCE, NoPlanError, choose, gradient_mismatch, mismatch, reference, reference_gradients, run_block,
    synthetic_inputs)

__all__ = ["ConvSpec", "ENTRY_POINT_GROUP", "NoPlanError", "PLANS", "Plan", "TOLERANCE", "activation",
           "availability", "choose", "conv2d", "expected_memory_format", "format_name",
           "get_plan", "gradient_mismatch", "mark_failed", "mismatch", "operand_reasons", "plans", "reference",
           "reference_gradients", "register_plan", "run_block", "synthetic_inputs", "unregister_plan"]
