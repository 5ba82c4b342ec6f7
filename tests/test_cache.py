import json
import os
import subprocess
import sys

import pytest
import torch

import mishops
from mishops import cache, registry, tuning
from tests.fake_backends import Fast, Slow


def run_worker(*shapes, env=None):
    out = subprocess.run([sys.executable, "-m", "tests.tune_worker", *shapes], capture_output=True, text=True,
                         env={**os.environ, **(env or {})}, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1]), out.stderr


@pytest.fixture
def fakes():
    registry.register(Fast, replace=True)
    registry.register(Slow, replace=True)
    yield
    registry.unregister(Fast.name)
    registry.unregister(Slow.name)


def test_choice_survives_a_new_process():
    first, _ = run_worker("8x8")
    assert first["stats"]["profiled_keys"] == 1
    second, _ = run_worker("8x8")
    assert second["stats"]["profiled_keys"] == 0 and second["stats"]["timed_runs"] == 0
    assert list(second["choices"].values())[0][1] == "cached"
    assert list(first["choices"].values())[0][0] == list(second["choices"].values())[0][0]
    files = cache.all_cache_files()
    assert len(files) == 1
    assert json.loads(files[0].read_text())["entries"]


def test_cache_file_is_keyed_by_environment():
    env = cache.environment("cpu test")
    other = dict(env, torch="0.0.1")
    assert cache.cache_file(env) != cache.cache_file(other)
    assert cache.cache_file(env) != cache.cache_file(dict(env, device="NVIDIA H100 sm90"))
    assert cache.cache_dir() == cache.cache_file(env).parent


def test_version_change_invalidates(fakes, monkeypatch):
    x = torch.randn(9)
    mishops.mish2(x)
    assert tuning.stats["profiled_keys"] == 1
    tuning.TUNER.clear()
    real = cache.environment
    monkeypatch.setattr(cache, "environment", lambda device: dict(real(device), torch="9.9.9"))
    mishops.mish2(x)
    assert tuning.stats["profiled_keys"] == 2
    assert len(cache.all_cache_files()) == 2


def test_source_change_retimes_only_that_backend(fakes, monkeypatch):
    x = torch.randn(10)
    mishops.mish2(x)
    tuning.TUNER.clear()
    monkeypatch.setattr(Slow, "source_hash", lambda self: "changed")
    mishops.mish2(x)
    choice = tuning.TUNER.last_choices()[-1]
    assert choice.how == "profiled"
    entry = cache.DiskCache(cache.environment(tuning.device_label(x.device))).read()[choice.key]
    assert entry["test_slow"]["hash"] == "changed"
    assert entry["test_fast"]["hash"] == Fast().source_hash()
    assert tuning.stats["profiled_keys"] == 2


def test_sixteen_cold_processes_lose_no_entries():
    shapes = [[f"{i + 2}x{j + 3}" for j in range(2)] for i in range(16)]
    procs = [subprocess.Popen([sys.executable, "-m", "tests.tune_worker", *s], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
             for s in shapes]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    (path,) = cache.all_cache_files()
    entries = json.loads(path.read_text())["entries"]
    want = {f"forward|float32|({s.replace('x', ', ')})" for group in shapes for s in group}
    got = {k.rsplit("|", 1)[0] for k in entries}
    assert want <= got
    assert not list(path.parent.glob("*.tmp"))


@pytest.mark.parametrize("content", [b"", b"{\"entries\": {", b"\x00\xff garbage \x13", b"[1, 2]",
                                     b'{"environment": {"format": "999"}, "entries": {}}',
                                     b'{"environment": {"format": "1", "device": "NVIDIA B200 sm100"}, "entries": {}}'],
                         ids=["empty", "truncated", "random-bytes", "not-a-table", "future-format", "other-gpu"])
def test_damaged_cache_warns_once_and_is_rebuilt(fakes, content):
    x = torch.randn(11)
    path = cache.cache_file(cache.environment(tuning.device_label(x.device)))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    with pytest.warns(RuntimeWarning, match="damaged tuning cache") as record:
        mishops.mish2(x)
        mishops.mish2(torch.randn(12))
    assert len([r for r in record if "damaged" in str(r.message)]) == 1
    doc = json.loads(path.read_text())
    assert doc["environment"]["format"] == str(cache.FORMAT_VERSION) and len(doc["entries"]) == 2


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_cache_dir_works_in_memory(fakes, tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    monkeypatch.setenv("MISHOPS_CACHE_DIR", str(ro / "sub"))
    with pytest.warns(RuntimeWarning, match="cannot write tuning cache"):
        mishops.mish2(torch.randn(13))


def test_unwritable_cache_dir_works_in_memory(fakes, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("MISHOPS_CACHE_DIR", str(blocker / "cache"))
    x = torch.randn(14)
    with pytest.warns(RuntimeWarning, match="cannot (read|write) tuning cache") as record:
        mishops.mish2(x)
        mishops.mish2(torch.randn(15))
    assert len(record) == 1
    mishops.mish2(x)
    assert tuning.stats["profiled_keys"] == 2  # remembered in memory


def test_cli_cache_show_and_clear(fakes, capsys):
    from mishops.cli import main

    mishops.mish2(torch.randn(16))
    assert main(["cache", "show"]) == 0
    out = capsys.readouterr().out
    assert "forward|float32|(16,)" in out and "test_slow" in out
    assert main(["cache", "clear"]) == 0
    assert cache.all_cache_files() == []
