"""Triton kernels for ``mish(mish(x))`` and its gradient: one elementwise pass over flat memory.

Kernels -> launchers -> backend class. The kernels are plain functions that ``triton.jit`` wraps
on first use, not at import, for two reasons: ``import mishops`` must not import Triton, and
``triton.jit`` decides when it wraps whether a kernel is compiled for the GPU or run by Triton's
CPU interpreter (``TRITON_INTERPRET=1``). One wrapped set per mode, picked by the variable's value
at each call, lets tests and users switch modes in a running process. They live at module level
(``tl`` bound there when Triton is imported) because the interpreter resolves names only through
the kernel's module globals, not through closures.

Math (fp32 whatever the storage dtype), with ``e = exp(v)`` clamped at ``v = 20``:
``tanh(softplus(v)) = n / (n + 2)`` where ``n = e (e + 2)`` (one exp and one division, no
overflow: at 20 the ratio is already 1 in fp32), and
``mish'(v) = t + v sigmoid(v) (1 - t^2) = t + v 4 e (e + 1) / (n + 2)^2`` (the same identity
with ``1 - t^2`` expanded: no cancellation near ``t = 1`` and no second division).
"""

from __future__ import annotations

import contextlib
import functools
import os
from types import SimpleNamespace

import torch

from mishops.layout import flat
from mishops.registry import KERNEL_DTYPES, Availability, Backend, register


def _interpreting() -> bool:
    """Whether Triton would run kernels through its interpreter now (read at call time)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


tl = None  # triton.language, bound by _kernels() on first use; the kernels look it up at launch


def _forward_kernel(x_ptr, y_ptr, n_elements, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # 64-bit: > 2^31 elements
    mask = offsets < n_elements
    v = tl.load(x_ptr + offsets, mask=mask).to(tl.float32)
    for _ in tl.static_range(2):  # mish(x), then mish of that
        e = tl.exp2(tl.minimum(v, 20.0) * 1.4426950408889634)  # e^v as 2^(v log2 e)
        n = e * (e + 2.0)
        v = v * (n / (n + 2.0))
    tl.store(y_ptr + offsets, v.to(y_ptr.dtype.element_ty), mask=mask)


def _backward_kernel(x_ptr, grad_out_ptr, grad_in_ptr, n_elements, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_elements
    v = tl.load(x_ptr + offsets, mask=mask).to(tl.float32)
    grad = tl.load(grad_out_ptr + offsets, mask=mask).to(tl.float32)
    for _ in tl.static_range(2):  # the chain rule through both layers: mish'(x), then mish'(mish(x))
        e = tl.exp2(tl.minimum(v, 20.0) * 1.4426950408889634)
        n = e * (e + 2.0)
        r = 1.0 / (n + 2.0)
        t = n * r
        # sigmoid(v) (1 - t^2) = 4 e (e + 1) r^2. Past the clamp it stays 4 e^-40, which a huge v
        # would scale up; its true value is nothing in fp32 there, so zero it. v * 0 then keeps
        # autograd's NaN at v = +inf (and at -inf, where e = 0).
        sigmoid_sech2 = tl.where(v < 20.0, 4.0 * (e * r) * ((e + 1.0) * r), 0.0)
        grad = grad * (t + v * sigmoid_sech2)
        v = v * t
    tl.store(grad_in_ptr + offsets, grad.to(grad_in_ptr.dtype.element_ty), mask=mask)


@functools.cache
def _kernels(interpret: bool) -> SimpleNamespace:
    """The kernels jitted for one mode. ``interpret`` is only the cache key: ``triton.jit`` reads
    ``TRITON_INTERPRET`` itself, so callers pass ``_interpreting()``, the value in force now."""
    global tl
    import triton
    import triton.language as tl

    return SimpleNamespace(forward=triton.jit(_forward_kernel), backward=triton.jit(_backward_kernel))


def _launch_config(n_elements: int) -> tuple[int, int]:
    """(BLOCK, num_warps). Big tensors: 4096 elements per 8-warp program, 16 per thread, so each
    thread keeps several 16-byte loads in flight. Below ~2M elements that would leave SMs idle, so
    smaller programs. A fixed rule rather than ``triton.autotune``: the dispatcher already times
    whole backends, and autotune would re-tune inside the first call for every new size."""
    return (4096, 8) if n_elements >= 1 << 21 else (1024, 4)


def _on_device_of(x: torch.Tensor):
    """Triton launches on the current device's current stream: make x's device current."""
    if x.device.type == "cuda" and x.device.index != torch.cuda.current_device():
        return torch.cuda.device(x.device)
    return contextlib.nullcontext()


def _launch(kernel_name: str, out: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
    """One kernel over the flat memory of ``inputs`` and ``out`` (dense, all with the same strides)."""
    n = out.numel()
    if n:
        block, num_warps = _launch_config(n)
        kernel = getattr(_kernels(_interpreting()), kernel_name)
        grid = ((n + block - 1) // block,)
        with _on_device_of(out):
            # FMA contraction named, not defaulted: Triton 3.9 warns that 3.10 changes the default.
            kernel[grid](*map(flat, inputs), flat(out), n, BLOCK=block, num_warps=num_warps, enable_fp_fusion=True)
    return out


def mish2_forward(x: torch.Tensor) -> torch.Tensor:
    """``mish(mish(x))`` for a dense ``x`` (any permutation of strides); the output has x's strides."""
    return _launch("forward", torch.empty_like(x), x)


def mish2_backward(x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """``grad_out * d/dx mish(mish(x))``, recomputed from ``x``; ``grad_out`` has x's strides."""
    return _launch("backward", torch.empty_like(x), x, grad_out)


@register
class TritonBackend(Backend):
    name = "triton"
    dtypes = KERNEL_DTYPES
    priority = 20

    @property
    def devices(self) -> frozenset[str]:
        """CUDA; also CPU tensors while ``TRITON_INTERPRET=1`` (so CI runs the kernels' code)."""
        return frozenset({"cuda", "cpu"}) if _interpreting() else frozenset({"cuda"})

    def is_available(self) -> Availability:
        try:
            import triton  # noqa: F401
        except ModuleNotFoundError as exc:
            if exc.name != "triton":
                return Availability.no(f"triton failed to import: {exc}")
            return Availability.no("triton is not installed: pip install mishops[triton]")
        except Exception as exc:
            return Availability.no(f"triton failed to import: {type(exc).__name__}: {exc}")
        if not _interpreting() and not torch.cuda.is_available():
            return Availability.no("no CUDA GPU (set TRITON_INTERPRET=1 to run Triton's interpreter on CPU tensors)")
        return Availability.yes()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mish2_forward(x)

    def backward(self, x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
        return mish2_backward(x, grad_out)
