"""mishops.nn: the block as Conv2d subclasses, against nn.Conv2d followed by Mish."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mishops.nn import ConvMish2d, ConvMishMish2d

TOL = dict(rtol=2e-3, atol=2e-3)


def _reference(block: nn.Conv2d, x, count):
    conv = nn.Conv2d(block.in_channels, block.out_channels, block.kernel_size, block.stride, block.padding,
                     block.dilation, block.groups, block.bias is not None, block.padding_mode)
    conv.load_state_dict(block.state_dict())
    y = conv(x)
    for _ in range(count):
        y = F.mish(y)
    return y


@pytest.mark.parametrize("cls, count", [(ConvMish2d, 1), (ConvMishMish2d, 2)])
@pytest.mark.parametrize("options", [{}, {"stride": 2, "padding": "valid"}, {"padding": "same", "dilation": 2},
                                     {"groups": 2, "bias": False}, {"padding": 1, "padding_mode": "reflect"}])
def test_matches_conv_then_mish(cls, count, options):
    torch.manual_seed(0)
    block = cls(4, 6, 3, **options)
    assert isinstance(block, nn.Conv2d) and block.mish_count == count
    x = torch.randn(2, 4, 9, 11, requires_grad=True)
    got, want = block(x), _reference(block, x, count)
    torch.testing.assert_close(got, want, **TOL)
    gx, gw = torch.autograd.grad(got.sum(), [x, block.weight])
    wx = torch.autograd.grad(want.sum(), x)[0]
    torch.testing.assert_close(gx, wx, **TOL)
    assert gw.shape == block.weight.shape


def test_state_dict_keys_are_conv2d_keys():
    assert set(ConvMish2d(2, 3, 3).state_dict()) == set(nn.Conv2d(2, 3, 3).state_dict())
    ConvMish2d(2, 3, 3).load_state_dict(nn.Conv2d(2, 3, 3).state_dict())


def test_from_conv_shares_the_parameters():
    conv = nn.Conv2d(2, 3, 3, stride=2, bias=False)
    block = ConvMishMish2d.from_conv(conv)
    assert block.weight is conv.weight and block.bias is None and block.stride == (2, 2) and block.mish_count == 2


def test_compiles_without_graph_breaks():
    block = ConvMish2d(3, 4, 3)
    x = torch.randn(1, 3, 6, 6)
    torch.testing.assert_close(torch.compile(block, backend="aot_eager", fullgraph=True)(x), _reference(block, x, 1), **TOL)


def test_bad_arguments_are_one_line_errors():
    with pytest.raises(ValueError, match=r"^mishops: mish_count must be 1 or 2, not 3$"):
        ConvMish2d(2, 3, 3, mish_count=3)
    with pytest.raises(TypeError, match=r"^mishops: backend must be a string"):
        ConvMish2d(2, 3, 3, backend=1)
    with pytest.raises(TypeError, match=r"^mishops: int64 input: ConvMish2d needs a floating dtype$"):
        ConvMish2d(2, 3, 3)(torch.ones(1, 2, 5, 5, dtype=torch.int64))
    assert "mish_count=1, backend='eager'" in repr(ConvMish2d(2, 3, 3, backend="EAGER"))
