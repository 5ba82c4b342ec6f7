"""The conv block as one op: its key, candidates, trial and reference for the tuner, and ``run_block``.

For a key (input and weight shapes, strides and dtypes, the conv's parameters and ``mish_count``,
the TF32/cuDNN switches, autocast) every registered plan that is available, runs on the device and
takes the input -- producing the memory format PyTorch's conv would -- is a candidate, ``eager``
(the reference block's own ops) always among them. The tuner checks each against ``eager`` on
synthetic inputs of the same shapes and strides, then times the correct ones (``mishops.tuning``).

A call that trains (grad mode on and x, the weight or the bias requiring grad) has keys of its
own, ending in ``|train=`` and what it differentiates (``|train=w,b``): there every candidate runs,
is checked and is timed as a forward and a backward with a fixed random upstream gradient, its
gradients checked against autograd through the reference, so storing the pre-activation against
recomputing it (``mishops.plans.training``) is settled by the clock, per shape.

Under autocast (``mishops.plans.autocast``) inference keys also name the uncast input
(``|uncast=...``) and each candidate is timed as it will run: with the cast inside the timed call,
from the uncast input for plans that cast while reading, or under autocast itself for a plan of
PyTorch's own ops (``eager``, and ``torch_conv`` in inference), which then casts nothing of ours at all.

Environment (read at each call): ``MISHOPS_PLAN`` names the plan (case-insensitive; ``auto`` for the
tuner's choice) and wins over ``MISHOPS_BACKEND`` / a named ``backend``, which mean ``torch_conv``
with that double-Mish backend. A named plan is used for training as it is. Under ``torch.compile``
tracing or CUDA graph capture the block is the conv, then the ``mishops::mish2`` custom op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from mishops import dispatch, layout
from mishops.plans import PLANS, autocast, training
from mishops.plans.base import ConvSpec, Plan, activation, conv2d
from mishops.plans.memory_format import expected_memory_format, format_name
from mishops.tuning import TUNER, Problem

#: how close a plan's output must be to the eager block's: (rtol, atol) per dtype.
#: fp32 allows for TF32 convs (two TF32 convs differ by ~5e-4 at the reference shape).
TOLERANCE = {
    torch.float64: (1e-9, 1e-9),
    torch.float32: (2e-3, 2e-3),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (4e-2, 4e-2),
}


class NoPlanError(dispatch.NoBackendError):
    """No plan (or not the one named) can run this block; the first line says why."""


# --- the reference and the checks ---------------------------------------------------------------


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, spec: ConvSpec) -> torch.Tensor:
    """The answer every plan is checked against: the ``eager`` plan's."""
    with torch.no_grad():
        return PLANS.get("eager").forward(x, weight, bias, spec)


def reference_gradients(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, spec: ConvSpec,
                        grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The gradients every plan's are checked against: autograd through the ``eager`` plan."""
    with torch.enable_grad():
        y = PLANS.get("eager").forward(x, weight, bias, spec)
        return training.vjp(y, training.differentiated(x, weight, bias), grad)


def synthetic_inputs(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """Fresh random tensors with the shapes, strides, dtypes and devices of the block's inputs,
    scaled so the conv output spans Mish's curved region: candidates are checked on these, never
    on the caller's data, which may be constant, empty-initialised or NaN and prove nothing."""

    def like(t: torch.Tensor, scale: float) -> torch.Tensor:
        fresh = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
        return fresh.normal_().mul_(scale)

    fan_in = weight[0].numel() or 1
    return like(x, 1.0), like(weight, 2.0 / fan_in**0.5), None if bias is None else like(bias, 0.5)


def mismatch(result: torch.Tensor, expected: torch.Tensor) -> str:
    """Why ``result`` is not an acceptable block output (empty when it is): the memory format
    (every format the reference is contiguous in), then ``dispatch.wrong_answer``'s checks."""
    if result.shape == expected.shape and expected.dim() == 4:
        for fmt in (torch.contiguous_format, torch.channels_last):
            if expected.is_contiguous(memory_format=fmt) and not result.is_contiguous(memory_format=fmt):
                return f"output is not {format_name(fmt)} like PyTorch's (strides {result.stride()})"
    return dispatch.wrong_answer(result, expected, TOLERANCE)


def gradient_mismatch(result: torch.Tensor, expected: torch.Tensor) -> str:
    """Why ``result`` is not an acceptable gradient (empty when it is): ``TOLERANCE`` relative to the
    largest element of ``expected``. Each element of the weight's and the bias's gradient sums over
    the batch and the image, so its rounding error grows with them and a fixed atol would reject a
    right backward at the reference shape; a wrong formula is off by the gradients' own size."""
    scale = max(1.0, float(expected.abs().nan_to_num(0.0).max())) if expected.numel() else 1.0
    wrong = dispatch.wrong_answer(result / scale, expected / scale, TOLERANCE)
    return f"{wrong}, relative to the largest element {scale:.3g}" if wrong.startswith("wrong answer") else wrong


class BlockTrial:
    """What every candidate for a key runs on and is judged by: synthetic inputs like the caller's
    and the reference answer; for a training key also a fixed random upstream gradient and the
    reference gradients, so a candidate is run, checked and timed as a forward and a backward."""

    def __init__(self, x, weight, bias, spec: ConvSpec, grads_of: tuple[bool, ...] | None,
                 source: torch.Tensor | None = None):
        self.source = None
        if source is not None and grads_of is None:  # inference under autocast, the cast not done yet
            self.source, self.weight, self.bias = synthetic_inputs(source, weight, bias)
            self.memory_format = expected_memory_format(source, weight)
            self.x = self.source.to(x.dtype, memory_format=self.memory_format)
        else:  # training trials time every plan on the cast input
            self.x, self.weight, self.bias = synthetic_inputs(x, weight, bias)
        self.spec = spec
        # a plan that casts as it reads may be handed an input of another dtype than its weight
        self.expected = reference(self.x.to(self.weight.dtype), self.weight, self.bias, spec)
        self.training = grads_of is not None
        if self.training:
            for t, wanted in zip((self.x, self.weight, self.bias), grads_of):
                if t is not None:
                    t.requires_grad_(wanted)
            self.grad = torch.empty_like(self.expected).normal_()
            self.expected_grads = reference_gradients(self.x, self.weight, self.bias, spec, self.grad)

    def run(self, plan: Plan):
        """The plan's output; for a training key, its output and gradients."""
        if self.training:
            return training.forward_backward(plan, self.x, self.weight, self.bias, self.spec, self.grad)
        x = self.x
        if self.source is not None:  # as run_block would: autocast casts, the plan casts, or we cast first
            if plan.autocasts:
                with torch.no_grad(), torch.autocast(x.device.type, dtype=x.dtype):
                    return plan.forward(self.source, self.weight, self.bias, self.spec)
            x = self.source if plan.casts_input else self.source.to(x.dtype, memory_format=self.memory_format)
        with torch.no_grad():
            return plan.forward(x, self.weight, self.bias, self.spec)

    def wrong(self, outcome) -> str:
        """Why ``outcome`` (what ``run`` returned) is not acceptable; empty when it is."""
        if not self.training:
            return mismatch(outcome, self.expected)
        y, *grads = outcome
        wrong = mismatch(y, self.expected)
        names = [n for n, t in zip(("dx", "dweight", "dbias"), (self.x, self.weight, self.bias))
                 if t is not None and t.requires_grad]
        for name, got, want in zip(names, grads, self.expected_grads):
            wrong = wrong or (f"{name}: {why}" if (why := gradient_mismatch(got, want)) else "")
        return wrong


# --- keys and candidates -------------------------------------------------------------------------


def flags() -> tuple:
    """Global switches that change which plans may run or what they compute."""
    return (torch.backends.cudnn.allow_tf32, torch.backends.cudnn.enabled,
            torch.backends.cudnn.deterministic, torch.are_deterministic_algorithms_enabled())


def key_string(x, weight, bias, spec: ConvSpec, amp: torch.dtype | None, switches: tuple,
               grads_of: tuple[bool, ...] | None = None, source: torch.Tensor | None = None) -> str:
    def t(name, v):
        return f"{name}={str(v.dtype).removeprefix('torch.')}{tuple(v.shape)}{tuple(v.stride())}"

    conv = f"stride={spec.stride} padding={spec.padding} dilation={spec.dilation} groups={spec.groups} " \
           f"mode={spec.padding_mode} mish={spec.mish_count}"
    bias_s = t("b", bias) if bias is not None else "b=None"
    amp_s = str(amp).removeprefix("torch.") if amp is not None else "off"
    tf32, enabled, cudnn_det, det = switches
    train = "" if grads_of is None else "|train=" + ",".join(n for n, g in zip("xwb", grads_of) if g)
    src = "" if source is None else "|" + t("uncast", source)
    return (f"block|{t('x', x)}|{t('w', weight)}|{bias_s}|{conv}|tf32={int(tf32)}|cudnn={int(enabled)}"
            f"|deterministic={int(cudnn_det or det)}|autocast={amp_s}{train}{src}")


def reasons(plan: Plan, x, weight, bias, spec: ConvSpec) -> list[str]:
    """Why ``plan`` cannot take this block input (empty when it can)."""
    unsupported = plan.not_supported_reasons(x, weight, bias, spec)
    if plan.devices is not None and x.device.type not in plan.devices:
        return unsupported  # its availability (importing a library, say) cannot change the answer
    return PLANS.reasons(plan.name, x.device) + unsupported


def describe(x: torch.Tensor, weight: torch.Tensor) -> str:
    return (f"input {x.device}, {str(x.dtype).removeprefix('torch.')}, shape {tuple(x.shape)}, "
            f"{layout.memory_format_name(x)}; weight {tuple(weight.shape)}, {layout.memory_format_name(weight)}")


def requested_plan() -> str | None:
    """The plan ``MISHOPS_PLAN`` names (checked), or None for the tuner's choice."""
    name = os.environ.get("MISHOPS_PLAN", "").strip().lower()
    if not name or name == "auto":
        return None
    if name not in PLANS.items and name not in PLANS.all():
        raise ValueError(f"mishops: MISHOPS_PLAN={name!r} names no plan; valid names: "
                         f"{', '.join(['auto', *PLANS.all()])}")
    return name


def _named(name: str, x, weight, bias, spec: ConvSpec) -> Plan:
    plan = PLANS.get(name)
    x, weight, bias = autocast.like_now(x), autocast.like_now(weight), autocast.like_now(bias)
    why = reasons(plan, x, weight, bias, spec)
    if why:
        raise NoPlanError(f"mishops: MISHOPS_PLAN={name} cannot run this block: {why[0]}\n"
                          f"  block: {describe(x, weight)}\n  {name}: " + "; ".join(why))
    return plan


def problem(key: str, x, weight, bias, spec: ConvSpec, grads_of, source) -> Problem:
    usable, rejected = [], {}
    for name, plan in PLANS.all().items():
        why = reasons(plan, x, weight, bias, spec)
        if why:
            rejected[name] = "; ".join(why)
        else:
            usable.append(plan)
    if not usable:  # eager runs wherever PyTorch's conv does; this is a broken registry or install
        raise NoPlanError(f"mishops: no plan can run this block, not even eager\n  block: {describe(x, weight)}\n"
                          + "\n".join(f"  {n}: {r}" for n, r in rejected.items()))
    return Problem("block", key, x.device, usable, lambda: BlockTrial(x, weight, bias, spec, grads_of, source),
                   rejected, on_failure=PLANS.mark_failed, fallback="eager", worth_timing=x.numel() > 0)


def choose(x, weight, bias, spec: ConvSpec, amp: torch.dtype | None = None,
           grads_of: tuple[bool, ...] | None = None, source: torch.Tensor | None = None) -> Plan:
    """The plan for this block input: ``MISHOPS_PLAN``'s, or the tuner's -- for ``grads_of`` (which
    of x, weight, bias the call differentiates; None: inference) the fastest forward and backward
    with correct gradients. ``source``: the input before autocast's cast, where the cast is not done
    yet (``x`` then only describes it)."""
    named = requested_plan()
    return _named(named, x, weight, bias, spec) if named else _tuned(x, weight, bias, spec, amp, grads_of, source)


def _tuned(x, weight, bias, spec: ConvSpec, amp, grads_of, source) -> Plan:
    switches = flags() if x.is_cuda else ()  # the cuDNN switches change nothing on other devices
    mkey = ("block", x.device, x.dtype, x.shape, x.stride(), weight.dtype, weight.shape, weight.stride(),
            None if bias is None else (bias.dtype, bias.stride()), spec, amp, switches, grads_of,
            None if source is None else (source.dtype, source.stride()))
    choice = TUNER.memory.get(mkey)
    if choice is None:  # a miss: candidates and trials read tensors' metadata, never their values
        key = key_string(x, weight, bias, spec, amp, switches or flags(), grads_of, source)
        x, weight, bias = autocast.like_now(x), autocast.like_now(weight), autocast.like_now(bias)
        choice = TUNER.choose(mkey, lambda: problem(key, x, weight, bias, spec, grads_of, source))
    return PLANS.items[choice.winner]


# --- a plan's configs ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConfigCandidate:
    """One config of a plan, as the tuner and ``BlockTrial`` see a plan."""

    plan: Plan
    config: Any
    priority: int

    @property
    def name(self) -> str:
        return f"{self.plan.name}[{self.config.name}]"

    @property
    def casts_input(self) -> bool:
        return self.plan.casts_input

    @property
    def autocasts(self) -> bool:
        return self.plan.autocasts

    def source_hash(self) -> str:
        return self.plan.source_hash()

    def forward(self, x, weight, bias, spec: ConvSpec) -> torch.Tensor:
        return self.plan.forward(x, weight, bias, spec, config=self.config)


def tuned_config(plan: Plan, x, weight, bias, spec: ConvSpec) -> Any:
    """``Plan.config_for``: the plan's configs for this input are candidates of their own key."""
    mkey = ("config", plan.name, x.device, x.dtype, x.shape, x.stride(), weight.dtype, weight.shape,
            weight.stride(), None if bias is None else (bias.dtype, bias.stride()), spec, flags())
    choice = TUNER.memory.get(mkey)
    if choice is None:
        choice = TUNER.choose(mkey, lambda: _config_problem(plan, x, weight, bias, spec))
    return _configs_by_name(plan, x, weight, bias, spec)[choice.winner].config


def _configs_by_name(plan: Plan, x, weight, bias, spec: ConvSpec) -> dict[str, ConfigCandidate]:
    found = plan.configs(x, weight, bias, spec)
    if not found:
        raise ValueError(f"mishops: plan {plan.name!r} asked for a tuned config but offers none for this input")
    return {c.name: c for c in (ConfigCandidate(plan, cfg, i) for i, cfg in enumerate(found))}


def _config_problem(plan: Plan, x, weight, bias, spec: ConvSpec) -> Problem:
    candidates = list(_configs_by_name(plan, x, weight, bias, spec).values())
    key = "config|" + plan.name + "|" + key_string(x, weight, bias, spec, None, flags())
    # a config that fails to build or launch is out for this key only: its siblings may run
    return Problem(f"{plan.name} config", key, x.device, candidates,
                   lambda: BlockTrial(x, weight, bias, spec, None), fallback=candidates[0].name,
                   worth_timing=x.numel() > 0)


# --- running -------------------------------------------------------------------------------------


def check_input(x, where: str) -> None:
    """PyTorch's conv would reject these too, with a longer story: say it in one line first."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"mishops: {where} expects a torch.Tensor, not {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"mishops: {str(x.dtype).removeprefix('torch.')} input: {where} needs a floating dtype")


def run_block(x: torch.Tensor, conv: torch.nn.Conv2d, backend: str = "auto", mish_count: int = 2,
              where: str = "the block") -> torch.Tensor:
    """``mish(mish(conv(x)))`` (``mish(conv(x))`` for ``mish_count=1``) by the fastest correct plan.

    ``backend`` (or ``MISHOPS_BACKEND``) other than ``"auto"`` names the double-Mish backend and
    so means the ``torch_conv`` plan; ``MISHOPS_PLAN`` names a plan and wins over both. Same
    output dtype, values and memory format as the reference block, under autocast too;
    differentiable. A cached call checks its input once (``where`` names the caller in the error:
    ModelNew, ConvMish2d...), reads the environment twice and looks its key up once.
    """
    spec = ConvSpec.of(conv, mish_count)
    if torch.compiler.is_compiling():
        return activation(conv(x), spec, backend)
    check_input(x, where)
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        return activation(conv(x), spec, backend)
    named = requested_plan()
    if named is None and dispatch.requested_backend(backend)[0] is not None:
        amp = autocast.autocast_dtype(x.device.type)
        if amp is None:
            return activation(conv2d(x, conv.weight, conv.bias, spec), spec, backend)
        with autocast.switched(x.device.type, False):
            weight, bias = autocast.cast(conv.weight, amp), autocast.cast(conv.bias, amp)
            x = autocast.cast(x, amp, expected_memory_format(x, weight))
            return activation(conv2d(x, weight, bias, spec), spec, backend)
    amp = autocast.autocast_dtype(x.device.type)
    if amp is None:
        return _run(named, x, conv.weight, conv.bias, spec, None)
    with autocast.switched(x.device.type, False):  # cast here, as autocast would for the conv, once a plan wants it
        return _run(named, autocast.cast_later(x, amp, expected_memory_format(x, conv.weight)),
                    autocast.cast_later(conv.weight, amp), autocast.cast_later(conv.bias, amp), spec, amp)


def _run(named: str | None, x, weight, bias, spec: ConvSpec, amp) -> torch.Tensor:
    """The chosen (or named) plan's output; under autocast ``x``, ``weight`` and ``bias`` may be
    ``PendingCast``s, made only as the plan needs them. An automatically chosen plan that breaks
    is out for the process and the next one runs."""
    given = (x, weight, bias) if amp is None else (  # the caller's tensors
        autocast.uncast(x), autocast.uncast(weight), autocast.uncast(bias))
    grads_of = training.grads_wanted(*given)
    # choosing reads only shapes, strides, dtypes and the device: casts not made yet will do
    source = given[0] if isinstance(x, autocast.PendingCast) else None
    while True:
        plan = _named(named, x, weight, bias, spec) if named else _tuned(x, weight, bias, spec, amp, grads_of, source)
        try:
            if amp is not None and plan.autocasts and not training.uses_fused_backward(plan, grads_of is not None):
                with autocast.switched(given[0].device.type, True):  # autocast casts, as for the reference
                    return plan.forward(*given, spec)
            return training.forward(plan, given[0] if plan.casts_input else autocast.cast_now(x),
                                    autocast.cast_now(weight), autocast.cast_now(bias), spec, grads_of is not None)
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:
            if named is not None or plan.name == "eager":
                raise
            PLANS.mark_failed(plan.name, f"forward raised {type(exc).__name__}: {exc}")
