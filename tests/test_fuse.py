"""mishops.fuse on hand-written models: what it fuses, what it leaves alone and why, and that the
fused model computes, trains, compiles and saves like the original."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import mishops
from mishops.nn import ConvMish2d

TOL = dict(rtol=2e-3, atol=2e-3)  # the plans' fp32 tolerance (mishops.plans.TOLERANCE)


class ConvBNMish(nn.Module):
    def __init__(self, cin, cout, k=3, stride=1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.Mish()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class Residual(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.a = ConvBNMish(c, c, 1)
        self.b = ConvBNMish(c, c, 3)

    def forward(self, x):
        return x + self.b(self.a(x))


class CSPStack(nn.Module):
    """CSPDarknet-style: stem, strided downsample, residual blocks, split and concat, plain head."""

    def __init__(self):
        super().__init__()
        self.stem = ConvBNMish(3, 8)
        self.down = ConvBNMish(8, 16, 3, 2)
        self.split_a = ConvBNMish(16, 8, 1)
        self.split_b = ConvBNMish(16, 8, 1)
        self.blocks = nn.Sequential(Residual(8), Residual(8))
        self.merge = ConvBNMish(16, 16, 1)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        x = self.down(self.stem(x))
        x = torch.cat([self.blocks(self.split_a(x)), self.split_b(x)], dim=1)
        return self.head(self.merge(x))


class WrittenOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 5, 3)
        self.c3 = nn.Conv2d(5, 5, 1)

    def forward(self, x):
        x = self.c1(x)
        x = x * torch.tanh(F.softplus(x))   # Mish written out
        x = F.mish(x)                      # then the functional one
        y = self.c2(x)
        y = torch.tanh(F.softplus(y)) * y  # operands the other way round
        z = self.c3(y)
        return z.mul(F.softplus(z).tanh())  # methods


class Reused(nn.Module):
    """The conv output feeds the Mish and the residual: fusing would lose it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.act = nn.Mish()

    def forward(self, x):
        z = self.conv(x)
        return self.act(z) + z


class SharedMish(nn.Module):
    """One nn.Mish instance after two convs: the forward is rewritten, the module kept."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3)
        self.c2 = nn.Conv2d(4, 4, 3)
        self.act = nn.Mish()

    def forward(self, x):
        return self.act(self.c2(self.act(self.c1(x))))


class Untraceable(nn.Module):
    """Data-dependent control flow: fx cannot trace it, so its children are fused one by one."""

    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Mish(), nn.Mish())

    def forward(self, x):
        if x.sum() > 1e9:
            return x
        return self.block(x)


def _randomize_bn(model):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return model


def _fused(model):
    torch.manual_seed(0)
    ref = copy.deepcopy(model)
    fused, report = mishops.fuse(model, report=True)
    return ref, fused, report


def _blocks(model):
    return [m for m in model.modules() if isinstance(m, ConvMish2d)]


def test_csp_stack_with_residuals_fuses_every_block_and_matches():
    torch.manual_seed(0)
    ref, fused, report = _fused(_randomize_bn(CSPStack()).eval())
    assert len(report.fused) == 9 and not report.left_alone and not report.walked and not report.rewritten
    assert all(f.absorbed == ("bn", "Mish") and f.mish_count == 1 for f in report.fused)
    assert type(fused) is CSPStack and len(_blocks(fused)) == 9
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.Mish)) for m in fused.modules())
    assert isinstance(fused.head, nn.Conv2d) and not isinstance(fused.head, ConvMish2d)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), ref(x), **TOL)


def test_conv_mish_mish_sequential_becomes_one_double_block():
    ref, fused, report = _fused(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Mish(), nn.Mish(), nn.Conv2d(4, 2, 1)))
    assert [(f.path, f.absorbed, f.mish_count) for f in report.fused] == [("0", ("Mish", "Mish"), 2)]
    assert type(fused[0]) is mishops.nn.ConvMishMish2d and fused[0].mish_count == 2
    assert isinstance(fused[1], nn.Identity) and isinstance(fused[2], nn.Identity)
    x = torch.randn(2, 3, 9, 9)
    torch.testing.assert_close(fused(x), ref(x), **TOL)


def test_written_out_and_functional_mish_are_fused_by_rewriting_the_forward():
    ref, fused, report = _fused(WrittenOut())
    assert [(f.path, f.mish_count) for f in report.fused] == [("c1", 2), ("c2", 1), ("c3", 1)]
    assert report.fused[0].absorbed == ("x*tanh(softplus(x))", "F.mish")
    assert report.rewritten == [""] and isinstance(fused, fx.GraphModule)
    x = torch.randn(2, 3, 10, 10)
    torch.testing.assert_close(fused(x), ref(x), **TOL)


def test_conv_output_used_elsewhere_is_left_alone_with_the_reason():
    ref, fused, report = _fused(Reused())
    assert not report.fused and not _blocks(fused)
    assert [a.path for a in report.left_alone] == ["conv"]
    assert "used elsewhere" in report.left_alone[0].reason
    x = torch.randn(1, 3, 6, 6)
    torch.testing.assert_close(fused(x), ref(x))


def test_training_mode_batchnorm_is_left_alone():
    ref, fused, report = _fused(CSPStack().train())
    assert not report.fused and not _blocks(fused)
    assert len(report.left_alone) == 9
    assert all("training mode" in a.reason and "model.eval()" in a.reason for a in report.left_alone)
    assert "left alone stem.conv: BatchNorm2d stem.bn is in training mode" in str(report)


def test_shared_mish_module_rewrites_the_forward_and_keeps_the_module():
    ref, fused, report = _fused(SharedMish())
    assert [f.path for f in report.fused] == ["c1", "c2"] and report.rewritten == [""]
    assert report.fused[0].absorbed == ("Mish (shared module)",)
    x = torch.randn(2, 3, 9, 9)
    torch.testing.assert_close(fused(x), ref(x), **TOL)


def test_untraceable_module_is_walked_and_said_so():
    ref, fused, report = _fused(Untraceable())
    assert [w.path for w in report.walked] == [""] and "torch.fx could not trace Untraceable" in report.walked[0].reason
    assert [f.path for f in report.fused] == ["block.0"]
    x = torch.randn(1, 3, 7, 7)
    torch.testing.assert_close(fused(x), ref(x), **TOL)


def test_conv_subclass_with_its_own_forward_is_left_alone():
    class SameConv(nn.Conv2d):
        def forward(self, x):
            return super().forward(F.pad(x, (1, 1, 1, 1)))

    ref, fused, report = _fused(nn.Sequential(SameConv(3, 3, 3), nn.Mish()))
    assert not report.fused and "forward of its own" in report.left_alone[0].reason


class BatchNormAct2d(nn.BatchNorm2d):  # the shape of timm's, which applies drop and act after the norm
    def __init__(self, c, act=True):
        super().__init__(c)
        self.drop = nn.Identity()
        self.act = nn.Mish() if act else nn.Identity()

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))


def test_batchnorm_subclass_applying_its_own_mish_is_folded():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), BatchNormAct2d(4), nn.Mish(),
                          nn.Conv2d(4, 4, 1), BatchNormAct2d(4, act=False), nn.Mish(),
                          nn.Conv2d(4, 4, 1), BatchNormAct2d(4, act=False))
    ref, fused, report = _fused(_randomize_bn(model).eval())
    assert [(f.path, f.absorbed) for f in report.fused] == [("0", ("bn", "Mish (in the BatchNorm)", "Mish")),
                                                            ("3", ("bn", "Mish"))]
    assert report.fused[0].mish_count == 2 and not report.left_alone  # the last conv has no Mish: not reported
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), ref(x), **TOL)


def test_gradients_match_the_original():
    torch.manual_seed(0)
    ref, fused, _ = _fused(WrittenOut())
    x = torch.randn(2, 3, 10, 10, requires_grad=True)
    params_ref = [ref.c1.weight, ref.c1.bias, ref.c2.weight, ref.c3.bias]
    params = [fused.c1.weight, fused.c1.bias, fused.c2.weight, fused.c3.bias]
    want = torch.autograd.grad(ref(x).square().sum(), [x, *params_ref])
    got = torch.autograd.grad(fused(x).square().sum(), [x, *params])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOL)


def test_folded_model_trains_and_input_gradients_match():
    torch.manual_seed(0)
    ref, fused, _ = _fused(_randomize_bn(CSPStack()).eval())
    x = torch.randn(2, 3, 12, 12, requires_grad=True)
    want = torch.autograd.grad(ref(x).sum(), x)[0]
    got = torch.autograd.grad(fused(x).sum(), x)[0]
    torch.testing.assert_close(got, want, **TOL)
    opt = torch.optim.SGD(fused.parameters(), lr=0.1)
    before = fused.stem.conv.weight.detach().clone()
    fused(x).square().mean().backward()
    opt.step()
    assert not torch.equal(before, fused.stem.conv.weight)


def test_fused_model_compiles_without_graph_breaks():
    ref, fused, _ = _fused(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Mish(), nn.Mish(), nn.Conv2d(4, 4, 3), nn.Mish()))
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)
    x = torch.randn(1, 3, 8, 8, requires_grad=True)
    torch.testing.assert_close(compiled(x), ref(x), **TOL)
    compiled(x).sum().backward()
    assert x.grad is not None and fused[0].weight.grad is not None


def test_state_dict_round_trip():
    torch.manual_seed(0)
    ref, fused, _ = _fused(_randomize_bn(CSPStack()).eval())
    state = fused.state_dict()
    assert "stem.conv.weight" in state and "stem.conv.bias" in state and "stem.bn.weight" not in state
    again = mishops.fuse(CSPStack().eval())
    again.load_state_dict(state)
    x = torch.randn(1, 3, 10, 10)
    with torch.no_grad():
        torch.testing.assert_close(again(x), ref(x), **TOL)


def test_unfolded_state_dict_of_the_original_loads_into_the_fused_model():
    ref, fused, _ = _fused(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Mish()))
    fused.load_state_dict(ref.state_dict())  # same keys: the block sits at the conv's path


def test_fuse_rejects_what_it_cannot_take():
    with pytest.raises(TypeError, match="^mishops.fuse expects an nn.Module, not int"):
        mishops.fuse(3)
    with pytest.raises(ValueError, match="^mishops: unknown backend 'nope'"):
        mishops.fuse(nn.Sequential(), backend="nope")
    model, report = mishops.fuse(nn.Conv2d(3, 3, 3), report=True)
    assert "bare Conv2d" in report.left_alone[0].reason


class MyMish(nn.Module):
    """The hand-written Mish module of many YOLOv4 codebases."""

    def forward(self, x):
        return x * torch.tanh(F.softplus(x))


class NotMish(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(x)


def test_a_hand_written_mish_module_is_recognised_and_others_are_not():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), MyMish(), nn.Conv2d(4, 4, 3), NotMish())
    ref, fused, report = _fused(model)
    assert [(f.path, f.absorbed) for f in report.fused] == [("0", ("MyMish",))]
    assert isinstance(fused[1], nn.Identity) and isinstance(fused[3], NotMish) and not isinstance(fused[2], ConvMish2d)
    x = torch.randn(1, 3, 9, 9)
    torch.testing.assert_close(fused(x), ref(x), **TOL)


def test_convs_with_hooks_or_parametrizations_are_left_alone():
    hooked = nn.Conv2d(3, 3, 3)
    hooked.register_forward_hook(lambda m, i, o: o * 2)
    param = nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 3, 3))
    ref, fused, report = _fused(nn.Sequential(hooked, nn.Mish(), param, nn.Mish()))
    assert not report.fused and [a.path for a in report.left_alone] == ["0", "2"]
    assert "forward hooks" in report.left_alone[0].reason and "parametrized" in report.left_alone[1].reason
    x = torch.randn(1, 3, 9, 9)
    torch.testing.assert_close(fused(x), ref(x))


@pytest.mark.gpu
@pytest.mark.parametrize("channels_last", [False, True])
def test_gpu_fused_stack_matches_in_fp32_and_bf16_autocast(channels_last):
    """On the GPU the fused plans compete (triton_conv, cuDNN): fp32 (TF32 convs) and bf16 autocast."""
    torch.manual_seed(0)
    model = _randomize_bn(CSPStack()).eval().cuda()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    ref, fused, report = _fused(model)
    assert len(report.fused) == 9
    x = torch.randn(4, 3, 64, 64, device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(fused(x), ref(x), rtol=5e-3, atol=5e-3)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got, want = fused(x), ref(x)
    assert got.dtype == want.dtype
    err = float((got.float() - want.float()).abs().max())
    assert err <= 5e-2 * float(want.float().abs().max()), err  # bf16 roundings through 9 blocks, either way
