"""Whole-block plans for ``Conv2d -> Mish -> Mish``, and choosing one per input.

A backend (``mishops.registry``) computes only the double Mish; a *plan* computes the whole
block from the input and the conv's parameters, so it may fuse the conv with its epilogue
(``cudnn_fused``: one cuDNN kernel instead of a conv kernel and a separate pass over its 2 GB
output; ``cudnn_fused_nchw``: the same, then a transpose, where the output must be NCHW), or fuse
the epilogue with the layout change where the output must be NCHW (``cudnn_conv_epilogue_cuda``
and ``cudnn_conv_epilogue_triton``: cuDNN's conv alone to NHWC, then one pass that adds the bias,
applies both Mish and writes NCHW). ``triton_conv`` is a conv of our own (Triton, implicit GEMM
on tensor cores) with the bias and both Mish in its epilogue, writing NCHW or channels_last
directly. ``torch_conv`` (PyTorch's conv, then ``mish2``) runs everywhere and is the reference.

Choosing follows ``mishops.dispatch`` and reuses its pieces: for a key (input and weight
shapes, strides and dtypes, conv parameters, TF32 and autocast state) every available plan that
supports the input and produces the memory format PyTorch's conv would (channels_last when the
input or the weight is channels_last, else contiguous) is first checked against ``torch_conv``
with the eager double Mish on random inputs of the same shapes and strides, then timed; a wrong
plan can never win. Measurements go to the same disk cache as the backends' under ``block|...``
keys.

A call that trains (grad mode on and x, the weight or the bias requiring grad) has keys of its own,
ending in ``|train=`` and the inputs it differentiates (``|train=w,b``); inference keys are unchanged.
There every candidate is checked and timed as a forward and a backward with a fixed random upstream
gradient, and its gradients are checked against autograd through the reference: ``torch_conv``
stores the pre-activation (the conv output, saved by ``mishops::mish2``), the fused plans recompute
it in ``_PlanFunction``'s backward, and which is faster at a shape is measured, not assumed. A
plan whose backward is wrong cannot be chosen for training, even where it wins inference.

Under autocast the block's input is cast as autocast would cast it for the conv, but only once a
plan is chosen, and not at all for a plan that casts while it reads (``casts_input``:
``triton_conv`` does it in its input pass, which saves a pass over the input). Inference keys
then name the uncast input too (``|uncast=float32...``), and each candidate is timed as it will
run: with the cast inside the timed call, or from the uncast input. After profiling a key the
scratch memory it cached goes back to CUDA (``dispatch.release_scratch``).

Environment (read at call time): ``MISHOPS_PLAN`` forces a plan (and wins over the next two);
``MISHOPS_BACKEND`` (like a named ``backend`` argument) forces the double-Mish backend, which
means ``torch_conv`` with that backend; ``MISHOPS_AUTOTUNE=0`` takes the first plan in
preference order that passes the check (its gradients' too, for a training key), without timing;
``MISHOPS_TUNE_BUDGET_MS`` bounds the timing per key. A forced plan is used for training as it is.

Plans that are not differentiable themselves (``differentiable = False``) still train: their
forward runs inside an autograd function whose backward recomputes the conv and applies the
dispatcher's fused double-Mish backward, then autograd through that conv (any padding). Under
``torch.compile`` tracing or CUDA graph capture the block is ``mish2(conv(x))``, the custom op
that is safe there.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F

from mishops import dispatch, registry
from mishops.dispatch import Choice, Measurement
from mishops.ops import mish2
from mishops.registry import FLOAT_DTYPES, Availability

log = logging.getLogger("mishops")

#: how close a plan's output must be to torch_conv + eager double Mish: (rtol, atol) per dtype.
#: fp32 allows for TF32 convs (two TF32 convs differ by ~5e-4 at the reference shape).
TOLERANCE = {
    torch.float64: (1e-9, 1e-9),
    torch.float32: (2e-3, 2e-3),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (4e-2, 4e-2),
}

#: counts that tests read: a warm process must leave them at zero.
stats = {"profiled_keys": 0, "timed_runs": 0}


class NoPlanError(dispatch.NoBackendError):
    """A forced plan cannot run this input; the message says why."""


@dataclass(frozen=True)
class ConvSpec:
    """The conv's hyper-parameters, as ``nn.Conv2d`` keeps them (padding may be a string)."""

    stride: tuple[int, ...]
    padding: tuple[int, ...] | str
    dilation: tuple[int, ...]
    groups: int
    padding_mode: str
    #: ``F.pad`` amounts for a non-zeros ``padding_mode`` (``nn.Conv2d._reversed_padding_repeated_twice``).
    reversed_padding: tuple[int, ...]
    #: how many Mish follow the conv: 2 is the reference block, 1 the Conv -> Mish of CSPDarknet-style models.
    mish_count: int = 2

    @classmethod
    def of(cls, conv: torch.nn.Conv2d, mish_count: int = 2) -> ConvSpec:
        if mish_count not in (1, 2):
            raise ValueError(f"mishops: mish_count must be 1 or 2, not {mish_count!r}")
        return cls(tuple(conv.stride), conv.padding if isinstance(conv.padding, str) else tuple(conv.padding),
                   tuple(conv.dilation), conv.groups, conv.padding_mode,
                   tuple(getattr(conv, "_reversed_padding_repeated_twice", ())), mish_count)


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, spec: ConvSpec) -> torch.Tensor:
    """What ``nn.Conv2d`` computes, from its parameters."""
    if spec.padding_mode != "zeros":
        x = F.pad(x, spec.reversed_padding, mode=spec.padding_mode)
        return F.conv2d(x, weight, bias, spec.stride, 0, spec.dilation, spec.groups)
    return F.conv2d(x, weight, bias, spec.stride, spec.padding, spec.dilation, spec.groups)


def activation(z: torch.Tensor, spec: ConvSpec, backend: str = "auto") -> torch.Tensor:
    """The block's activation of the conv output ``z``: ``mish2`` (by ``backend``) or one ``F.mish``."""
    return mish2(z, backend) if spec.mish_count == 2 else F.mish(z)


def activation_backward(z: torch.Tensor, grad: torch.Tensor, spec: ConvSpec) -> torch.Tensor:
    """d(activation)/dz * grad, from the conv output ``z`` alone: the dispatcher's fused double-Mish
    backward, or autograd through one ``F.mish``."""
    if spec.mish_count == 2:
        return dispatch.run("backward", z, grad)  # copies grad to z's strides when they differ
    with torch.enable_grad():
        leaf = z.detach().requires_grad_()
        return torch.autograd.grad(F.mish(leaf), leaf, grad)[0]


def _strides_like_channels_last(t: torch.Tensor) -> bool:
    """c10's ``is_channels_last_strides_2d``: the test behind ``suggest_memory_format``,
    including how it settles tensors that are both contiguous and channels_last."""
    if t.dim() != 4:
        return False
    sizes, strides = t.shape, t.stride()
    if strides[1] == 0:
        return False
    lowest = 0
    for d in (1, 3, 2, 0):
        if sizes[d] == 0 or strides[d] < lowest:
            return False
        if d == 0 and lowest == strides[1]:
            return False
        lowest = strides[d] * (sizes[d] if sizes[d] > 1 else 1)
    return True


def expected_memory_format(x: torch.Tensor, weight: torch.Tensor) -> torch.memory_format:
    """PyTorch's rule for a conv's output: channels_last when the input or the weight is."""
    if x.dim() == 4 and (_strides_like_channels_last(x) or _strides_like_channels_last(weight)):
        return torch.channels_last
    return torch.contiguous_format


class Plan:
    """One way to compute the whole block.

    Subclasses set the class attributes and implement ``forward``; inputs reach ``forward`` on a
    supported device and dtype, with ``not_supported_reasons`` empty, and with the dtypes
    autocast would give the conv (the dispatcher casts first, unless ``casts_input``).
    """

    name: ClassVar[str]
    #: preference when autotuning is off or timings tie: lower wins.
    priority: ClassVar[int] = 100
    #: device types it runs on (``torch.device.type``); ``None`` means any.
    devices: ClassVar[frozenset[str] | None] = None
    dtypes: ClassVar[frozenset[torch.dtype]] = FLOAT_DTYPES
    #: memory formats its output can have; it is a candidate only where PyTorch's is among them.
    output_formats: ClassVar[frozenset[torch.memory_format]] = frozenset(
        {torch.contiguous_format, torch.channels_last})
    #: False: its forward is not tracked by autograd; the dispatcher supplies the backward.
    differentiable: ClassVar[bool] = False
    #: True: under autocast its forward takes the input as the caller gave it (e.g. fp32 with bf16
    #: weights) and casts it while reading it, which saves autocast's own pass over the input.
    casts_input: ClassVar[bool] = False
    #: kernel sources hashed into the tuning-cache key beside the class's module (as for backends).
    source_files: ClassVar[tuple[Path, ...]] = ()

    def is_available(self) -> Availability:
        return Availability.yes()

    def not_supported_reasons(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                              spec: ConvSpec) -> list[str]:
        """Why this plan cannot take the input (empty when it can), availability aside."""
        reasons = registry.device_and_dtype_reasons(self, x)
        wanted = expected_memory_format(x, weight)
        if wanted not in self.output_formats:
            reasons.append(f"PyTorch's conv output would be {_format_name(wanted)}; this plan writes "
                           + " or ".join(sorted(_format_name(f) for f in self.output_formats)) + " only")
        return reasons

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                spec: ConvSpec) -> torch.Tensor:
        raise NotImplementedError

    def source_hash(self) -> str:
        """Changes whenever the code that computes this plan's result changes."""
        return registry._source_hash(type(self))

    def __repr__(self) -> str:
        return f"<mishops plan {self.name!r}>"


def operand_reasons(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, spec: ConvSpec) -> list[str]:
    """Why a fused kernel cannot take these operands, whatever it computes: what every plan of
    ours with its own kernel (cuDNN's graphs, ``triton_conv``) needs of them."""
    if x.dim() != 4:
        return ["input is not a batch of images (4-D)"]
    reasons = []
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        reasons.append("input, weight and bias dtypes differ")
    if weight.device != x.device or (bias is not None and bias.device != x.device):
        reasons.append("input, weight and bias are on different devices")
    if spec.groups != 1:
        reasons.append(f"grouped conv (groups={spec.groups})")
    if spec.mish_count != 2:
        reasons.append(f"its epilogue applies Mish twice (mish_count={spec.mish_count} asked)")
    return reasons


def _format_name(memory_format: torch.memory_format) -> str:
    return "channels_last" if memory_format == torch.channels_last else "contiguous"


# --- the registry ------------------------------------------------------------------------------


def _import_builtin_plans() -> None:
    from mishops.plans import (  # noqa: F401  (registers them)
        cudnn_epilogue, cudnn_fused, cudnn_nchw, torch_conv, triton_conv)


PLANS = registry.Registry("plan", Plan, _import_builtin_plans, on_change=lambda: _memory.clear())
_lock, _plans, _failed = PLANS.lock, PLANS.items, PLANS.failed
register_plan, unregister_plan, plans, get_plan = PLANS.register, PLANS.unregister, PLANS.all, PLANS.get
availability, mark_failed = PLANS.availability, PLANS.mark_failed


# --- checking answers ----------------------------------------------------------------------------


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, spec: ConvSpec) -> torch.Tensor:
    """The answer every plan is checked against: PyTorch's conv, then ``F.mish`` twice."""
    with torch.no_grad():
        return activation(conv2d(x, weight, bias, spec), spec, "eager")


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
                return f"output is not {_format_name(fmt)} like PyTorch's (strides {result.stride()})"
    return dispatch.wrong_answer(result, expected, TOLERANCE)


def reference_gradients(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, spec: ConvSpec,
                        grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The gradients every plan's are checked against: autograd through ``reference``'s block (the
    conv's own backward, the eager double Mish's), for the inputs that require them."""
    with torch.enable_grad():
        y = activation(conv2d(x, weight, bias, spec), spec, "eager")
        return torch.autograd.grad(y, _differentiated(x, weight, bias), grad)


def gradient_mismatch(result: torch.Tensor, expected: torch.Tensor) -> str:
    """Why ``result`` is not an acceptable gradient (empty when it is): ``TOLERANCE`` relative to the
    largest element of ``expected``. Each element of the weight's and the bias's gradient sums over
    the batch and the image, so its rounding error grows with them and a fixed atol would reject a
    right backward at the reference shape; a wrong formula is off by the gradients' own size."""
    scale = max(1.0, float(expected.abs().nan_to_num(0.0).max())) if expected.numel() else 1.0
    wrong = dispatch.wrong_answer(result / scale, expected / scale, TOLERANCE)
    return f"{wrong}, relative to the largest element {scale:.3g}" if wrong.startswith("wrong answer") else wrong


# --- choosing ----------------------------------------------------------------------------------

_memory: dict[tuple, Choice] = {}


def clear_memory() -> None:
    """Forget the in-memory choices and failures of plans (the disk cache stays)."""
    with _lock:
        _memory.clear()
        _failed.clear()


def _flags() -> tuple:
    """Global switches that change which plans may run or what they compute."""
    return (torch.backends.cudnn.allow_tf32, torch.backends.cudnn.enabled,
            torch.backends.cudnn.deterministic, torch.are_deterministic_algorithms_enabled())


def _key_string(x, weight, bias, spec: ConvSpec, autocast: torch.dtype | None, flags: tuple,
                grads_of: tuple[bool, ...] | None = None, source: torch.Tensor | None = None) -> str:
    def t(name, v):
        return f"{name}={str(v.dtype).removeprefix('torch.')}{tuple(v.shape)}{tuple(v.stride())}"

    conv = f"stride={spec.stride} padding={spec.padding} dilation={spec.dilation} groups={spec.groups} " \
           f"mode={spec.padding_mode} mish={spec.mish_count}"
    bias_s = t("b", bias) if bias is not None else "b=None"
    amp = str(autocast).removeprefix("torch.") if autocast is not None else "off"
    tf32, enabled, cudnn_det, det = flags
    train = "" if grads_of is None else "|train=" + ",".join(n for n, g in zip("xwb", grads_of) if g)
    src = "" if source is None else "|" + t("uncast", source)
    return (f"block|{t('x', x)}|{t('w', weight)}|{bias_s}|{conv}|tf32={int(tf32)}|cudnn={int(enabled)}"
            f"|deterministic={int(cudnn_det or det)}|autocast={amp}{train}{src}")


def _reasons(plan: Plan, x, weight, bias, spec) -> list[str]:
    available = availability(plan.name)
    reasons = [] if available else [f"unavailable: {available.reason}"]
    return reasons + plan.not_supported_reasons(x, weight, bias, spec)


def _describe(x: torch.Tensor, weight: torch.Tensor) -> str:
    from mishops.layout import memory_format_name

    return (f"input {x.device}, {str(x.dtype).removeprefix('torch.')}, shape {tuple(x.shape)}, "
            f"{memory_format_name(x)}; weight {tuple(weight.shape)}, {memory_format_name(weight)}")


def _forced(name: str, x, weight, bias, spec) -> Plan:
    plan = get_plan(name)
    why = _reasons(plan, x, weight, bias, spec)
    if why:
        raise NoPlanError(f"mishops: plan {name!r} (requested by MISHOPS_PLAN) cannot run this block "
                          f"({_describe(x, weight)}): " + "; ".join(why))
    return plan


class _Trial:
    """What every candidate for a key runs on and is judged by: synthetic inputs like the caller's
    and the reference answer; for a training key also a fixed random upstream gradient and the
    reference gradients, so a candidate is run, checked and timed as a forward and a backward
    (``_forward_backward``) -- storing the pre-activation (``torch_conv``) against recomputing
    it (``_PlanFunction``) is then settled by the clock, per shape."""

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
        self.expected = reference(self.x, self.weight, self.bias, spec)
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
            return _forward_backward(plan, self.x, self.weight, self.bias, self.spec, self.grad)
        x = self.x
        if self.source is not None:  # as run_block would: the plan casts, or autocast's cast first
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


def _profile(candidates: list[Plan], trial: _Trial, budget_s: float) -> dict[str, Measurement]:
    """Check, then time, each candidate against the reference on the trial's synthetic inputs."""
    share = budget_s / max(len(candidates), 1)
    results: dict[str, Measurement] = {}
    for plan in candidates:
        h = plan.source_hash()
        try:
            for _ in range(2):  # the first call may build, compile or tune
                outcome = trial.run(plan)
            wrong = trial.wrong(outcome)
            del outcome
            if wrong:
                results[plan.name] = Measurement(False, h, reason=wrong)
                log.warning("mishops: plan %r rejected for %s: %s", plan.name, _describe(trial.x, trial.weight), wrong)
                continue
            median, spread, reps = dispatch._time(lambda: trial.run(plan), trial.expected, share)
            stats["timed_runs"] += reps
            results[plan.name] = Measurement(True, h, median, spread)
        except torch.OutOfMemoryError as exc:  # says nothing about the plan: not remembered on disk
            results[plan.name] = Measurement(False, "", reason=f"out of memory: {str(exc).splitlines()[0]}")
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            results[plan.name] = Measurement(False, h, reason=f"raised {type(exc).__name__}: {first}")
            log.warning("mishops: plan %r failed for %s: %s", plan.name, _describe(trial.x, trial.weight),
                        results[plan.name].reason)
    return results


def _first_correct(candidates: list[Plan], trial: _Trial) -> tuple[str, dict[str, Measurement]]:
    """Without timing: the first plan in preference order whose answer (and, for a training key,
    whose gradients) pass the check."""
    checked = {}
    for plan in candidates:
        try:
            wrong = trial.wrong(trial.run(plan))
        except Exception as exc:
            wrong = f"raised {type(exc).__name__}: {exc}"
        checked[plan.name] = Measurement(not wrong, plan.source_hash(), reason=wrong)
        if not wrong:
            return plan.name, checked
    return "torch_conv", checked


def _choose(key: str, x, weight, bias, spec, grads_of: tuple[bool, ...] | None,
            source: torch.Tensor | None = None) -> Choice:
    dispatch._apply_log_env()
    usable, rejected = [], {}
    for name, plan in plans().items():
        why = _reasons(plan, x, weight, bias, spec)
        if why:
            rejected[name] = "; ".join(why)
        else:
            usable.append(plan)
    if not usable:
        raise NoPlanError(f"mishops: no plan can run this block ({_describe(x, weight)}): "
                          + "; ".join(f"{n}: {r}" for n, r in rejected.items()))
    preferred = min(usable, key=lambda p: (p.priority, p.name)).name
    if len(usable) == 1 or x.numel() == 0:
        return Choice("block", key, preferred, "preference", rejected=rejected)
    started = time.perf_counter()
    if os.environ.get("MISHOPS_AUTOTUNE", "1") == "0":
        winner, checked = _first_correct(usable, _Trial(x, weight, bias, spec, grads_of, source))
        return Choice("block", key, winner, "preference", checked, rejected, time.perf_counter() - started)

    label = dispatch.device_label(x.device)
    store = dispatch._disk_cache(label)
    measured = dispatch._cached_measurements(store, key, usable)
    missing = [p for p in usable if p.name not in measured]
    fresh = {}
    if missing:
        budget_s = float(os.environ.get("MISHOPS_TUNE_BUDGET_MS", dispatch.DEFAULT_BUDGET_MS)) / 1e3
        fresh = _profile(missing, _Trial(x, weight, bias, spec, grads_of, source), budget_s)
        stats["profiled_keys"] += 1
        dispatch.release_scratch(x.device)
    measured.update(fresh)
    writer = True
    if dispatch._distributed():
        measured, writer = dispatch._agree(label, measured)
        fresh = {n: m for n, m in measured.items() if n in fresh}
    durable = {n: m.to_json() for n, m in fresh.items() if m.ok or m.source_hash}
    if durable and writer:
        store.update(key, durable)
    winner = dispatch.pick(measured, {p.name: p.priority for p in usable}) or "torch_conv"
    return Choice("block", key, winner, "profiled" if fresh else "cached", measured, rejected,
                  time.perf_counter() - started)


def choose(x, weight, bias, spec: ConvSpec, autocast: torch.dtype | None = None,
           grads_of: tuple[bool, ...] | None = None, source: torch.Tensor | None = None) -> Plan:
    """The plan for this block input: ``MISHOPS_PLAN``'s, or the fastest correct one -- for
    ``grads_of`` (which of x, weight, bias the call differentiates; None: inference) the fastest
    forward and backward with correct gradients. ``source``: the input before autocast's cast,
    where the cast is not done yet (``x`` then only describes it); each candidate is timed with
    the cast included, or without it for plans that cast while reading (``casts_input``)."""
    forced = os.environ.get("MISHOPS_PLAN")
    if forced:
        return _forced(forced, x, weight, bias, spec)
    flags = _flags()
    mkey = (x.device, x.dtype, x.shape, x.stride(), weight.dtype, weight.shape, weight.stride(),
            None if bias is None else (bias.dtype, bias.stride()), spec, autocast, flags, grads_of,
            None if source is None else (source.dtype, source.stride()))
    choice = _memory.get(mkey)
    if choice is None:
        with _lock:  # one thread profiles a cold key; the others wait and reuse its choice
            choice = _memory.get(mkey)
            if choice is None:
                key = _key_string(x, weight, bias, spec, autocast, flags, grads_of, source)
                choice = _choose(key, x, weight, bias, spec, grads_of, source)
                _memory[mkey] = choice
                with dispatch._lock:
                    dispatch._history.append(choice)
                log.info("mishops: %s", choice.summary())
    return _plans[choice.backend]


# --- running -----------------------------------------------------------------------------------


class _PlanFunction(torch.autograd.Function):
    """Forward: the plan. Backward: recompute the conv, the dispatcher's fused double-Mish
    backward, then autograd through that conv -- the gradients autograd would give, for every
    padding (``"same"``, reflect, ...) ``nn.Conv2d`` accepts."""

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


def _differentiated(*tensors: torch.Tensor | None) -> list[torch.Tensor]:
    return [t for t in tensors if t is not None and t.requires_grad]


def _grads_wanted(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[bool, ...] | None:
    """Which of x, weight, bias this call differentiates, or None when it trains nothing: a
    training call is chosen for, and timed as, a forward and a backward."""
    if not torch.is_grad_enabled():
        return None
    wanted = tuple(t is not None and t.requires_grad for t in (x, weight, bias))
    return wanted if any(wanted) else None


def _forward(plan: Plan, x, weight, bias, spec: ConvSpec, training: bool) -> torch.Tensor:
    """The plan's output, with a backward when ``training``: its own where it is differentiable
    (``torch_conv`` stores the pre-activation) or ``_PlanFunction``'s (which recomputes it)."""
    if training:  # the fused backward (mishops.plans.training); the lead re-wires this on merge
        from mishops.plans import training as _training
        return _training.forward(plan, x, weight, bias, spec)
    return plan.forward(x, weight, bias, spec)


def _forward_backward(plan: Plan, x, weight, bias, spec: ConvSpec, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One training step of the block by ``plan``: the output, then the gradients of the inputs
    that require them for the upstream gradient ``grad``."""
    with torch.enable_grad():
        y = _forward(plan, x, weight, bias, spec, training=True)
        return (y.detach(), *torch.autograd.grad(y, _differentiated(x, weight, bias), grad))


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _cast(t: torch.Tensor | None, dtype: torch.dtype,
          memory_format: torch.memory_format = torch.preserve_format) -> torch.Tensor | None:
    """What autocast does to a conv argument: floating tensors other than float64 take ``dtype``.
    The copy may change the layout for free: the input goes to the output's memory format, which
    the conv reads faster (NHWC) and which leaves the result's format unchanged."""
    if t is None or not t.is_floating_point() or t.dtype in (torch.float64, dtype):
        return t
    return t.to(dtype, memory_format=memory_format)


@dataclass
class _PendingCast:
    """Autocast's cast of the input, made only if the chosen plan needs it."""

    source: torch.Tensor
    dtype: torch.dtype
    memory_format: torch.memory_format
    done: torch.Tensor | None = None

    def like(self) -> torch.Tensor:
        """An unwritten tensor with the cast's dtype, shape and strides, for choosing; the caller
        drops it at once, so a plan that casts as it reads never holds the cast's memory."""
        return torch.empty(self.source.shape, dtype=self.dtype, device=self.source.device,
                           memory_format=self.memory_format)

    def cast(self) -> torch.Tensor:
        if self.done is None:
            self.done = self.source.to(self.dtype, memory_format=self.memory_format)
        return self.done


def _cast_later(x: torch.Tensor, dtype: torch.dtype, memory_format: torch.memory_format):
    """``_cast(x, dtype, memory_format)``, deferred where it would copy."""
    if not x.is_floating_point() or x.dtype in (torch.float64, dtype):
        return x
    return _PendingCast(x, dtype, memory_format)


def _cast_now(x) -> torch.Tensor:
    return x.cast() if isinstance(x, _PendingCast) else x


def _capturing(x: torch.Tensor) -> bool:
    return x.device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def run_block(x: torch.Tensor, conv: torch.nn.Conv2d, backend: str = "auto", mish_count: int = 2) -> torch.Tensor:
    """``mish(mish(conv(x)))`` (``mish(conv(x))`` for ``mish_count=1``) by the fastest correct plan for this input.

    ``backend`` (or ``MISHOPS_BACKEND``) other than ``"auto"`` names the double-Mish backend and
    so means the ``torch_conv`` plan; ``MISHOPS_PLAN`` names a plan and wins over both. Same
    output dtype, values and memory format as the reference block, under autocast too;
    differentiable.
    """
    if torch.compiler.is_compiling() or _capturing(x):
        return activation(conv(x), ConvSpec.of(conv, mish_count), backend)
    spec = ConvSpec.of(conv, mish_count)
    weight, bias = conv.weight, conv.bias
    amp = _autocast_dtype(x.device.type)
    uncast = x
    if amp is not None:  # cast here, as autocast would for the conv, so plans see one dtype
        x, weight, bias = _cast_later(x, amp, expected_memory_format(x, weight)), _cast(weight, amp), _cast(bias, amp)
    with torch.autocast(uncast.device.type, enabled=False) if amp is not None else contextlib.nullcontext():
        if backend != "auto" or os.environ.get("MISHOPS_BACKEND"):
            if not os.environ.get("MISHOPS_PLAN"):
                return activation(conv2d(_cast_now(x), weight, bias, spec), spec, backend)
        explicit = bool(os.environ.get("MISHOPS_PLAN"))
        grads_of = _grads_wanted(uncast, weight, bias)
        while True:
            # choosing reads only the input's shape, strides, dtype and device: a cast not done yet will do
            pending = isinstance(x, _PendingCast)
            plan = choose(x.like() if pending else x, weight, bias, spec, amp, grads_of, uncast if pending else None)
            if plan.name == "torch_conv":
                if grads_of is not None:  # training: the fused backward (mishops.plans.training)
                    return _forward(plan, _cast_now(x), weight, bias, spec, True)
                return plan.forward(_cast_now(x), weight, bias, spec, backend)
            try:
                return _forward(plan, uncast if plan.casts_input else _cast_now(x), weight, bias, spec,
                                grads_of is not None)
            except Exception as exc:
                if explicit:
                    raise
                mark_failed(plan.name, f"forward raised {type(exc).__name__}: {exc}")


__all__ = ["ConvSpec", "activation", "activation_backward", "NoPlanError", "Plan", "TOLERANCE", "choose", "clear_memory", "conv2d",
           "expected_memory_format", "get_plan", "gradient_mismatch", "mismatch", "operand_reasons", "plans", "reference",
           "reference_gradients", "register_plan", "run_block", "synthetic_inputs", "unregister_plan"]
