"""The backends of ``y = mish(mish(x))`` and the one place they (and the block plans) are registered.

A backend is a subclass of :class:`Backend` whose capabilities are class attributes, so the
dispatcher can rule it out for an input without importing its dependencies (xformers' style);
``is_available`` is the only method that may touch a compiler, a GPU or an optional package.

Built-in backends live one per file in ``mishops/backends/`` and register with ``@register``.
Third-party packages register through the entry-point group ``mishops.backends``; each entry
point names a ``Backend`` subclass (or instance).
"""

from __future__ import annotations

import functools
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
    #: the ops it offers: ``forward`` and ``backward`` always; ``grad_bias`` where it has that fused kernel.
    ops: ClassVar[frozenset[str]] = frozenset({"forward", "backward"})
    #: kernel sources (relative to the repository root's ``csrc/`` or absolute) whose text is part
    #: of the tuning-cache key, beside this class's own module source.
    source_files: ClassVar[tuple[Path, ...]] = ()

    def is_available(self) -> Availability:
        """Whether it can run in this process at all (its package, toolchain, a GPU); asked once."""
        return Availability.yes()

    def device_reasons(self, device: torch.device) -> list[str]:
        """Why it cannot run on this device (its compute capability, say); asked once per device,
        so each GPU of a host with different models gets its own answer."""
        return []

    def not_supported_reasons(self, x: torch.Tensor) -> list[str]:
        """Why this backend cannot take ``x`` (empty when it can), availability aside."""
        return device_and_dtype_reasons(self, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def backward(self, x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
        """d/dx mish(mish(x)) * grad_out, recomputed from the saved input ``x``."""
        raise NotImplementedError

    def grad_bias(self, z: torch.Tensor, grad_out: torch.Tensor, mish_count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(dz, dbias): ``grad_out * d/dz act(z)`` with z's strides, ``act`` Mish ``mish_count`` times,
        and its sum per channel of a 4-D ``z`` (over N, H, W) in float32 (float64 for float64), in one
        pass: the conv block's bias gradient without a second read of ``dz``. Offered where ``ops``
        says so; raises ``mishops.tuning.CannotTake`` for a layout its kernel does not walk."""
        raise NotImplementedError

    def source_hash(self) -> str:
        """Changes whenever the code that computes this backend's result changes."""
        return source_hash_of(type(self))

    def __repr__(self) -> str:
        return f"<mishops backend {self.name!r}>"


def device_and_dtype_reasons(impl, x: torch.Tensor) -> list[str]:
    """What ``impl``'s ``devices`` and ``dtypes`` rule out about ``x``, in the words the errors use."""
    reasons = []
    if impl.devices is not None and x.device.type not in impl.devices:
        reasons.append(f"device type {x.device.type!r} not supported (runs on {sorted(impl.devices)})")
    if x.dtype not in impl.dtypes:
        names = sorted(str(d).removeprefix("torch.") for d in impl.dtypes)
        reasons.append(f"dtype {str(x.dtype).removeprefix('torch.')} not supported (supports {names})")
    return reasons


_CSRC = Path(__file__).resolve().parent.parent / "csrc"


def csrc_path(name: str) -> Path:
    """Kernel sources ship inside the package when installed, beside it in a checkout."""
    packaged = Path(__file__).resolve().parent / "csrc" / name
    return packaged if packaged.exists() else _CSRC / name


@functools.cache
def source_hash_of(cls: type) -> str:
    """A hash of the module that defines ``cls`` and of its ``source_files``."""
    h = hashlib.sha256()
    try:
        h.update(inspect.getsource(inspect.getmodule(cls)).encode())
    except (OSError, TypeError):
        h.update(cls.__qualname__.encode())
    for path in cls.source_files:
        h.update(Path(path).read_bytes())
    return h.hexdigest()[:16]


class Registry:
    """Named implementations of one kind (double-Mish backends, whole-block plans), in preference order.

    Availability is asked once per process, ``device_reasons`` once per device; an implementation
    that broke at build or launch is marked failed with its reason and stays out of automatic
    choices. Names are case-insensitive (registered lower-case). ``load_builtins`` imports the
    modules that register the built-ins on first listing; ``entry_point_group`` lets other packages
    add theirs; ``on_change`` runs whenever the set or a failure changes (to drop cached choices).
    """

    def __init__(self, kind: str, base: type, load_builtins, entry_point_group: str | None = None,
                 on_change=None):
        self.kind, self.base, self.entry_point_group = kind, base, entry_point_group
        self._load_builtins = load_builtins
        #: called whenever the set or a failure changes (the ops drop their remembered choices).
        self.on_change = on_change or (lambda: None)
        self.lock = threading.RLock()
        self.items: dict = {}
        self.failed: dict[str, str] = {}
        self.cached: dict[str, Availability] = {}
        self.per_device: dict[tuple, list[str]] = {}
        self._entry_points_loaded = entry_point_group is None

    def register(self, cls_or_obj=None, *, replace: bool = False):
        """Register a class (as a decorator) or instance; returns its argument."""

        def add(item):
            obj = item() if isinstance(item, type) else item
            if not isinstance(obj, self.base):
                raise TypeError(f"{item!r} is not a {self.base.__module__}.{self.base.__qualname__}")
            if obj.name != obj.name.lower():
                raise ValueError(f"{self.kind} names are lower-case: {obj.name!r}")
            with self.lock:
                if obj.name in self.items and not replace:
                    raise ValueError(f"a {self.kind} named {obj.name!r} is already registered")
                self.items[obj.name] = obj
                self._forget(obj.name)
            return item

        return add if cls_or_obj is None else add(cls_or_obj)

    def unregister(self, name: str) -> None:
        with self.lock:
            self.items.pop(name, None)
            self._forget(name)

    def _forget(self, name: str) -> None:
        self.cached.pop(name, None)
        self.failed.pop(name, None)
        for k in [k for k in self.per_device if k[0] == name]:
            del self.per_device[k]
        self.on_change()

    def _load_entry_points(self) -> None:
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        for ep in importlib.metadata.entry_points(group=self.entry_point_group):
            try:
                self.register(ep.load())
            except Exception as exc:  # a broken plugin must not break import mishops
                self.failed[ep.name] = f"entry point {ep.value!r} failed to load: {type(exc).__name__}: {exc}"
                log.warning("%s entry point %s: %s", self.kind, ep.name, self.failed[ep.name])

    def all(self) -> dict:
        """Every registered one, in preference order."""
        self._load_builtins()
        self._load_entry_points()
        with self.lock:
            return dict(sorted(self.items.items(), key=lambda kv: (kv[1].priority, kv[0])))

    def get(self, name: str):
        if name in self.items:  # the hot path of a named one: no import, no sort
            return self.items[name]
        found = self.all()
        if not isinstance(name, str) or name.strip().lower() not in found:
            raise ValueError(f"mishops: unknown {self.kind} {name!r}; valid names: {', '.join(found)}")
        return found[name.strip().lower()]

    def reasons(self, name: str, device: torch.device) -> list[str]:
        """Why ``name`` cannot run on ``device`` at all (empty when it can): unavailable in this
        process, or not on this device. Cached per process and per device."""
        available = self.availability(name)
        if not available:
            return [f"unavailable: {available.reason}"]
        key = (name, device.type, device.index)
        found = self.per_device.get(key)
        if found is None:
            with self.lock:
                try:
                    found = list(self.get(name).device_reasons(device))
                except Exception as exc:
                    found = [f"device_reasons() raised {type(exc).__name__}: {exc}"]
                self.per_device[key] = found
        return found

    def availability(self, name: str) -> Availability:
        """Cached per process; one marked failed stays unavailable with the failure's reason."""
        with self.lock:
            if name in self.failed:
                return Availability.no(self.failed[name])
            if name not in self.cached:
                obj = self.get(name)
                try:
                    self.cached[name] = obj.is_available()
                except Exception as exc:
                    self.cached[name] = Availability.no(f"is_available() raised {type(exc).__name__}: {exc}")
            return self.cached[name]

    def mark_failed(self, name: str, reason: str) -> None:
        """One that broke at build or launch stays out of automatic choices for this process."""
        with self.lock:
            self.failed[name] = reason
            self.on_change()
        log.warning("%s %r marked failed: %s", self.kind, name, reason)


def _import_builtin_backends() -> None:
    import mishops.backends  # noqa: F401  (registers the built-ins)


BACKENDS = Registry("backend", Backend, _import_builtin_backends, ENTRY_POINT_GROUP)
register, unregister, backends, get = BACKENDS.register, BACKENDS.unregister, BACKENDS.all, BACKENDS.get
availability, mark_failed = BACKENDS.availability, BACKENDS.mark_failed


def failures() -> dict[str, str]:
    with BACKENDS.lock:
        return dict(BACKENDS.failed)
