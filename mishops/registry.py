"""The backends of ``y = mish(mish(x))`` and the one place they are registered.

A backend is a subclass of :class:`Backend` whose capabilities are class attributes, so the
dispatcher can rule it out for an input without importing its dependencies (xformers' style);
``is_available`` is the only method that may touch a compiler, a GPU or an optional package.

Built-in backends live one per file in ``mishops/backends/`` and register with ``@register``.
Third-party packages register through the entry-point group ``mishops.backends``; each entry
point names a ``Backend`` subclass (or instance).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import inspect
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

log = logging.getLogger("mishops")

ENTRY_POINT_GROUP = "mishops.backends"
FLOAT_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
KERNEL_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32})


@dataclass(frozen=True)
class Availability:
    """Truthy when the backend can run in this process; otherwise ``reason`` says why not."""

    ok: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.ok

    @classmethod
    def yes(cls) -> Availability:
        return cls(True)

    @classmethod
    def no(cls, reason: str) -> Availability:
        return cls(False, reason)


class Backend:
    """One implementation of the double Mish, forward and backward.

    Subclasses set the class attributes and implement ``forward`` and ``backward``. Inputs reach
    them already checked against ``devices``/``dtypes``; unless ``any_strides`` is set they are
    also non-overlapping and dense (contiguous, channels_last or any other permutation), so a
    kernel may treat the storage as one flat array and ``torch.empty_like(x)`` gives an output
    with the same strides.
    """

    name: ClassVar[str]
    #: device types it runs on (``torch.device.type``); ``None`` means any.
    devices: ClassVar[frozenset[str] | None] = None
    dtypes: ClassVar[frozenset[torch.dtype]] = KERNEL_DTYPES
    #: True if it handles arbitrary strides itself; False: the dispatcher hands it dense tensors.
    any_strides: ClassVar[bool] = False
    #: preference when autotuning is off or timings tie: lower wins.
    priority: ClassVar[int] = 100
    #: kernel sources (relative to the repository root's ``csrc/`` or absolute) whose text is part
    #: of the tuning-cache key, beside this class's own module source.
    source_files: ClassVar[tuple[Path, ...]] = ()

    def is_available(self) -> Availability:
        return Availability.yes()

    def not_supported_reasons(self, x: torch.Tensor) -> list[str]:
        """Why this backend cannot take ``x`` (empty when it can), availability aside."""
        reasons = []
        if self.devices is not None and x.device.type not in self.devices:
            reasons.append(f"device type {x.device.type!r} not supported (runs on {sorted(self.devices)})")
        if x.dtype not in self.dtypes:
            names = sorted(str(d).removeprefix("torch.") for d in self.dtypes)
            reasons.append(f"dtype {str(x.dtype).removeprefix('torch.')} not supported (supports {names})")
        return reasons

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def backward(self, x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
        """d/dx mish(mish(x)) * grad_out, recomputed from the saved input ``x``."""
        raise NotImplementedError

    def source_hash(self) -> str:
        """Changes whenever the code that computes this backend's result changes."""
        return _source_hash(type(self))

    def __repr__(self) -> str:
        return f"<mishops backend {self.name!r}>"


_CSRC = Path(__file__).resolve().parent.parent / "csrc"


def csrc_path(name: str) -> Path:
    """Kernel sources ship inside the package when installed, beside it in a checkout."""
    packaged = Path(__file__).resolve().parent / "csrc" / name
    return packaged if packaged.exists() else _CSRC / name


_hash_cache: dict[type, str] = {}


def _source_hash(cls: type) -> str:
    if cls not in _hash_cache:
        h = hashlib.sha256()
        try:
            h.update(inspect.getsource(inspect.getmodule(cls)).encode())
        except (OSError, TypeError):
            h.update(cls.__qualname__.encode())
        for path in cls.source_files:
            h.update(Path(path).read_bytes())
        _hash_cache[cls] = h.hexdigest()[:16]
    return _hash_cache[cls]


_lock = threading.RLock()
_backends: dict[str, Backend] = {}
_failed: dict[str, str] = {}
_availability: dict[str, Availability] = {}
_entry_points_loaded = False


def register(cls_or_obj=None, *, replace: bool = False):
    """Register a backend class (as a decorator) or instance; returns its argument."""

    def add(item):
        backend = item() if isinstance(item, type) else item
        if not isinstance(backend, Backend):
            raise TypeError(f"{item!r} is not a mishops.Backend")
        with _lock:
            if backend.name in _backends and not replace:
                raise ValueError(f"a backend named {backend.name!r} is already registered")
            _backends[backend.name] = backend
            _availability.pop(backend.name, None)
            _failed.pop(backend.name, None)
        return item

    return add if cls_or_obj is None else add(cls_or_obj)


def unregister(name: str) -> None:
    with _lock:
        _backends.pop(name, None)
        _availability.pop(name, None)
        _failed.pop(name, None)


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            register(ep.load())
        except Exception as exc:  # a broken plugin must not break import mishops
            _failed[ep.name] = f"entry point {ep.value!r} failed to load: {type(exc).__name__}: {exc}"
            log.warning("mishops: backend entry point %s: %s", ep.name, _failed[ep.name])


def backends() -> dict[str, Backend]:
    """Every registered backend, in preference order."""
    import mishops.backends  # noqa: F401  (registers the built-ins)

    _load_entry_points()
    with _lock:
        return dict(sorted(_backends.items(), key=lambda kv: (kv[1].priority, kv[0])))


def get(name: str) -> Backend:
    if name in _backends:  # the hot path of a named backend: no import, no sort
        return _backends[name]
    found = backends()
    if name not in found:
        raise ValueError(f"unknown mishops backend {name!r}; valid names: {', '.join(found)}")
    return found[name]


def availability(name: str) -> Availability:
    """Cached per process; a backend marked failed stays unavailable with the failure's reason."""
    with _lock:
        if name in _failed:
            return Availability.no(_failed[name])
        if name not in _availability:
            backend = get(name)
            try:
                _availability[name] = backend.is_available()
            except Exception as exc:
                _availability[name] = Availability.no(f"is_available() raised {type(exc).__name__}: {exc}")
        return _availability[name]


def mark_failed(name: str, reason: str) -> None:
    """A backend that broke at build or launch stays out of automatic choices for this process."""
    with _lock:
        _failed[name] = reason
    log.warning("mishops: backend %r marked failed: %s", name, reason)


def failures() -> dict[str, str]:
    with _lock:
        return dict(_failed)
