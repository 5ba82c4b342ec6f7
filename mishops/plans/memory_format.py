"""PyTorch's rule for the memory format of a conv's output, which every plan's output must follow."""

from __future__ import annotations

import torch


def _strides_like_channels_last(t: torch.Tensor) -> bool:
    """c10's ``is_channels_last_strides_2d``: the test behind ``suggest_memory_format``,
    including how it settles tensors that are both contiguous and channels_last."""
    if t.dim() != 4:
        return False
    sizes, strides = t.shape, t.stride()
    if strides[1] == 0:
        return False
    lowest = 0
    for d in (1, 3, 2, 0):
        if sizes[d] == 0 or strides[d] < lowest:
            return False
        if d == 0 and lowest == strides[1]:
            return False
        lowest = strides[d] * (sizes[d] if sizes[d] > 1 else 1)
    return True


def expected_memory_format(x: torch.Tensor, weight: torch.Tensor) -> torch.memory_format:
    """PyTorch's rule for a conv's output: channels_last when the input or the weight is."""
    if x.dim() == 4 and (_strides_like_channels_last(x) or _strides_like_channels_last(weight)):
        return torch.channels_last
    return torch.contiguous_format


def format_name(memory_format: torch.memory_format) -> str:
    return "channels_last" if memory_format == torch.channels_last else "contiguous"
