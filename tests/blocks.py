"""What the plan tests share: the block with any conv options, an isolated plan registry, and how
a GPU result is judged against float64 and against eager's own error."""

import contextlib
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mishops import plans, tuning
from mishops.plans import run_block

CL = torch.channels_last


class Model(nn.Module):
    """The reference block, with any ``nn.Conv2d`` options."""

    def __init__(self, cin, cout, k, **conv_args):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, **conv_args)

    def forward(self, x):
        return F.mish(F.mish(self.conv(x)))


@pytest.fixture(autouse=True)
def isolated_plans(monkeypatch):
    """No forced plan, a short timing budget, and the registry and choices as they were after."""
    monkeypatch.delenv("MISHOPS_PLAN", raising=False)
    monkeypatch.setenv("MISHOPS_TUNE_BUDGET_MS", "40")
    # GPU tests: search the heuristics' first 6 cuDNN configs (a full search takes 5-15 s per graph)
    monkeypatch.setenv("MISHOPS_CUDNN_CONFIGS", os.environ.get("MISHOPS_CUDNN_CONFIGS", "6"))
    tuning.TUNER.clear()
    before = plans.plans()  # the built-ins, registered
    yield
    with plans.PLANS.lock:
        plans.PLANS.items.clear()
        plans.PLANS.items.update(before)
    tuning.TUNER.clear()


def block_choices():
    return [c for c in tuning.TUNER.last_choices() if c.op == "block"]


def register(plan_cls):
    """Register a test plan (replacing one of the same name), its call count reset."""
    plan_cls.calls = 0
    plans.register_plan(plan_cls, replace=True)
    return plans.PLANS.items[plan_cls.name]


def tf32_round(t: torch.Tensor) -> torch.Tensor:
    """Round fp32 to TF32's 10-bit mantissa (nearest, ties away), as a TF32 conv sees its operands."""
    bits = t.float().contiguous().view(torch.int32)
    return ((bits + 0x1000) & -0x2000).view(torch.float32)


def max_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    diff = (y.double() - ref).abs()
    return float(diff.nan_to_num(nan=0.0).max()) if diff.numel() else 0.0


def block64(x: torch.Tensor, conv: nn.Conv2d, mish_count: int = 2, weight: torch.Tensor | None = None):
    """The block in float64 with ``conv``'s options (zero padding), optionally another weight."""
    weight = conv.weight if weight is None else weight
    bias = None if conv.bias is None else conv.bias.double()
    z = F.conv2d(x.double(), weight.double(), bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    for _ in range(mish_count):
        z = F.mish(z)
    return z


def tf32_floor(x: torch.Tensor, conv: nn.Conv2d, ref: torch.Tensor, mish_count: int = 2) -> float:
    """What TF32 operands rounded to nearest cost against ``ref``, whatever algorithm eager picked:
    cuDNN runs small convs in plain fp32, so eager's own error can be far below any TF32 kernel's."""
    return max_err(block64(tf32_round(x), conv, mish_count, weight=tf32_round(conv.weight)), ref)


def gradients_at_tf32_preactivation(x: torch.Tensor, conv: nn.Conv2d, grad: torch.Tensor, mish_count: int = 2):
    """(dx, dweight, dbias) in float64 as a TF32 kernel's training path gives them: the activation's
    gradient taken at the pre-activation that the kernel stored (TF32-rounded operands), then
    pulled back through the conv of the unrounded operands (cuDNN's backward, as the plan runs it)."""
    w64 = conv.weight.detach().double()
    z = F.conv2d(tf32_round(x.detach()).double(), tf32_round(conv.weight.detach()).double(),
                 None if conv.bias is None else conv.bias.detach().double(), conv.stride, conv.padding,
                 conv.dilation, conv.groups).requires_grad_(True)
    y = z
    for _ in range(mish_count):
        y = F.mish(y)
    (dz,) = torch.autograd.grad(y, z, grad.double())
    dx, dw, _ = torch.ops.aten.convolution_backward(dz, x.detach().double(), w64, None, list(conv.stride),
                                                    list(conv.padding), list(conv.dilation), False, [0, 0],
                                                    conv.groups, [True, True, False])
    return dx, dw, dz.sum(dim=(0, 2, 3))


def tf32_gradient_floors(x: torch.Tensor, conv: nn.Conv2d, grad: torch.Tensor, ref, setting: str) -> list[float]:
    """What a pre-activation from TF32 products costs each of (dx, dweight, dbias) against ``ref``
    (0 outside the "tf32" setting): a plan that stores its kernel's pre-activation is held to this
    where cuDNN ran eager's small conv in plain fp32, as ``tf32_floor`` does for the forward."""
    if setting != "tf32":
        return [0.0, 0.0, 0.0]
    return [max_err(g, r) for g, r in zip(gradients_at_tf32_preactivation(x, conv, grad), ref)]


def compile_for_hopper(kernel, signature: dict, constexprs: dict, **options):
    """Compile a Triton kernel for sm_90 without a GPU (Triton's own ptxas): what the interpreter
    cannot check -- the compiler's view of the code, static ifs and layouts -- checked in CI."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {**signature, **{name: "constexpr" for name in constexprs}}
    return triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                          target=GPUTarget("cuda", 90, 32), options=options)


def in_setting(name: str):
    """Enter a GPU test setting: "tf32", "fp32" (TF32 off), "bf16-autocast" or "fp16-autocast"."""
    torch.backends.cudnn.allow_tf32 = name != "fp32"
    amp = {"bf16-autocast": torch.bfloat16, "fp16-autocast": torch.float16}.get(name)
    return torch.autocast("cuda", dtype=amp) if amp else contextlib.nullcontext()


def assert_gradients_match_eager(monkeypatch, plan: str, name: str, module_cl: bool) -> None:
    """dx, dweight and dbias through ``plan`` (forced) within 2x eager's own error against float64, or
    of the TF32 floor where that is larger (``tf32_gradient_floors``)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", torch.backends.cudnn.allow_tf32)
    monkeypatch.setenv("MISHOPS_PLAN", plan)
    torch.manual_seed(0)
    model = Model(8, 16, 3, padding=1).cuda()
    if module_cl:
        model = model.to(memory_format=CL)
    model64 = Model(8, 16, 3, padding=1).cuda().double()
    model64.load_state_dict(model.state_dict())
    x = torch.randn(2, 8, 15, 17, device="cuda")
    grad = torch.randn(2, 16, 15, 17, device="cuda")

    def grads(m, inp, fn):
        inp = inp.clone().requires_grad_(True)
        with in_setting(name if m is not model64 else "fp32"):
            out = fn(m, inp)
        return torch.autograd.grad(out, [inp, m.conv.weight, m.conv.bias], grad.to(out.dtype))

    ref = grads(model64, x.double(), lambda m, t: m(t))
    torch.backends.cudnn.allow_tf32 = True
    ours = grads(model, x, lambda m, t: run_block(t, m.conv))
    eager = grads(model, x, lambda m, t: m(t))
    assert_gradients_within_eager(ours, eager, ref, tf32_gradient_floors(x, model.conv, grad, ref, name))


def assert_gradients_within_eager(ours, eager, ref, floors) -> None:
    """Each of (dx, dweight, dbias) within 2x eager's own error against float64 ``ref``, or 2x its TF32
    floor where that is larger, plus 1e-5 of its largest element; same dtype and shape as eager's."""
    for what, a, e, r, floor in zip(["x", "weight", "bias"], ours, eager, ref, floors):
        assert a.dtype == e.dtype and a.shape == e.shape
        err, eager_err = max_err(a, r), max_err(e, r)
        assert err <= 2 * max(eager_err, floor) + 1e-5 * float(r.abs().max()), \
            f"d{what}: {err:.3g} vs eager {eager_err:.3g}, TF32 floor {floor:.3g}"


def run_in_two_new_processes(tmp_path, plan: str, script: str) -> tuple[dict, dict]:
    """Run ``script`` (which prints a JSON line last) twice, each in a new process forcing ``plan``
    with one disk cache between them and the default cuDNN search, as users get it."""
    env = dict(os.environ, MISHOPS_CACHE_DIR=str(tmp_path / "cache"), MISHOPS_PLAN=plan, MISHOPS_TUNE_BUDGET_MS="200")
    env.pop("MISHOPS_CUDNN_CONFIGS", None)

    def run():
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout.strip().splitlines()[-1])

    return run(), run()
