import pytest
import torch
import torch.nn.functional as F

import mishops
from tests.reference import Model, special_input


def test_gradcheck_float64_through_the_custom_op():
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(mishops.mish2, (x,))


def test_opcheck_passes():
    for x in (torch.randn(3, 5), torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)):
        torch.library.opcheck(torch.ops.mishops.mish2.default, (x, "auto"))
        torch.library.opcheck(torch.ops.mishops.mish2_backward.default, (x, torch.randn_like(x), "auto"))


def test_grad_requires_custom_op_path_and_matches_autograd():
    x = special_input((5, 17), torch.float32)
    x.requires_grad_(True)
    g = torch.randn(5, 17)
    (got,) = torch.autograd.grad(mishops.mish2(x), x, g)
    (ref,) = torch.autograd.grad(F.mish(F.mish(x)), x, g)
    torch.testing.assert_close(got, ref, equal_nan=True)


def test_no_grad_and_inference_mode_on_requires_grad_input():
    x = torch.randn(8, requires_grad=True)
    with torch.no_grad():
        y = mishops.mish2(x)
    assert not y.requires_grad
    with torch.inference_mode():
        y = mishops.mish2(x)
    torch.testing.assert_close(y, F.mish(F.mish(x.detach())))


def test_compile_fullgraph_model_no_graph_break():
    torch._dynamo.reset()
    model = mishops.ModelNew(3, 4, 3, backend="eager")
    ref = Model(3, 4, 3)
    ref.load_state_dict(model.state_dict())
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    x = torch.randn(2, 3, 10, 10)
    torch.testing.assert_close(compiled(x), ref(x))
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0


def test_compile_inductor_trains_like_reference():
    torch._dynamo.reset()
    model = mishops.ModelNew(3, 4, 3)
    ref = Model(3, 4, 3)
    ref.load_state_dict(model.state_dict())
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(2, 3, 9, 9)
    compiled(x).square().mean().backward()
    ref(x).square().mean().backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


def test_training_step_equals_reference_model():
    torch.manual_seed(0)
    model = mishops.ModelNew(4, 6, 3)
    ref = Model(4, 6, 3)
    ref.load_state_dict(model.state_dict())
    x = torch.randn(3, 4, 12, 12)
    target = torch.randn(3, 6, 10, 10)
    losses = []
    for m in (model, ref):
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        loss = F.mse_loss(m(x), target)
        loss.backward()
        losses.append(loss.detach())
        opt.step()
    torch.testing.assert_close(losses[0], losses[1])
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q)


def test_autocast_behaves_like_reference():
    model = mishops.ModelNew(3, 4, 3)
    ref = Model(3, 4, 3)
    ref.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = model(x), ref(x)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want)


def test_functional_rejects_non_tensors():
    with pytest.raises(TypeError, match="expects a torch.Tensor"):
        mishops.mish2([1.0, 2.0])


def test_double_backward_passes_gradgradcheck():
    """mish2's backward is differentiable: second derivatives in x and in the upstream gradient."""
    x = (torch.randn(3, 7, dtype=torch.float64) * 3).requires_grad_(True)
    assert torch.autograd.gradgradcheck(mishops.mish2, (x,))


def test_double_backward_matches_autograd_through_f_mish():
    x = (torch.randn(4, 9, dtype=torch.float64) * 3).requires_grad_(True)
    g = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    gg = torch.randn(4, 9, dtype=torch.float64)
    results = []
    for f in (mishops.mish2, lambda t: F.mish(F.mish(t))):
        (dx,) = torch.autograd.grad(f(x), x, g, create_graph=True)
        results.append(torch.autograd.grad(dx, (x, g), gg))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)


def test_triple_backward_through_x():
    x = (torch.randn(5, dtype=torch.float64) * 2).requires_grad_(True)
    results = []
    for f in (mishops.mish2, lambda t: F.mish(F.mish(t))):
        (d1,) = torch.autograd.grad(f(x).sum(), x, create_graph=True)
        (d2,) = torch.autograd.grad(d1.sum(), x, create_graph=True)
        results.append(torch.autograd.grad(d2.sum(), x)[0])
    torch.testing.assert_close(*results)
