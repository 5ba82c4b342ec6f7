"""The Hopper CUDA conv plan: the kernel compiles for sm_90a without spills (CPU, wherever nvcc
is), what the plan declines and why, and on a Hopper GPU its block against float64 within 2x the
eager block's own error, in fp32 (TF32), bf16 and fp16, NCHW and channels_last."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mishops import plans
from mishops.plans import ConvSpec, run_block
from mishops.plans import hopper_conv as hc
from tests.blocks import block64, isolated_plans, tf32_floor, tf32_round  # noqa: F401 (fixture: no forced plan, a short budget, the registry restored)

CL = torch.channels_last
HAS_HOPPER = torch.cuda.is_available() and any(
    torch.cuda.get_device_capability(i) == (9, 0) for i in range(torch.cuda.device_count()))


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


def test_kernel_compiles_for_sm90a_without_spills(tmp_path):
    """ptxas's report for every instance (fp32/bf16/fp16 x one or two Mish x with or without the split
    epilogue's warpgroups): no stack, no spills, registers within one CTA an SM, and no warning
    (a plain sm_90 build would reject the wgmma and TMA instructions)."""
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (no CUDA toolkit on this machine): cannot check the sm_90a build")
    src = hc.SOURCES[0]
    done = subprocess.run([nvcc, "-std=c++17", "-O3", "-gencode=arch=compute_90a,code=sm_90a", "-Xptxas", "-v",
                           "-c", str(src), "-o", str(tmp_path / "hopper_conv.o")],
                          capture_output=True, text=True, timeout=600)
    report = done.stdout + done.stderr
    assert done.returncode == 0, report
    functions = re.findall(r"Compiling entry function '(\w+)'", report)
    assert len(functions) == 12, report
    spills = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", report)
    assert len(spills) == 12 and all(s == ("0", "0", "0") for s in spills), report
    registers = dict(zip(functions, (int(r) for r in re.findall(r"Used (\d+) registers", report))))
    # setmaxnreg only moves the launch's registers between warpgroups, and the kernel's shares add up
    # to all of them (Registers in the kernel): with fewer at launch the consumers would wait forever
    for name, count in registers.items():  # 640 threads with the split epilogue (template flag Lb1), else 384
        assert count == (96 if "Lb1E" in name else 168), report
    print(f"registers per instance: {registers}")
    assert "warning" not in report.lower(), report  # e.g. wgmma serialised, setmaxnreg ignored


def _spec(**conv_args) -> ConvSpec:
    return ConvSpec.of(nn.Conv2d(8, 16, 3, **conv_args))


@pytest.mark.parametrize("conv_args,why", [
    ({"groups": 2}, "grouped conv"),
    ({"padding": "same"}, "padding 'same'"),
    ({"padding": 1, "padding_mode": "reflect"}, "mode 'reflect'"),
])
def test_declines_what_it_cannot_compute(conv_args, why):
    x, w = torch.randn(1, 8, 8, 8), torch.randn(16, 8 // conv_args.get("groups", 1), 3, 3)
    reasons = plans.get_plan("hopper_conv").not_supported_reasons(x, w, None, _spec(**conv_args))
    assert any(why in r for r in reasons), reasons


@pytest.mark.parametrize("stride", [2, (2, 3), (1, 2)])
def test_strided_convs_are_taken_without_row_boxes(stride):
    """Any stride: the kernel views a padded row as (pixel / stride, pixel % stride). A kernel row's
    taps then start at different phases, so they cannot share one row box."""
    plan = plans.get_plan("hopper_conv")
    conv = nn.Conv2d(64, 128, 3, stride=stride)
    x = torch.randn(1, 64, 40, 40)
    assert not any("stride" in r for r in plan.not_supported_reasons(x, conv.weight, None, ConvSpec.of(conv)))
    found = plan.configs(x, conv.weight.detach(), None, ConvSpec.of(conv))
    assert found and not any(c.rowbox for c in found)


def test_pad_pass_widens_rows_to_a_multiple_of_the_stride():
    """The kernel views a padded row as (pixel / stride, pixel % stride), so the pass adds zero columns
    (here the torch path, which runs where Triton does not)."""
    x = torch.randn(2, 5, 6, 9)
    xp = hc.padded_input(x, (1, 1), 32, torch.float32, width=12)
    assert xp.shape == (2, 8, 12, 32)
    assert torch.equal(xp[:, 1:7, 1:10, :5], tf32_round(x.permute(0, 2, 3, 1)))
    assert not xp[:, :, 10:].any() and not xp[..., 5:].any() and not xp[:, 0].any()


def test_declines_odd_channel_counts_and_fp32_without_tf32(monkeypatch):
    plan = plans.get_plan("hopper_conv")
    reasons = plan.not_supported_reasons(torch.randn(1, 3, 8, 8), torch.randn(5, 3, 3, 3), None, _spec())
    assert any("5 output channels, not a multiple of 8" in r for r in reasons), reasons
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    reasons = plan.not_supported_reasons(torch.randn(1, 8, 8, 8), torch.randn(16, 8, 3, 3), None, _spec())
    assert any("TF32 off" in r for r in reasons), reasons
    reasons = plan.not_supported_reasons(torch.randn(1, 8, 8, 8, dtype=torch.bfloat16),
                                         torch.randn(16, 8, 3, 3, dtype=torch.bfloat16), None, _spec())
    assert not any("TF32" in r for r in reasons), reasons


def test_one_mish_is_supported():
    spec = ConvSpec.of(nn.Conv2d(8, 16, 3), mish_count=1)
    reasons = plans.get_plan("hopper_conv").not_supported_reasons(
        torch.randn(1, 8, 8, 8), torch.randn(16, 8, 3, 3), None, spec)
    assert not any("Mish" in r for r in reasons), reasons


def test_configs_are_named_and_pruned_by_shape():
    plan = plans.get_plan("hopper_conv")
    x, w = torch.randn(1, 64, 16, 16), torch.randn(128, 64, 3, 3)
    names = [c.name for c in plan.configs(x, w, None, _spec())]
    assert names[0] == "s5_pingpong_rowbox_split" and len(set(names)) == len(names)
    assert "s6_pingpong_rowbox" in names and "s4_pingpong_rowbox" in names
    tiny = plan.configs(torch.randn(1, 8, 8, 8), torch.randn(16, 8, 1, 1), None, _spec())
    assert all(c.stages <= 3 for c in tiny) and not any(c.rowbox for c in tiny)


@pytest.mark.parametrize("kernel,dilation,rowbox_stages", [
    (3, 1, {4, 5, 6}), (5, 2, {6}), (5, 3, set()), (7, 1, set()), (1, 1, set())])
def test_row_boxes_only_where_the_ring_and_box_hold_a_kernel_row(kernel, dilation, rowbox_stages):
    """A row box's stage is held until the row's last tap (ring deeper than the kernel's width) and
    holds 8 rows of shift ((width - 1) x dilation); elsewhere the kernel would refuse the launch."""
    conv = nn.Conv2d(64, 128, kernel, dilation=dilation)
    x, w = torch.randn(1, 64, 40, 40), conv.weight.detach()
    found = plans.get_plan("hopper_conv").configs(x, w, None, ConvSpec.of(conv))
    assert {c.stages for c in found if c.rowbox} == rowbox_stages


SPLIT = {"s5_pingpong_rowbox_split", "s5_pingpong_split"}


@pytest.mark.parametrize("dtype,cl,offered", [
    (torch.float32, False, {"s4_pingpong_rowbox_staged", "s4_pingpong_staged"} | SPLIT),
    (torch.float32, True, {"s4_pingpong_rowbox_staged", "s4_pingpong_staged"} | SPLIT),
    (torch.bfloat16, False, {"s4_pingpong_rowbox_staged", "s4_pingpong_staged", "s5_pingpong_rowbox_staged"} | SPLIT),
], ids=["fp32-nchw", "fp32-cl", "bf16-nchw"])
def test_buffered_epilogues_only_where_shared_memory_holds_them(dtype, cl, offered):
    """An fp32 slice buffer per consumer (2 x 32 KB) leaves room for 4 stages, a 16-bit one for 5;
    the split epilogue's fp32 slice (34 KB) for 5 in either."""
    fmt = CL if cl else torch.contiguous_format
    x = torch.randn(1, 64, 20, 20, dtype=dtype).contiguous(memory_format=fmt)
    w = torch.randn(128, 64, 3, 3, dtype=dtype).contiguous(memory_format=fmt)
    found = plans.get_plan("hopper_conv").configs(x, w, None, _spec())
    assert {c.name for c in found if c.epilogue != "direct"} == offered
    for c in hc.CONFIGS:
        assert c.fits(w, 1, cl) == (c.shared_memory(w.element_size()) <= hc.MAX_SHARED_MEMORY)


def test_config_names_an_epilogue_it_has():
    assert hc.HopperConfig(4, 2, True, "split").kernel_args == (4, 2, True, 2)
    with pytest.raises(ValueError, match="one of"):
        hc.HopperConfig(4, 2, epilogue="tma")


@pytest.mark.skipif(HAS_HOPPER, reason="checks the answer without a Hopper GPU")
def test_unavailable_without_a_hopper_gpu_says_why(monkeypatch):
    reason = plans.get_plan("hopper_conv").is_available().reason
    assert reason and ("CUDA" in reason or "Hopper" in reason), reason
    monkeypatch.setenv("MISHOPS_PLAN", "hopper_conv")
    with pytest.raises(plans.NoPlanError, match="hopper_conv"):
        run_block(torch.randn(1, 8, 8, 8), nn.Conv2d(8, 16, 3))


# --- on a Hopper GPU ----------------------------------------------------------------------------------

GPU_SHAPES = [  # (batch, cin, cout, h, w, k, padding, stride)
    pytest.param((64, 64, 128, 256, 256, 3, 0, 1), id="reference"),
    pytest.param((1, 64, 128, 256, 256, 3, 0, 1), id="batch1"),
    pytest.param((3, 8, 24, 37, 53, 3, 1, 1), id="8to24_37x53_pad1"),
    pytest.param((4, 64, 128, 75, 301, 3, 1, 2), id="stride2_75x301_pad1"),  # an odd padded width
    pytest.param((2, 16, 32, 33, 47, 5, 2, (2, 3)), id="stride2x3_k5"),
]
SETTINGS = ["tf32", "bf16-autocast", "fp16-autocast"]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_HOPPER, reason="needs a Hopper GPU (compute capability 9.0)")
@pytest.mark.parametrize("shape", GPU_SHAPES)
@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("input_cl", [False, True], ids=["nchw", "channels_last"])
def test_block_matches_float64_within_twice_eager(monkeypatch, shape, setting, input_cl):
    n, cin, cout, h, w, k, pad, stride = shape
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    monkeypatch.setenv("MISHOPS_PLAN", "hopper_conv")
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, k, padding=pad, stride=stride).cuda()
    x = torch.randn(n, cin, h, w, device="cuda")
    if input_cl:
        x = x.contiguous(memory_format=CL)
    amp = {"bf16-autocast": torch.bfloat16, "fp16-autocast": torch.float16}.get(setting)
    with torch.no_grad(), torch.autocast("cuda", dtype=amp, enabled=amp is not None):
        ours = run_block(x, conv)
        eager = F.mish(F.mish(conv(x)))
    assert ours.dtype == eager.dtype and ours.shape == eager.shape
    fmt = CL if input_cl else torch.contiguous_format
    assert ours.is_contiguous(memory_format=fmt)
    m = min(n, 2)  # float64 on a slice of the batch
    if amp is not None:  # the float64 reference sees the operands autocast gave the conv
        xq, wq, bq = x[:m].to(amp), conv.weight.to(amp), conv.bias.to(amp)
        z = F.conv2d(xq.double(), wq.double(), bq.double(), conv.stride, conv.padding)
        ref = F.mish(F.mish(z))
        floor = 0.0
    else:
        ref = block64(x[:m], conv)
        floor = tf32_floor(x[:m], conv, ref)
    err = float((ours[:m].double() - ref).abs().max())
    eager_err = float((eager[:m].double() - ref).abs().max())
    assert not ours.isnan().any()
    tol = 2 * max(eager_err, floor) + 1e-6 * float(ref.abs().max())
    assert err <= tol, f"{err:.3g} vs eager {eager_err:.3g}, tf32 floor {floor:.3g}"


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_HOPPER, reason="needs a Hopper GPU (compute capability 9.0)")
@pytest.mark.parametrize("config", hc.CONFIGS, ids=lambda c: c.name)
@pytest.mark.parametrize("dtype,cl", [(torch.float32, False), (torch.bfloat16, True)], ids=["fp32-nchw", "bf16-cl"])
def test_every_config_matches_float64(monkeypatch, config, dtype, cl):
    """Each config the tuner may time, on a shape with partial tiles (150-wide rows) and several tiles
    a CTA, into an output poisoned with NaN: every element written, within 2x eager's error."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    torch.manual_seed(0)
    conv = nn.Conv2d(64, 128, 3, padding=1).cuda().to(dtype)
    if not config.fits(conv.weight, 1, cl):
        pytest.skip(f"{config.name} does not fit {dtype} (the plan never offers it there)")
    x = torch.randn(3, 64, 20, 150, device="cuda", dtype=dtype)
    fmt = CL if cl else torch.contiguous_format
    x = x.contiguous(memory_format=fmt)
    out = torch.full((3, 128, 20, 150), float("nan"), device="cuda", dtype=dtype).contiguous(memory_format=fmt)
    hc.conv_mish(x, conv.weight, conv.bias, (1, 1), (1, 1), 2, fmt, config, out=out)
    with torch.no_grad():
        eager = F.mish(F.mish(conv(x)))
        ref = F.mish(F.mish(F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), 1, 1)))
    err = float((out.double() - ref).abs().max())  # NaN (an unwritten element) fails the comparison
    floor = tf32_floor(x, conv, ref) if dtype == torch.float32 else 0.0
    tol = 2 * max(float((eager.double() - ref).abs().max()), floor) + 1e-6 * float(ref.abs().max())
    assert err <= tol, f"{config.name}: {err:.3g} vs tolerance {tol:.3g}"


NEW_PROCESS = """
import torch, torch.nn.functional as F
from mishops.plans import hopper_conv as hc
torch.backends.cudnn.allow_tf32 = True
x = torch.randn(2, 64, 9, 140, device="cuda")
w, b = torch.randn(128, 64, 3, 3, device="cuda") / 24, torch.randn(128, device="cuda")
y = hc.conv_mish(x, w, b, (1, 1), (1, 1))
ref = F.mish(F.mish(F.conv2d(x.double(), w.double(), b.double(), 1, 1)))
print(hc.stats["builds"], float((y.double() - ref).abs().max()))
"""


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_HOPPER, reason="needs a Hopper GPU (compute capability 9.0)")
def test_a_new_process_loads_the_built_kernel_without_rebuilding():
    hc.extension()  # built here (or found built) in the shared build directory
    done = subprocess.run([sys.executable, "-c", NEW_PROCESS], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ))
    assert done.returncode == 0, done.stderr
    builds, err = done.stdout.strip().splitlines()[-1].split()
    assert int(builds) == 0, done.stdout
    assert float(err) < 1e-2, done.stdout  # the loaded kernel computes the block (TF32 operands)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_HOPPER, reason="needs a Hopper GPU (compute capability 9.0)")
def test_declines_three_to_five_channels_on_the_gpu():
    reasons = plans.get_plan("hopper_conv").not_supported_reasons(
        torch.randn(1, 3, 8, 8, device="cuda"), torch.randn(5, 3, 3, 3, device="cuda"), None, _spec())
    assert reasons == ["5 output channels, not a multiple of 8"], reasons
