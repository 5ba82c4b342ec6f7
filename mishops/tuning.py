"""The one tuner behind every choice mishops makes: double-Mish backends, block plans, a plan's configs.

An op (``mishops.dispatch`` for ``mish2``, ``mishops.plans.block`` for the conv block, a plan for its
own configs) describes one choice as a :class:`Problem`: a key, the candidates that may take it, why
the others cannot, and how to build a :class:`Trial` -- fresh inputs of the key's shape, dtype,
strides and device, never the caller's tensors, with the reference's answer. The tuner owns the rest,
so every choice follows the same rules:

* **checking**: each candidate runs on the trial twice (the first call may build or compile) and its
  answer is checked against the reference's; a wrong one is out for that key, logged once;
* **timing**: :func:`time_ms`, the project's one timer (benchmarks and sweeps use it too): CUDA events
  around each call with the L2 cache flushed before it, median and 20-80% spread after warm-up;
* **picking** (:func:`pick`): the lowest median wins; a candidate of better priority wins instead only
  when it is within ``TIE_MARGIN`` of the fastest *and* the difference is below both candidates'
  spread; when the two fastest are within ``RETIME_MARGIN`` they are re-timed interleaved before
  deciding, so a drift of the clock between two timings cannot decide;
* **failures by kind**: out of memory, or :class:`CannotTake` raised by a candidate -> skipped for that
  key only, nothing remembered on disk; any other exception is a build or launch failure -> the
  candidate is out for the process (``Problem.on_failure``, shown by ``mishops info``);
* **caching**: the choice in memory per key, each candidate's measurement on disk with its source
  hash (``mishops.cache``), so a changed candidate re-times only itself and a new GPU re-tunes;
* **ranks**: in a ``torch.distributed`` job every rank merges the others' measurements and takes the
  same choice; one rank per device model writes the cache file;
* **capture**: during CUDA graph capture nothing can be timed, so a key not measured before takes the
  preference order, with one warning.

Environment (read when a key is tuned): ``MISHOPS_AUTOTUNE=0`` takes the first candidate in preference
order whose answer is right, without timing; ``MISHOPS_TUNE_BUDGET_MS`` bounds the timing per key;
``MISHOPS_DIST_SYNC=0`` lets each rank choose alone; ``MISHOPS_LOG`` sets the ``mishops`` logger's level.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from mishops import cache

log = logging.getLogger("mishops")

DEFAULT_BUDGET_MS = 2000.0
#: how far (relative) a preferred candidate may be behind the fastest and still win a tie.
TIE_MARGIN = 0.02
#: the two fastest are re-timed interleaved when the slower is within this of the faster: on the H200
#: the same plans timed one after the other moved by up to 10%, in opposite directions, between the
#: tuner's first call and a later run (benchmarks/results/h200/gpu-run6.md), enough to turn a 14%
#: loss into a 4% lead. Interleaving takes a drift of the clock out of the comparison (whether drift
#: caused that one is not known); it costs RETIME_REPS calls of two candidates, once per key.
RETIME_MARGIN = 0.10
#: interleaved re-timing of the two fastest: calls of each.
RETIME_REPS = 30


class CannotTake(Exception):
    """Raised by a candidate that finds, only when it runs, that it cannot take this key (a shape
    its kernel does not cover, no correct engine config): it is skipped for that key alone."""


class TuningSettingError(ValueError):
    """An environment variable the tuner reads has a value it cannot use; the message names it."""


# --- the one timer -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    median_ms: float
    spread_ms: float  # 20th to 80th percentile
    reps: int


def _summary(times: list[float]) -> Timing:
    q = statistics.quantiles(times, n=10) if len(times) > 1 else [times[0]] * 9
    return Timing(statistics.median(times), q[7] - q[1], len(times))


def l2_flush_buffer(device: torch.device) -> torch.Tensor:
    """Twice the L2's size: zeroing it evicts whatever the previous call left in the L2."""
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20) or (50 << 20)
    return torch.empty(2 * l2, dtype=torch.uint8, device=device)


def _timed_call(fn: Callable[[], Any], flush: torch.Tensor | None, start: torch.cuda.Event, end: torch.cuda.Event,
                idle_start: bool) -> None:
    if flush is not None:
        flush.zero_()
    if idle_start:
        torch.cuda.synchronize()  # the current device: call_times_ms sets it
    start.record(); fn(); end.record()


def call_times_ms(fn: Callable[[], Any], device: torch.device, reps: int, idle_start: bool = True,
                  flush: bool = True) -> list[float]:
    """The time in ms of each of ``reps`` calls of ``fn()``: the project's one timer.

    On CUDA each call sits between two events, after the L2 is flushed (``flush``: a buffer twice
    its size zeroed outside the events), as the data of a real model's next layer would be cold.
    ``idle_start``: the host waits for the GPU before each call, so the host's work before the
    call's kernels run counts. The tuner needs that: with the flush still running, a candidate's
    Python and launch costs hid behind it, and in a model of many small layers, where the GPU waits
    for exactly that host work, the fused model ran slower than the unfused one. Without it the
    calls queue back to back and the events see the GPU's time alone, the host's hidden: what a
    bandwidth table of a memory-bound pass wants. On CPU a monotonic clock times each call."""
    device = torch.device(device)
    if device.type != "cuda":
        times = []
        for _ in range(reps):
            t0 = time.perf_counter(); fn(); times.append((time.perf_counter() - t0) * 1e3)
        return times
    buffer = l2_flush_buffer(device) if flush else None
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    with torch.cuda.device(device):
        for s, e in events:
            _timed_call(fn, buffer, s, e, idle_start)
        torch.cuda.synchronize(device)
    return [s.elapsed_time(e) for s, e in events]


def time_ms(fn: Callable[[], Any], device: torch.device, budget_s: float = 0.5, max_reps: int = 100,
            min_reps: int = 5) -> Timing:
    """Median and 20-80% spread in ms of :func:`call_times_ms` (idle start, L2 flushed) after one
    warm-up call, as many calls as fit in about ``budget_s`` within ``min_reps`` and ``max_reps``."""
    first = call_times_ms(fn, device, 1)[0]
    reps = int(min(max_reps, max(min_reps, budget_s * 1e3 / max(first, 1e-3))))
    return _summary(call_times_ms(fn, device, reps))


def time_interleaved(fns: dict[str, Callable[[], Any]], device: torch.device,
                     reps: int = RETIME_REPS) -> dict[str, Timing]:
    """``time_ms`` for several functions whose calls alternate, so a change of clock or load during
    the run affects each alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {n: [] for n in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            times[name] += call_times_ms(fn, device, 1)
    return {n: _summary(t) for n, t in times.items()}


def release_scratch(device: torch.device) -> None:
    """Hand the memory that tuning cached back to CUDA. Trials allocate and free scratch tensors of
    every size the candidates need; the caching allocator keeps those blocks, split and scattered,
    and the chosen kernel's large allocations ran measurably slower in the state they left until
    ``empty_cache`` (``benchmarks/results/plans-h100/``). Once per tuned key, so free in steady state."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.empty_cache()


# --- what the tuner knows of candidates and problems --------------------------------------------


class Candidate(Protocol):
    name: str
    priority: int

    def source_hash(self) -> str: ...


class Trial(Protocol):
    """Inputs of the key's shape, dtype, strides and device, and the reference's answer on them."""

    def run(self, candidate) -> Any:
        """The candidate's outcome on the trial inputs (what ``wrong`` judges)."""

    def wrong(self, outcome) -> str:
        """Why ``outcome`` is not the reference's answer; empty when it is."""


@dataclass
class Problem:
    """One choice an op asks the tuner for."""

    op: str  # what is chosen, for logs and tables: "mish2 forward", "block", "triton_conv config"
    key: str  # the disk cache's key: everything the answer depends on
    device: torch.device
    candidates: list  # those that may take the key (each has name, priority, source_hash())
    make_trial: Callable[[], Trial]
    rejected: dict[str, str] = field(default_factory=dict)  # name -> why it cannot take the key
    #: a build or launch failure: the candidate is out for the process with this reason.
    on_failure: Callable[[str, str], None] = lambda name, reason: None
    #: the candidate to take when none measured correct (the reference itself).
    fallback: str | None = None
    #: False for keys that need no timing (an empty tensor): the preference order decides.
    worth_timing: bool = True


@dataclass
class Measurement:
    ok: bool
    source_hash: str
    median_ms: float = math.inf
    spread_ms: float = 0.0
    reason: str = ""
    #: False for outcomes that say nothing lasting about the candidate (out of memory, cannot take
    #: the key, a build failure): never written to disk.
    durable: bool = True

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
    winner: str
    how: str  # profiled | cached | preference | checked | capture
    measurements: dict[str, Measurement] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    tuning_s: float = 0.0

    def ranked(self) -> list[tuple[str, Measurement]]:
        """Measured candidates, fastest first, the wrong and failed ones last."""
        return sorted(self.measurements.items(), key=lambda kv: (not kv[1].ok, kv[1].median_ms, kv[0]))

    def summary(self) -> str:
        times = ", ".join(f"{n} {m.median_ms:.3f} ms" if m.ok else f"{n} out ({m.reason})" for n, m in self.ranked())
        return f"{self.op} {self.key} -> {self.winner} ({self.how})" + (f" [{times}]" if times else "")


# --- the pick rule -------------------------------------------------------------------------------


def close_call(a: Measurement, b: Measurement) -> bool:
    """``b`` (the slower) is within ``TIE_MARGIN`` of ``a`` and the gap is below both spreads."""
    gap = b.median_ms - a.median_ms
    return gap <= TIE_MARGIN * a.median_ms and gap <= min(a.spread_ms, b.spread_ms)


def pick(measurements: dict[str, Measurement], priority: dict[str, int]) -> str | None:
    """The lowest median among the correct; a better-priority candidate instead only on a close call."""
    ok = {n: m for n, m in measurements.items() if m.ok}
    if not ok:
        return None
    fastest = min(ok, key=lambda n: (ok[n].median_ms, priority.get(n, 0), n))
    rivals = [n for n in ok if priority.get(n, 0) < priority.get(fastest, 0) and close_call(ok[fastest], ok[n])]
    return min(rivals, key=lambda n: (priority.get(n, 0), n)) if rivals else fastest


# --- the tuner -----------------------------------------------------------------------------------


def device_label(device: torch.device) -> str:
    """The device as the cache sees it: the model and compute capability, not the index."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} sm{props.major}{props.minor}"
    if device.type == "cpu":
        return f"cpu {platform.machine()} {platform.processor() or ''}".strip()
    return device.type


def budget_s() -> float:
    raw = os.environ.get("MISHOPS_TUNE_BUDGET_MS")
    if raw is None or raw.strip() == "":
        return DEFAULT_BUDGET_MS / 1e3
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not value >= 0 or math.isinf(value):
        raise TuningSettingError(f"mishops: MISHOPS_TUNE_BUDGET_MS={raw!r} is not a number of milliseconds "
                                 f"(default {DEFAULT_BUDGET_MS:g})")
    return value / 1e3


def _autotune_on() -> bool:
    return os.environ.get("MISHOPS_AUTOTUNE", "1").strip().lower() not in ("0", "false", "off", "no")


def apply_log_env() -> None:
    level = os.environ.get("MISHOPS_LOG")
    if not level:
        return
    log.setLevel(level.upper())
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)


def _distributed() -> bool:
    if os.environ.get("MISHOPS_DIST_SYNC", "1") == "0":
        return False
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized()


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


#: counts that tests and ``mishops info`` read: a warm process leaves them unchanged.
stats = {"profiled_keys": 0, "timed_runs": 0, "cache_writes": 0}


class Tuner:
    """The choices of this process, in memory, over the disk cache."""

    def __init__(self):
        self.lock = threading.RLock()  # guards the dicts below, never held while tuning
        #: one lock per cold key, held while it tunes: a choice that needs another choice on another
        #: thread (a plan's backward runs on autograd's device thread and asks for its backends) waits
        #: only for its own key, never for the outer one.
        self._tuning: dict[Hashable, threading.Lock] = {}
        self.memory: dict[Hashable, Choice] = {}
        self.history: deque[Choice] = deque(maxlen=256)
        self.decided = 0  # choices made (tuned, or read from disk), for ``tune`` to report its own
        self._disk: dict[str, cache.DiskCache] = {}
        self._said: set[str] = set()

    # -- memory ---------------------------------------------------------------------------------

    def forget(self, keep=lambda mkey, choice: False) -> None:
        """Drop remembered choices (all, or those ``keep`` does not keep); the disk cache stays."""
        with self.lock:
            for mkey in [k for k, c in self.memory.items() if not keep(k, c)]:
                del self.memory[mkey]

    def clear(self) -> None:
        with self.lock:
            self.memory.clear()
            self.history.clear()
            self._tuning.clear()
            self._disk.clear()
            self._said.clear()

    def last_choices(self) -> list[Choice]:
        with self.lock:
            return list(self.history)

    def say_once(self, tag: str, message: str) -> None:
        if tag not in self._said:
            self._said.add(tag)
            log.warning(message)

    def disk(self, device: torch.device) -> cache.DiskCache:
        label = device_label(device)
        with self.lock:
            if label not in self._disk:
                self._disk[label] = cache.DiskCache(cache.environment(label))
            return self._disk[label]

    # -- choosing -------------------------------------------------------------------------------

    def choose(self, mkey: Hashable, describe: Callable[[], Problem], remember: bool = True) -> Choice:
        """The remembered choice for ``mkey``, else the one ``describe()``'s problem tunes to.
        One thread tunes a cold key; the others that want that key wait and reuse its choice."""
        choice = self.memory.get(mkey)
        if choice is not None:
            return choice
        with self.lock:
            key_lock = self._tuning.setdefault(mkey, threading.Lock())
        with key_lock:
            choice = self.memory.get(mkey)
            if choice is not None:
                return choice
            choice = self.decide(describe())
            with self.lock:
                if remember and choice.how != "capture":
                    self.memory[mkey] = choice
                self.history.append(choice)
                self.decided += 1
            log.info("%s", choice.summary())
            return choice

    def decide(self, problem: Problem) -> Choice:
        apply_log_env()
        names = [c.name for c in problem.candidates]
        by_name = {c.name: c for c in problem.candidates}
        priority = {c.name: c.priority for c in problem.candidates}
        preferred = min(names, key=lambda n: (priority[n], n))
        if not problem.worth_timing or names == [problem.fallback]:  # the reference alone: nothing to judge
            return Choice(problem.op, problem.key, preferred, "preference", rejected=problem.rejected)
        capturing = problem.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        started = time.perf_counter()
        if not _autotune_on() and not capturing:
            winner, checked = self._first_correct(problem, sorted(names, key=lambda n: (priority[n], n)))
            return Choice(problem.op, problem.key, winner, "checked", checked, problem.rejected,
                          time.perf_counter() - started)
        store = self.disk(problem.device)
        measured = self._cached(store, problem.key, problem.candidates)
        missing = [c for c in problem.candidates if c.name not in measured]
        if capturing:
            winner = pick(measured, priority) if not missing else None
            if winner is None:
                self.say_once("capture", "a choice was needed during CUDA graph capture, where nothing "
                                         f"can be timed; using the preference order ({preferred}). Call once "
                                         "before capturing (or mishops.tune) to capture the fastest.")
            return Choice(problem.op, problem.key, winner or preferred, "capture", measured, problem.rejected)
        fresh: dict[str, Measurement] = {}
        trial = None
        if missing:
            trial = problem.make_trial()
            fresh = self._profile(problem, missing, trial)
            stats["profiled_keys"] += 1
        measured.update(fresh)
        if trial is not None:  # before agreeing, so every rank decides on the same merged numbers
            retimed = self._retime_close_call(measured, by_name, trial, problem.device)
            # what is written is what decided: a new process must read the numbers this one chose by
            fresh = {n: measured[n] for n in [*fresh, *(r for r in retimed if r not in fresh)]}
        writer = True
        if _distributed():
            measured, writer = _agree(device_label(problem.device), measured)
            fresh = {n: m for n, m in measured.items() if n in fresh}
        durable = {n: m.to_json() for n, m in fresh.items() if m.durable}
        if durable and writer and store.update(problem.key, durable):
            stats["cache_writes"] += 1
        if trial is not None:
            del trial
            release_scratch(problem.device)
        winner = pick(measured, priority) or problem.fallback or preferred
        return Choice(problem.op, problem.key, winner, "profiled" if fresh else "cached", measured,
                      problem.rejected, time.perf_counter() - started)

    @staticmethod
    def _cached(store: cache.DiskCache, key: str, candidates: list) -> dict[str, Measurement]:
        found = {}
        entry = store.read().get(key, {})
        for candidate in candidates:
            raw = entry.get(candidate.name)
            try:
                m = Measurement.from_json(raw) if raw else None
            except (KeyError, TypeError, ValueError):
                m = None
            if m is not None and m.source_hash == candidate.source_hash():
                found[candidate.name] = m
        return found

    def _attempt(self, problem: Problem, candidate, trial: Trial, check_only: bool = False) -> Measurement:
        """Run, check and (unless ``check_only``) time one candidate; failures scored, not raised."""
        h = candidate.source_hash()
        try:
            outcome = None
            for _ in range(1 if check_only else 2):  # the first call may build, compile or tune
                outcome = trial.run(candidate)
            wrong = trial.wrong(outcome)
            del outcome
            if wrong:
                self.say_once(f"wrong|{problem.op}|{candidate.name}|{problem.key}",
                              f"{candidate.name} gave a wrong answer for {problem.op} {problem.key}: {wrong}")
                return Measurement(False, h, reason=wrong)
            if check_only:
                return Measurement(True, h)
            timing = time_ms(lambda: trial.run(candidate), problem.device,
                             budget_s() / max(len(problem.candidates), 1))
            stats["timed_runs"] += timing.reps
            return Measurement(True, h, timing.median_ms, timing.spread_ms)
        except torch.OutOfMemoryError as exc:  # says nothing about the candidate
            return Measurement(False, h, reason=f"out of memory: {str(exc).splitlines()[0]}", durable=False)
        except CannotTake as exc:
            return Measurement(False, h, reason=f"cannot take this key: {exc}", durable=False)
        except TuningSettingError:
            raise
        except Exception as exc:  # a build or launch failure: out for the process
            reason = f"{problem.op} raised {first_line(exc)}"
            problem.on_failure(candidate.name, reason)
            return Measurement(False, h, reason=reason, durable=False)

    def _profile(self, problem: Problem, candidates: list, trial: Trial) -> dict[str, Measurement]:
        return {c.name: self._attempt(problem, c, trial) for c in candidates}

    def measure(self, problem: Problem, progress: Callable[[str], None] = lambda name: None) -> dict[str, Measurement]:
        """Check and time every candidate of ``problem`` afresh, as tuning would, remembering
        nothing (``mishops bench``'s table); ``progress(name)`` is called before each."""
        trial = problem.make_trial()
        found = {}
        for candidate in problem.candidates:
            progress(candidate.name)
            found[candidate.name] = self._attempt(problem, candidate, trial)
        del trial
        release_scratch(problem.device)
        return found

    def _first_correct(self, problem: Problem, order: list[str]) -> tuple[str, dict[str, Measurement]]:
        by_name = {c.name: c for c in problem.candidates}
        trial = problem.make_trial()
        checked = {}
        for name in order:
            checked[name] = self._attempt(problem, by_name[name], trial, check_only=True)
            if checked[name].ok:
                return name, checked
        return problem.fallback or order[0], checked

    @staticmethod
    def _retime_close_call(measured: dict[str, Measurement], by_name: dict, trial: Trial,
                           device: torch.device) -> list[str]:
        """When the two fastest are within ``RETIME_MARGIN``, time them again, interleaved; the names re-timed."""
        ok = sorted((m.median_ms, n) for n, m in measured.items() if m.ok and n in by_name)
        if len(ok) < 2 or ok[1][0] - ok[0][0] > RETIME_MARGIN * ok[0][0]:
            return []
        pair = [ok[0][1], ok[1][1]]
        try:
            timings = time_interleaved({n: (lambda c=by_name[n]: trial.run(c)) for n in pair}, device)
        except Exception as exc:  # both ran a moment ago; keep their first timings
            log.info("re-timing %s failed (%s); keeping the first timings", pair, first_line(exc))
            return []
        for n, t in timings.items():
            old = measured[n]
            measured[n] = Measurement(True, old.source_hash, t.median_ms, t.spread_ms, durable=old.durable)
        stats["timed_runs"] += sum(t.reps for t in timings.values())
        return pair


def _agree(label: str, measurements: dict[str, Measurement]) -> tuple[dict[str, Measurement], bool]:
    """Every rank gets the same merged timings (a candidate counts only if correct on all ranks);
    returns them and whether this rank is the one that writes its device's cache file."""
    dist = torch.distributed
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (label, {n: m.to_json() | {"durable": m.durable}
                                              for n, m in measurements.items()}))
    names = set.intersection(*(set(m) for _, m in gathered))
    merged = {}
    for name in sorted(names):
        per_rank = [(Measurement.from_json(m[name]), m[name]["durable"]) for _, m in gathered]
        durable = all(d for _, d in per_rank)
        if all(m.ok for m, _ in per_rank):
            merged[name] = Measurement(True, per_rank[0][0].source_hash,
                                       statistics.median(m.median_ms for m, _ in per_rank),
                                       max(m.spread_ms for m, _ in per_rank), durable=durable)
        else:
            merged[name] = Measurement(False, per_rank[0][0].source_hash, durable=durable,
                                       reason="; ".join(sorted({m.reason for m, _ in per_rank if not m.ok})))
    first_rank_of_label = min(r for r, (lab, _) in enumerate(gathered) if lab == label)
    return merged, dist.get_rank() == first_rank_of_label


#: the process's tuner: every op chooses through it.
TUNER = Tuner()


def tune(model: torch.nn.Module, example_input: torch.Tensor, train: bool = False) -> list[Choice]:
    """Make every choice ``model``'s forward needs for inputs like ``example_input`` -- with ``train``,
    also those of a training step (forward and backward) -- so that CUDA graph capture and the first
    training step find them made. Returns the choices this call made (none for keys already
    remembered in this process)."""
    before = TUNER.decided
    with torch.no_grad():
        model(example_input)
    if train:
        saved = {p: p.grad for p in model.parameters()}  # the step must leave no gradients behind
        with torch.enable_grad():
            out = model(example_input)
            outputs = [t for t in (out if isinstance(out, (tuple, list)) else [out])
                       if isinstance(t, torch.Tensor) and t.requires_grad]
            torch.autograd.backward(outputs, [torch.randn_like(t) for t in outputs])
        for p, grad in saved.items():
            p.grad = grad
    made = TUNER.decided - before
    return TUNER.last_choices()[-made:] if made else []
