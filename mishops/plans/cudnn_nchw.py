"""The cuDNN fusion where PyTorch's conv would return a contiguous (NCHW) tensor: fuse, then transpose.

cuDNN has no engine for the fused graph with an NCHW output, so this plan runs ``cudnn_fused``
(NHWC output) and turns the result into NCHW in one tiled Triton pass (the kernel that also serves
``cudnn_epilogue``, there with the bias and the Mish applied on the way). PyTorch's own
``contiguous()`` moves a large NHWC result at a fraction of the copy bandwidth, where this
transpose is bound by memory, so the default layout of the block keeps most of the fusion's gain.
One Mish or two: whatever the fused graph applied (``ConvSpec.mish_count``).

The kernel is a plain function that ``triton.jit`` wraps on first use (``import mishops`` must not
import Triton), once per mode: compiled, or Triton's CPU interpreter under ``TRITON_INTERPRET=1``,
which lets CI run it on CPU tensors.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from mishops.plans import ConvSpec, get_plan, register_plan
from mishops.plans.cudnn_fused import OnCudnnGraphs
from mishops.registry import Availability

tl = None  # triton.language, bound by _kernel() on first use; the kernel looks it up at launch


def _nhwc_to_nchw_kernel(src, bias, dst, pre, HW, C, hw_tiles, c_tiles, HAS_BIAS: tl.constexpr,
                         MISH_COUNT: tl.constexpr, STORE_PRE: tl.constexpr, BLOCK_HW: tl.constexpr,
                         BLOCK_C: tl.constexpr):
    """One [BLOCK_HW, BLOCK_C] tile of one image, read along C (contiguous in NHWC) and written
    along HW (contiguous in NCHW): Triton gives the load and the store each a coalesced layout
    and passes the tile between them through shared memory. On the way, optionally, the bias and
    ``MISH_COUNT`` Mish (0, 1 or 2) in fp32 -- the formula of ``mishops.backends.triton`` -- so a conv without its
    epilogue costs one pass more than the fused kernel, not two. ``STORE_PRE``: the value before
    the Mish (the pre-activation a training forward keeps) is written to ``pre`` too, in NCHW.
    A 1-D grid (channel tile fastest) has room for any number of images."""
    tile_id = tl.program_id(0)
    c = (tile_id % c_tiles) * BLOCK_C + tl.arange(0, BLOCK_C)
    rest = tile_id // c_tiles
    hw = (rest % hw_tiles) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    image = (rest // hw_tiles).to(tl.int64) * HW * C  # 64-bit: the whole tensor may pass 2^31
    mask = (hw[:, None] < HW) & (c[None, :] < C)
    v = tl.load(src + image + hw[:, None] * C + c[None, :], mask=mask)  # neither: the bits move untouched
    if HAS_BIAS:
        v = v.to(tl.float32) + tl.load(bias + c, mask=c < C).to(tl.float32)[None, :]
    if STORE_PRE:
        tl.store(pre + image + c[None, :] * HW + hw[:, None], v.to(pre.dtype.element_ty), mask=mask)
    if MISH_COUNT > 0:
        v = v.to(tl.float32)
        for _ in tl.static_range(MISH_COUNT):
            e = tl.exp2(tl.minimum(v, 20.0) * 1.4426950408889634)  # e^v as 2^(v log2 e)
            n = e * (e + 2.0)
            v = v * (n / (n + 2.0))
    tl.store(dst + image + c[None, :] * HW + hw[:, None], v.to(dst.dtype.element_ty), mask=mask)


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


def nhwc_to_nchw(y: torch.Tensor, bias: torch.Tensor | None = None, mish2: bool = False,
                 dtype: torch.dtype | None = None, mish_count: int | None = None,
                 preactivation: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``y.contiguous()`` for a 4-D channels_last ``y``, in one pass; with ``bias`` (one value per
    channel) added and Mish applied ``mish_count`` times (``mish2=True``: twice) on the way, in
    fp32, stored as ``dtype`` (default y's). ``preactivation``: returns (that, ``y + bias`` in NCHW
    and ``dtype``), both written by the same pass.
    Tiles hold 4096 elements: 64 channels by 64 pixels, or all of a narrower channel dimension by
    more pixels. One image must hold fewer than 2^31 elements (its offsets are 32-bit)."""
    n, c, h, w = y.shape
    if not y.is_contiguous(memory_format=torch.channels_last):
        raise ValueError(f"nhwc_to_nchw needs a channels_last tensor, got strides {y.stride()}")
    if c * h * w >= 2**31:
        raise ValueError(f"nhwc_to_nchw: one image of {c * h * w} elements passes 2^31")
    count = (2 if mish2 else 0) if mish_count is None else mish_count
    if count not in (0, 1, 2):
        raise ValueError(f"nhwc_to_nchw: mish_count must be 0, 1 or 2, not {count!r}")
    out = torch.empty(y.shape, dtype=dtype or y.dtype, device=y.device)
    pre = torch.empty_like(out) if preactivation else None
    if out.numel():
        block_c = min(64, 1 << (c - 1).bit_length())
        block_hw = 4096 // block_c
        hw_tiles, c_tiles = (h * w + block_hw - 1) // block_hw, (c + block_c - 1) // block_c
        # FMA contraction named, not defaulted: Triton 3.9 warns that 3.10 changes the default.
        _kernel(_interpreting())[(n * hw_tiles * c_tiles,)](
            y, y if bias is None else bias, out, out if pre is None else pre, h * w, c, hw_tiles, c_tiles,
            HAS_BIAS=bias is not None, MISH_COUNT=count, STORE_PRE=preactivation, BLOCK_HW=block_hw,
            BLOCK_C=block_c, num_warps=4, enable_fp_fusion=True)
    return (out, pre) if preactivation else out


@register_plan
class CudnnFusedNchwPlan(OnCudnnGraphs):
    name = "cudnn_fused_nchw"
    priority = 20

    def is_available(self) -> Availability:
        fused = super().is_available()
        if not fused:
            return fused
        if importlib.util.find_spec("triton") is None:
            return Availability.no("triton is not installed: pip install mishops[triton]")
        return Availability.yes()

    def forward(self, x, weight, bias, spec: ConvSpec) -> torch.Tensor:
        y = get_plan("cudnn_fused").forward(x, weight, bias, spec)
        if y.is_contiguous():  # one channel or one pixel: NHWC is NCHW already
            return y
        with torch.cuda.device(y.device):
            return nhwc_to_nchw(y)
