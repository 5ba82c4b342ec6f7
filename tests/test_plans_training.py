"""Choosing a plan for training: forward + backward timed, gradients checked, keys of their own."""

import time

import pytest
import torch
import torch.nn.functional as F

from mishops import plans, tuning
from mishops.model import ModelNew
from mishops.plans import Plan, conv2d, run_block
from tests.blocks import block_choices, isolated_plans, register  # noqa: F401
from tests.reference import Model


class _OwnBackward(Plan):
    """Differentiable through autograd, with a hook on the output that can slow or bend the
    gradient flowing back: a plan whose backward is its own, not ``_PlanFunction``'s."""

    differentiable = True
    backward_delay_s = 0.0
    grad_scale = 1.0

    def forward(self, x, weight, bias, spec):
        y = F.mish(F.mish(conv2d(x, weight, bias, spec)))
        if y.requires_grad:
            y.register_hook(self._backward_hook)
        return y

    def _backward_hook(self, grad):
        time.sleep(self.backward_delay_s)
        return grad * self.grad_scale


class _SlowBackward(_OwnBackward):
    """Fast forward, 100 ms backward; first in preference order, so it loses training only on time
    (and ties, which a loaded machine's timing spread can make, go its way)."""

    name = "test_slow_backward"
    priority = 0
    backward_delay_s = 0.1


class _WrongBackward(_OwnBackward):
    """Right output, gradients 1.5 times too large; first in preference order."""

    name = "test_wrong_backward"
    priority = 0
    grad_scale = 1.5


class _Recompute(Plan):
    """Conv + eager double Mish outside autograd: trains through ``_PlanFunction`` (recompute)."""

    name = "test_recompute"
    priority = 0

    def forward(self, x, weight, bias, spec):
        with torch.no_grad():
            return F.mish(F.mish(conv2d(x, weight, bias, spec)))


#: the plans that store the pre-activation for their backward (autograd through the conv).
STORING = ("torch_conv", "eager")


def _slow_torch_conv_forward(monkeypatch, delay_s=0.01):
    """The storing plans' forwards made 10 ms slower; their backward (the stored pre-activation) untouched."""
    for name in STORING:
        plan = plans.get_plan(name)

        def slowed(*args, forward=plan.forward, **kwargs):
            time.sleep(delay_s)
            return forward(*args, **kwargs)

        monkeypatch.setattr(plan, "forward", slowed)


def _conv_and_input(x_requires_grad=False):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 5, 3)
    return conv, torch.randn(2, 3, 9, 11, requires_grad=x_requires_grad)


def test_fast_forward_slow_backward_wins_inference_and_loses_training(monkeypatch):
    register(_SlowBackward)
    _slow_torch_conv_forward(monkeypatch)
    conv, x = _conv_and_input()
    with torch.no_grad():
        run_block(x, conv)
    inference = block_choices()[-1]
    run_block(x, conv).sum().backward()
    training = block_choices()[-1]
    assert inference.winner == "test_slow_backward", inference.summary()
    assert training.winner in STORING, training.summary()
    assert training.key.endswith("|train=w,b") and "train" not in inference.key
    fast, slowed = inference.measurements["test_slow_backward"], inference.measurements["torch_conv"]
    assert fast.ok and slowed.ok and fast.median_ms < slowed.median_ms
    slow, store = training.measurements["test_slow_backward"], training.measurements[training.winner]
    assert slow.ok and store.ok and slow.median_ms > 100 and store.median_ms < slow.median_ms


@pytest.mark.parametrize("autotune", ["1", "0"])
def test_a_plan_with_a_wrong_backward_is_never_chosen_for_training(monkeypatch, autotune):
    monkeypatch.setenv("MISHOPS_AUTOTUNE", autotune)
    register(_WrongBackward)
    _slow_torch_conv_forward(monkeypatch)  # the wrong plan is the faster one too
    conv, x = _conv_and_input(x_requires_grad=True)
    with torch.no_grad():
        run_block(x, conv)
    inference = block_choices()[-1]
    assert inference.winner == "test_wrong_backward" and inference.measurements["test_wrong_backward"].ok

    grad = torch.randn(2, 5, 7, 9)
    ours = torch.autograd.grad(run_block(x, conv), [x, conv.weight, conv.bias], grad)
    training = block_choices()[-1]
    assert training.winner in STORING, training.summary()
    rejected = training.measurements["test_wrong_backward"]
    assert not rejected.ok and rejected.reason.startswith("dx: wrong answer"), rejected.reason
    expected = torch.autograd.grad(F.mish(F.mish(conv(x))), [x, conv.weight, conv.bias], grad)
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b)


def test_a_forced_plan_trains_as_it_is(monkeypatch):
    """MISHOPS_PLAN is obeyed in training as in inference: no choice, no check, its own backward."""
    register(_WrongBackward)
    monkeypatch.setenv("MISHOPS_PLAN", "test_wrong_backward")
    conv, x = _conv_and_input()
    (dw,) = torch.autograd.grad(run_block(x, conv).sum(), [conv.weight])
    (expected,) = torch.autograd.grad(F.mish(F.mish(conv(x))).sum(), [conv.weight])
    torch.testing.assert_close(dw, 1.5 * expected)
    assert block_choices() == []


def test_training_and_inference_keys_are_cached_separately():
    register(_Recompute)
    conv, x = _conv_and_input()
    profiled = tuning.stats["profiled_keys"]
    with torch.no_grad():
        run_block(x, conv)
    run_block(x, conv)  # trains the weight and the bias
    run_block(x.detach().requires_grad_(True), conv)  # and the input
    keys = [c.key for c in block_choices()]
    assert keys == [keys[0], keys[0] + "|train=w,b", keys[0] + "|train=x,w,b"], keys
    assert [c.how for c in block_choices()] == ["profiled"] * 3
    assert all(c.measurements["test_recompute"].ok and c.measurements["torch_conv"].ok for c in block_choices())
    before = dict(tuning.stats)
    assert before["profiled_keys"] == profiled + 3

    def all_three():
        with torch.no_grad():
            run_block(x, conv)
        run_block(x, conv).sum().backward()
        run_block(x.detach().requires_grad_(True), conv)

    all_three()
    assert tuning.stats == before and len(block_choices()) == 3
    tuning.TUNER.clear()  # a new process: the disk cache answers each key
    all_three()
    assert tuning.stats == before
    assert [c.how for c in block_choices()] == ["cached"] * 3
    assert [c.key for c in block_choices()] == keys


@pytest.mark.parametrize("extra_plan", [None, _Recompute], ids=["builtin-plans", "with-a-recompute-plan"])
def test_model_new_training_steps_equal_reference_model(extra_plan):
    if extra_plan is not None:
        register(extra_plan)
    torch.manual_seed(0)
    reference = Model(4, 6, 3).double()
    ours = ModelNew(4, 6, 3).double()
    ours.load_state_dict(reference.state_dict())
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (reference, ours)]
    for step in range(2):
        x = torch.randn(3, 4, 10, 12, dtype=torch.float64) * 2
        target = torch.randn(3, 6, 8, 10, dtype=torch.float64)
        for model, optimizer in zip((reference, ours), optimizers):
            optimizer.zero_grad()
            F.mse_loss(model(x), target).backward()
        for (name, a), b in zip(ours.named_parameters(), reference.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12, msg=f"step {step}: d{name}")
        for optimizer in optimizers:
            optimizer.step()
    choices = block_choices()
    assert len(choices) == 1 and choices[0].key.endswith("|train=w,b")
    if extra_plan is not None:
        assert choices[0].how == "profiled" and choices[0].measurements[extra_plan.name].ok
