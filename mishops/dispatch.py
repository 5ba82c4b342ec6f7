"""Choosing a backend per input: profile once, check the answer, cache the winner.

For a key (op, device, dtype, shape, strides) every available backend that supports the input is
checked against the eager oracle on scratch copies, then timed (CUDA events after warm-up, the L2
flushed between repetitions when the tensor would fit in it; a monotonic clock on CPU). A backend
that computes a wrong answer, or raises, can never win. The fastest wins only if it beats the
runner-up by more than the measured spread; otherwise the preference order breaks the tie, so the
choice is stable from run to run. Measurements go to the disk cache (``mishops.cache``) and the
choice to an in-memory table, so the next call with the same key does no profiling.

Environment (read at call time): ``MISHOPS_BACKEND`` forces a backend; ``MISHOPS_AUTOTUNE=0``
uses the preference order without profiling; ``MISHOPS_TUNE_BUDGET_MS`` bounds profiling time per
key; ``MISHOPS_LOG`` sets the log level of the ``mishops`` logger; ``MISHOPS_DIST_SYNC=0`` lets
each rank of a torch.distributed job choose on its own.
"""

from __future__ import annotations

import logging
import os
import platform
import statistics
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from mishops import cache, layout, registry
from mishops.registry import Backend

log = logging.getLogger("mishops")

OPS = ("forward", "backward")
DEFAULT_BUDGET_MS = 2000.0
#: how close a candidate must be to the oracle: (rtol, atol) per dtype.
TOLERANCE = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-4, 1e-5),
    torch.float16: (4e-3, 2e-3),
    torch.bfloat16: (3e-2, 2e-2),
}

#: counts that tests and ``mishops info`` read: a warm process must leave them at zero.
stats = {"profiled_keys": 0, "timed_runs": 0, "cache_writes": 0}


class NoBackendError(RuntimeError):
    """No backend can run this input; the message lists every backend with its own reasons."""


@dataclass
class Measurement:
    ok: bool
    source_hash: str
    median_ms: float = float("inf")
    spread_ms: float = 0.0
    reason: str = ""

    def to_json(self) -> dict:
        return {"ok": self.ok, "hash": self.source_hash, "median_ms": self.median_ms,
                "spread_ms": self.spread_ms, "reason": self.reason}

    @classmethod
    def from_json(cls, d: dict) -> Measurement:
        return cls(bool(d["ok"]), str(d["hash"]), float(d["median_ms"]), float(d["spread_ms"]),
                   str(d.get("reason", "")))


@dataclass
class Choice:
    """What was chosen for a key, how, and what every candidate measured."""

    op: str
    key: str
    backend: str
    how: str  # profiled | cached | preference | capture
    measurements: dict[str, Measurement] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    tuning_s: float = 0.0

    def summary(self) -> str:
        times = ", ".join(f"{n} {m.median_ms:.3f} ms" if m.ok else f"{n} rejected ({m.reason})"
                          for n, m in sorted(self.measurements.items(), key=lambda kv: kv[1].median_ms))
        return f"{self.op} {self.key} -> {self.backend} ({self.how})" + (f" [{times}]" if times else "")


_lock = threading.RLock()
_memory: dict[tuple, Choice] = {}
_history: deque[Choice] = deque(maxlen=256)
_disk: dict[str, cache.DiskCache] = {}
_said_once: set[str] = set()


def device_label(device: torch.device) -> str:
    """The device as the cache sees it: the model and compute capability, not the index."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} sm{props.major}{props.minor}"
    if device.type == "cpu":
        return f"cpu {platform.machine()} {platform.processor() or ''}".strip()
    return device.type


def key_string(op: str, x: torch.Tensor) -> str:
    return f"{op}|{str(x.dtype).removeprefix('torch.')}|{tuple(x.shape)}|{tuple(x.stride())}"


def last_choices() -> list[Choice]:
    """The choices made in this process, oldest first (profiled, cached, forced alike)."""
    with _lock:
        return list(_history)


def clear_memory() -> None:
    """Forget the in-memory choices (the disk cache stays)."""
    with _lock:
        _memory.clear()
        _history.clear()
        _disk.clear()
        _said_once.clear()


def _say_once(tag: str, message: str) -> None:
    if tag not in _said_once:
        _said_once.add(tag)
        log.warning(message)


def _apply_log_env() -> None:
    level = os.environ.get("MISHOPS_LOG")
    if not level:
        return
    log.setLevel(level.upper())
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)


def _describe(x: torch.Tensor) -> str:
    return (f"{x.device}, {str(x.dtype).removeprefix('torch.')}, shape {tuple(x.shape)}, "
            f"{layout.memory_format_name(x)}")


def _reasons(backend: Backend, x: torch.Tensor) -> list[str]:
    available = registry.availability(backend.name)
    reasons = [] if available else [f"unavailable: {available.reason}"]
    return reasons + backend.not_supported_reasons(x)


def _error(x: torch.Tensor, op: str, reasons: dict[str, list[str]], requested: str | None) -> NoBackendError:
    """ONE error: what the input is, what no backend supports about it, then each backend's reasons."""
    lines = [f"mishops: no backend can run mish2 {op} on this input ({_describe(x)})"]
    all_reasons = [r for rs in reasons.values() for r in rs]
    for what in ("dtype", "device type"):
        shared = {r for r in all_reasons if r.startswith(what)}
        if shared and all(any(r.startswith(what) for r in rs) for rs in reasons.values()):
            lines.append(f"  no backend supports its {what}")
    order = sorted(reasons, key=lambda n: (n != requested, n))
    for name in order:
        label = f"{name} (requested)" if name == requested else name
        lines.append(f"  {label}: " + "; ".join(reasons[name] or ["supported"]))
    lines.append("  hint: `python -m mishops info` lists every backend and why it is unavailable")
    return NoBackendError("\n".join(lines))


def _named(name: str, x: torch.Tensor, op: str) -> Backend:
    backend = registry.get(name)
    why = _reasons(backend, x)
    if why:
        others = {n: _reasons(b, x) for n, b in registry.backends().items()}
        raise _error(x, op, others, requested=name)
    return backend


def _candidates(x: torch.Tensor) -> tuple[list[Backend], dict[str, list[str]]]:
    usable, rejected = [], {}
    for name, backend in registry.backends().items():
        why = _reasons(backend, x)
        if why:
            rejected[name] = why
        else:
            usable.append(backend)
    return usable, rejected


def pick(measurements: dict[str, Measurement], priority: dict[str, int]) -> str | None:
    """The fastest correct backend, unless a preferred one is within the measured spread of it."""
    ok = {n: m for n, m in measurements.items() if m.ok}
    if not ok:
        return None
    best = min(ok, key=lambda n: (ok[n].median_ms, priority.get(n, 0), n))
    tied = [n for n, m in ok.items()
            if m.median_ms - ok[best].median_ms <= max(m.spread_ms, ok[best].spread_ms)]
    return min(tied, key=lambda n: (priority.get(n, 0), n))


# --- profiling -------------------------------------------------------------------------------


def _run(backend: Backend, op: str, x: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor:
    return backend.forward(x) if op == "forward" else backend.backward(x, grad)


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


def _time(fn, x: torch.Tensor, budget_s: float) -> tuple[float, float, int]:
    """Median and 20-80% spread in ms of ``fn()`` after warm-up, within about ``budget_s``."""
    if x.device.type == "cuda":
        l2 = getattr(torch.cuda.get_device_properties(x.device), "L2_cache_size", 50 << 20)
        flush = torch.empty(2 * l2, dtype=torch.uint8, device=x.device) if 3 * x.nbytes < 4 * l2 else None
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(); fn(); end.record(); end.synchronize()
        reps = int(min(100, max(5, budget_s * 1e3 / max(start.elapsed_time(end), 1e-3))))
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(reps)]
        for s, e in events:
            if flush is not None:
                flush.zero_()
            s.record(); fn(); e.record()
        torch.cuda.synchronize(x.device)
        times = [s.elapsed_time(e) for s, e in events]
    else:
        t0 = time.perf_counter(); fn(); first = time.perf_counter() - t0
        reps = int(min(100, max(5, budget_s / max(first, 1e-6))))
        times = []
        for _ in range(reps):
            t0 = time.perf_counter(); fn(); times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=10) if len(times) > 1 else [times[0]] * 9
    return statistics.median(times), q[7] - q[1], reps


def release_scratch(device: torch.device) -> None:
    """Hand the memory that profiling cached back to CUDA. Profiling allocates and frees scratch
    tensors of every size the candidates need; the caching allocator keeps those blocks, split and
    scattered (about 30 GB after a whole-block search at the reference shape), and the chosen
    kernel's large allocations then ran 12% slower on the H100 until ``empty_cache`` (4.3 vs 3.8 ms
    for ``triton_conv``). Once per profiled key, so it costs nothing in steady state."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.empty_cache()


def _profile(op: str, candidates: list[Backend], x: torch.Tensor, budget_s: float) -> dict[str, Measurement]:
    """Check then time each candidate on scratch copies; the caller's tensors are never passed in."""
    scratch = torch.empty_like(x).copy_(x)
    grad = torch.empty_like(x).normal_() if op == "backward" else None
    expected = _run(registry.get("eager"), op, scratch, grad)
    share = budget_s / max(len(candidates), 1)
    results: dict[str, Measurement] = {}
    for backend in candidates:
        h = backend.source_hash()
        try:
            for _ in range(2):  # the first call may build or JIT-compile
                out = _run(backend, op, scratch, grad)
            wrong = wrong_answer(out, expected)
            del out
            if wrong:
                results[backend.name] = Measurement(False, h, reason=wrong)
                log.warning("mishops: backend %r rejected for %s %s: %s", backend.name, op, tuple(x.shape), wrong)
                continue
            median, spread, reps = _time(lambda: _run(backend, op, scratch, grad), x, share)
            stats["timed_runs"] += reps
            results[backend.name] = Measurement(True, h, median, spread)
        except Exception as exc:
            reason = f"{op} raised {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            registry.mark_failed(backend.name, reason)
            results[backend.name] = Measurement(False, h, reason=reason)
    return results


# --- agreement across ranks --------------------------------------------------------------------


def _distributed() -> bool:
    if os.environ.get("MISHOPS_DIST_SYNC", "1") == "0":
        return False
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized()


def _agree(label: str, measurements: dict[str, Measurement]) -> tuple[dict[str, Measurement], bool]:
    """Every rank gets the same merged timings (a backend counts only if correct on all ranks);
    returns them and whether this rank is the one that writes its device's cache file."""
    dist = torch.distributed
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (label, {n: m.to_json() for n, m in measurements.items()}))
    names = set.intersection(*(set(m) for _, m in gathered))
    merged = {}
    for name in sorted(names):
        per_rank = [Measurement.from_json(m[name]) for _, m in gathered]
        if all(m.ok for m in per_rank):
            merged[name] = Measurement(True, per_rank[0].source_hash,
                                       statistics.median(m.median_ms for m in per_rank),
                                       max(m.spread_ms for m in per_rank))
        else:
            merged[name] = Measurement(False, per_rank[0].source_hash,
                                       reason="; ".join(sorted({m.reason for m in per_rank if not m.ok})))
    first_rank_of_label = min(r for r, (lab, _) in enumerate(gathered) if lab == label)
    return merged, dist.get_rank() == first_rank_of_label


# --- choosing ----------------------------------------------------------------------------------


def _disk_cache(label: str) -> cache.DiskCache:
    if label not in _disk:
        _disk[label] = cache.DiskCache(cache.environment(label))
    return _disk[label]


def _cached_measurements(store: cache.DiskCache, key: str, candidates: list[Backend]) -> dict[str, Measurement]:
    found = {}
    entry = store.read().get(key, {})
    for backend in candidates:
        raw = entry.get(backend.name)
        try:
            m = Measurement.from_json(raw) if raw else None
        except (KeyError, TypeError, ValueError):
            m = None
        if m is not None and m.source_hash == backend.source_hash():
            found[backend.name] = m
    return found


def _choose(op: str, x: torch.Tensor) -> Choice:
    _apply_log_env()
    key = key_string(op, x)
    candidates, rejected = _candidates(x)
    if not candidates:
        raise _error(x, op, rejected, requested=None)
    priority = {b.name: b.priority for b in candidates}
    preferred = min(candidates, key=lambda b: (b.priority, b.name)).name
    reasons = {n: "; ".join(r) for n, r in rejected.items()}
    capturing = x.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if len(candidates) == 1 or x.numel() == 0:
        return Choice(op, key, preferred, "preference", rejected=reasons)
    if os.environ.get("MISHOPS_AUTOTUNE", "1") == "0":
        return Choice(op, key, preferred, "preference", rejected=reasons)

    label = device_label(x.device)
    store = _disk_cache(label)
    measured = _cached_measurements(store, key, candidates)
    missing = [b for b in candidates if b.name not in measured]
    if capturing:
        winner = pick(measured, priority) if not missing else None
        if winner is None:
            _say_once("capture", "mishops: a choice was needed during CUDA graph capture, where profiling is "
                                 f"impossible; using the preference order ({preferred}). Run once before "
                                 "capturing (or `mishops tune`) to capture the fastest backend.")
        return Choice(op, key, winner or preferred, "capture", measured, reasons)

    started = time.perf_counter()
    fresh = {}
    if missing:
        budget_s = float(os.environ.get("MISHOPS_TUNE_BUDGET_MS", DEFAULT_BUDGET_MS)) / 1e3
        fresh = _profile(op, missing, x, budget_s)
        stats["profiled_keys"] += 1
        release_scratch(x.device)
    measured.update(fresh)
    writer = True
    if _distributed():
        measured, writer = _agree(label, measured)
        fresh = {n: m for n, m in measured.items() if n in fresh}
    if fresh and writer and store.update(key, {n: m.to_json() for n, m in fresh.items()}):
        stats["cache_writes"] += 1
    winner = pick(measured, priority) or registry.get("eager").name
    how = "profiled" if fresh else "cached"
    return Choice(op, key, winner, how, measured, reasons, time.perf_counter() - started)


def choose(op: str, x: torch.Tensor, backend: str = "auto", forced: str | None = None) -> Backend:
    """The backend that runs ``op`` on ``x``: the environment's, the caller's, or the tuned one.

    ``forced`` is ``MISHOPS_BACKEND`` when the caller has already read it (the hot path reads the
    environment once per call)."""
    forced = forced if forced is not None else os.environ.get("MISHOPS_BACKEND")
    if forced or backend != "auto":
        return _named(forced or backend, x, op)
    mkey = (op, x.is_cuda, x.get_device(), x.dtype, x.shape, x.stride())  # cheaper than x.device
    choice = _memory.get(mkey)
    if choice is None or choice.backend in registry._failed:
        with _lock:  # one thread profiles a cold key; the others wait and reuse its choice
            choice = _memory.get(mkey)
            if choice is None or choice.backend in registry._failed:
                choice = _choose(op, x)
                if choice.how != "capture":
                    _memory[mkey] = choice
                _history.append(choice)
                log.info("mishops: %s", choice.summary())
    return registry._backends[choice.backend]


def run(op: str, x: torch.Tensor, grad: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """Run ``op`` with the chosen backend; an automatically chosen one that breaks is replaced."""
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, not {op!r}")
    forced = os.environ.get("MISHOPS_BACKEND", "")
    explicit = backend != "auto" or bool(forced)
    while True:
        chosen = choose(op, x, backend, forced)
        xin, gin = x, grad
        if not chosen.any_strides and not x.is_contiguous() and not layout.is_dense(x):
            xin = layout.densify(x)
        if grad is not None and (grad.stride() != xin.stride() or not chosen.any_strides and not layout.is_dense(grad)):
            gin = torch.empty_like(xin).copy_(grad)
        try:
            return chosen.forward(xin) if gin is None else chosen.backward(xin, gin)
        except Exception as exc:
            if explicit or chosen.name == "eager":
                raise
            registry.mark_failed(chosen.name, f"{op} raised {type(exc).__name__}: {exc}")
