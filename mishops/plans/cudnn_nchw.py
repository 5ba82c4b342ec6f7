"""The cuDNN fusion where PyTorch's conv would return a contiguous (NCHW) tensor: fuse, then transpose.

cuDNN has no engine for the fused graph with an NCHW output, so this plan runs ``cudnn_fused``
(NHWC output) and turns the result into NCHW in one tiled Triton pass. PyTorch's own
``contiguous()`` moves the 2 GB result of the reference shape at under a third of the copy
bandwidth (4.4 ms on H100), where a bandwidth-bound transpose needs about 1.4 ms; with the fused
graph at about 2.9 ms from an NCHW input, the default layout of the block gets most of the
fusion's gain.

The kernel is a plain function that ``triton.jit`` wraps on first use (``import mishops`` must not
import Triton), once per mode: compiled, or Triton's CPU interpreter under ``TRITON_INTERPRET=1``,
which lets CI run it on CPU tensors.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from mishops.plans import ConvSpec, Plan, availability, get_plan, register_plan
from mishops.registry import Availability

tl = None  # triton.language, bound by _kernel() on first use; the kernel looks it up at launch

#: CUDA's limit on the grid's third dimension, which walks the images.
MAX_IMAGES = 65535


def _nhwc_to_nchw_kernel(src, dst, HW, C, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
    """One [BLOCK_HW, BLOCK_C] tile of one image, read along C (contiguous in NHWC) and written
    along HW (contiguous in NCHW): Triton gives the load and the store each a coalesced layout
    and passes the tile between them through shared memory."""
    hw = tl.program_id(0) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    image = tl.program_id(2).to(tl.int64) * HW * C  # 64-bit: the whole tensor may pass 2^31
    mask = (hw[:, None] < HW) & (c[None, :] < C)
    tile = tl.load(src + image + hw[:, None] * C + c[None, :], mask=mask)
    tl.store(dst + image + c[None, :] * HW + hw[:, None], tile, mask=mask)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


@functools.cache
def _kernel(interpret: bool):
    """The kernel jitted for one mode; ``interpret`` is only the cache key (``triton.jit`` reads
    ``TRITON_INTERPRET`` itself)."""
    global tl
    import triton
    import triton.language as tl

    return triton.jit(_nhwc_to_nchw_kernel)


def nhwc_to_nchw(y: torch.Tensor) -> torch.Tensor:
    """``y.contiguous()`` for a 4-D channels_last ``y``, in one pass. Tiles hold 4096 elements:
    64 channels by 64 pixels, or all of a narrower channel dimension by more pixels."""
    n, c, h, w = y.shape
    out = torch.empty(y.shape, dtype=y.dtype, device=y.device)
    if out.numel():
        block_c = min(64, 1 << (c - 1).bit_length())
        block_hw = 4096 // block_c
        grid = ((h * w + block_hw - 1) // block_hw, (c + block_c - 1) // block_c, n)
        _kernel(_interpreting())[grid](y, out, h * w, c, BLOCK_HW=block_hw, BLOCK_C=block_c, num_warps=4)
    return out


@register_plan
class CudnnFusedNchwPlan(Plan):
    name = "cudnn_fused_nchw"
    priority = 20
    devices = frozenset({"cuda"})
    dtypes = frozenset({torch.float16, torch.bfloat16, torch.float32})
    output_formats = frozenset({torch.contiguous_format})

    def is_available(self) -> Availability:
        fused = availability("cudnn_fused")
        if not fused:
            return Availability.no(f"needs the cudnn_fused plan: {fused.reason}")
        if importlib.util.find_spec("triton") is None:
            return Availability.no("triton is not installed: pip install mishops[triton]")
        return Availability.yes()

    def not_supported_reasons(self, x, weight, bias, spec: ConvSpec) -> list[str]:
        reasons = super().not_supported_reasons(x, weight, bias, spec)
        reasons += get_plan("cudnn_fused").fusion_reasons(x, weight, bias, spec)
        if x.dim() == 4 and x.shape[0] > MAX_IMAGES:
            reasons.append(f"more than {MAX_IMAGES} images")
        return reasons

    def source_hash(self) -> str:
        return f"{super().source_hash()}-{get_plan('cudnn_fused').source_hash()}"

    def forward(self, x, weight, bias, spec: ConvSpec) -> torch.Tensor:
        y = get_plan("cudnn_fused").forward(x, weight, bias, spec)
        if y.is_contiguous():  # one channel or one pixel: NHWC is NCHW already
            return y
        with torch.cuda.device(y.device):
            return nhwc_to_nchw(y)
