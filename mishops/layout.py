"""Memory-layout facts the backends and the dispatcher share.

Elementwise kernels never need to know a tensor's shape: when its elements tile one block of
memory with no gaps or overlaps ("non-overlapping and dense": contiguous, channels_last or any
permutation), the kernel walks that block as a flat array and ``torch.empty_like`` gives an
output with the same strides, i.e. the same memory format PyTorch's own ops would give.
"""

from __future__ import annotations

import torch


def is_dense(x: torch.Tensor) -> bool:
    """True when ``x``'s elements occupy exactly ``x.numel()`` consecutive storage slots."""
    if x.is_contiguous():
        return True
    expected = 1
    for size, stride in sorted(zip(x.shape, x.stride()), key=lambda d: d[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def densify(x: torch.Tensor) -> torch.Tensor:
    """A dense tensor equal to ``x``, in the memory format PyTorch would pick for its output."""
    if is_dense(x):
        return x
    out = torch.empty_like(x)
    if not is_dense(out):  # empty_like keeps odd strides only for dense inputs; be sure anyway
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return out.copy_(x)


def flat(x: torch.Tensor) -> torch.Tensor:
    """The 1-D view of a dense tensor's memory block, in storage order."""
    return x.as_strided((x.numel(),), (1,))


def memory_format_name(x: torch.Tensor) -> str:
    if x.is_contiguous():
        return "contiguous"
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    return "dense" if is_dense(x) else "strided"
