"""Autocast for the block: plans see the dtypes autocast would give the conv, cast once, and only if needed.

Under autocast the block's input is cast as autocast would cast it for the conv, but only once a plan
is chosen, and not at all for a plan that casts while it reads (``Plan.casts_input``), which saves a
pass over the input. The cast goes to the output's memory format, which the conv reads faster and
which leaves the result's format unchanged.
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
    if t is None or not t.is_floating_point() or t.dtype in (torch.float64, dtype):
        return t
    return t.to(dtype, memory_format=memory_format)


@dataclass
class PendingCast:
    """Autocast's cast of the input, made only if the chosen plan needs it."""

    source: torch.Tensor
    dtype: torch.dtype
    memory_format: torch.memory_format
    done: torch.Tensor | None = None

    def like(self) -> torch.Tensor:
        """An unwritten tensor with the cast's dtype, shape and strides, for choosing; the caller
        drops it at once, so a plan that casts as it reads never holds the cast's memory."""
        return torch.empty(self.source.shape, dtype=self.dtype, device=self.source.device,
                           memory_format=self.memory_format)

    def cast(self) -> torch.Tensor:
        if self.done is None:
            self.done = self.source.to(self.dtype, memory_format=self.memory_format)
        return self.done


def cast_later(x: torch.Tensor, dtype: torch.dtype, memory_format: torch.memory_format):
    """``cast(x, dtype, memory_format)``, deferred where it would copy."""
    if not x.is_floating_point() or x.dtype in (torch.float64, dtype):
        return x
    return PendingCast(x, dtype, memory_format)


def cast_now(x) -> torch.Tensor:
    return x.cast() if isinstance(x, PendingCast) else x
