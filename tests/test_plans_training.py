"""Choosing a plan for training: forward + backward timed, gradients checked, keys of their own."""

import time

import pytest
import torch
import torch.nn.functional as F

from mishops import plans, tuning
from mishops.model import ModelNew
from mishops.plans import Plan, conv2d, run_block
from tests.blocks import assert_gradients_within_eager, block_choices, isolated_plans, max_err, register  # noqa: F401
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


class _Storing(Plan):
    """Not differentiable, and stores: its own ``forward_storing`` (eager ops outside autograd) gives
    the output and the pre-activation, counted, as a fused epilogue that writes both would."""

    name = "test_storing"
    priority = 0
    stores_preactivation = True
    calls = 0

    def forward(self, x, weight, bias, spec):
        raise AssertionError("a storing plan's training forward is forward_storing")

    def forward_storing(self, x, weight, bias, spec):
        type(self).calls += 1
        with torch.no_grad():
            z = conv2d(x, weight, bias, spec)
            return (F.mish(F.mish(z)) if spec.mish_count == 2 else F.mish(z)), z


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


# --- the fused training path (mishops.plans.training) ---------------------------------------------

from mishops.plans import ConvSpec, training  # noqa: E402


@pytest.mark.parametrize("plan_name", ["torch_conv", "test_storing", "test_recompute"],
                         ids=["store", "own-store", "recompute"])
@pytest.mark.parametrize("x_grad", [False, True], ids=["w,b", "x,w,b"])
@pytest.mark.parametrize("mish_count", [2, 1])
def test_gradcheck_float64(plan_name, x_grad, mish_count):
    """The fused backward's gradients of x, the weight and the bias, numerically checked: stored
    pre-activation (torch_conv's, and a plan's own ``forward_storing``) and recomputed (a plan that
    is not differentiable)."""
    register(_Recompute)
    register(_Storing)
    plan = plans.get_plan(plan_name)
    conv = torch.nn.Conv2d(2, 3, 3, stride=(1, 2), padding=1).double()
    spec = ConvSpec.of(conv, mish_count)
    if mish_count == 1 and plan_name == "test_recompute":
        pytest.skip("the test plan applies Mish twice")
    x = (torch.randn(2, 2, 5, 6, dtype=torch.float64) * 2).requires_grad_(x_grad)
    weight = conv.weight.detach().clone().requires_grad_(True)
    bias = conv.bias.detach().clone().requires_grad_(True)
    inputs = (x, weight, bias) if x_grad else (weight, bias)

    def block(*args):
        xs, w, b = args if x_grad else (x, *args)
        return training.forward(plan, xs, w, b, spec, True)

    assert torch.autograd.gradcheck(block, inputs)


def test_a_storing_plans_backward_reads_what_its_forward_stored(monkeypatch):
    """``forward_storing`` runs once a training call, ``forward`` never, and the backward
    recomputes no conv: its gradients come from the stored pre-activation."""
    register(_Storing)
    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    spec = ConvSpec.of(conv)
    x = torch.randn(2, 3, 6, 7)
    y = training.forward(plans.get_plan("test_storing"), x, conv.weight, conv.bias, spec, True)
    recomputed = []
    monkeypatch.setattr(training, "conv2d", lambda *a, **k: recomputed.append(1))
    g = torch.randn_like(y)
    dw, db = torch.autograd.grad(y, (conv.weight, conv.bias), g)
    assert _Storing.calls == 1 and not recomputed
    expected = torch.autograd.grad(F.mish(F.mish(conv(x))), (conv.weight, conv.bias), g)
    torch.testing.assert_close((dw, db), expected)


def test_grad_bias_fallback_matches_autograd_in_each_layout():
    torch.manual_seed(0)
    spec = ConvSpec.of(torch.nn.Conv2d(1, 1, 1))
    for fmt in (torch.contiguous_format, torch.channels_last):
        z = (torch.randn(2, 5, 3, 4, dtype=torch.float64) * 3).contiguous(memory_format=fmt)
        g = torch.randn_like(z)
        dz, db = training.grad_bias(z, g, spec)
        zd = z.clone().requires_grad_(True)
        (expected,) = torch.autograd.grad(F.mish(F.mish(zd)), zd, g)
        torch.testing.assert_close(dz, expected)
        torch.testing.assert_close(db, expected.sum(dim=(0, 2, 3)))
        assert db.dtype == torch.float64


def _two_block_nets(seed=0):
    """The same two-block net (3 -> 4 -> 5 channels) built from ModelNew and from the reference."""
    torch.manual_seed(seed)
    reference = torch.nn.Sequential(Model(3, 4, 3), Model(4, 5, 3))
    ours = torch.nn.Sequential(ModelNew(3, 4, 3), ModelNew(4, 5, 3))
    ours.load_state_dict(reference.state_dict())
    return ours, reference


def _sgd_run(net, steps=20, seed=1):
    """Losses of ``steps`` SGD steps on fixed random batches; the second block differentiates its input."""
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
    losses = []
    for _ in range(steps):
        x = torch.randn(2, 3, 11, 10, generator=gen) * 2
        target = torch.randn(2, 5, 7, 6, generator=gen)
        optimizer.zero_grad()
        loss = F.mse_loss(net(x), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compile"])
def test_twenty_sgd_steps_of_a_two_block_net_match_the_reference(compiled):
    ours, reference = _two_block_nets()
    if compiled:
        torch._dynamo.reset()
        run = torch.compile(ours, fullgraph=True)
    else:
        run = ours
    ours_losses, reference_losses = _sgd_run(run), _sgd_run(reference)
    torch.testing.assert_close(ours_losses, reference_losses, rtol=1e-4, atol=1e-6)
    for (name, a), b in zip(ours.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    if not compiled:  # the first block trains w,b; the second, whose input is the first's output, x,w,b
        keys = [c.key for c in block_choices()]
        assert any(k.endswith("|train=w,b") for k in keys) and any(k.endswith("|train=x,w,b") for k in keys), keys


def test_backward_layout_is_read_at_call_time(monkeypatch):
    monkeypatch.setenv("MISHOPS_TRAIN_BACKWARD_LAYOUT", "channels_last")
    assert training.backward_layout() == "channels_last"
    monkeypatch.setenv("MISHOPS_TRAIN_BACKWARD_LAYOUT", "sideways")
    with pytest.raises(ValueError, match="as_is or channels_last"):
        training.backward_layout()


# --- GPU: the block's gradients against float64 ---------------------------------------------------

GPU_TRAIN_SHAPES = {  # (batch, cin, cout, h, w, kernel, conv args)
    "reference": (64, 64, 128, 256, 256, 3, {}),
    "batch1": (1, 64, 128, 256, 256, 3, {}),
    "odd": (3, 5, 7, 9, 41, 3, {}),
    "stride2-pad1": (2, 16, 24, 17, 13, 5, {"stride": 2, "padding": 1}),
    "pad1": (2, 8, 16, 15, 17, 3, {"padding": 1}),
}


def _gpu_block_gradients(monkeypatch, plan, setting, layout, shape_name):
    """dx, dweight and dbias of the block through ``plan`` (forced), eager's, float64's, and the TF32 floor of each."""
    from tests.blocks import Model as Block, in_setting, tf32_gradient_floors

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", torch.backends.cudnn.allow_tf32)
    monkeypatch.setenv("MISHOPS_PLAN", plan)
    n, cin, cout, h, w, k, conv_args = GPU_TRAIN_SHAPES[shape_name]
    torch.manual_seed(0)
    model = Block(cin, cout, k, **conv_args).cuda()
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    model = model.to(memory_format=fmt)
    x = torch.rand(n, cin, h, w, device="cuda").contiguous(memory_format=fmt)
    with torch.no_grad():
        grad = torch.randn_like(model(x))

    def grads(m, inp, fn, name):
        inp = inp.clone().requires_grad_(True)
        with in_setting(name):
            out = fn(m, inp)
        return torch.autograd.grad(out, [inp, m.conv.weight, m.conv.bias], grad.to(out.dtype))

    ref = grads(model.double(), x.double(), lambda m, t: m(t), "fp32")
    model = model.float()
    torch.backends.cudnn.allow_tf32 = True
    ours = grads(model, x, lambda m, t: run_block(t, m.conv), setting)
    eager = grads(model, x, lambda m, t: m(t), setting)
    return ours, eager, ref, tf32_gradient_floors(x, model.conv, grad, ref, setting)


@pytest.mark.gpu
@pytest.mark.parametrize("shape_name", list(GPU_TRAIN_SHAPES))
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("setting", ["tf32", "bf16-autocast", "fp16-autocast"])
@pytest.mark.parametrize("plan", ["torch_conv", "triton_conv", "cudnn_fused", "cudnn_conv_epilogue_cuda",
                                  "cudnn_conv_epilogue_triton"])
def test_gpu_training_gradients_vs_float64(monkeypatch, plan, setting, layout, shape_name):
    """Every gradient within 2x eager's own error against float64, or of the TF32 floor where that is
    larger (plus 1e-5 of its largest element)."""
    if shape_name in ("reference", "batch1") and (setting == "fp16-autocast" or plan not in ("torch_conv", "triton_conv")):
        pytest.skip("the reference-sized shapes run PyTorch's conv and one conv kernel of ours, TF32 and bf16")
    try:
        ours, eager, ref, floors = _gpu_block_gradients(monkeypatch, plan, setting, layout, shape_name)
    except plans.NoPlanError as exc:
        pytest.skip(f"{plan} does not take this block: {str(exc)[:200]}")
    assert_gradients_within_eager(ours, eager, ref, floors)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_gpu_backward_layouts_agree(monkeypatch, layout):
    """cuDNN's weight and input gradients from NCHW tensors and from channels_last copies."""
    found = []
    for choice in ("as_is", "channels_last"):
        monkeypatch.setenv("MISHOPS_TRAIN_BACKWARD_LAYOUT", choice)
        found.append(_gpu_block_gradients(monkeypatch, "torch_conv", "tf32", layout, "odd"))
    for a, b, r in zip(found[0][0], found[1][0], found[0][2]):
        assert max_err(a, r) < 1e-3 * float(r.abs().max()) and max_err(b, r) < 1e-3 * float(r.abs().max())


@pytest.mark.parametrize("case", ["plain", "stride-pad", "channels_last"])
def test_triton_weight_grad_matches_cudnn_formula(monkeypatch, case):
    """The Triton weight gradient (interpreted on CPU) against float64 aten.convolution_backward of
    the TF32-rounded operands."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # before Triton's first import: its own jitted helpers follow it
    pytest.importorskip("triton")
    from mishops.backends import triton as triton_backend

    stride, padding = ((2, 1), (1, 2)) if case == "stride-pad" else ((1, 1), (0, 0))
    torch.manual_seed(0)
    x = torch.randn(2, 16, 9, 40)
    if case == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(24, 16, 3, 3)
    dz = torch.randn_like(F.conv2d(x, weight, None, stride, padding))
    got = triton_backend.conv_weight_grad(x, dz, weight.shape, stride, padding, (1, 1))
    from tests.blocks import tf32_round

    # against the operands rounded to TF32 as the kernel rounds them: what is left is summation order
    _, expected, _ = torch.ops.aten.convolution_backward(
        tf32_round(dz).double(), tf32_round(x).double().contiguous(memory_format=torch.channels_last)
        if case == "channels_last" else tf32_round(x).double(), weight.double(), None, list(stride), list(padding),
        [1, 1], False, [0, 0], 1, [False, True, False])
    assert got.shape == weight.shape and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def test_weight_grad_choice_is_read_at_call_time(monkeypatch):
    monkeypatch.setenv("MISHOPS_TRAIN_WGRAD", "triton")
    assert training.weight_grad_by() == "triton"
    monkeypatch.setenv("MISHOPS_TRAIN_WGRAD", "magic")
    with pytest.raises(ValueError, match="cudnn or triton"):
        training.weight_grad_by()


@pytest.mark.gpu
@pytest.mark.parametrize("shape_name", ["stride2-pad1", "reference"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_gpu_triton_weight_grad_vs_float64(monkeypatch, layout, shape_name):
    """torch_conv's training backward with the Triton weight gradient (MISHOPS_TRAIN_WGRAD=triton):
    within 2x eager's error, or within TF32's own (5e-4 of the largest element) where eager's is
    smaller than that, as on the H200 at stride2-pad1, where cuDNN's weight gradient was more exact."""
    monkeypatch.setenv("MISHOPS_TRAIN_WGRAD", "triton")
    ours, eager, ref, _ = _gpu_block_gradients(monkeypatch, "torch_conv", "tf32", layout, shape_name)
    for what, a, e, r in zip(["x", "weight", "bias"], ours, eager, ref):
        err, eager_err = max_err(a, r), max_err(e, r)
        bound = max(2 * eager_err, 5e-4 * float(r.abs().max())) + 1e-5 * float(r.abs().max())
        assert err <= bound, f"d{what}: {err:.3g} vs eager {eager_err:.3g}"
