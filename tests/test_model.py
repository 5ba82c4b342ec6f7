import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mishops
from tests.reference import Model, get_init_inputs

TOL = dict(rtol=2e-3, atol=2e-3)


def test_same_init_parameters_and_state_dict_as_reference():
    ref = Model(*get_init_inputs())
    model = mishops.ModelNew(*get_init_inputs())
    assert model.load_state_dict(ref.state_dict()) is not None
    assert set(model.state_dict()) == {"conv.weight", "conv.bias"}
    assert model.backend == "auto"


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("backend", ["auto", "eager"])
def test_output_equals_reference_model(backend, channels_last):
    ref = Model(5, 7, 3)
    model = mishops.ModelNew(5, 7, 3, backend=backend)
    model.load_state_dict(ref.state_dict())
    x = torch.randn(2, 5, 13, 11)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        got, want = model(x), ref(x)
    torch.testing.assert_close(got, want)
    assert got.stride() == want.stride()


@pytest.mark.parametrize("options", [
    {"stride": 2}, {"stride": (1, 2), "padding": 1}, {"padding": "same"}, {"padding": "valid"},
    {"dilation": 2, "padding": 2}, {"groups": 2}, {"groups": 4, "bias": False}, {"bias": False},
    {"padding": 1, "padding_mode": "reflect"}, {"padding": 2, "padding_mode": "circular"},
])
def test_conv_options_match_conv2d_then_mish_twice(options):
    torch.manual_seed(0)
    model = mishops.ModelNew(4, 8, 3, **options)
    conv = nn.Conv2d(4, 8, 3, **options)
    conv.load_state_dict(model.conv.state_dict())
    x = torch.randn(2, 4, 11, 10, requires_grad=True)
    got, want = model(x), F.mish(F.mish(conv(x)))
    torch.testing.assert_close(got, want, **TOL)
    grads = torch.autograd.grad(got.sum(), [x, model.conv.weight])
    wants = torch.autograd.grad(want.sum(), [x, conv.weight])
    for g, w in zip(grads, wants):
        torch.testing.assert_close(g, w, **TOL)


def test_conv_options_are_keyword_only():
    with pytest.raises(TypeError):
        mishops.ModelNew(2, 3, 3, "auto", 2)


def test_kernel_size_tuple_and_repr():
    model = mishops.ModelNew(2, 3, (3, 5), backend="eager")
    assert model.conv.kernel_size == (3, 5)
    assert "backend='eager'" in repr(model)


def test_backend_names_are_case_insensitive():
    assert mishops.ModelNew(2, 3, 3, backend="EAGER").backend == "eager"
    assert mishops.ModelNew(2, 3, 3, backend="Auto").backend == "auto"


@pytest.mark.parametrize("backend, error, first_line", [
    ("nope", ValueError, r"^mishops: unknown backend 'nope'; valid: auto, .*eager"),
    (2, TypeError, r"^mishops: backend must be a string \(a backend name or 'auto'\), not int 2$"),
    (None, TypeError, r"^mishops: backend must be a string \(a backend name or 'auto'\), not NoneType None$"),
])
def test_bad_backend_fails_at_construction(backend, error, first_line):
    with pytest.raises(error, match=first_line):
        mishops.ModelNew(2, 3, 3, backend)


def test_integer_input_is_a_one_line_error():
    with pytest.raises(TypeError) as info:
        mishops.ModelNew(4, 8, 3)(torch.ones(1, 4, 10, 10, dtype=torch.int64))
    assert str(info.value) == "mishops: int64 input: ModelNew needs a floating dtype"


def test_conv_errors_are_pytorchs():
    with pytest.raises(ValueError, match="padding_mode"):
        mishops.ModelNew(2, 3, 3, padding_mode="bogus")
    with pytest.raises(ValueError, match="groups"):
        mishops.ModelNew(3, 4, 3, groups=2)
