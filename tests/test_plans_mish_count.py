"""``mish_count`` 1 or 2 through every plan: the Triton kernels in the interpreter (CPU, CI), what each
plan declines, and every plan on the GPU against float64."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mishops import plans
from mishops.plans import ConvSpec, run_block
from tests.blocks import (gradients_at_tf32_preactivation, in_setting, isolated_plans,  # noqa: F401 (autouse)
                          max_err, tf32_floor)

HAS_GPU = torch.cuda.is_available()


def _block64(x, weight, bias, count, **conv_args):
    y = F.conv2d(x.double(), weight.double(), None if bias is None else bias.double(), **conv_args)
    for _ in range(count):
        y = F.mish(y)
    return y


@pytest.fixture
def interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    plans.PLANS.cached.pop("triton_conv", None)
    yield
    plans.PLANS.cached.pop("triton_conv", None)


@pytest.mark.parametrize("count", [1, 2])
def test_triton_conv_kernel_applies_mish_count_times(interpreter, count):
    from mishops.plans import triton_conv as tc

    g = torch.Generator().manual_seed(count)
    x, w, b = torch.randn(2, 5, 6, 9, generator=g) * 2, torch.randn(7, 5, 3, 3, generator=g) / 4, torch.randn(7, generator=g)
    y = tc.conv_mish2(x, w, b, (1, 1), (1, 1), mish_count=count)
    ref = _block64(tc.tf32_rounded(x.clone()), tc.tf32_rounded(w.clone()), b, count, padding=1)
    assert max_err(y, ref) <= 2e-6 * float(ref.abs().max()) + 1e-6
    other = _block64(tc.tf32_rounded(x.clone()), tc.tf32_rounded(w.clone()), b, 3 - count, padding=1)
    assert max_err(y, other) > 1e-2  # the other count is far off: the test can tell them apart


def test_triton_conv_kernel_rejects_other_counts(interpreter):
    from mishops.plans import triton_conv as tc

    with pytest.raises(ValueError, match="mish_count must be 1 or 2, not 3"):
        tc.conv_mish2(torch.randn(1, 2, 4, 4), torch.randn(3, 2, 3, 3), None, (0, 0), (1, 1), mish_count=3)


@pytest.mark.parametrize("count", [0, 1, 2])
def test_triton_transpose_epilogue_applies_mish_count_times(interpreter, count):
    from mishops.plans.cudnn_nchw import nhwc_to_nchw

    y = (torch.randn(2, 6, 5, 70) * 3).permute(0, 3, 1, 2)  # channels_last, 70 channels
    bias = torch.randn(70)
    out = nhwc_to_nchw(y, bias, mish_count=count)
    z = y.double() + bias.double()[:, None, None]
    for _ in range(count):
        z = F.mish(z)
    assert out.is_contiguous() and max_err(out, z) <= 1e-5 * float(z.abs().max())


@pytest.mark.parametrize("count", [1, 2])
def test_run_block_through_triton_conv_with_mish_count(interpreter, monkeypatch, count):
    monkeypatch.setenv("MISHOPS_PLAN", "triton_conv")
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    x = torch.randn(2, 4, 5, 7, requires_grad=True)
    y = run_block(x, conv, mish_count=count)
    want = conv(x)
    for _ in range(count):
        want = F.mish(want)
    assert plans.mismatch(y.detach(), want.detach()) == ""
    # its backward reads the pre-activation the kernel stored (TF32 products)
    expected = gradients_at_tf32_preactivation(x, conv, torch.ones_like(y), count)
    for got, exp in zip(torch.autograd.grad(y.sum(), [x, conv.weight, conv.bias]), expected):
        torch.testing.assert_close(got.double(), exp, rtol=1e-4, atol=1e-5 * float(exp.abs().max()))


def test_no_plan_declines_one_mish_except_the_cuda_epilogue_without_its_binding(interpreter):
    from mishops.plans import cudnn_epilogue

    x, w = torch.randn(1, 4, 8, 8), torch.randn(8, 4, 3, 3)
    spec = ConvSpec.of(nn.Conv2d(4, 8, 3), mish_count=1)
    assert not any("mish" in r.lower() for r in plans.operand_reasons(x, w, None, spec))
    for name, plan in plans.plans().items():
        mish = [r for r in plan.not_supported_reasons(x, w, None, spec) if "mish" in r.lower()]
        if name == "cudnn_conv_epilogue_cuda" and not cudnn_epilogue.binding_takes_mish_count():
            assert mish == ["one Mish (mish_count=1): the CUDA extension's binding exports the double-Mish "
                            "epilogue only"]
        else:
            assert mish == [], (name, mish)
    two = ConvSpec.of(nn.Conv2d(4, 8, 3))
    assert not any("mish" in r.lower() for r in plans.get_plan("cudnn_conv_epilogue_cuda").not_supported_reasons(x, w, None, two))


def test_cudnn_cache_keys_tell_the_counts_apart_and_keep_the_double_mish_keys(monkeypatch):
    from mishops.plans.cudnn_fused import CudnnFusedPlan

    monkeypatch.setattr(CudnnFusedPlan, "source_hash", lambda self: "h")
    plan = CudnnFusedPlan()
    x, w, b = torch.randn(1, 4, 8, 8), torch.randn(8, 4, 3, 3), torch.randn(8)
    one, two = (ConvSpec.of(nn.Conv2d(4, 8, 3), mish_count=c) for c in (1, 2))
    assert plan._disk_key(x, w, b, two).startswith("cudnn_fused|float32|")
    assert plan._disk_key(x, w, b, one).startswith("cudnn_fused|mish_count=1|float32|")
    assert plan._disk_key(x, w, b, one, epilogue=False) == plan._disk_key(x, w, b, two, epilogue=False)


# --- GPU: every plan, both counts ---------------------------------------------------------------

ALL_PLANS = ["torch_conv", "triton_conv", "cudnn_fused", "cudnn_fused_nchw", "cudnn_conv_epilogue_cuda",
             "cudnn_conv_epilogue_triton"]


@pytest.mark.gpu
@pytest.mark.parametrize("count", [1, 2])
@pytest.mark.parametrize("setting", ["tf32", "bf16-autocast"])
@pytest.mark.parametrize("plan", ALL_PLANS)
def test_gpu_every_plan_with_mish_count_vs_float64(monkeypatch, plan, setting, count):
    """Forced plan: values within 2x eager's own error against float64, and the gradients too."""
    available = plans.availability(plan)
    if not available:
        pytest.skip(f"{plan}: {available.reason}")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", torch.backends.cudnn.allow_tf32)
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 32, 3, padding=1).cuda()
    if plan == "cudnn_fused":
        conv = conv.to(memory_format=torch.channels_last)
    x = torch.randn(2, 16, 19, 20, device="cuda") * 2
    spec = ConvSpec.of(conv, mish_count=count)
    with in_setting(setting):
        reasons = plans.get_plan(plan).not_supported_reasons(x.to(conv.weight.dtype), conv.weight, conv.bias, spec)
    if reasons:
        if plan == "cudnn_conv_epilogue_cuda" and count == 1:
            pytest.skip(f"{plan}: {'; '.join(reasons)}")
        if setting != "tf32":
            pytest.skip(f"{plan} takes no autocast input here: {'; '.join(reasons)}")
    monkeypatch.setenv("MISHOPS_PLAN", plan)
    ref = _block64(x, conv.weight, conv.bias, count, padding=1)
    xg = x.clone().requires_grad_(True)
    with in_setting(setting):
        y = run_block(xg, conv, mish_count=count)
        eager = conv(x)
        for _ in range(count):
            eager = F.mish(eager)
    err, eager_err = max_err(y, ref), max_err(eager, ref)
    floor = tf32_floor(x, conv, ref, count) if setting == "tf32" else 0.0
    assert err <= 2 * max(eager_err, floor) + 1e-6, \
        f"{plan} mish_count={count}: {err:.3g} vs eager {eager_err:.3g}, tf32 {floor:.3g}"
    grad = torch.randn_like(y)
    dx = torch.autograd.grad(y, xg, grad)[0]
    x64 = x.double().requires_grad_(True)
    dx64 = torch.autograd.grad(_block64(x64, conv.weight, conv.bias, count, padding=1), x64, grad.double())[0]
    assert max_err(dx, dx64) <= 4e-2 * float(dx64.abs().max())


@pytest.mark.gpu
@pytest.mark.parametrize("count", [1, 2])
def test_gpu_cuda_epilogue_kernel_with_mish_count(count):
    from mishops import registry
    from mishops.plans import cudnn_epilogue

    available = registry.availability("cuda")
    if not available:
        pytest.skip(f"cuda: {available.reason}")
    if count == 1 and not cudnn_epilogue.binding_takes_mish_count():
        pytest.skip("the CUDA extension's binding exports the double-Mish epilogue only")
    y = (torch.randn(2, 9, 11, 64, device="cuda") * 3).permute(0, 3, 1, 2)
    bias = torch.randn(64, device="cuda")
    out = cudnn_epilogue.bias_mish2_nhwc_to_nchw(y, bias, count)
    z = y.double() + bias.double()[:, None, None]
    for _ in range(count):
        z = F.mish(z)
    assert out.is_contiguous() and max_err(out, z) <= 1e-5 * float(z.abs().max())
