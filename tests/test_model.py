import pytest
import torch

import mishops
from tests.reference import Model, get_init_inputs


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


def test_kernel_size_tuple_and_repr():
    model = mishops.ModelNew(2, 3, (3, 5), backend="eager")
    assert model.conv.kernel_size == (3, 5)
    assert "backend='eager'" in repr(model)


def test_unknown_backend_is_a_clear_error():
    model = mishops.ModelNew(2, 3, 3, backend="nope")
    with pytest.raises(ValueError, match="backend='nope' names no backend; valid names: auto"):
        model(torch.randn(1, 2, 5, 5))
