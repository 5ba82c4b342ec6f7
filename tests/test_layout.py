"""Odd tensors through mish2 and ModelNew: a correct result in F.mish's layout, or a clear error."""

import pytest
import torch
import torch.nn.functional as F

import mishops
from mishops import layout, registry


def cpu_backends():
    names = ["auto"]
    for name, backend in registry.backends().items():
        if registry.availability(name) and (backend.devices is None or "cpu" in backend.devices):
            names.append(name)
    return names


ODD = {
    "empty": lambda d: torch.randn(0, 3, device=d),
    "zero-dim": lambda d: torch.tensor(1.5, device=d),
    "expanded": lambda d: torch.randn(3, 1, device=d).expand(3, 4),
    "transposed": lambda d: torch.randn(5, 7, device=d).t(),
    "sliced": lambda d: torch.randn(6, 10, device=d)[:, ::3],
    "offset-view": lambda d: torch.randn(101, device=d)[1:],
    "channels_last": lambda d: torch.randn(2, 3, 4, 5, device=d).contiguous(memory_format=torch.channels_last),
    "channels_last-sliced": lambda d: torch.randn(2, 6, 4, 5, device=d).contiguous(
        memory_format=torch.channels_last)[:, ::2],
}


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("case", list(ODD))
def test_odd_tensors_match_f_mish_values_and_layout(case, backend):
    x = ODD[case]("cpu")
    before = x.clone()
    y = mishops.mish2(x, backend=backend)
    want = F.mish(F.mish(x))
    torch.testing.assert_close(y, want)
    assert y.shape == want.shape and y.dtype == want.dtype
    if layout.is_dense(x):
        assert y.stride() == want.stride()
    assert layout.is_dense(y)
    assert torch.equal(x, before)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "cuda", "triton", "cupy"])
@pytest.mark.parametrize("case", list(ODD))
def test_odd_tensors_on_the_gpu(case, backend):
    """Every kernel backend through the dispatcher: values, layout, the input untouched."""
    x = ODD[case]("cuda")
    before = x.clone()
    y = mishops.mish2(x, backend=backend)
    want = F.mish(F.mish(x))
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-6)
    if layout.is_dense(x):
        assert y.stride() == want.stride()
    assert layout.is_dense(y) and torch.equal(x, before)


@pytest.mark.gpu
def test_cpu_tensor_by_name_is_clear_and_auto_fits_on_gpu_machine():
    with pytest.raises(mishops.NoBackendError, match="cuda \\(requested\\): device type 'cpu' not supported"):
        mishops.mish2(torch.randn(3), backend="cuda")
    x = torch.randn(3)
    torch.testing.assert_close(mishops.mish2(x), F.mish(F.mish(x)))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.complex64])
def test_integer_and_complex_inputs_are_a_clear_error(dtype):
    with pytest.raises(mishops.NoBackendError, match="^mishops: (int32|int64|bool|complex64) input: mish2 needs a floating-point tensor$"):
        mishops.mish2(torch.zeros(3, dtype=dtype))


def test_cpu_tensor_to_gpu_only_backend_by_name_is_clear():
    with pytest.raises(mishops.NoBackendError) as err:
        mishops.mish2(torch.randn(3), backend="cuda")
    first_reason = str(err.value).splitlines()[1]
    assert first_reason.startswith("  cuda (requested):") and "device type 'cpu' not supported" in first_reason


@pytest.mark.parametrize("grad_mode", ["no_grad", "inference_mode"])
def test_requires_grad_inputs_under_no_grad(grad_mode):
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    model = mishops.ModelNew(3, 2, 3)
    ctx = torch.no_grad() if grad_mode == "no_grad" else torch.inference_mode()
    with ctx:
        y = model(x)
    assert not y.requires_grad
    torch.testing.assert_close(y, F.mish(F.mish(model.conv(x))).detach())


def test_is_dense_agrees_with_storage():
    assert layout.is_dense(torch.randn(2, 3).t())
    assert layout.is_dense(torch.randn(1, 3, 1).expand(1, 3, 1))
    assert not layout.is_dense(torch.randn(3, 1).expand(3, 4))
    assert not layout.is_dense(torch.randn(4, 4)[:, :2])
    assert layout.memory_format_name(torch.randn(1, 2, 3, 4).contiguous(memory_format=torch.channels_last)) \
        in {"contiguous", "channels_last"}
