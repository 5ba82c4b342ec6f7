"""mish2's eager autograd path (a plain autograd.Function, no custom op, so no torch._dynamo import)
against the custom op it stands in for."""

import torch
import torch.nn.functional as F

import mishops
from mishops import ops


def test_eager_training_call_uses_the_autograd_function(monkeypatch):
    used = []
    monkeypatch.setattr(ops, "_mish2_op", lambda x, backend: used.append("op") or F.mish(F.mish(x)))
    x = torch.randn(3, 7, requires_grad=True)
    y = mishops.mish2(x)
    assert used == [] and y.grad_fn is not None and "_Mish2Eager" in type(y.grad_fn).__name__
    (gx,) = torch.autograd.grad(y.square().sum(), x)
    (want,) = torch.autograd.grad(F.mish(F.mish(x)).square().sum(), x)
    torch.testing.assert_close(gx, want)


def test_fake_tensors_go_through_the_custom_op():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.randn(2, 3, requires_grad=True)
        y = mishops.mish2(x)
    assert type(y).__name__ == "FakeTensor" and y.shape == (2, 3)


def test_torch_func_grad():
    x = torch.randn(6)
    got = torch.func.grad(lambda t: mishops.mish2(t).sum())(x)
    want = torch.func.grad(lambda t: F.mish(F.mish(t)).sum())(x)
    torch.testing.assert_close(got, want)
