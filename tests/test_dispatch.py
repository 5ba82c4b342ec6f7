import logging
import threading

import pytest
import torch
import torch.nn.functional as F

import mishops
from mishops import dispatch, registry, tuning
from mishops.dispatch import NoBackendError
from tests.fake_backends import Broken, Fast, Float16Only, Slow, Unavailable, Wrong


@pytest.fixture
def fakes(request):
    """Register the test-only backends named by the test's parameter list."""
    classes = request.param if hasattr(request, "param") else (Fast, Slow, Wrong)
    for cls in classes:
        registry.register(cls, replace=True)
    yield
    for cls in classes:
        registry.unregister(cls.name)


def x_cpu(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype) * 4


@pytest.mark.parametrize("fakes", [(Fast, Slow, Wrong)], indirect=True)
def test_slow_and_wrong_are_never_chosen_and_wrong_is_explained(fakes, caplog):
    x = x_cpu(64, 33)
    with caplog.at_level(logging.WARNING, logger="mishops"):
        y = mishops.mish2(x)
    torch.testing.assert_close(y, F.mish(F.mish(x)))
    choice = mishops.last_choices()[-1]
    assert choice.how == "profiled"
    assert choice.winner in {"test_fast", "eager"}
    assert choice.measurements["test_slow"].median_ms > 15
    wrong = choice.measurements["test_wrong"]
    assert not wrong.ok and "wrong answer" in wrong.reason
    assert "test_wrong gave a wrong answer" in caplog.text


@pytest.mark.parametrize("fakes", [(Fast, Slow)], indirect=True)
def test_cache_prevents_reprofiling_and_keys_differ(fakes):
    x = x_cpu(8, 16)
    mishops.mish2(x)
    assert tuning.stats["profiled_keys"] >= 1
    before = tuning.stats["profiled_keys"]
    for _ in range(3):
        mishops.mish2(x_cpu(8, 16))
    assert tuning.stats["profiled_keys"] == before
    assert len(tuning.TUNER.last_choices()) == 1
    mishops.mish2(x_cpu(8, 16, dtype=torch.float64))       # dtype
    mishops.mish2(x_cpu(8, 17))                            # shape
    mishops.mish2(x_cpu(16, 8).t())                        # strides
    keys = [c.key for c in tuning.TUNER.last_choices()]
    assert len(set(keys)) == 4
    assert tuning.stats["profiled_keys"] == before + 3


def test_key_string_has_dtype_shape_strides():
    assert dispatch.key_string("forward", torch.zeros(2, 3).t()) == "forward|float32|(3, 2)|(1, 3)"


@pytest.mark.parametrize("fakes", [(Fast, Slow)], indirect=True)
def test_named_backend_is_used_without_profiling(fakes):
    y = mishops.mish2(x_cpu(4, 4), backend="test_slow")
    assert y.shape == (4, 4)
    assert tuning.stats["profiled_keys"] == 0


@pytest.mark.parametrize("fakes", [(Fast, Slow)], indirect=True)
def test_env_override_beats_code_and_unknown_name_is_clear(fakes, monkeypatch):
    monkeypatch.setenv("MISHOPS_BACKEND", "test_fast")
    calls = []
    monkeypatch.setattr(Fast, "forward", lambda self, x: calls.append(1) or F.mish(F.mish(x)))
    mishops.mish2(x_cpu(3), backend="eager")
    assert calls == [1]
    monkeypatch.setenv("MISHOPS_BACKEND", "bogus")
    with pytest.raises(ValueError, match=r"MISHOPS_BACKEND='bogus' names no backend; valid names: auto, .*test_fast.*eager"):
        mishops.mish2(x_cpu(3))


@pytest.mark.parametrize("fakes", [(Unavailable, Float16Only)], indirect=True)
def test_named_unavailable_backend_error_lists_every_reason(fakes):
    with pytest.raises(NoBackendError) as err:
        mishops.mish2(x_cpu(3), backend="test_unavailable")
    msg = str(err.value)
    lines = msg.splitlines()
    assert "float32" in lines[0] and "shape (3,)" in lines[0]
    assert lines[1].startswith("  test_unavailable (requested): unavailable: needs a flux capacitor")
    assert "test_fp16only: dtype float32 not supported" in msg
    assert "eager: supported" in msg
    assert "mishops info" in lines[-1]


def test_unsupported_dtype_is_one_clear_error():
    with pytest.raises(NoBackendError) as err:
        mishops.mish2(torch.arange(4))
    assert str(err.value) == "mishops: int64 input: mish2 needs a floating-point tensor"


@pytest.mark.parametrize("fakes", [(Broken, Fast)], indirect=True)
def test_broken_backend_falls_back_and_records_reason(fakes):
    x = x_cpu(5, 5)
    torch.testing.assert_close(mishops.mish2(x), F.mish(F.mish(x)))
    assert "simulated build failure" in registry.failures()["test_broken"]
    assert not registry.availability("test_broken")
    with pytest.raises(NoBackendError, match="simulated build failure"):
        mishops.mish2(x, backend="test_broken")


@pytest.mark.parametrize("fakes", [(Broken, Fast)], indirect=True)
def test_chosen_backend_breaking_later_falls_back(fakes, monkeypatch):
    monkeypatch.setenv("MISHOPS_AUTOTUNE", "0")
    monkeypatch.setattr(Broken, "forward", lambda self, x: F.mish(F.mish(x)))
    mishops.mish2(x_cpu(4))
    assert tuning.TUNER.last_choices()[-1].winner == "test_broken"
    monkeypatch.setattr(Broken, "forward", lambda self, x: (_ for _ in ()).throw(RuntimeError("launch failed")))
    x = x_cpu(4)
    torch.testing.assert_close(mishops.mish2(x), F.mish(F.mish(x)))
    assert "launch failed" in registry.failures()["test_broken"]


@pytest.mark.parametrize("fakes", [(Fast, Slow)], indirect=True)
def test_autotune_off_uses_preference_order(fakes, monkeypatch):
    monkeypatch.setenv("MISHOPS_AUTOTUNE", "0")
    mishops.mish2(x_cpu(4))
    choice = tuning.TUNER.last_choices()[-1]
    assert choice.winner == "test_slow" and choice.how == "checked"
    assert tuning.stats["profiled_keys"] == 0


@pytest.mark.parametrize("fakes", [(Fast, Slow)], indirect=True)
def test_log_env_prints_each_candidate(fakes, monkeypatch, capsys):
    monkeypatch.setenv("MISHOPS_LOG", "INFO")
    mishops.mish2(x_cpu(6))
    err = capsys.readouterr().err
    assert "-> " in err and "test_slow" in err and " ms" in err


@pytest.mark.parametrize("fakes", [(Fast, Slow)], indirect=True)
def test_profiling_leaves_the_callers_input_untouched(fakes, monkeypatch):
    def scribble(self, x):
        x.fill_(7.0)  # a careless backend that writes its input
        return F.mish(F.mish(x))

    monkeypatch.setattr(Slow, "forward", scribble)
    x = x_cpu(32)
    before = x.clone()
    mishops.mish2(x)
    assert torch.equal(x, before)


@pytest.mark.parametrize("fakes", [(Fast, Slow)], indirect=True)
def test_two_threads_on_a_cold_key_profile_once(fakes):
    x = x_cpu(40)
    barrier = threading.Barrier(4)
    results = []

    def worker():
        barrier.wait()
        results.append(mishops.mish2(x))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert tuning.stats["profiled_keys"] == 1
    assert all(torch.equal(r, results[0]) for r in results)


def test_backward_op_has_its_own_key():
    x = x_cpu(7).requires_grad_()
    mishops.mish2(x).sum().backward()
    ops = [c.op for c in tuning.TUNER.last_choices()]
    assert ops == ["mish2 forward", "mish2 backward"]


@pytest.mark.parametrize("fakes", [(Fast, Slow)], indirect=True)
def test_non_dense_input_is_densified_for_kernels(fakes, monkeypatch):
    seen = []

    class Dense(Fast):
        name = "test_dense_only"
        any_strides = False

        def forward(self, x):
            seen.append(x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last))
            return F.mish(F.mish(x))

    registry.register(Dense)
    try:
        x = x_cpu(6, 8)[:, ::2]
        y = mishops.mish2(x, backend="test_dense_only")
        torch.testing.assert_close(y, F.mish(F.mish(x)))
        assert seen == [True]
    finally:
        registry.unregister("test_dense_only")


@pytest.mark.parametrize("fakes", [(Fast, Slow)], indirect=True)
def test_tuning_budget_bounds_the_timing(fakes, monkeypatch):
    """test_slow takes 20 ms a call: a 1 ms budget leaves it the floor of 5 timed calls, 3 s about 50."""
    monkeypatch.setenv("MISHOPS_TUNE_BUDGET_MS", "1")
    mishops.mish2(x_cpu(50))
    assert tuning.TUNER.last_choices()[-1].tuning_s < 0.6
    monkeypatch.setenv("MISHOPS_TUNE_BUDGET_MS", "3000")
    mishops.mish2(x_cpu(51))
    assert tuning.TUNER.last_choices()[-1].tuning_s > 0.9
