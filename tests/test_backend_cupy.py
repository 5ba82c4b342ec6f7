"""The CuPy backend: its availability reasons (CPU, run everywhere) and its kernels (GPU).

Every GPU result is checked element by element against float64 F.mish / autograd, with NaN and
infinity positions required to match exactly and outputs poisoned beforehand, so an element a
kernel skips cannot pass.
"""

import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

from mishops import dispatch, registry
from mishops.backends import cupy as cupy_backend
from mishops.backends.cupy import CupyBackend
from mishops.layout import flat
from mishops.registry import KERNEL_DTYPES, Availability
from tests.reference import SPECIAL_VALUES, mish2_f64, mish2_grad_f64, special_input

REPO = Path(__file__).resolve().parent.parent
HAS_CUPY = importlib.util.find_spec("cupy") is not None
needs_cupy = pytest.mark.skipif(not HAS_CUPY, reason="cupy is not installed (pip install mishops[cupy13] or "
                                                     "mishops[cupy12])")
backend = CupyBackend()
eager = registry.get("eager")


def _reason_in_subprocess(pythonpath_first: Path) -> str:
    """is_available().reason in a fresh interpreter that sees ``pythonpath_first`` before all else."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(pythonpath_first), str(REPO)]))
    code = "from mishops.backends.cupy import CupyBackend; print(CupyBackend().is_available().reason)"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def _fake_distribution(root: Path, dist_name: str, version: str) -> None:
    info = root / f"{dist_name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist_name}\nVersion: {version}\n")


def _fake_cupy(runtime_version: int = 13000, raw_module=None) -> types.ModuleType:
    """A stand-in ``cupy`` module with just what is_available touches."""
    fake = types.ModuleType("cupy")
    runtime = types.SimpleNamespace(runtimeGetVersion=lambda: runtime_version)
    fake.cuda = types.SimpleNamespace(runtime=runtime, Device=lambda index: _NullContext())
    fake.RawModule = raw_module
    return fake


class _NullContext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# --- CPU: registration and availability reasons ------------------------------------------------


def test_registered_with_declared_capabilities():
    found = registry.get("cupy")
    assert isinstance(found, CupyBackend)
    assert found.devices == frozenset({"cuda"}) and found.dtypes == KERNEL_DTYPES and found.priority == 30
    assert found.not_supported_reasons(torch.zeros(2)) == ["device type 'cpu' not supported (runs on ['cuda'])"]


def test_import_mishops_does_not_import_cupy():
    code = "import sys, mishops; mishops.registry.backends(); print('cupy' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(REPO)),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


@pytest.mark.skipif(HAS_CUPY, reason="cupy is installed here")
def test_not_installed_here_says_how_to_install():
    reason = registry.availability("cupy").reason
    assert reason == "cupy is not installed: pip install mishops[cupy13] (CUDA 13) or mishops[cupy12]"


def test_not_installed_reason_even_where_cupy_is(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # makes `import cupy` raise ModuleNotFoundError
    assert backend.is_available() == Availability.no(cupy_backend.NOT_INSTALLED)


def test_a_missing_dependency_of_cupy_is_named_not_cupy(tmp_path):
    package = tmp_path / "cupy"
    package.mkdir()
    (package / "__init__.py").write_text("import fastrlock_that_is_missing\n")
    reason = _reason_in_subprocess(tmp_path)
    assert reason == "import cupy failed: ModuleNotFoundError: No module named 'fastrlock_that_is_missing'"


def test_import_error_gives_its_first_line_and_resolves_the_real_package(tmp_path):
    # The fake top-level `cupy` is what the backend imports, not mishops/backends/cupy.py itself.
    package = tmp_path / "cupy"
    package.mkdir()
    (package / "__init__.py").write_text(textwrap.dedent('''
        raise ImportError("libnvrtc.so.13: cannot open shared object file: No such file or directory\\n"
                          "CuPy failed to load libnvrtc.so.13")
    '''))
    reason = _reason_in_subprocess(tmp_path)
    assert reason == ("import cupy failed: ImportError: libnvrtc.so.13: cannot open shared object file: "
                      "No such file or directory")


def test_two_cupy_wheels_are_named(tmp_path):
    _fake_distribution(tmp_path, "cupy-cuda12x", "13.0.0")
    _fake_distribution(tmp_path, "cupy-cuda13x", "14.0.0")
    reason = _reason_in_subprocess(tmp_path)
    assert reason.startswith("several CuPy packages installed: ")
    assert "cupy-cuda12x 13.0.0" in reason and "cupy-cuda13x 14.0.0" in reason
    assert reason.endswith("uninstall all but one")


def test_cupy_distributions_reads_metadata_and_ignores_lookalikes(tmp_path):
    _fake_distribution(tmp_path / "a", "cupy-cuda12x", "13.3.0")
    _fake_distribution(tmp_path / "a", "cupy-xarray", "0.1.4")      # a plugin, not a CuPy build
    _fake_distribution(tmp_path / "a", "cupy-rocm-6-0", "13.3.0")
    _fake_distribution(tmp_path / "b", "cupy-cuda12x", "13.0.0")    # same name later on the path
    found = cupy_backend._cupy_distributions([str(tmp_path / "a"), str(tmp_path / "b")])
    assert sorted(found) == ["cupy-cuda12x 13.3.0", "cupy-rocm-6-0 13.3.0"]
    _fake_distribution(tmp_path / "c", "cupy", "13.3.0")             # a source build
    assert cupy_backend._cupy_distributions([str(tmp_path / "c")]) == ["cupy 13.3.0"]
    assert cupy_backend._cupy_distributions([str(tmp_path / "empty")]) == []


@pytest.mark.parametrize("cupy_runtime,torch_cuda,expected", [
    (12080, "13.0", "CuPy is built for CUDA 12 but torch uses CUDA 13: uninstall that CuPy wheel and "
                    "pip install cupy-cuda13x"),
    (13000, "12.8", "CuPy is built for CUDA 13 but torch uses CUDA 12: uninstall that CuPy wheel and "
                    "pip install cupy-cuda12x"),
    (12040, "12.8", None),
    (13000, "13.0", None),
    (13000, None, "torch is not built with CUDA (torch.version.cuda is None)"),
])
def test_cuda_major_mismatch(cupy_runtime, torch_cuda, expected):
    assert cupy_backend._cuda_major_mismatch(cupy_runtime, torch_cuda) == expected


def test_no_gpu_reason(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert backend.is_available() == Availability.no("no CUDA GPU: torch.cuda.is_available() is False")


def test_cuda_major_mismatch_reaches_is_available(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(runtime_version=12080))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    reason = backend.is_available().reason
    assert reason.startswith("CuPy is built for CUDA 12 but torch uses CUDA 13")


def test_compile_failure_is_the_reason(monkeypatch):
    def raw_module(**kwargs):
        assert kwargs["code"] == cupy_backend.kernel_source() and kwargs["options"] == cupy_backend.COMPILE_OPTIONS
        raise RuntimeError("nvrtc: error: failed to open libnvrtc-builtins.so.13.0\nmore detail")

    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(raw_module=raw_module))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    cupy_backend._module.cache_clear()
    cupy_backend._kernel.cache_clear()
    try:
        reason = backend.is_available().reason
    finally:
        cupy_backend._module.cache_clear()
        cupy_backend._kernel.cache_clear()
    assert reason == ("CuPy could not build the kernels: RuntimeError: nvrtc: error: failed to open "
                      "libnvrtc-builtins.so.13.0")


def test_is_available_never_raises(monkeypatch):
    def broken(path=None):
        raise OSError("metadata unreadable")

    monkeypatch.setattr(cupy_backend, "_cupy_distributions", broken)
    assert backend.is_available() == Availability.no("CuPy check failed: OSError: metadata unreadable")


def test_kernel_names_cover_every_dtype_both_ops_and_both_widths():
    assert len(cupy_backend.KERNEL_NAMES) == 2 * 3 * 2
    for dtype in KERNEL_DTYPES:
        for op in ("forward", "backward"):
            assert cupy_backend._kernel_name(op, dtype, 16 // dtype.itemsize) in cupy_backend.KERNEL_NAMES
            assert cupy_backend._kernel_name(op, dtype, 1) in cupy_backend.KERNEL_NAMES


NVCC = shutil.which("nvcc") or next((p for p in ["/usr/local/cuda/bin/nvcc"] if os.path.exists(p)), None)


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (the kernel source is compiled by NVRTC on GPU machines)")
def test_kernel_source_compiles_to_16_byte_accesses_and_fast_math(tmp_path):
    """nvcc's front end is NVRTC's: the source must build as-is, with no header, and the 16-byte
    instantiations must move whole 16-byte vectors while the math uses the fast exp and reciprocal,
    as few of them as csrc/mish_math.cuh promises: per element one exp (fp32: the inner Mish's; the
    outer's is a polynomial) or two (16-bit), and a quarter of a reciprocal per Mish in a pack."""
    instantiate = "\n".join(f"void* kernel_{i} = (void*)&{name};" for i, name in enumerate(cupy_backend.KERNEL_NAMES))
    source = tmp_path / "mish2.cu"
    source.write_text(cupy_backend.kernel_source() + "\n" + instantiate + "\n")
    ptx = tmp_path / "mish2.ptx"
    options = [*cupy_backend.COMPILE_OPTIONS, "-ftz=true"]  # CuPy always adds -ftz=true
    done = subprocess.run([NVCC, "-ptx", "-arch=sm_90", *options, str(source), "-o", str(ptx)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    text = ptx.read_text()
    entries = text.split(".visible .entry ")[1:]
    assert len(entries) == len(cupy_backend.KERNEL_NAMES)
    for body in entries:
        vec = 4 if "Li4E" in body[:60] else 8 if "Li8E" in body[:60] else 1
        assert (".v4." in body) == (vec > 1), body[:60]
        assert "div.rn.f32" not in body and "div.full" not in body and "div.approx" not in body
        packs = cupy_backend._PACKS
        elements = packs * vec + (vec > 1)  # the packs a thread takes, and the one-element tail
        exps_per_element = 1 if "Float32" in body[:60] else 2
        assert body.count("ex2.approx.ftz.f32") == exps_per_element * elements, body[:60]
        assert body.count("rcp.approx.ftz.f32") == 2 * (packs * max(vec // 4, 1) + (vec > 1)), body[:60]


# --- GPU: the kernels --------------------------------------------------------------------------

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
#: max of |y - ref| / max(1, |ref|): fp32 a few ulp (fast exp and division), half types one ulp
#: of their own (the fp32 result rounded once).
TOLERANCE = {torch.float32: 4e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
CHUNK = 1 << 26


def _poison_allocator(nbytes: int, device) -> None:
    """Leave a freed block of all-ones bytes (NaN in every float type) where the next output of that
    size will be allocated, so elements a kernel fails to write stay NaN."""
    block = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=device).fill_(0xFF)
    del block


def _run(op: str, x: torch.Tensor, g: torch.Tensor | None = None) -> torch.Tensor:
    _poison_allocator(x.nbytes, x.device)
    return backend.forward(x) if op == "forward" else backend.backward(x, g)


def _errors(op: str, out: torch.Tensor, x: torch.Tensor, g: torch.Tensor | None = None) -> tuple[float, float]:
    """Checks every element of ``out`` (NaN and infinities exactly) against float64; returns the max
    error |y - ref| / max(1, |ref|) of ``out`` and of the eager backend on the same input."""
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    assert out.stride() == x.stride()  # same layout, so storage slot i of out is element i of x's storage
    fx, fo = flat(x), flat(out)
    fg = flat(g) if g is not None else None
    worst = worst_eager = 0.0
    for start in range(0, fx.numel(), CHUNK):
        xs, ys = fx[start:start + CHUNK], fo[start:start + CHUNK].double()
        gs = fg[start:start + CHUNK] if fg is not None else None
        ref = mish2_f64(xs) if op == "forward" else mish2_grad_f64(xs, gs)
        nan_differs = ys.isnan() != ref.isnan()
        if bool(nan_differs.any()):
            i = int(nan_differs.nonzero()[0])
            raise AssertionError(f"{op} {x.dtype}: NaN mismatch at storage index {start + i}: x={float(xs[i])}, "
                                 f"got {float(ys[i])}, expected {float(ref[i])}")
        err = _relative_error(ys, ref)
        if float(err.max()) > TOLERANCE[x.dtype]:
            i = int(err.argmax())
            raise AssertionError(f"{op} {x.dtype}: error {float(err[i]):.3g} at storage index {start + i}: "
                                 f"x={float(xs[i])}, got {float(ys[i])}, expected {float(ref[i])}")
        theirs = eager.forward(xs) if op == "forward" else eager.backward(xs, gs)
        worst = max(worst, float(err.max()))
        worst_eager = max(worst_eager, float(_relative_error(theirs.double(), ref).max()))
    return worst, worst_eager


def _relative_error(got: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """|got - ref| / max(1, |ref|); 0 where both agree exactly (equal infinities, both NaN), inf
    where only one is NaN."""
    err = (got - ref).abs() / ref.abs().clamp_min(1.0)
    err = torch.where((got == ref) | (got.isnan() & ref.isnan()), 0.0, err)
    return err.nan_to_num(nan=float("inf"))


def _layout_case(case: str, dtype, device="cuda") -> torch.Tensor:
    """Fresh random values (normal * 4, every special value planted) in the layout ``case`` names."""
    if case == "odd":
        return special_input((9, 41, 341), dtype, device)
    if case == "grid_stride":  # more 16-byte packs than one wave of threads on any GPU
        return special_input((7, 1031, 1009), dtype, device)
    if case == "one":
        return special_input((1,), dtype, device)
    if case == "empty":
        return torch.empty(0, dtype=dtype, device=device)
    if case == "empty_3d":
        return torch.empty(3, 0, 5, dtype=dtype, device=device)
    if case == "scalar":
        return special_input((), dtype, device)
    if case == "channels_last":
        x = special_input((3, 17, 9, 13), dtype, device).contiguous(memory_format=torch.channels_last)
        assert not x.is_contiguous()
        return x
    if case == "misaligned":  # storage starts one element past a 16-byte boundary: no 16-byte path
        x = special_input((9, 41, 341), dtype, device).flatten()[1:]
        assert x.data_ptr() % 16 != 0
        return x
    raise ValueError(case)


CASES = ["odd", "grid_stride", "one", "empty", "empty_3d", "scalar", "channels_last", "misaligned"]


@pytest.mark.gpu
@needs_cupy
def test_available_where_cupy_and_a_gpu_are():
    assert registry.availability("cupy"), registry.availability("cupy").reason


@pytest.mark.gpu
@needs_cupy
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_matches_float64(dtype, case):
    x = _layout_case(case, dtype)
    _errors("forward", _run("forward", x), x)


@pytest.mark.gpu
@needs_cupy
@pytest.mark.parametrize("case", CASES + ["misaligned_grad"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_matches_float64_autograd(dtype, case):
    if case == "misaligned_grad":  # x aligned, grad_out one element off: no 16-byte path either
        x = special_input((9 * 41 * 341,), dtype, "cuda")
        g = torch.randn(x.numel() + 1, device="cuda").to(dtype)[1:]
    else:
        x = _layout_case(case, dtype)
        g = torch.empty_like(x).normal_()
    _errors("backward", _run("backward", x, g), x, g)


@pytest.mark.gpu
@needs_cupy
@pytest.mark.parametrize("op", ["forward", "backward"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_special_values(dtype, op):
    """Every special value at every position of a 16-byte pack and in the leftover tail."""
    values = SPECIAL_VALUES + [-44.0, 88.0, -1e30, 1e30, 9.0, -1.19, 20.01, 43.9, 44.1]
    n = 8 * 8 * len(values) + 3  # len(values) is odd, so each value visits all 8 lanes of a pack
    x = torch.tensor(values, dtype=torch.float64).repeat(n // len(values) + 1)[:n].to("cuda", dtype)
    g = torch.randn(x.shape, device="cuda").to(dtype)
    _errors(op, _run(op, x, g), x, g)
    if op == "forward" and dtype == torch.float32:  # the F.mish edge cases, spelled out
        y = backend.forward(torch.tensor([float("inf"), -float("inf"), float("nan"), 1e4, -1e4], device="cuda"))
        assert y[0] == float("inf") and y[1].isnan() and y[2].isnan() and y[3] == 1e4 and y[4] == 0
    if op == "backward" and dtype == torch.float32:  # autograd's NaN at +inf (inf * 0), 1 at large x
        gi = backend.backward(torch.tensor([float("inf"), 1e4, 100.0], device="cuda"), torch.ones(3, device="cuda"))
        assert gi[0].isnan() and abs(float(gi[1]) - 1) < 1e-6 and abs(float(gi[2]) - 1) < 1e-6


@pytest.mark.gpu
@needs_cupy
@pytest.mark.parametrize("op", ["forward", "backward"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_accuracy_at_most_twice_eagers_on_conv_like_data(dtype, op):
    """The quality bar: max error vs float64 at most 2x eager's own (plus an ulp at 1)."""
    x = (torch.randn(9, 41, 341, device="cuda") * 2).to(dtype)
    g = torch.randn(x.shape, device="cuda").to(dtype)
    ours, theirs = _errors(op, _run(op, x, g), x, g)
    assert ours <= 2 * theirs + torch.finfo(dtype).eps, (ours, theirs)


@pytest.mark.gpu
@needs_cupy
@pytest.mark.slow
def test_reference_shape_fp32():
    """The reference problem's activation tensor, 64x128x254x254 fp32, forward and backward."""
    x = torch.randn(64, 128, 254, 254, device="cuda") * 2
    y = _run("forward", x)
    ours, theirs = _errors("forward", y, x)
    assert ours <= 2 * theirs + torch.finfo(torch.float32).eps, (ours, theirs)
    del y
    g = torch.randn_like(x)
    gi = _run("backward", x, g)
    ours, theirs = _errors("backward", gi, x, g)
    assert ours <= 2 * theirs + torch.finfo(torch.float32).eps, (ours, theirs)


@pytest.mark.gpu
@needs_cupy
@pytest.mark.slow
def test_more_than_2_to_the_31_elements_use_64_bit_offsets():
    """Misaligned, so the one-element kernel indexes every element itself, past 2^31."""
    n = (1 << 31) + 37
    if torch.cuda.get_device_properties(0).total_memory < 12 * n:
        pytest.skip("needs about 12 bytes of GPU memory per element")
    x = (torch.randn(n + 1, device="cuda", dtype=torch.bfloat16) * 4)[1:]
    x[-5:] = torch.tensor([float("nan"), float("inf"), -3.0, 2.5, -float("inf")])
    _errors("forward", _run("forward", x), x)
    g = torch.empty_like(x).normal_()
    _errors("backward", _run("backward", x, g), x, g)


@pytest.mark.gpu
@needs_cupy
@pytest.mark.parametrize("op", ["forward", "backward"])
def test_runs_on_torchs_current_stream(op):
    """The input is written on a side stream behind a long sleep; only the side stream is synced.
    A kernel launched anywhere else would read the stale input (NaN) or not be finished."""
    source = special_input((9, 41, 341), torch.float32, "cuda")
    g = torch.randn_like(source)
    x = torch.full_like(source, float("nan"))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)
        x.copy_(source)
        out = _run(op, x, g)
    side.synchronize()
    _errors(op, out, source, g)


@pytest.mark.gpu
@needs_cupy
@pytest.mark.parametrize("op", ["forward", "backward"])
def test_last_device_index_while_device_0_is_current(op):
    device = torch.device("cuda", torch.cuda.device_count() - 1)
    with torch.cuda.device(0):
        x = special_input((9, 41, 341), torch.bfloat16, device)
        g = torch.randn(x.shape, device=device).to(torch.bfloat16)
        out = _run(op, x, g)
        assert out.device == device
        _errors(op, out, x, g)


@pytest.mark.gpu
@needs_cupy
def test_empty_tensors_launch_nothing(monkeypatch):
    def no_kernel(name):
        raise AssertionError(f"kernel {name} fetched for an empty tensor")

    monkeypatch.setattr(cupy_backend, "_kernel", no_kernel)
    x = torch.empty(4, 0, 3, device="cuda", dtype=torch.bfloat16)
    assert backend.forward(x).shape == (4, 0, 3)
    assert backend.backward(x, torch.empty_like(x)).shape == (4, 0, 3)


@pytest.mark.gpu
@needs_cupy
def test_dispatcher_runs_it_by_name():
    x = special_input((9, 41, 341), torch.float16, "cuda")
    y = dispatch.run("forward", x, backend="cupy")
    _errors("forward", y, x)
    assert dispatch.choose("forward", x, "cupy") is registry.get("cupy")
