"""The tuner's rules, through real ops and test-only candidates: trial inputs of its own, the pick rule,
failures by kind, the cache, and tuning ahead."""

import math

import pytest
import torch
import torch.nn.functional as F

import mishops
from mishops import registry, tuning
from mishops.tuning import Measurement, Problem, Tuner, pick
from tests.fake_backends import OomOnWide, SlowNoisy, WrongOnNaN, Zeros


@pytest.fixture
def register_backends():
    added = []

    def add(*classes):
        for cls in classes:
            registry.register(cls, replace=True)
            added.append(cls.name)

    yield add
    for name in added:
        registry.unregister(name)


def m(median, spread=0.0, ok=True):
    return Measurement(ok, "h", median, spread)


# --- the pick rule -------------------------------------------------------------------------------


def test_lowest_median_wins_whatever_the_priority():
    assert pick({"preferred": m(1.05, 0.1), "fast": m(1.0, 0.1)}, {"preferred": 0, "fast": 9}) == "fast"


def test_preferred_wins_only_within_margin_and_below_both_spreads():
    prio = {"preferred": 0, "fast": 9}
    assert pick({"preferred": m(1.01, 0.02), "fast": m(1.0, 0.02)}, prio) == "preferred"
    assert pick({"preferred": m(1.01, 0.02), "fast": m(1.0, 0.005)}, prio) == "fast"  # below one spread only
    assert pick({"preferred": m(1.03, 0.5), "fast": m(1.0, 0.5)}, prio) == "fast"  # past the 2% margin
    assert pick({"preferred": m(4.2, 7.5), "fast": m(0.013, 0.01)}, prio) == "fast"  # a wide spread buys nothing


def test_pick_ignores_the_wrong_and_is_deterministic():
    prio = {"a": 0, "b": 1, "c": 2}
    ms = {"a": m(math.inf, ok=False), "b": m(1.0, 0.1), "c": m(1.0, 0.1)}
    assert {pick(dict(reversed(list(ms.items()))), prio) for _ in range(5)} == {"b"}
    assert pick({"a": m(math.inf, ok=False)}, prio) is None


class _Named:
    """A candidate that is its name: what the tuner's own tests need of one."""

    def __init__(self, name, priority):
        self.name, self.priority = name, priority

    def source_hash(self):
        return "h"


class _CountingTrial:
    """Runs a candidate by counting its calls; every answer is right."""

    calls: dict[str, int] = {}

    def run(self, c):
        self.calls[c.name] = self.calls.get(c.name, 0) + 1
        return c.name

    def wrong(self, outcome):
        return ""


def test_close_call_is_retimed_interleaved(monkeypatch):
    calls = {"a": 0, "b": 0}
    monkeypatch.setattr(_CountingTrial, "calls", calls)
    tuner = Tuner()
    problem = Problem("test", "k", torch.device("cpu"), [_Named("a", 0), _Named("b", 1)], _CountingTrial)
    choice = tuner.decide(problem)
    # two warm-up calls, the timed ones, then (the timings of two no-ops are within 2%) the interleaved ones
    assert calls["a"] >= 2 + 5 + tuning.RETIME_REPS and calls["b"] >= 2 + 5 + tuning.RETIME_REPS
    assert choice.winner in ("a", "b") and choice.how == "profiled"


@pytest.mark.parametrize("slower_ms,retimed", [(1.05, True), (1.09, True), (1.15, False)])
def test_the_two_fastest_are_retimed_when_within_the_retime_margin(monkeypatch, slower_ms, retimed):
    """Within RETIME_MARGIN the interleaved timings decide (here they reverse the order); beyond it the
    first timings stand."""
    monkeypatch.setattr(_CountingTrial, "calls", {})
    first = {"a": tuning.Timing(1.00, 0.0, 5), "b": tuning.Timing(slower_ms, 0.0, 5)}
    monkeypatch.setattr(tuning, "time_ms", lambda fn, device, budget: first[fn()])
    monkeypatch.setattr(tuning, "time_interleaved", lambda fns, device: {
        "a": tuning.Timing(1.2, 0.0, 30), "b": tuning.Timing(1.0, 0.0, 30)})
    problem = Problem("test", "k", torch.device("cpu"), [_Named("a", 0), _Named("b", 1)], _CountingTrial)
    assert Tuner().decide(problem).winner == ("b" if retimed else "a")


def test_a_choice_needed_on_another_thread_while_tuning_is_made(monkeypatch):
    """A plan's backward runs on autograd's device thread (CUDA) and asks for its backends while the
    plan's own key is tuning on the caller's thread: the inner choice must not wait for the outer."""
    import threading

    tuner = Tuner()
    inner = Problem("inner", "k2", torch.device("cpu"), [_Named("c", 0)], _CountingTrial)
    answers = []

    class NestedOnAnotherThread(_CountingTrial):
        def run(self, c):
            worker = threading.Thread(target=lambda: answers.append(tuner.choose("inner", lambda: inner)))
            worker.start()
            worker.join(timeout=20)
            assert not worker.is_alive(), "the inner choice waited for the outer key's tuning"
            return super().run(c)

    monkeypatch.setattr(_CountingTrial, "calls", {})
    outer = Problem("outer", "k1", torch.device("cpu"), [_Named("a", 0), _Named("b", 1)], NestedOnAnotherThread)
    assert tuner.choose("outer", lambda: outer).winner in ("a", "b")
    assert answers and {a.winner for a in answers} == {"c"}


def test_a_new_process_reads_the_numbers_a_close_call_was_decided_by(monkeypatch):
    """The interleaved re-timing reverses a close first timing; the disk must keep the re-timed
    numbers, or the next process (a fresh tuner over the same cache) picks the other candidate."""
    monkeypatch.setattr(_CountingTrial, "calls", {})
    first = {"a": tuning.Timing(1.00, 0.0, 5), "b": tuning.Timing(1.01, 0.0, 5)}
    monkeypatch.setattr(tuning, "time_ms", lambda fn, device, budget: first[fn()])
    monkeypatch.setattr(tuning, "time_interleaved", lambda fns, device: {
        "a": tuning.Timing(2.0, 0.0, 30), "b": tuning.Timing(1.0, 0.0, 30)})
    problem = Problem("test", "k", torch.device("cpu"), [_Named("a", 0), _Named("b", 1)], _CountingTrial)
    assert Tuner().decide(problem).winner == "b"
    again = Tuner().decide(problem)
    assert again.how == "cached" and again.winner == "b"


# --- candidates are judged on inputs of their own ------------------------------------------------


@pytest.mark.parametrize("first_input", ["zeros", "random"])
def test_a_backend_returning_zeros_is_never_chosen(register_backends, first_input):
    register_backends(Zeros)
    x = torch.zeros(64, 64) if first_input == "zeros" else torch.randn(64, 64)
    mishops.mish2(x)
    choice = mishops.last_choices()[-1]
    assert choice.winner != "test_zeros" and not choice.measurements["test_zeros"].ok
    later = torch.randn(64, 64) * 4
    torch.testing.assert_close(mishops.mish2(later), F.mish(F.mish(later)))


def test_a_slow_noisy_backend_with_best_priority_is_never_chosen(register_backends):
    register_backends(SlowNoisy)
    mishops.mish2(torch.randn(32, 32))
    choice = mishops.last_choices()[-1]
    assert choice.measurements["test_slow_noisy"].ok
    assert choice.winner == "eager", choice.summary()


def test_out_of_memory_skips_that_key_only(register_backends):
    register_backends(OomOnWide)
    mishops.mish2(torch.randn(8, 64))
    wide = mishops.last_choices()[-1]
    assert wide.winner == "eager" and wide.measurements["test_oom_on_wide"].reason.startswith("out of memory")
    assert "test_oom_on_wide" not in registry.failures()  # not out for the process
    mishops.mish2(torch.randn(8, 8))
    narrow = mishops.last_choices()[-1]
    assert narrow.measurements["test_oom_on_wide"].ok
    # nothing about the wide key's out-of-memory went to disk: a new process tries it again
    tuning.TUNER.clear()
    mishops.mish2(torch.randn(8, 64))
    assert mishops.last_choices()[-1].how == "profiled"


def test_a_backend_wrong_only_on_nan_is_out(register_backends):
    register_backends(WrongOnNaN)
    mishops.mish2(torch.randn(16, 16))
    choice = mishops.last_choices()[-1]
    assert not choice.measurements["test_wrong_on_nan"].ok
    assert "wrong answer" in choice.measurements["test_wrong_on_nan"].reason


def test_trial_input_has_the_keys_layout_and_the_special_values():
    like = torch.empty(4, 5, 6, 7).to(memory_format=torch.channels_last)
    x = mishops.dispatch.trial_input(like)
    assert x.stride() == like.stride() and x.dtype == like.dtype
    flat = x.permute(0, 2, 3, 1).reshape(-1)
    assert flat[0].isnan() and flat[1] == math.inf and flat[2] == -math.inf
    assert flat[20:].std() > 1.0  # random beyond the specials


def test_trial_input_of_an_expanded_key_shares_its_elements_as_the_key_does():
    """An expanded input (stride 0) cannot be filled in place; the tuner must still judge it."""
    like = torch.randn(1, 6).expand(5, 6)
    x = mishops.dispatch.trial_input(like)
    assert x.stride() == like.stride() and torch.equal(x[0].nan_to_num(), x[4].nan_to_num())
    y = mishops.mish2(like)
    torch.testing.assert_close(y, F.mish(F.mish(like)))


# --- environment ---------------------------------------------------------------------------------


def test_bad_budget_is_one_line_naming_the_variable(monkeypatch):
    monkeypatch.setenv("MISHOPS_TUNE_BUDGET_MS", "abc")
    with pytest.raises(tuning.TuningSettingError, match=r"^mishops: MISHOPS_TUNE_BUDGET_MS='abc' is not a number"):
        tuning.budget_s()


@pytest.mark.parametrize("value", ["auto", "AUTO", " Auto "])
def test_mishops_backend_auto_means_auto(monkeypatch, value):
    monkeypatch.setenv("MISHOPS_BACKEND", value)
    x = torch.randn(5)
    torch.testing.assert_close(mishops.mish2(x), F.mish(F.mish(x)))


def test_backend_names_are_case_insensitive(monkeypatch):
    monkeypatch.setenv("MISHOPS_BACKEND", "EAGER")
    x = torch.randn(5)
    torch.testing.assert_close(mishops.mish2(x, backend="eager"), F.mish(F.mish(x)))


def test_env_named_backend_error_names_the_variable(monkeypatch):
    monkeypatch.setenv("MISHOPS_BACKEND", "cuda")
    with pytest.raises(mishops.NoBackendError) as err:
        mishops.mish2(torch.randn(3), backend="eager")
    first = str(err.value).splitlines()[0]
    assert first.startswith("mishops: MISHOPS_BACKEND=cuda cannot run mish2 forward") and len(first) <= 200


# --- capability per device -----------------------------------------------------------------------


def test_device_reasons_are_asked_once_per_device(register_backends):
    asked = []

    class PerDevice(Zeros):
        name = "test_per_device"

        def device_reasons(self, device):
            asked.append(device)
            return ["not on this one"]

    register_backends(PerDevice)
    for _ in range(3):
        assert registry.BACKENDS.reasons("test_per_device", torch.device("cpu")) == ["not on this one"]
    assert registry.BACKENDS.reasons("test_per_device", torch.device("meta")) == ["not on this one"]
    assert asked == [torch.device("cpu"), torch.device("meta")]


# --- tuning ahead --------------------------------------------------------------------------------


def test_tune_a_model_makes_every_choice_its_forward_and_backward_need():
    model = torch.nn.Sequential(mishops.ModelNew(3, 4, 3), mishops.ModelNew(4, 2, 3))
    x = torch.randn(2, 3, 12, 12)
    choices = mishops.tune(model, x, train=True)
    ops = {c.op for c in choices}
    assert "block" in ops and any(c.key.endswith("|train=w,b") for c in choices)
    profiled = tuning.stats["profiled_keys"]
    with torch.no_grad():
        model(x)
    model(x).sum().backward()
    assert tuning.stats["profiled_keys"] == profiled  # all cached by tune
