"""The Triton conv plan: its kernels under Triton's CPU interpreter (in CI) and on the GPU, what it
declines, and the block through the plan machinery. The GPU accuracy, gradient and NaN tests that
compare every plan with eager live in ``tests/test_plans.py``."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mishops.plans import autocast
from mishops import plans, tuning
from mishops.plans import ConvSpec, run_block
from mishops.plans import triton_conv as tc
from tests.blocks import compile_for_hopper, gradients_at_tf32_preactivation
from tests.reference import SPECIAL_VALUES

pytest.importorskip("triton")
HAS_GPU = torch.cuda.is_available()
CL = torch.channels_last


@pytest.fixture(autouse=True)
def isolated(monkeypatch):
    monkeypatch.delenv("MISHOPS_PLAN", raising=False)
    monkeypatch.setenv("MISHOPS_TUNE_BUDGET_MS", "40")
    tuning.TUNER.clear()
    plans.PLANS.cached.pop("triton_conv", None)  # availability depends on TRITON_INTERPRET, set per test
    yield
    tuning.TUNER.clear()
    plans.PLANS.cached.pop("triton_conv", None)


@pytest.fixture
def device(request, monkeypatch):
    """CPU tensors through the interpreter, or the GPU compiled."""
    if request.param == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        return "cpu"
    if not HAS_GPU:
        pytest.skip("needs a CUDA GPU")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    return "cuda"


DEVICES = [pytest.param("cpu"), pytest.param("cuda", marks=pytest.mark.gpu)]
SHAPES = [  # (batch, cin, cout, h, w, (kh, kw), padding, dilation)
    (2, 5, 7, 6, 9, (3, 3), (1, 1), (1, 1)),
    (1, 20, 33, 5, 17, (3, 3), (1, 2), (1, 1)),
    (2, 3, 4, 7, 7, (2, 3), (0, 1), (2, 1)),
    (1, 70, 130, 3, 21, (1, 1), (0, 0), (1, 1)),
    (2, 8, 9, 5, 12, (3, 3), (1, 1), (1, 1)),  # rows of a multiple of 4: fp32 NCHW tiles leave through TMA
    (1, 4, 9, 2, 130, (3, 3), (1, 1), (1, 1)),  # a whole tile and a partial one per row
    (1, 16, 128, 2, 130, (3, 3), (1, 1), (1, 1)),  # the reference shape's 128 x 128 tiles, 8 warps, maxnreg
]


def _reference(x, w, b, padding, dilation, round_tf32):
    """float64 block on the operands the kernel multiplies (TF32-rounded for fp32)."""
    x, w = x.float(), w.float()
    if round_tf32:
        x, w = tc.tf32_rounded(x.contiguous()), tc.tf32_rounded(w.contiguous())
    z = F.conv2d(x.double(), w.double(), None if b is None else b.double(), 1, padding, dilation)
    return F.mish(F.mish(z))


def _inputs(shape, dtype, device, seed=0):
    n, cin, cout, h, w, k, _, _ = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, h, w, generator=g) * 2
    x.view(-1)[:: 7] *= 40  # large |conv| values: the clamp at 20 and Mish's negative tail
    weight = torch.randn(cout, cin, *k, generator=g) / (cin * k[0] * k[1]) ** 0.5
    bias = torch.randn(cout, generator=g)
    return x.to(device, dtype), weight.to(device, dtype), bias.to(device, dtype)


def test_round_tf32_is_round_to_nearest_ties_away():
    one = 1.0
    ulp = 2.0**-10  # TF32 keeps 10 mantissa bits
    values = torch.tensor([one + ulp / 2, one + ulp / 2 - 2**-23, -(one + ulp / 2), one + ulp * 1.5, 3.0e38,
                           float("inf"), -float("inf"), float("nan"), 0.0, -0.0, 1e-40])
    got = tc.tf32_rounded(values.clone())
    expected = torch.tensor([one + ulp, one, -(one + ulp), one + 2 * ulp, 3.0e38, float("inf"), -float("inf"),
                             float("nan"), 0.0, -0.0, 1e-40])
    assert torch.equal(got[:4], expected[:4])
    assert (got[4] - 3.0e38).abs() / 3.0e38 < 2**-10
    assert torch.equal(got[5:7], expected[5:7]) and got[7].isnan()
    assert torch.equal(got[8:].view(torch.int32) & -0x2000, got[8:].view(torch.int32))


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("input_cl", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", [None, 14], ids=["width-own", "width-14"])  # 14: hopper_conv's zero columns
def test_padded_input_is_padded_nhwc_rounded(device, input_cl, dtype, width):
    x = torch.randn(2, 5, 6, 9).to(device, dtype)
    x.view(-1)[:len(SPECIAL_VALUES)] = torch.tensor(SPECIAL_VALUES).to(dtype)
    if input_cl:
        x = x.contiguous(memory_format=CL)
    xp = tc.padded_input(x, (2, 1), 16, dtype == torch.float32, width=width)
    expected = torch.zeros(2, 10, width or 11, 16, dtype=dtype)
    expected[:, 2:8, 1:10, :5] = x.cpu().permute(0, 2, 3, 1)
    if dtype == torch.float32:
        expected = tc.tf32_rounded(expected)
    assert xp.shape == expected.shape and xp.is_contiguous()
    assert torch.equal(xp.cpu().view(torch.int16 if dtype != torch.float32 else torch.int32),
                       expected.view(torch.int16 if dtype != torch.float32 else torch.int32))


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("has_bias", [True, False])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_kernel_vs_float64(device, fmt, dtype, has_bias, shape):
    if device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter multiplies bf16 tiles loaded through tensor descriptors wrongly "
                    "(results ~1e10; fp16 and the same kernel on the GPU are right)")
    x, w, b = _inputs(shape, dtype, device)
    if not has_bias:
        b = None
    padding, dilation = shape[6], shape[7]
    ref = _reference(x.cpu(), w.cpu(), None if b is None else b.cpu(), padding, dilation, dtype == torch.float32)
    out = torch.full(ref.shape, float("nan"), dtype=dtype, device=device).contiguous(memory_format=fmt)
    y = tc.conv_mish2(x.contiguous(memory_format=fmt), w, b, padding, dilation, fmt, out=out)
    assert y is out
    # fp32: the kernel's own rounding only (fp32 accumulation, exp2 and the division);
    # 16-bit: one rounding of the output, plus fp32 accumulation of 16-bit products.
    rtol = {torch.float32: 2e-6, torch.bfloat16: 2**-8, torch.float16: 2**-11}[dtype]
    diff = (y.cpu().double() - ref).abs()
    assert not y.isnan().any()
    assert bool((diff <= rtol * (ref.abs() + ref.abs().max())).all()), f"max error {diff.max():.3g}"


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_kernel_special_inputs(device):
    """NaN and inf in the input reach exactly the outputs whose windows hold them, as in eager."""
    shape = (2, 4, 6, 8, 8, (3, 3), (1, 1), (1, 1))
    x, w, b = _inputs(shape, torch.float32, "cpu")
    x.view(-1)[torch.randperm(x.numel(), generator=torch.Generator().manual_seed(1))[:len(SPECIAL_VALUES)]] = \
        torch.tensor(SPECIAL_VALUES)
    ref = _reference(x, w, b, (1, 1), (1, 1), True)
    y = tc.conv_mish2(x.to(device), w.to(device), b.to(device), (1, 1), (1, 1)).cpu().double()
    assert torch.equal(y.isnan(), ref.isnan()) and ref.isnan().any()
    assert torch.equal(y.isinf(), ref.isinf())
    finite = ref.isfinite()
    assert bool(((y - ref).abs()[finite] <= 2e-6 * ref.abs()[finite] + 1e-5).all())


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[4]], ids=["plain-stores", "tma-stores"])
def test_kernel_writes_the_preactivation_beside_the_output(device, fmt, shape):
    """A training forward's call: ``conv + bias`` into ``preactivation`` (poisoned first), every element
    against float64 on the TF32-rounded operands, and the output bit for bit as without it."""
    x, w, b = _inputs(shape, torch.float32, device)
    padding, dilation = shape[6], shape[7]
    x = x.contiguous(memory_format=fmt)
    plain = tc.conv_mish2(x, w, b, padding, dilation, fmt)
    pre = torch.full_like(plain, float("nan"))
    out = tc.conv_mish2(x, w, b, padding, dilation, fmt, preactivation=pre)
    assert torch.equal(out.view(torch.int32), plain.view(torch.int32))
    xr, wr = tc.tf32_rounded(x.cpu().contiguous()), tc.tf32_rounded(w.cpu().contiguous())
    z = F.conv2d(xr.double(), wr.double(), b.cpu().double(), 1, padding, dilation)
    assert pre.is_contiguous(memory_format=fmt) and not pre.isnan().any()
    diff = (pre.cpu().double() - z).abs()
    assert bool((diff <= 2e-6 * (z.abs() + z.abs().max())).all()), f"max error {diff.max():.3g}"


@pytest.mark.parametrize("store_pre", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("tma_store", [False, True], ids=["plain-stores", "tma-stores"])
def test_kernel_compiles_for_hopper(monkeypatch, store_pre, tma_store):
    """The reference shape's config (128 x 128 tiles, 8 warps, 128 registers), both epilogues."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    _, kernel = tc._kernels(False)

    def desc(*block):
        return f"tensordesc<fp32[{','.join(map(str, block))}]>"

    signature = {"x_desc": desc(128, 32), "w_desc": desc(128, 32), "bias": "*fp32", "out": "*fp32", "pre": "*fp32",
                 **{name: "i32" for name in ("H", "W", "Hp", "Wp", "Cout", "TAPS_W", "DH", "DW")}}
    constexprs = {"TAPS": 9, "CP": 64, "HAS_BIAS": True, "MISH_COUNT": 2, "CHANNELS_LAST": False,
                  "STORE_PRE": store_pre, "TMA_STORE": tma_store, "BLOCK_P": 128, "BLOCK_CO": 128, "BLOCK_K": 32,
                  "NUM_STAGES": 3}
    if tma_store:
        signature["out_desc"] = desc(1, 128, 1, 128)
    else:
        constexprs["out_desc"] = None
    signature = {name: signature[name] for name in kernel.arg_names if name in signature}
    compiled = compile_for_hopper(kernel, signature, constexprs, num_warps=8, maxnreg=128)
    assert ".maxnreg 128" in compiled.asm["ptx"] and compiled.asm["cubin"]


def test_a_preactivation_unlike_the_output_is_refused():
    x, w, b = _inputs(SHAPES[0], torch.float32, "cpu")
    with pytest.raises(ValueError, match="out must be"):
        tc.conv_mish2(x, w, b, (1, 1), (1, 1), preactivation=torch.empty(2, 7, 6, 8))


def test_out_of_the_wrong_layout_is_refused():
    x, w, b = _inputs(SHAPES[0], torch.float32, "cpu")
    out = torch.empty(2, 7, 6, 9)
    with pytest.raises(ValueError, match="out must be a torch.channels_last"):
        tc.conv_mish2(x, w, b, (1, 1), (1, 1), CL, out=out)


def _spec(**conv_args) -> ConvSpec:
    return ConvSpec.of(nn.Conv2d(4, 8, 3, **conv_args))


@pytest.mark.parametrize("conv_args,why", [
    ({"stride": 2}, "stride (2, 2)"),
    ({"groups": 2}, "grouped conv"),
    ({"padding": "same"}, "padding 'same'"),
    ({"padding": 1, "padding_mode": "reflect"}, "mode 'reflect'"),
])
def test_declines_what_it_cannot_compute(monkeypatch, conv_args, why):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x, w = torch.randn(1, 4, 8, 8), torch.randn(8, 4 // conv_args.get("groups", 1), 3, 3)
    reasons = plans.get_plan("triton_conv").not_supported_reasons(x, w, None, _spec(**conv_args))
    assert any(why in r for r in reasons), reasons


def test_declines_an_output_image_of_2_to_the_31_elements(monkeypatch):
    """The training epilogue's offsets within an image are 32-bit (meta tensors: nothing allocated)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    plan = plans.get_plan("triton_conv")
    x = torch.empty(1, 16, 1026, 1026, device="meta")
    assert not any("2^31" in r for r in plan.not_supported_reasons(x, torch.empty(2040, 16, 3, 3, device="meta"),
                                                                  None, _spec()))
    reasons = plan.not_supported_reasons(x, torch.empty(2056, 16, 3, 3, device="meta"), None, _spec())
    assert any("one output image has 2^31 elements" in r for r in reasons), reasons


def test_declines_fp32_without_tf32(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    reasons = plans.get_plan("triton_conv").not_supported_reasons(
        torch.randn(1, 4, 8, 8), torch.randn(8, 4, 3, 3), None, _spec())
    assert any("TF32 off" in r for r in reasons), reasons
    assert not plans.get_plan("triton_conv").not_supported_reasons(
        torch.randn(1, 4, 8, 8, dtype=torch.bfloat16), torch.randn(8, 4, 3, 3, dtype=torch.bfloat16), None, _spec())


@pytest.mark.skipif(HAS_GPU, reason="checks the CPU-only answer")
def test_unavailable_on_cpu_without_the_interpreter_says_why(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET=1" in plans.get_plan("triton_conv").is_available().reason
    monkeypatch.setenv("MISHOPS_PLAN", "triton_conv")
    with pytest.raises(plans.NoPlanError, match="triton_conv"):
        run_block(torch.randn(1, 4, 8, 8), nn.Conv2d(4, 8, 3))


@pytest.mark.parametrize("module_cl,input_cl", [(False, False), (True, False), (False, True)])
def test_run_block_through_the_plan_in_the_interpreter(monkeypatch, module_cl, input_cl):
    """Forced through ``mishops.plans``: values, PyTorch's memory format, and gradients from the
    backward that reads the pre-activation the plan's forward stored, against the reference module."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("MISHOPS_PLAN", "triton_conv")
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 10, 3, padding=1)
    x = torch.randn(2, 6, 7, 11)
    if module_cl:
        conv = conv.to(memory_format=CL)
    if input_cl:
        x = x.contiguous(memory_format=CL)
    grad = torch.randn(2, 10, 7, 11)

    def grads(fn):
        inp = x.clone().requires_grad_(True)
        out = fn(inp)
        return (out, *torch.autograd.grad(out, [inp, conv.weight, conv.bias], grad))

    ours = grads(lambda t: run_block(t, conv))
    with torch.no_grad():
        assert plans.mismatch(ours[0], F.mish(F.mish(conv(x)))) == ""
    # the stored pre-activation is the kernel's (TF32 products)
    for a, r in zip(ours[1:], gradients_at_tf32_preactivation(x, conv, grad)):
        torch.testing.assert_close(a.double(), r, rtol=1e-4, atol=1e-5 * float(r.abs().max()))


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL], ids=["nchw", "channels_last"])
def test_a_wider_input_is_cast_by_the_input_pass(device, fmt):
    """Autocast's cast of x, done while padding: the same bits as casting first."""
    x, w, b = _inputs(SHAPES[4], torch.float32, device)
    w16, b16 = w.half(), b.half()
    x = x.contiguous(memory_format=fmt)
    fused = tc.conv_mish2(x, w16, b16, (1, 1), (1, 1), fmt)
    cast_first = tc.conv_mish2(x.half(), w16, b16, (1, 1), (1, 1), fmt)
    assert fused.dtype == torch.float16 and fused.is_contiguous(memory_format=fmt)
    assert torch.equal(fused.view(torch.int16), cast_first.view(torch.int16))


def test_under_autocast_run_block_never_casts_the_input_separately(monkeypatch):
    """The plan takes the fp32 input itself (``casts_input``); values, dtype and gradients
    (dx in fp32, as autocast gives) match eager autocast."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("MISHOPS_PLAN", "triton_conv")
    casts = []  # of the input (the weight and bias are cast as for any plan)
    real_cast = autocast.PendingCast.cast
    monkeypatch.setattr(autocast.PendingCast, "cast",
                        lambda self: (self.source is x and casts.append(1)) or real_cast(self))
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 10, 3, padding=1)
    x = torch.randn(2, 6, 7, 12, requires_grad=True)
    grad = torch.randn(2, 10, 7, 12)
    with torch.autocast("cpu", dtype=torch.float16):
        y = run_block(x, conv)
        expected = F.mish(F.mish(conv(x)))
    assert casts == [] and y.dtype == expected.dtype == torch.float16
    assert plans.mismatch(y.detach(), expected.detach()) == ""
    ours = torch.autograd.grad(y, [x, conv.weight, conv.bias], grad.half())
    theirs = torch.autograd.grad(expected, [x, conv.weight, conv.bias], grad.half())
    for a, e in zip(ours, theirs):
        assert a.dtype == e.dtype
        torch.testing.assert_close(a, e, rtol=2e-2, atol=2e-2 * float(e.abs().max()))
    monkeypatch.setenv("MISHOPS_PLAN", "torch_conv")
    with torch.autocast("cpu", dtype=torch.float16):
        run_block(x, conv)
    assert casts == [1]  # a plan without casts_input gets autocast's cast
