import pytest
import torch

from mishops import registry
from tests.reference import SPECIAL_VALUES, mish2_f64, mish2_grad_f64, special_input

eager = registry.get("eager")


def max_rel_err(y, ref):
    """Max |y - ref| / max(1, |ref|) over finite reference values; NaN/inf must match exactly."""
    y, ref = y.double(), ref.double()
    finite = torch.isfinite(ref)
    assert torch.equal(torch.isnan(y), torch.isnan(ref)), "NaN positions differ"
    assert torch.equal(y[torch.isinf(ref)], ref[torch.isinf(ref)]), "infinities differ"
    return float(((y - ref).abs() / ref.abs().clamp_min(1))[finite].max())


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-14), (torch.float32, 2e-6), (torch.bfloat16, 1.6e-2)])
@pytest.mark.parametrize("shape", [(9, 41, 341), (1,), (2, 3, 5, 7)])
def test_forward_matches_float64(dtype, tol, shape):
    x = special_input(shape, dtype)
    y = eager.forward(x)
    assert y.dtype == dtype and y.shape == x.shape
    assert max_rel_err(y, mish2_f64(x)) <= tol


def test_special_values_follow_f_mish():
    x = torch.tensor(SPECIAL_VALUES)
    y = eager.forward(x)
    assert torch.isnan(y[0]) and y[1] == float("inf") and torch.isnan(y[2])  # F.mish(-inf) is NaN
    assert y[3] == 1e4 and abs(float(y[4])) < 1e-30


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_backward_matches_float64_autograd(dtype, tol):
    x = special_input((7, 33), dtype)
    g = torch.randn(7, 33, dtype=dtype)
    got = eager.backward(x, g)
    ref = mish2_grad_f64(x, g)
    assert torch.equal(torch.isnan(got), torch.isnan(ref))
    ok = ~torch.isnan(ref)
    torch.testing.assert_close(got[ok].double(), ref[ok], rtol=tol, atol=tol)


def test_keeps_memory_format():
    x = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    assert eager.forward(x).is_contiguous(memory_format=torch.channels_last)
