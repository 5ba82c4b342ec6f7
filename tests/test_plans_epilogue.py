"""The NCHW epilogue plans: cuDNN's conv alone to NHWC, then bias + double Mish + NHWC -> NCHW in one pass.

CPU: the Triton kernel in Triton's interpreter on odd shapes and special values, every element
against float64 with the output poisoned beforehand; availability and applicability of the plans.
GPU: both kernels against float64 (odd shapes, misaligned input, more images than the grid's z,
more than 2^31 elements); both plans through ``run_block`` against the float64 block within 2x
eager's own error; the conv-only cuDNN config surviving a new process; gradients.

Kernel tolerances, per output element: fp32 ``4e-6 |ref|`` (the Triton backend's 3e-6: exp2's
argument rounding plus a few ulp; the bias add adds one rounding of the sum) plus 1e-11 where
|ref| is tiny; fp16/bf16 one ulp of the output dtype (its rounding, plus the fp32 math's error
near a rounding boundary), plus 6e-8 for fp16's subnormal spacing and 1e-35 for flushed e^v.
"""

import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mishops import plans
from mishops.plans import ConvSpec, NoPlanError, run_block
from tests.blocks import (Model, assert_gradients_match_eager, block_choices, compile_for_hopper,  # noqa: F401
                          in_setting, isolated_plans, max_err, run_in_two_new_processes, tf32_floor)
from tests.reference import special_input

HAS_GPU = torch.cuda.is_available()
CL = torch.channels_last
EPILOGUE_PLANS = ["cudnn_conv_epilogue_cuda", "cudnn_conv_epilogue_triton"]
RTOL = {torch.float32: 4e-6, torch.float16: 2**-10, torch.bfloat16: 2**-7}
ATOL = {torch.float32: 1e-11, torch.float16: 6e-8, torch.bfloat16: 1e-35}


@pytest.fixture
def poisoned_empty(monkeypatch):
    """Every ``torch.empty`` comes back full of NaN (integers: -1), so an element a kernel skips fails."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan") if t.is_floating_point() else -1)

    monkeypatch.setattr(torch, "empty", empty)


def _nhwc_input(n, c, h, w, dtype, device, seed):
    """Random values with NaN, +-inf, large |x| and tiny ones planted, channels_last strides."""
    return special_input((n, h, w, c), dtype=dtype, device=device, seed=seed).permute(0, 3, 1, 2)


def _reference(y, bias):
    """float64 ``mish(mish(y + bias))`` from the values the kernel read, NCHW."""
    z = y.double() + (0 if bias is None else bias.double()[:, None, None])
    return F.mish(F.mish(z)).contiguous()


def _assert_every_element_close(out, ref, out_dtype):
    assert out.is_contiguous() and out.shape == ref.shape and out.dtype == out_dtype
    got = out.double()
    assert torch.equal(got.isnan(), ref.isnan()), "NaN positions differ"
    assert torch.equal(got.isinf() & (got > 0), ref.isinf() & (ref > 0)), "+inf positions differ"
    assert torch.equal(got.isinf() & (got < 0), ref.isinf() & (ref < 0)), "-inf positions differ"
    finite = ref.isfinite()
    err = (got - ref).abs()[finite]
    bound = (RTOL[out_dtype] * ref.abs() + ATOL[out_dtype])[finite]
    worst = int((err - bound).argmax()) if err.numel() else 0
    assert bool((err <= bound).all()), f"max excess at {worst}: got {got[finite][worst]}, want {ref[finite][worst]}"


# --- the Triton kernel in the interpreter (CPU) ----------------------------------------------------

CPU_SHAPES = [(2, 5, 1, 13), (2, 70, 1, 13), (2, 5, 12, 25), (2, 70, 12, 25)]  # N, C, H, W: H*W 13 and 300
#: numpy's word for -inf * 0 = NaN, which is the answer (mish(-inf) is NaN like F.mish's)
NAN_BY_DESIGN = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


@NAN_BY_DESIGN
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", CPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_triton_epilogue_in_interpreter(monkeypatch, poisoned_empty, shape, dtype, with_bias):
    pytest.importorskip("triton")
    from mishops.plans.cudnn_nchw import nhwc_to_nchw

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    n, c, h, w = shape
    y = _nhwc_input(n, c, h, w, dtype, "cpu", seed=c * h)
    bias = (torch.randn(c) * 3).to(dtype) if with_bias else None
    out = nhwc_to_nchw(y, bias, mish2=True)
    _assert_every_element_close(out, _reference(y, bias), dtype)


@NAN_BY_DESIGN
@pytest.mark.parametrize("mish_count", [2, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_epilogue_in_interpreter_writes_the_preactivation(monkeypatch, poisoned_empty, dtype, mish_count):
    """The training forward's pass: the output as without it, and ``y + bias`` in NCHW, every element:
    fp32 exactly (one correctly rounded sum, as PyTorch's), bf16 within one of its ulp (how the
    float32 sum is converted: the interpreter's conversion need not round to nearest)."""
    pytest.importorskip("triton")
    from mishops.plans.cudnn_nchw import nhwc_to_nchw

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    y = _nhwc_input(2, 70, 12, 25, dtype, "cpu", seed=3)
    bias = (torch.randn(70) * 3).to(dtype)
    out, pre = nhwc_to_nchw(y, bias, mish_count=mish_count, preactivation=True)
    z = y.double() + bias.double()[:, None, None]
    ref = F.mish(F.mish(z)) if mish_count == 2 else F.mish(z)
    _assert_every_element_close(out, ref.contiguous(), dtype)
    assert pre.is_contiguous() and pre.dtype == dtype
    torch.testing.assert_close(pre, z.to(dtype).contiguous(), rtol=0 if dtype == torch.float32 else RTOL[dtype],
                               atol=0, equal_nan=True)


@pytest.mark.parametrize("store_pre", [False, True], ids=["inference", "training"])
def test_triton_epilogue_compiles_for_hopper(monkeypatch, store_pre):
    pytest.importorskip("triton")
    from mishops.plans import cudnn_nchw

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    signature = {"src": "*fp32", "bias": "*fp32", "dst": "*fp32", "pre": "*fp32", "HW": "i32", "C": "i32",
                 "hw_tiles": "i32", "c_tiles": "i32"}
    constexprs = {"HAS_BIAS": True, "MISH_COUNT": 2, "STORE_PRE": store_pre, "BLOCK_HW": 64, "BLOCK_C": 64}
    compiled = compile_for_hopper(cudnn_nchw._kernel(False), signature, constexprs, num_warps=4)
    assert compiled.asm["cubin"]


@NAN_BY_DESIGN
def test_triton_epilogue_in_interpreter_converts_dtype(monkeypatch, poisoned_empty):
    pytest.importorskip("triton")
    from mishops.plans.cudnn_nchw import nhwc_to_nchw

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    y = _nhwc_input(2, 70, 12, 25, torch.bfloat16, "cpu", seed=1)
    bias = torch.randn(70)
    for dtype in (torch.float32, torch.float16):
        _assert_every_element_close(nhwc_to_nchw(y, bias, mish2=True, dtype=dtype), _reference(y, bias), dtype)


def test_triton_transpose_rejects_a_tensor_that_is_not_channels_last(monkeypatch):
    pytest.importorskip("triton")
    from mishops.plans.cudnn_nchw import nhwc_to_nchw

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ValueError, match="channels_last"):
        nhwc_to_nchw(torch.randn(2, 3, 4, 5))


# --- the plans off the GPU ---------------------------------------------------------------------


@pytest.mark.skipif(HAS_GPU, reason="checks the CPU-only answer")
@pytest.mark.parametrize("name", EPILOGUE_PLANS)
def test_plans_unavailable_on_cpu_with_reason(monkeypatch, name):
    available = plans.availability(name)
    assert not available and available.reason
    assert "cudnn" in available.reason.lower() or "GPU" in available.reason
    monkeypatch.setenv("MISHOPS_PLAN", name)
    with pytest.raises(NoPlanError, match=f"^mishops: MISHOPS_PLAN={name} cannot run this block: device type 'cpu'"):
        run_block(torch.randn(1, 3, 5, 5), nn.Conv2d(3, 4, 3))


@pytest.mark.parametrize("name", EPILOGUE_PLANS)
def test_plans_take_nchw_outputs_only(name):
    plan = plans.get_plan(name)
    conv, x = nn.Conv2d(4, 6, 3), torch.randn(1, 4, 8, 8)
    spec = ConvSpec.of(conv)
    nchw = plan.not_supported_reasons(x, conv.weight, conv.bias, spec)
    assert not any("would be" in r for r in nchw), nchw  # a candidate, device aside
    assert all("device type 'cpu'" in r for r in nchw), nchw
    cl_conv = nn.Conv2d(4, 6, 3).to(memory_format=CL)
    for inp, weight in [(x, cl_conv.weight), (x.contiguous(memory_format=CL), conv.weight)]:
        reasons = plan.not_supported_reasons(inp, weight, conv.bias, spec)
        assert any("would be channels_last" in r and "contiguous only" in r for r in reasons), reasons


@pytest.mark.parametrize("name", EPILOGUE_PLANS)
def test_plans_decline_what_cudnn_cannot_run(monkeypatch, name):
    plan = plans.get_plan(name)
    x = torch.randn(1, 4, 8, 8)
    for conv, words in [(nn.Conv2d(4, 4, 3, groups=2), "grouped"),
                        (nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), "padding"),
                        (nn.Conv2d(4, 4, 3, padding="same"), "padding")]:
        reasons = plan.not_supported_reasons(x, conv.weight, conv.bias, ConvSpec.of(conv))
        assert any(words in r for r in reasons), reasons
    conv = nn.Conv2d(4, 4, 3)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    assert any("TF32" in r for r in plan.not_supported_reasons(x, conv.weight, conv.bias, ConvSpec.of(conv)))


def test_channels_last_block_never_offers_the_epilogue_plans():
    model = Model(3, 5, 3).to(memory_format=CL)
    x = torch.randn(2, 3, 9, 11)
    with torch.no_grad():
        torch.testing.assert_close(run_block(x, model.conv), model(x), rtol=0, atol=0)
    choice = block_choices()[-1]
    for name in EPILOGUE_PLANS:
        assert "contiguous only" in choice.rejected[name]


# --- GPU: the kernels --------------------------------------------------------------------------

GPU_KERNEL_SHAPES = [(2, 5, 1, 13), (2, 70, 12, 25), (3, 128, 17, 19), (1, 64, 8, 8), (4, 1, 5, 7), (2, 3, 1, 1)]


@pytest.fixture(params=["cuda", "triton"])
def kernel(request):
    """The epilogue pass of each plan, where its backend's toolchain is there."""
    from mishops import registry
    from mishops.plans.cudnn_epilogue import bias_mish2_nhwc_to_nchw
    from mishops.plans.cudnn_nchw import nhwc_to_nchw

    available = registry.availability(request.param)
    if not available:
        pytest.skip(f"{request.param}: {available.reason}")
    if request.param == "cuda":
        return bias_mish2_nhwc_to_nchw
    return lambda y, bias: nhwc_to_nchw(y, bias, mish2=True)


@pytest.mark.gpu
@pytest.mark.parametrize("misaligned", [False, True], ids=["aligned", "offset"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", GPU_KERNEL_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gpu_kernel_vs_float64(kernel, poisoned_empty, shape, dtype, with_bias, misaligned):
    n, c, h, w = shape
    y = _nhwc_input(n, c, h, w, dtype, "cuda", seed=c * h + w)
    if misaligned:  # one element into a buffer: the CUDA kernel's narrow loads
        buffer = torch.zeros(y.numel() + 1, dtype=dtype, device="cuda")
        buffer[1:].copy_(y.permute(0, 2, 3, 1).reshape(-1))
        y = buffer[1:].view(n, h, w, c).permute(0, 3, 1, 2)
    bias = (torch.randn(c, device="cuda") * 3).to(dtype) if with_bias else None
    out = kernel(y, bias)
    _assert_every_element_close(out, _reference(y, bias), dtype)


@pytest.mark.gpu
def test_gpu_kernel_more_images_than_the_grid_holds(kernel, poisoned_empty):
    y = _nhwc_input(70000, 3, 1, 2, torch.float32, "cuda", seed=3)
    bias = torch.randn(3, device="cuda")
    _assert_every_element_close(kernel(y, bias), _reference(y, bias), torch.float32)


@pytest.mark.gpu
def test_gpu_kernel_past_2_31_elements(kernel):
    """2.2e9 fp16 elements (4.4 GB each way): 64-bit offsets; first and last images checked."""
    n, c, h, w = 33, 64, 1024, 1024
    if torch.cuda.mem_get_info()[0] < 12 * 2**30:
        pytest.skip("needs 12 GiB of free GPU memory")
    y = torch.randn(n, h, w, c, device="cuda", dtype=torch.float16).permute(0, 3, 1, 2)
    y[-1, :, -1, -1] = float("nan")
    bias = torch.randn(c, device="cuda", dtype=torch.float16)
    out = kernel(y, bias)
    for image in (0, n - 1):
        _assert_every_element_close(out[image:image + 1], _reference(y[image:image + 1], bias), torch.float16)
    del out, y


# --- GPU: the plans ----------------------------------------------------------------------------

GPU_SHAPES = [  # (batch, cin, cout, h, w, kernel, conv args)
    (2, 64, 128, 32, 32, 3, {}),
    (3, 5, 7, 9, 41, 3, {}),
    (2, 16, 24, 17, 13, 5, {"stride": 2, "padding": 1}),
    (2, 8, 70, 15, 17, 3, {"padding": 1, "bias": False}),
]
SETTINGS = ["tf32", "fp32", "bf16-autocast"]


def _skip_unavailable(name):
    available = plans.availability(name)
    if not available:
        pytest.skip(f"{name}: {available.reason}")


@pytest.mark.gpu
@pytest.mark.parametrize("plan", EPILOGUE_PLANS)
@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: f"{s[:6]}{s[6]}")
def test_gpu_plan_accuracy_vs_float64(monkeypatch, plan, setting, shape):
    _skip_unavailable(plan)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", torch.backends.cudnn.allow_tf32)
    monkeypatch.setenv("MISHOPS_PLAN", plan)
    n, cin, cout, h, w, k, conv_args = shape
    torch.manual_seed(0)
    model = Model(cin, cout, k, **conv_args).cuda()
    x = torch.randn(n, cin, h, w, device="cuda") * 2
    x.view(-1)[::97] *= 50  # some large |conv| values
    model64 = Model(cin, cout, k, **conv_args).cuda().double()
    model64.load_state_dict(model.state_dict())
    with torch.no_grad():
        ref = model64(x.double())
        with in_setting(setting):
            if setting == "fp32":  # TF32 off: cuDNN's graph would not honour it
                with pytest.raises(NoPlanError, match="TF32"):
                    run_block(x, model.conv)
                return
            try:
                y = run_block(x, model.conv)
            except NoPlanError as exc:  # no correct conv config for this setting: declining is right
                assert "no engine config computed the conv correctly" in str(exc)
                pytest.skip(str(exc))
            eager = model(x)
        floor = tf32_floor(x, model.conv, ref) if setting == "tf32" else 0.0
    assert y.dtype == eager.dtype and y.shape == eager.shape and y.is_contiguous()
    assert torch.equal(y.isnan(), eager.isnan())
    err, eager_err = max_err(y, ref), max_err(eager, ref)
    assert err <= 2 * max(eager_err, floor) + 1e-6, f"{plan} error {err:.3g}, eager {eager_err:.3g}, tf32 {floor:.3g}"


@pytest.mark.gpu
@pytest.mark.parametrize("setting", ["tf32", "bf16-autocast"])
def test_gpu_auto_choice_measures_the_epilogue_plans(monkeypatch, setting):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", torch.backends.cudnn.allow_tf32)
    model, x = Model(32, 64, 3).cuda(), torch.randn(4, 32, 40, 40, device="cuda")
    with torch.no_grad(), in_setting(setting):
        y, expected = run_block(x, model.conv), model(x)
    assert plans.mismatch(y, expected) == ""
    choice = block_choices()[-1]
    for name in EPILOGUE_PLANS:
        if plans.availability(name):
            assert choice.measurements[name].ok, choice.measurements[name].reason


_SUBPROCESS = textwrap.dedent("""
    import json, torch
    from torch import nn
    from mishops.plans import run_block, cudnn_fused
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 32, 3).cuda()
    x = torch.randn(2, 16, 20, 24, device="cuda")
    with torch.no_grad():
        y = run_block(x, conv)
    assert y.is_contiguous()
    print(json.dumps({"stats": cudnn_fused.stats, "sum": float(y.double().sum())}))
""")


@pytest.mark.gpu
def test_gpu_cudnn_conv_config_survives_a_new_process(tmp_path):
    _skip_unavailable("cudnn_conv_epilogue_triton")
    first, second = run_in_two_new_processes(tmp_path, "cudnn_conv_epilogue_triton", _SUBPROCESS)
    assert first["stats"]["tunes"] == 1 and first["stats"]["builds"] >= 1
    assert second["stats"] == {"tunes": 0, "builds": 1, "rebuilds": 1}, (first, second)
    assert first["sum"] == second["sum"]


@pytest.mark.gpu
@pytest.mark.parametrize("plan", EPILOGUE_PLANS)
@pytest.mark.parametrize("setting", ["tf32", "bf16-autocast"])
def test_gpu_gradients_vs_float64(monkeypatch, plan, setting):
    _skip_unavailable(plan)
    assert_gradients_match_eager(monkeypatch, plan, setting, module_cl=False)
