"""Autocast for the block: plans see the dtypes autocast would give the conv, cast once, and only if needed.

Under autocast the block's input, weight and bias are cast as autocast would cast them for the conv,
but only once a plan is chosen: not at all for a plan that runs PyTorch's own ops under the caller's
autocast (``Plan.autocasts``: autocast casts, and keeps the weight's cast for the rest of its region,
as for the reference's conv), and not the input for a plan that casts while it reads
(``Plan.casts_input``), which saves a pass over it. The input's cast goes to the output's memory
format, which the conv reads faster and which leaves the result's format unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def autocast_dtype(device_type: str) -> torch.dtype | None:
    if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def cast(t: torch.Tensor | None, dtype: torch.dtype,
         memory_format: torch.memory_format = torch.preserve_format) -> torch.Tensor | None:
    """What autocast does to a conv argument: floating tensors other than float64 take ``dtype``."""
    return t.to(dtype, memory_format=memory_format) if _casts(t, dtype) else t


def _casts(t: torch.Tensor | None, dtype: torch.dtype) -> bool:
    return t is not None and t.is_floating_point() and t.dtype not in (torch.float64, dtype)


@dataclass
class PendingCast:
    """Autocast's cast of a block argument, made only if the chosen plan needs it. Until then it
    answers what choosing asks (dtype, shape, strides, device) without allocating anything."""

    source: torch.Tensor
    dtype: torch.dtype
    memory_format: torch.memory_format = torch.preserve_format
    done: torch.Tensor | None = None

    @property
    def shape(self) -> torch.Size:
        return self.source.shape

    @property
    def device(self) -> torch.device:
        return self.source.device

    @property
    def is_cuda(self) -> bool:
        return self.source.is_cuda

    def stride(self) -> tuple[int, ...]:
        """The cast's strides: the source's (a contiguous or channels_last tensor keeps them), the
        memory format's, or for any other layout the cast's own, made to be sure."""
        if self.memory_format is torch.preserve_format:
            if self.source.is_contiguous() or (self.source.dim() == 4 and
                                               self.source.is_contiguous(memory_format=torch.channels_last)):
                return self.source.stride()
            return self.cast().stride()
        shape = self.source.shape
        order = (1, 3, 2, 0) if self.memory_format is torch.channels_last else tuple(range(len(shape) - 1, -1, -1))
        strides, step = [0] * len(shape), 1
        for dim in order:
            strides[dim], step = step, step * shape[dim]
        return tuple(strides)

    def like(self) -> torch.Tensor:
        """An unwritten tensor with the cast's dtype, shape and strides, for a cache miss's choosing;
        the caller drops it at once, so a plan that casts as it reads never holds the cast's memory."""
        return torch.empty_strided(self.source.shape, self.stride(), dtype=self.dtype, device=self.source.device)

    def cast(self) -> torch.Tensor:
        if self.done is None:
            self.done = self.source.to(self.dtype, memory_format=self.memory_format)
        return self.done


def cast_later(t: torch.Tensor | None, dtype: torch.dtype,
               memory_format: torch.memory_format = torch.preserve_format):
    """``cast(t, dtype, memory_format)``, deferred where it would copy."""
    return PendingCast(t, dtype, memory_format) if _casts(t, dtype) else t


def cast_now(t):
    """The tensor itself: a pending cast made now."""
    return t.cast() if isinstance(t, PendingCast) else t


def uncast(t):
    """What the caller gave, before any cast."""
    return t.source if isinstance(t, PendingCast) else t


def like_now(t):
    """A tensor that looks like ``t`` (the real one where it exists): for a cache miss's choosing."""
    return t.like() if isinstance(t, PendingCast) else t


class switched:
    """Autocast on or off for ``device_type`` inside, and the other way after: where autocast is on
    (``switched(t, False)``) as ``torch.autocast(t, enabled=False)``, and back on inside that
    (``switched(t, True)``), at a fraction of that context manager's host cost per call. Its
    bookkeeping (nesting count, cache, tracing checks) changes nothing inside a region already open,
    and autocast's dtype stays the region's."""

    __slots__ = ("device_type", "enabled")

    def __init__(self, device_type: str, enabled: bool):
        self.device_type, self.enabled = device_type, enabled

    def __enter__(self):
        torch.set_autocast_enabled(self.device_type, self.enabled)

    def __exit__(self, *exc):
        torch.set_autocast_enabled(self.device_type, not self.enabled)
