"""Tests for mishops/backends/triton.py.

On CPU the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``, set per test by the
``interpreter`` fixture, so the result is the same whichever tests ran first); the ``gpu`` tests run
the compiled kernels. Every result is compared with float64 PyTorch: ``F.mish(F.mish(x.double()))``
forward, float64 autograd through ``F.mish`` backward (``tests/reference.py``).

Tolerances. fp32: rtol 3e-6. The kernel computes e^v as exp2(v log2 e); rounding v log2 e to fp32
perturbs e^v by up to |v| 2^-24 relative (6.6e-7 at |v| = 20, 1.3e-6 up to |v| = 44, where y is
still ~1e-9), on the GPU ex2.approx and div.full add about 2 ulp each, and the rest is a handful of
fp32 roundings (6e-8 each): at most ~2e-6 (the interpreter's worst, over the sweep, is 0.3x the
bound). Absolute floors where relative error means nothing:
forward atol 1e-11 (|y| < 1e-11 below x = -30, where exp's relative error keeps growing with |x|
and the GPU may flush denormals), backward atol 1e-6 |grad_out| (the derivative is O(1) and
crosses zero at x = -1.19; eager's own fp32 error there is ~2e-6 |grad_out|). fp16/bf16: every
element within 2x eager's max error in the same dtype on the same input, or correctly rounded.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import mishops
from mishops import registry, tuning
from mishops.backends import triton as triton_backend
from tests.reference import SPECIAL_VALUES, mish2_f64, mish2_grad_f64

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
#: numpy warns about inf * 0 and the like inside the interpreter; those NaNs are the point.
interpreter_warnings = pytest.mark.filterwarnings("ignore::RuntimeWarning")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FP32_RTOL, FP32_FORWARD_ATOL, FP32_BACKWARD_ATOL_PER_GRAD = 3e-6, 1e-11, 1e-6
#: the project's special values, plus where this kernel's formulas change regime: 1 - t^2 would
#: cancel near 8.7, mish' crosses zero at -1.19, exp's relative error grows past -12.
SPECIAL = SPECIAL_VALUES + [8.7, 1.0, -1.1924, -5.0, -12.9, -30.0]

#: x range of the sweep tests: from where e^x underflows to well past the clamp at 20.
SWEEP = (-110.0, 50.0)
# CPU shapes stay small: the interpreter runs each program in Python (BLOCK is 1024 below 2M elements).
CPU_SHAPES = {
    "odd": (3, 7, 131),
    "one": (1,),
    "empty": (4, 0, 3),
    "0-d": (),
    "non-multiple-of-block": (2 * 1024 + 3,),
    "channels_last": (2, 5, 7, 9),
}


def make_input(shape, dtype, device="cpu", scale=4.0, seed=0):
    """Conv-like values spread over the interesting range, channels_last for 4-D shapes."""
    gen = torch.Generator(device=device).manual_seed(seed)
    x = (torch.randn(shape, generator=gen, device=device) * scale).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def with_specials(x: torch.Tensor) -> torch.Tensor:
    """``x`` with the special values written at spread-out positions (keeps strides)."""
    flat = x.view(-1) if x.is_contiguous() else x.permute(0, 2, 3, 1).reshape(-1)
    if flat.numel() >= 4 * len(SPECIAL):
        positions = torch.linspace(0, flat.numel() - 1, len(SPECIAL), dtype=torch.float64).long()
        flat[positions.to(x.device)] = torch.tensor(SPECIAL, device=x.device).to(x.dtype)
        assert x.isnan().any(), "with_specials wrote into a copy"
    return x


def eager_backward(x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    x_ = x.detach().clone().requires_grad_()
    F.mish(F.mish(x_)).backward(grad_out)
    return x_.grad


def ulp(ref: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    info = torch.finfo(dtype)
    magnitude = ref.abs().clamp_min(info.smallest_normal)
    return info.eps * torch.exp2(torch.floor(torch.log2(magnitude)))


def assert_same_nonfinite(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """NaN exactly where the reference has NaN, the same infinities; returns the finite mask."""
    out = out.double()
    assert torch.equal(out.isnan(), ref.isnan()), (
        f"NaN mismatch at {(out.isnan() != ref.isnan()).nonzero()[:8].tolist()}")
    inf = ref.isinf()
    assert torch.equal(out.isinf(), inf), f"inf mismatch at {(out.isinf() != inf).nonzero()[:8].tolist()}"
    assert torch.equal(out[inf], ref[inf])
    return ref.isfinite()


def assert_fp32_close(out, ref, atol):
    """|out - ref| <= FP32_RTOL |ref| + atol (``atol`` a number or a per-element tensor)."""
    finite = assert_same_nonfinite(out, ref)
    excess = ((out.double() - ref).abs() / (FP32_RTOL * ref.abs() + atol))[finite]
    bad = excess > 1
    assert not bad.any(), (f"{int(bad.sum())} of {excess.numel()} elements off, the worst by "
                           f"{float(excess.max()):.3g}x the tolerance")


def assert_low_precision_close(out, ref, eager, dtype, interpreted):
    """Every element within 2x eager's max error, or correctly rounded (within half an ulp).
    Triton's interpreter converts fp32 to bf16 by truncation (``cast_impl`` in
    triton/runtime/interpreter.py) where the GPU rounds to nearest, so there a whole ulp is allowed."""
    finite = assert_same_nonfinite(out, ref)
    err = (out.double() - ref).abs()[finite]
    eager_err = (eager.double() - ref).abs()[finite]
    eager_err = eager_err[eager_err.isfinite()]
    eager_max = float(eager_err.max()) if eager_err.numel() else 0.0
    rounding = (1.0 if dtype == torch.bfloat16 and interpreted else 0.5) * ulp(ref[finite], dtype)
    bad = err > rounding.clamp_min(2 * eager_max)
    assert not bad.any(), (f"{int(bad.sum())} of {err.numel()} elements off: max |error| {float(err.max()):.3g}, "
                           f"eager's {eager_max:.3g}")


def check_forward(backend, x, interpreted):
    y = backend.forward(x)
    assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
    assert y.stride() == x.stride()
    ref = mish2_f64(x)
    if x.dtype == torch.float32:
        assert_fp32_close(y, ref, FP32_FORWARD_ATOL)
    else:
        assert_low_precision_close(y, ref, F.mish(F.mish(x)), x.dtype, interpreted)


def check_backward(backend, x, grad_out, interpreted):
    grad_in = backend.backward(x, grad_out)
    assert grad_in.shape == x.shape and grad_in.dtype == x.dtype and grad_in.stride() == x.stride()
    ref = mish2_grad_f64(x, grad_out)
    if x.dtype == torch.float32:
        assert_fp32_close(grad_in, ref, FP32_BACKWARD_ATOL_PER_GRAD * grad_out.double().abs())
    else:
        assert_low_precision_close(grad_in, ref, eager_backward(x, grad_out), x.dtype, interpreted)


def spy_on(monkeypatch, backend) -> list[str]:
    """The names of the backend's methods as they get called, in order."""
    calls = []
    for op in ("forward", "backward"):
        real = getattr(type(backend), op)

        def spy(self, *args, real=real, op=op):
            calls.append(op)
            return real(self, *args)

        monkeypatch.setattr(type(backend), op, spy)
    return calls


@pytest.fixture
def interpreter(monkeypatch):
    """The backend with Triton's interpreter on; availability cached by earlier tests is set aside."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delitem(registry.BACKENDS.cached, "triton", raising=False)
    backend = registry.get("triton")
    assert registry.availability("triton"), registry.availability("triton").reason
    return backend


@pytest.fixture
def compiled(monkeypatch):
    """The backend with compiled kernels, even if the whole run has TRITON_INTERPRET=1."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delitem(registry.BACKENDS.cached, "triton", raising=False)
    backend = registry.get("triton")
    assert registry.availability("triton"), registry.availability("triton").reason
    return backend


# --- CPU, under Triton's interpreter -------------------------------------------------------------


@needs_triton
@interpreter_warnings
@pytest.mark.parametrize("shape", CPU_SHAPES.values(), ids=CPU_SHAPES.keys())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_interpreter_forward(interpreter, dtype, shape):
    check_forward(interpreter, with_specials(make_input(shape, dtype)), interpreted=True)


@needs_triton
@interpreter_warnings
@pytest.mark.parametrize("shape", CPU_SHAPES.values(), ids=CPU_SHAPES.keys())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_interpreter_backward(interpreter, dtype, shape):
    x = with_specials(make_input(shape, dtype))
    grad_out = make_input(shape, dtype, scale=1.0, seed=1)
    check_backward(interpreter, x, grad_out, interpreted=True)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_interpreter_sweep(interpreter, dtype):
    """Every regime of the formulas in order: underflow, the derivative's zero at -1.19, the
    clamp at 20 and beyond."""
    x = torch.linspace(*SWEEP, 20_001).to(dtype)
    check_forward(interpreter, x, interpreted=True)
    check_backward(interpreter, x, make_input(x.shape, dtype, scale=1.0, seed=1), interpreted=True)


@needs_triton
def test_empty_tensors_launch_nothing(interpreter, monkeypatch):
    def no_kernels(interpret):
        raise AssertionError("a kernel was launched for an empty tensor")

    monkeypatch.setattr(triton_backend, "_kernels", no_kernels)
    for shape in [(0,), (4, 0, 3), (0, 3, 5, 5)]:
        x = torch.empty(shape)
        assert interpreter.forward(x).shape == shape
        assert interpreter.backward(x, torch.empty(shape)).shape == shape


@needs_triton
@interpreter_warnings
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_interpreter_special_values(interpreter, dtype):
    x = torch.tensor(SPECIAL).to(dtype)
    check_forward(interpreter, x, interpreted=True)
    check_backward(interpreter, x, torch.ones_like(x), interpreted=True)
    # and exactly what autograd does with them: NaN at +-inf and NaN, the same infinities
    eager = registry.get("eager")
    assert_same_nonfinite(interpreter.forward(x), eager.forward(x).double())
    assert_same_nonfinite(interpreter.backward(x, torch.ones_like(x)), eager.backward(x, torch.ones_like(x)).double())


@needs_triton
def test_interpreter_large_tensor_uses_the_big_block(interpreter):
    """Above 2M elements programs take 4096 elements; the tail block is partial."""
    n = (1 << 21) + 5
    assert triton_backend._launch_config(n)[0] == 4096 and n % 4096
    x = make_input((n,), torch.float32)
    check_forward(interpreter, x, interpreted=True)
    check_backward(interpreter, x, make_input((n,), torch.float32, scale=1.0, seed=1), interpreted=True)


@needs_triton
def test_interpreter_permuted_dense_input(interpreter):
    """Any dense permutation, not only channels_last: the output keeps the input's strides."""
    x = make_input((5, 3, 67), torch.float32).permute(2, 0, 1)
    assert not x.is_contiguous()
    check_forward(interpreter, x, interpreted=True)
    check_backward(interpreter, x, torch.randn(5, 3, 67).permute(2, 0, 1), interpreted=True)


@needs_triton
def test_fp64_is_not_supported(interpreter):
    x = torch.randn(7, dtype=torch.float64)
    reasons = interpreter.not_supported_reasons(x)
    assert reasons and "dtype float64" in reasons[0]
    assert not interpreter.not_supported_reasons(x.float())
    with pytest.raises(mishops.NoBackendError, match="float64"):
        mishops.mish2(x, backend="triton")


@needs_triton
def test_mish2_gradients_through_the_triton_backend(interpreter, monkeypatch):
    """mishops.mish2(..., backend="triton") with autograd: the kernels run, the gradients match."""
    calls = spy_on(monkeypatch, interpreter)
    x = make_input((2, 5, 7, 9), torch.float32).requires_grad_()
    grad_out = make_input(x.shape, torch.float32, scale=1.0, seed=1)
    y = mishops.mish2(x, backend="triton")
    y.backward(grad_out)
    assert calls == ["forward", "backward"]
    assert y.stride() == x.stride() and x.grad.stride() == x.stride()
    assert_fp32_close(y.detach(), mish2_f64(x.detach()), FP32_FORWARD_ATOL)
    assert_fp32_close(x.grad, mish2_grad_f64(x, grad_out), FP32_BACKWARD_ATOL_PER_GRAD * grad_out.double().abs())
    torch.testing.assert_close(x.grad, eager_backward(x, grad_out), rtol=1e-5, atol=1e-5)


@needs_triton
def test_dispatcher_profiles_triton_on_cpu(interpreter, monkeypatch):
    """Automatic choice on CPU with the interpreter: triton is a candidate and passes the
    dispatcher's own correctness check against eager (fast or not, it is measured)."""
    monkeypatch.setenv("MISHOPS_TUNE_BUDGET_MS", "20")
    x = make_input((3, 7, 131), torch.float32)
    y = mishops.mish2(x)
    choice = tuning.TUNER.last_choices()[-1]
    assert choice.how == "profiled"
    assert choice.measurements["triton"].ok, choice.measurements["triton"].reason
    torch.testing.assert_close(y, F.mish(F.mish(x)), rtol=1e-5, atol=1e-6)


@needs_triton
def test_env_var_names_the_backend(interpreter, monkeypatch):
    monkeypatch.setenv("MISHOPS_BACKEND", "triton")
    calls = spy_on(monkeypatch, interpreter)
    x = make_input((2, 3, 5, 7), torch.bfloat16)
    y = mishops.mish2(x)
    assert calls == ["forward"] and y.stride() == x.stride()


@needs_triton
def test_mode_follows_the_environment_at_call_time(monkeypatch):
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    backend = registry.get("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert backend.devices == {"cuda"}
    assert isinstance(triton_backend._kernels(triton_backend._interpreting()).forward, JITFunction)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend.devices == {"cuda", "cpu"}
    assert isinstance(triton_backend._kernels(triton_backend._interpreting()).forward, InterpretedFunction)


# --- availability, each in a fresh process ----------------------------------------------------------


def run_python(code: str, **env_changes: str | None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    for key, value in env_changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True,
                          text=True, timeout=120, cwd=os.path.dirname(os.path.dirname(__file__)))


def test_import_does_not_import_triton():
    result = run_python("""
        import sys, mishops
        mishops.registered_backends()
        assert "triton" not in sys.modules, "import mishops imported triton"
        print("ok")
    """)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


@needs_triton
def test_unavailable_without_gpu_or_interpreter():
    result = run_python("""
        import torch, mishops
        from mishops import registry
        available = registry.availability("triton")
        assert not available
        print(available.reason)
        try:
            mishops.mish2(torch.ones(3), backend="triton")
        except mishops.NoBackendError as exc:
            print(exc)
        else:
            raise AssertionError("mish2 ran the triton backend without a GPU or the interpreter")
    """, TRITON_INTERPRET=None, CUDA_VISIBLE_DEVICES="")
    assert result.returncode == 0, result.stderr
    assert "no CUDA GPU (set TRITON_INTERPRET=1 to run Triton's interpreter on CPU tensors)" in result.stdout
    assert "mishops: backend 'triton' cannot run mish2 forward on cpu" in result.stdout
    assert "triton (requested): device type 'cpu' not supported" in result.stdout


def test_unavailable_without_triton(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # what `import triton` sees when it is not installed
    available = type(registry.get("triton"))().is_available()
    assert not available and available.reason == "triton is not installed: pip install mishops[triton]"


def test_broken_triton_reports_the_real_error(tmp_path):
    (tmp_path / "triton").mkdir()
    (tmp_path / "triton" / "__init__.py").write_text(
        'raise ImportError("libtriton.so: cannot open shared object file")\n')
    result = run_python("""
        from mishops import registry
        print(registry.availability("triton").reason)
    """, PYTHONPATH=os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    assert result.returncode == 0, result.stderr
    assert "triton failed to import" in result.stdout and "libtriton.so: cannot open" in result.stdout


# --- GPU: the compiled kernels ------------------------------------------------------------------------

GPU_SHAPES = {
    "odd": (9, 41, 341),
    "channels_last": (8, 16, 33, 35),
    "empty": (0,),
    "0-d": (),
    "non-multiple-of-big-block": ((1 << 21) + 4097,),
}


def poison_allocator(nbytes: int) -> None:
    """Leave NaN bytes in the caching allocator's next block of this size, so an output element
    that the kernel fails to write reads back as NaN."""
    if nbytes:
        torch.empty(nbytes, dtype=torch.uint8, device="cuda").fill_(0xFF)


def gpu_input(shape, dtype, seed=0):
    return with_specials(make_input(shape, dtype, device="cuda", seed=seed))


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES.values(), ids=GPU_SHAPES.keys())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_forward(compiled, dtype, shape):
    x = gpu_input(shape, dtype)
    poison_allocator(x.nbytes)
    check_forward(compiled, x, interpreted=False)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES.values(), ids=GPU_SHAPES.keys())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_backward(compiled, dtype, shape):
    x = gpu_input(shape, dtype)
    grad_out = make_input(shape, dtype, device="cuda", scale=1.0, seed=1)
    poison_allocator(x.nbytes)
    check_backward(compiled, x, grad_out, interpreted=False)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_special_values(compiled, dtype):
    x = torch.tensor(SPECIAL, device="cuda").to(dtype)
    check_forward(compiled, x, interpreted=False)
    check_backward(compiled, x, torch.ones_like(x), interpreted=False)
    eager = registry.get("eager")
    assert_same_nonfinite(compiled.forward(x), eager.forward(x).double())
    assert_same_nonfinite(compiled.backward(x, torch.ones_like(x)), eager.backward(x, torch.ones_like(x)).double())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_sweep(compiled, dtype):
    x = torch.linspace(*SWEEP, (1 << 20) + 1, device="cuda").to(dtype)
    check_forward(compiled, x, interpreted=False)
    check_backward(compiled, x, make_input(x.shape, dtype, device="cuda", scale=1.0, seed=1), interpreted=False)


@pytest.mark.gpu
def test_gpu_reference_shape_fp32(compiled):
    """The conv output of the reference model (64x128x254x254, 2.1 GB), checked slice by slice."""
    x = gpu_input((64, 128, 254, 254), torch.float32)
    grad_out = make_input(x.shape, torch.float32, device="cuda", scale=1.0, seed=1)
    poison_allocator(x.nbytes)
    y = compiled.forward(x)
    poison_allocator(x.nbytes)
    grad_in = compiled.backward(x, grad_out)
    for i in range(0, x.shape[0], 8):
        rows = slice(i, i + 8)
        assert_fp32_close(y[rows], mish2_f64(x[rows]), FP32_FORWARD_ATOL)
        g = grad_out[rows]
        assert_fp32_close(grad_in[rows], mish2_grad_f64(x[rows], g), FP32_BACKWARD_ATOL_PER_GRAD * g.double().abs())


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_more_than_2_31_elements(compiled):
    """64-bit offsets: 2^31 + 4097 fp16 elements (4.3 GB a tensor), every element checked."""
    n = (1 << 31) + 4097
    if torch.cuda.mem_get_info()[0] < 4 * n * 2 + (8 << 30):
        pytest.skip("needs ~26 GB of free GPU memory")
    x = make_input((n,), torch.float16, device="cuda")
    grad_out = make_input((n,), torch.float16, device="cuda", scale=1.0, seed=1)
    poison_allocator(x.nbytes)
    y = compiled.forward(x)
    poison_allocator(x.nbytes)
    grad_in = compiled.backward(x, grad_out)
    chunk = 1 << 27
    for start in range(0, n, chunk):
        part = slice(start, start + chunk)
        # one rounding of an fp32-accurate value: within an fp16 ulp (rtol 1e-3), fp16 subnormals aside
        torch.testing.assert_close(y[part].double(), mish2_f64(x[part]), rtol=1e-3, atol=1e-6)
        torch.testing.assert_close(grad_in[part].double(), mish2_grad_f64(x[part], grad_out[part]),
                                   rtol=1e-3, atol=1e-6)


@pytest.mark.gpu
def test_gpu_runs_on_the_current_stream(compiled):
    """The kernels queue behind work on a non-default current stream: launched on another stream
    they would read the input before it is written (and the poisoned output would show it)."""
    source = make_input((1 << 22,), torch.float32, device="cuda")
    grad_out = make_input((1 << 22,), torch.float32, device="cuda", scale=1.0, seed=1)
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        poison_allocator(source.nbytes)
        torch.cuda._sleep(100_000_000)  # keeps this stream busy for tens of milliseconds
        x = source * 1.0
        y = compiled.forward(x)
        grad_in = compiled.backward(x, grad_out)
    stream.synchronize()
    assert_fp32_close(y, mish2_f64(source), FP32_FORWARD_ATOL)
    assert_fp32_close(grad_in, mish2_grad_f64(source, grad_out), FP32_BACKWARD_ATOL_PER_GRAD * grad_out.double().abs())


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_gpu_second_device(compiled):
    """x on cuda:1 while cuda:0 is current: the launch must happen on x's device."""
    torch.cuda.set_device(0)
    x = gpu_input((9, 41, 341), torch.float32).to("cuda:1")
    grad_out = torch.randn(x.shape, device="cuda:1")
    y = compiled.forward(x)
    grad_in = compiled.backward(x, grad_out)
    assert y.device == x.device and torch.cuda.current_device() == 0
    assert_fp32_close(y, mish2_f64(x), FP32_FORWARD_ATOL)
    assert_fp32_close(grad_in, mish2_grad_f64(x, grad_out), FP32_BACKWARD_ATOL_PER_GRAD * grad_out.double().abs())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_mish2_autograd(compiled, dtype):
    """End to end through the dispatcher and the custom op: forward and gradient vs float64."""
    x = make_input((4, 16, 31, 29), dtype, device="cuda").requires_grad_()
    grad_out = make_input(x.shape, dtype, device="cuda", scale=1.0, seed=1)
    y = mishops.mish2(x, backend="triton")
    y.backward(grad_out)
    assert y.stride() == x.stride() and x.grad.stride() == x.stride()
    if dtype == torch.float32:
        assert_fp32_close(y.detach(), mish2_f64(x.detach()), FP32_FORWARD_ATOL)
        assert_fp32_close(x.grad, mish2_grad_f64(x, grad_out), FP32_BACKWARD_ATOL_PER_GRAD * grad_out.double().abs())
    else:
        assert_low_precision_close(y.detach(), mish2_f64(x.detach()), F.mish(F.mish(x.detach())), dtype, interpreted=False)
        assert_low_precision_close(x.grad, mish2_grad_f64(x, grad_out), eager_backward(x, grad_out), dtype, interpreted=False)


# --- the block's fused activation + bias gradient (grad_bias) ------------------------------------

GRAD_BIAS_SHAPES = {"odd": (2, 5, 7, 9), "aligned": (3, 16, 8, 8), "wide_rows": (2, 300, 3, 5), "pixel": (4, 6, 1, 1)}


def check_grad_bias(found, z, g, mish_count):
    """dz against float64 autograd through the activation, and dbias against the float64 sum of
    dz, within the dtype's rounding: dz is rounded once from fp32, and dbias sums those rounded
    values in fp32 (each within half an ulp), so its error is bounded by eps/2 of sum |dz|."""
    dz, dbias = found
    zd = z.detach().double().requires_grad_(True)
    act = F.mish(F.mish(zd)) if mish_count == 2 else F.mish(zd)
    (ref,) = torch.autograd.grad(act, zd, g.double())
    assert dz.dtype == z.dtype and dz.stride() == z.stride() and dbias.dtype == torch.float32
    eps = torch.finfo(z.dtype).eps
    bound = (2e-6 if z.dtype == torch.float32 else eps) * torch.maximum(g.double().abs(), ref.abs()) + 1e-30
    assert bool(((dz.double() - ref).abs() <= bound).all()), float(((dz.double() - ref).abs() / bound).max())
    ref_bias = ref.sum(dim=(0, 2, 3))
    bias_bound = (1e-5 if z.dtype == torch.float32 else eps) * ref.abs().sum(dim=(0, 2, 3)) + 1e-6
    assert bool(((dbias.double() - ref_bias).abs() <= bias_bound).all()), (dbias, ref_bias)


def grad_bias_inputs(shape, dtype, layout, device):
    gen = torch.Generator().manual_seed(0)
    z = (torch.randn(shape, generator=gen) * 3).to(device=device, dtype=dtype)
    g = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    if layout == "channels_last":
        z, g = (t.contiguous(memory_format=torch.channels_last) for t in (z, g))
    return z, g


@needs_triton
@interpreter_warnings
@pytest.mark.parametrize("mish_count", [2, 1])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", [GRAD_BIAS_SHAPES["odd"], GRAD_BIAS_SHAPES["pixel"]], ids=["odd", "pixel"])
def test_interpreter_grad_bias(interpreter, shape, layout, mish_count):
    from mishops.backends import triton as triton_backend

    z, g = grad_bias_inputs(shape, torch.float32, layout, "cpu")
    check_grad_bias(triton_backend.grad_bias(z, g, mish_count), z, g, mish_count)


@pytest.mark.gpu
@pytest.mark.parametrize("mish_count", [2, 1])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", GRAD_BIAS_SHAPES.values(), ids=GRAD_BIAS_SHAPES.keys())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_grad_bias(compiled, dtype, shape, layout, mish_count):
    from mishops.backends import triton as triton_backend

    z, g = grad_bias_inputs(shape, dtype, layout, "cuda")
    found = triton_backend.grad_bias(z, g, mish_count)
    assert found is not None
    check_grad_bias(found, z, g, mish_count)
