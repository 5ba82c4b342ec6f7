import subprocess
import sys
import textwrap

import pytest
import torch

import mishops
from mishops import registry
from tests.fake_backends import Fast, Float16Only, Unavailable


@pytest.fixture
def fresh_names():
    added = []
    yield added
    for name in added:
        registry.unregister(name)


def test_builtins_registered_in_preference_order():
    names = list(mishops.registered_backends())
    assert "eager" in names
    priorities = [b.priority for b in mishops.registered_backends().values()]
    assert priorities == sorted(priorities)
    assert set(names) >= {"eager", "cuda", "triton", "cupy"}


def test_register_and_duplicate_name(fresh_names):
    registry.register(Fast)
    fresh_names.append(Fast.name)
    assert isinstance(registry.get(Fast.name), Fast)
    with pytest.raises(ValueError, match="already registered"):
        registry.register(Fast)
    registry.register(Fast(), replace=True)


def test_register_rejects_non_backends():
    with pytest.raises(TypeError, match="is not a mishops.registry.Backend"):
        registry.register(object)


def test_unavailable_backend_gives_its_reason(fresh_names):
    registry.register(Unavailable)
    fresh_names.append(Unavailable.name)
    ok = registry.availability(Unavailable.name)
    assert not ok and ok.reason == "needs a flux capacitor"


def test_not_supported_reasons_name_device_and_dtype(fresh_names):
    b = Float16Only()
    reasons = b.not_supported_reasons(torch.zeros(2, dtype=torch.float32))
    assert reasons and "dtype float32 not supported" in reasons[0] and "float16" in reasons[0]
    assert b.not_supported_reasons(torch.zeros(2, dtype=torch.float16)) == []
    cuda_only = registry.get("cuda")
    assert any("device type 'cpu'" in r for r in cuda_only.not_supported_reasons(torch.zeros(2)))


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="unknown backend 'nope'; valid names: .*eager"):
        registry.get("nope")


def test_source_hash_changes_with_kernel_source(tmp_path):
    src = tmp_path / "k.cu"
    src.write_text("one")

    class WithSource(Fast):
        name = "test_with_source"
        source_files = (src,)

    first = WithSource().source_hash()
    registry.source_hash_of.cache_clear()
    src.write_text("two")
    assert WithSource().source_hash() != first


def test_entry_point_backends_register(tmp_path):
    """A real installed distribution's entry point in the group ``mishops.backends`` is loaded."""
    (tmp_path / "plugin_mod.py").write_text(textwrap.dedent("""
        import torch.nn.functional as F
        from mishops.registry import Backend, FLOAT_DTYPES
        class PluginBackend(Backend):
            name = "plugin"
            dtypes = FLOAT_DTYPES
            any_strides = True
            def forward(self, x):
                return F.mish(F.mish(x))
    """))
    dist = tmp_path / "mishops_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mishops-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[mishops.backends]\nplugin = plugin_mod:PluginBackend\n"
                                           "broken = plugin_mod:DoesNotExist\n")
    code = textwrap.dedent("""
        import sys, torch, mishops
        from mishops import registry
        names = list(mishops.registered_backends())
        assert "plugin" in names, names
        print(registry.failures()["broken"])
        y = mishops.mish2(torch.randn(5), backend="plugin")
        print("ok", y.shape)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**__import__("os").environ, "PYTHONPATH": f"{tmp_path}:{__import__('os').getcwd()}"})
    assert out.returncode == 0, out.stderr
    assert "entry point 'plugin_mod:DoesNotExist' failed to load" in out.stdout
    assert "ok torch.Size([5])" in out.stdout
