"""``mish2``'s backend per input: the key, the candidates, the trial inputs and the reference the tuner needs.

The tuner (``mishops.tuning``) does the choosing. This module says what a ``mish2`` choice depends
on (the op, device, dtype, shape and strides), which registered backends may take an input and why
the others cannot, and what a candidate is judged on: fresh random data of the key's shape, dtype,
strides and device -- spread over Mish's curved region, with large values of both signs, zeros, NaN
and +-inf at fixed places -- against the eager backend's answer on the same data. The caller's own
tensor is never a trial input: an all-zero warm-up batch would let a backend that returns zeros win.

Environment (read at each call): ``MISHOPS_BACKEND`` names the backend (``auto``, or any name,
case-insensitive) and wins over the ``backend`` argument; the tuner's variables are in its docstring.
"""

from __future__ import annotations

import os

import torch

from mishops import layout, registry, tuning
from mishops.registry import BACKENDS, Backend
from mishops.tuning import TUNER, Measurement, Problem

OPS = ("forward", "backward", "grad_bias")
#: how close a candidate must be to the eager backend: (rtol, atol) per dtype.
TOLERANCE = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-4, 1e-5),
    torch.float16: (4e-3, 2e-3),
    torch.bfloat16: (3e-2, 2e-2),
}
#: values every trial input holds at its first elements (in storage order), beside random ones.
SPECIAL_VALUES = (float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 30.0, -30.0, 88.0, -88.0, 1e4, -1e4, 20.0)


class NoBackendError(RuntimeError):
    """No backend can run this input. The first line says why in one sentence; each backend's
    reasons follow, one per line."""


def key_string(op: str, x: torch.Tensor, mish_count: int = 2) -> str:
    name = op if op != "grad_bias" else f"grad_bias|mish={mish_count}"
    return f"{name}|{str(x.dtype).removeprefix('torch.')}|{tuple(x.shape)}|{tuple(x.stride())}"


def describe(x: torch.Tensor) -> str:
    return (f"{x.device}, {str(x.dtype).removeprefix('torch.')}, shape {tuple(x.shape)}, "
            f"{layout.memory_format_name(x)}")


def requested_backend(backend: str) -> tuple[str | None, str]:
    """The backend asked for and who asked: ``MISHOPS_BACKEND`` (wins) or the argument; None for auto."""
    forced = os.environ.get("MISHOPS_BACKEND", "").strip().lower()
    if forced and forced != "auto":
        return forced, "MISHOPS_BACKEND"
    if backend != "auto":
        if not isinstance(backend, str):
            raise TypeError(f"mishops: backend must be a name or 'auto', not {type(backend).__name__}")
        name = backend.strip().lower()
        return (None if name == "auto" else name), "backend"
    return None, ""


def check_backend_name(name: str, source: str) -> str:
    """``name`` if a backend is registered under it; else a one-line error that lists the valid names
    and says who asked (the argument, or the environment variable)."""
    if name in BACKENDS.items or name in registry.backends():
        return name
    who = f"MISHOPS_BACKEND={name!r}" if source == "MISHOPS_BACKEND" else f"backend={name!r}"
    raise ValueError(f"mishops: {who} names no backend; valid names: {', '.join(['auto', *registry.backends()])}")


def require_floating(x: torch.Tensor, what: str) -> None:
    """The one-line complaint PyTorch would make, before any backend's reasons."""
    if not x.is_floating_point():
        raise NoBackendError(f"mishops: {str(x.dtype).removeprefix('torch.')} input: {what} needs a floating-point tensor")


def reasons(backend: Backend, x: torch.Tensor, op: str = "forward") -> list[str]:
    """Why ``backend`` cannot take ``x`` for ``op`` (empty when it can)."""
    unsupported = backend.not_supported_reasons(x)
    if op not in backend.ops:
        unsupported = [f"offers no {op} kernel", *unsupported]
    elif op == "grad_bias" and x.dim() != 4:
        unsupported = ["the bias gradient is per channel of a 4-D tensor", *unsupported]
    if backend.devices is not None and x.device.type not in backend.devices:
        return unsupported  # its availability (importing triton, say) cannot change the answer
    return BACKENDS.reasons(backend.name, x.device) + unsupported


def no_backend_error(x: torch.Tensor, op: str, why: dict[str, list[str]], requested: str | None = None,
                     source: str = "") -> NoBackendError:
    """One error: its first line the cause in one sentence (the input, and who asked); then each
    backend's reasons on a line of its own; then where to look further."""
    what = f"mish2 {op} on {describe(x)}"
    if requested is not None:
        who = f"MISHOPS_BACKEND={requested}" if source == "MISHOPS_BACKEND" else f"backend {requested!r}"
        first = f"mishops: {who} cannot run {what}: {why[requested][0]}"
    else:
        shared = set.intersection(*(set(r) for r in why.values())) if why else set()
        first = f"mishops: no backend can run {what}" + (f": {min(shared)}" if shared else "")
    lines = [first if len(first) <= 200 else first[:197] + "..."]
    for name in sorted(why, key=lambda n: (n != requested, n)):
        label = f"{name} (requested)" if name == requested else name
        lines.append(f"  {label}: " + "; ".join(why[name] or ["supported"]))
    lines.append("  `mishops info` lists every backend and why it is unavailable")
    return NoBackendError("\n".join(lines))


def wrong_answer(result: torch.Tensor, expected: torch.Tensor, tolerance: dict = TOLERANCE) -> str:
    """Why ``result`` is not ``expected`` (empty when it is): shape, dtype, device, then every
    element within ``tolerance[dtype]`` = (rtol, atol), NaN where and only where expected."""
    if result.shape != expected.shape or result.dtype != expected.dtype or result.device != expected.device:
        return (f"returned {result.dtype} {tuple(result.shape)} on {result.device}, expected "
                f"{expected.dtype} {tuple(expected.shape)} on {expected.device}")
    if expected.numel() == 0:
        return ""
    rtol, atol = tolerance.get(expected.dtype, (1e-2, 1e-2))
    close = torch.isclose(result, expected, rtol=rtol, atol=atol, equal_nan=True)
    if bool(close.all()):
        return ""
    bad = int((~close).sum())
    diff = (result.double() - expected.double()).abs().nan_to_num(nan=float("inf"))
    return f"wrong answer: {bad} of {expected.numel()} elements off (max |error| {float(diff.max()):.3g})"


def trial_input(x: torch.Tensor) -> torch.Tensor:
    """Fresh data with ``x``'s shape, strides, dtype and device: normal with spread 3, and
    ``SPECIAL_VALUES`` at the first elements of its storage. The storage is filled before the view
    is taken, so strides that overlap (an ``expand``) get the same shared elements as the key's."""
    span = 1 + sum((size - 1) * stride for size, stride in zip(x.shape, x.stride())) if x.numel() else 0
    storage = torch.empty(span, dtype=x.dtype, device=x.device)
    if span:
        storage.normal_(0.0, 3.0)
        specials = torch.tensor(SPECIAL_VALUES, dtype=torch.float64)[:span]
        storage[: len(specials)] = specials.to(x.dtype).to(x.device)
    return storage.as_strided(x.shape, x.stride())


def _run(backend: Backend, op: str, x: torch.Tensor, grad: torch.Tensor | None, mish_count: int = 2):
    if op == "forward":
        return backend.forward(x)
    if op == "backward":
        return backend.backward(x, grad)
    return backend.grad_bias(x, grad, mish_count)


def per_channel_sum_mismatch(result: torch.Tensor, expected: torch.Tensor) -> str:
    """``wrong_answer`` relative to the largest element: each element sums over N, H and W, so its
    rounding grows with them, while a wrong formula is off by the sums' own size."""
    scale = max(1.0, float(expected.abs().nan_to_num(0.0, posinf=0.0, neginf=0.0).max())) if expected.numel() else 1.0
    return wrong_answer(result / scale, expected / scale)


class Mish2Trial:
    """A candidate backend runs ``op`` on fresh data and is judged against the eager backend."""

    def __init__(self, op: str, like: torch.Tensor, mish_count: int = 2):
        self.op, self.mish_count = op, mish_count
        self.x = trial_input(like)
        self.grad = torch.empty_like(self.x).normal_() if op != "forward" else None
        self.expected = _run(registry.get("eager"), op, self.x, self.grad, mish_count)

    def run(self, backend: Backend):
        return _run(backend, self.op, self.x, self.grad, self.mish_count)

    def wrong(self, outcome) -> str:
        if self.op != "grad_bias":
            return wrong_answer(outcome, self.expected)
        (dz, dbias), (want_dz, want_dbias) = outcome, self.expected
        wrong = wrong_answer(dz, want_dz)
        return f"dz: {wrong}" if wrong else (f"dbias: {why}" if (why := per_channel_sum_mismatch(dbias, want_dbias)) else "")


def problem(op: str, x: torch.Tensor, mish_count: int = 2) -> Problem:
    """What the tuner needs to choose ``op``'s backend for inputs like ``x``."""
    usable, rejected = [], {}
    for name, backend in registry.backends().items():
        why = reasons(backend, x, op)
        if why:
            rejected[name] = why
        else:
            usable.append(backend)
    if not usable:
        raise no_backend_error(x, op, rejected)
    return Problem(f"mish2 {op}", key_string(op, x, mish_count), x.device, usable, lambda: Mish2Trial(op, x, mish_count),
                   {n: "; ".join(r) for n, r in rejected.items()}, on_failure=registry.mark_failed,
                   fallback="eager", worth_timing=x.numel() > 0)


def choose(op: str, x: torch.Tensor, backend: str = "auto", mish_count: int = 2) -> Backend:
    """The backend that runs ``op`` on ``x``: the one ``MISHOPS_BACKEND`` or ``backend`` names, else
    the tuner's choice for the key. A named backend without a ``grad_bias`` kernel leaves that op
    to the tuner: naming a double-Mish backend says nothing about bias gradients."""
    named, source = requested_backend(backend)
    chosen = registry.get(check_backend_name(named, source)) if named is not None else None
    if chosen is not None and (op != "grad_bias" or op in chosen.ops):
        why = reasons(chosen, x, op)
        if why:
            require_floating(x, "mish2")
            raise no_backend_error(x, op, {n: reasons(b, x, op) for n, b in registry.backends().items()}, named,
                                   source)
        return chosen
    mkey = ("mish2", op, mish_count, x.is_cuda, x.get_device(), x.dtype, x.shape, x.stride())  # cheaper than x.device
    choice = TUNER.memory.get(mkey)
    if choice is None:
        require_floating(x, "mish2")
        choice = TUNER.choose(mkey, lambda: problem(op, x, mish_count))
    return BACKENDS.items[choice.winner]


def decide(op: str, x: torch.Tensor) -> tuning.Choice | None:
    """The tuner's choice for ``op`` on inputs like ``x`` with what every candidate measured (made
    now unless already made); None when ``MISHOPS_BACKEND`` names the backend."""
    if requested_backend("auto")[0] is not None:
        return None
    require_floating(x, "mish2")
    mkey = ("mish2", op, 2, x.is_cuda, x.get_device(), x.dtype, x.shape, x.stride())
    return TUNER.choose(mkey, lambda: problem(op, x))


def run(op: str, x: torch.Tensor, grad: torch.Tensor | None = None, backend: str = "auto", mish_count: int = 2):
    """Run ``op`` with the chosen backend; an automatically chosen one that breaks is replaced.
    ``grad_bias`` returns (dz, dbias) for a 4-D ``x``, the activation Mish ``mish_count`` times."""
    if op not in OPS:
        raise ValueError(f"mishops: op must be one of {OPS}, not {op!r}")
    while True:
        chosen = choose(op, x, backend, mish_count)
        xin, gin = x, grad
        if not chosen.any_strides and not x.is_contiguous() and not layout.is_dense(x):
            xin = layout.densify(x)
        if grad is not None and (grad.stride() != xin.stride() or not chosen.any_strides and not layout.is_dense(grad)):
            gin = torch.empty_like(xin).copy_(grad)
        try:
            return _run(chosen, op, xin, gin, mish_count)
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:
            if requested_backend(backend)[0] is not None or chosen.name == "eager":
                raise
            registry.mark_failed(chosen.name, f"{op} raised {tuning.first_line(exc)}")


def _forget_mish2_choices() -> None:
    TUNER.forget(keep=lambda mkey, choice: mkey[0] != "mish2")


BACKENDS.on_change = _forget_mish2_choices

__all__ = ["Measurement", "NoBackendError", "OPS", "TOLERANCE", "check_backend_name", "choose", "decide", "key_string",
           "no_backend_error", "problem", "run", "trial_input", "wrong_answer"]
