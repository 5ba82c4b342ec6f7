"""A Triton implicit-GEMM conv with bias + Mish (once or twice) in its epilogue, writing NCHW directly.

cuDNN fuses the block only into an NHWC output; an NCHW module then pays a separate pass over the
2 GB result (``cudnn_fused_nchw``, ``cudnn_conv_epilogue_*``). This plan writes each tile straight
from the accumulator in the layout PyTorch would give (NCHW, or channels_last where the input or
the weight is), so the output is written once. Its timings and errors are in the results files
(``benchmarks/results/``) and the README.

Two kernels:

* ``_pad_round_kernel`` copies the input, in any layout, into a zero-padded NHWC buffer whose
  fp32 values are rounded to TF32 (round to nearest, as cuDNN's TF32 conv does). Tensor cores
  take fp32 operands only K-major (channels contiguous), and Triton's ``tl.dot`` in TF32
  truncates the operands, which gives 2.8x the eager block's error; rounding here, in a pass
  that must touch the data anyway, gives exactly eager's error at no cost in the main loop.
  The padding makes every (tap, channel block) operand tile one rectangle of the 2-D view
  ``[N * Hp * Wp, C]``: a TMA descriptor loads it with no index arithmetic or masks.
* ``_conv_kernel``: one program per (image, output row, ``BLOCK_P`` pixels of that row,
  ``BLOCK_CO`` output channels) accumulates ``X[P, K] @ W[K, CO]`` over K = (kh, kw, channel
  block), then adds the bias, applies Mish ``MISH_COUNT`` times (1 or 2) in fp32 and stores the tile along the pixels,
  which are contiguous in NCHW.

Stride 1 only (a strided conv's pixels are not one rectangle of the padded view); any padding,
dilation and kernel size; groups 1; fp32 (TF32 on, as PyTorch's conv by default), bf16 and fp16.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from dataclasses import dataclass

import torch

from mishops.plans import ConvSpec, Plan, expected_memory_format, operand_reasons, register_plan
from mishops.plans.base import block_output
from mishops.registry import Availability

tl = None  # triton.language, bound by _kernels() on first use; the kernels look it up at launch

#: CUDA's limit on a grid's second and third dimensions.
MAX_GRID_YZ = 65535


def _pad_round_kernel(x, xp, C, H, W, Hp, Wp, Cp, PH, PW, sxn, sxc, sxh, sxw,
                      ROUND_TF32: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    """One [BLOCK_W, BLOCK_C] tile of one padded row: pixels outside the image and channels past
    C are zeros."""
    wp = tl.program_id(0) * BLOCK_W + tl.arange(0, BLOCK_W)
    hp = tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)
    h = hp - PH
    w = wp - PW
    w_end = tl.where((h >= 0) & (h < H), W, 0)  # rows of padding have no pixels inside
    inside = (w >= 0) & (w < w_end)
    src = x + n * sxn + h * sxh
    dst = xp + ((n * Hp + hp) * Wp) * Cp
    for c0 in range(0, Cp, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        v = tl.load(src + c[None, :] * sxc + w[:, None] * sxw, mask=inside[:, None] & (c[None, :] < C), other=0.0)
        if ROUND_TF32:  # to nearest, ties away (cvt.rna.tf32.f32); inf and NaN kept as they are
            bits = v.to(tl.uint32, bitcast=True)
            rounded = (bits + 0x1000) & 0xFFFFE000
            bits = tl.where((bits & 0x7F800000) == 0x7F800000, bits, rounded)
            v = bits.to(tl.float32, bitcast=True)
        tl.store(dst + wp[:, None] * Cp + c[None, :], v.to(xp.dtype.element_ty),
                 mask=(wp[:, None] < Wp) & (c[None, :] < Cp))


def _conv_kernel(x_desc, w_desc, out_desc, bias, out, pre, H, W, Hp, Wp, Cout, TAPS_W, DH, DW,
                 TAPS: tl.constexpr, CP: tl.constexpr, HAS_BIAS: tl.constexpr, MISH_COUNT: tl.constexpr,
                 CHANNELS_LAST: tl.constexpr, STORE_PRE: tl.constexpr,
                 TMA_STORE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_K: tl.constexpr,
                 NUM_STAGES: tl.constexpr):
    tiles_w = (W + BLOCK_P - 1) // BLOCK_P  # not tl.cdiv: a jit function, which breaks the interpreter once
    # triton was imported with TRITON_INTERPRET unset
    h = tl.program_id(0) // tiles_w
    w0 = (tl.program_id(0) % tiles_w) * BLOCK_P
    co0 = tl.program_id(1) * BLOCK_CO
    n = tl.program_id(2)
    row0 = (n * Hp + h) * Wp + w0  # the padded-view row of this tile's first pixel at tap (0, 0)
    blocks = CP // BLOCK_K
    # acc[co, p] = W[co, k] X[p, k]^T: both operands K-major, as TF32 tensor cores need, and the
    # tile's rows are runs of pixels, which NCHW stores contiguously.
    acc = tl.full((BLOCK_CO, BLOCK_P), 0.0, tl.float32)  # tl.zeros is a jit function too
    for i in tl.range(0, TAPS * blocks, num_stages=NUM_STAGES):
        tap = i // blocks
        c0 = (i % blocks) * BLOCK_K
        a = x_desc.load([row0 + (tap // TAPS_W) * DH * Wp + (tap % TAPS_W) * DW, c0])
        b = w_desc.load([co0, tap * CP + c0])
        acc = tl.dot(b, a.T, acc)

    p = tl.arange(0, BLOCK_P)
    co = co0 + tl.arange(0, BLOCK_CO)
    if HAS_BIAS:
        acc += tl.load(bias + co, mask=co < Cout, other=0.0).to(tl.float32)[:, None]
    if STORE_PRE:  # conv + bias, which a training forward keeps for the backward, in the output's layout
        image = pre + n.to(tl.int64) * Cout * H * W  # then 32-bit offsets: an image holds < 2^31 elements
        if CHANNELS_LAST:
            inside = (h * W + (w0 + p[None, :])) * Cout + co[:, None]
        else:
            inside = (co[:, None] * H + h) * W + (w0 + p[None, :])
        tl.store(image + inside, acc.to(pre.dtype.element_ty), mask=(co[:, None] < Cout) & (w0 + p[None, :] < W))
    v = acc
    for _ in tl.static_range(MISH_COUNT):  # the same Mish as the double-Mish backends
        e = tl.exp2(tl.minimum(v, 20.0) * 1.4426950408889634)  # e^v as 2^(v log2 e)
        m = e * (e + 2.0)
        v = v * (m / (m + 2.0))
    v = v.to(out.dtype.element_ty)
    if TMA_STORE:  # the descriptor clips the tile at the row's end and the last channel
        out_desc.store([n, co0, h, w0], tl.reshape(v, (1, BLOCK_CO, 1, BLOCK_P)))
    else:
        if CHANNELS_LAST:
            offsets = ((n.to(tl.int64) * H + h) * W + (w0 + p[None, :])) * Cout + co[:, None]
        else:
            offsets = ((n.to(tl.int64) * Cout + co[:, None]) * H + h) * W + (w0 + p[None, :])
        tl.store(out + offsets, v, mask=(co[:, None] < Cout) & (w0 + p[None, :] < W))


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


@functools.cache
def _kernels(interpret: bool):
    """The kernels jitted for one mode; ``interpret`` is only the cache key (``triton.jit`` reads
    ``TRITON_INTERPRET`` itself)."""
    global tl
    import triton
    import triton.language as tl

    return triton.jit(_pad_round_kernel), triton.jit(_conv_kernel)


def tf32_rounded(t: torch.Tensor) -> torch.Tensor:
    """fp32 -> TF32, to nearest with ties away from zero, as ``_pad_round_kernel`` does."""
    bits = t.view(torch.int32)
    rounded = (bits + 0x1000) & -0x2000
    special = (bits & 0x7F800000) == 0x7F800000
    return torch.where(special, bits, rounded).view(torch.float32)


def padded_input(x: torch.Tensor, padding: tuple[int, int], channels: int, round_tf32: bool,
                 dtype: torch.dtype | None = None, width: int | None = None) -> torch.Tensor:
    """``x`` as a zero-padded NHWC buffer ``[N, H + 2 ph, W + 2 pw, channels]`` of ``dtype`` (x's
    by default; a narrower one is autocast's cast, done in the same pass), TF32-rounded if asked;
    ``width`` (at least W + 2 pw) widens its rows with more zero columns on the right."""
    n, c, h, w = x.shape
    ph, pw = padding
    hp, wp = h + 2 * ph, width or w + 2 * pw
    xp = torch.empty((n, hp, wp, channels), dtype=dtype or x.dtype, device=x.device)
    block_c = min(64, 1 << (channels - 1).bit_length())
    block_w = max(1, 4096 // block_c)
    block_w = min(block_w, 1 << (wp - 1).bit_length())
    pad_kernel, _ = _kernels(_interpreting())
    grid = ((wp + block_w - 1) // block_w, hp, n)
    pad_kernel[grid](x, xp, c, h, w, hp, wp, channels, ph, pw, *x.stride(),
                     ROUND_TF32=round_tf32, BLOCK_W=block_w, BLOCK_C=block_c, num_warps=4)
    return xp


def packed_weight(weight: torch.Tensor, channels: int, round_tf32: bool) -> torch.Tensor:
    """``[Cout, Cin, KH, KW]`` -> ``[Cout, KH * KW * channels]``, K-major in the kernel's (kh, kw, c)
    order, channels past Cin zero."""
    cout, cin, kh, kw = weight.shape
    packed = torch.zeros((cout, kh, kw, channels), dtype=weight.dtype, device=weight.device)
    packed[..., :cin] = weight.permute(0, 2, 3, 1)
    if round_tf32:
        packed = tf32_rounded(packed)
    return packed.view(cout, kh * kw * channels)


@dataclass(frozen=True)
class TileConfig:
    block_p: int
    block_co: int
    block_k: int
    num_warps: int
    num_stages: int
    #: a cap on registers per thread (None: the compiler's choice), to fit more programs on an SM
    maxnreg: int | None = None

    @property
    def name(self) -> str:
        return (f"p{self.block_p}co{self.block_co}k{self.block_k}w{self.num_warps}s{self.num_stages}"
                + (f"r{self.maxnreg}" if self.maxnreg else ""))


def tile_config(dtype: torch.dtype, out_w: int, cout: int) -> TileConfig:
    """The tiles the H100 sweep found fastest at the reference shape (``benchmarks/sweep_triton_conv.py``,
    results under ``benchmarks/results/plans-h100/``): 128 pixels x 128 channels, K steps of 32 fp32 or
    64 16-bit values, 8 warps, 3 stages, and a cap of 128 registers a thread, so two programs share an
    SM and one's epilogue overlaps the other's main loop. Narrower rows and fewer channels get smaller
    tiles so programs are not mostly masked off."""
    block_p = min(128, max(16, 1 << (out_w - 1).bit_length()))
    block_co = min(128, max(16, 1 << (cout - 1).bit_length()))
    block_k = 32 if dtype == torch.float32 else 64
    if block_p * block_co >= 128 * 128:
        return TileConfig(block_p, block_co, block_k, 8, 3, maxnreg=128)
    return TileConfig(block_p, block_co, block_k, 4, 3)


def tile_configs(dtype: torch.dtype, out_w: int, cout: int) -> list[TileConfig]:
    """The configs worth timing for a shape: ``tile_config``'s first, then its neighbours in the
    H100 sweep (a stage more or fewer, K steps twice as long, half the pixels or half the channels
    with half the warps), pruned to tiles the row and the channels fill, as ``triton.autotune``'s
    ``prune_configs_by`` would. A GPU other than the sweep's may prefer another; the tuner decides."""
    best = tile_config(dtype, out_w, cout)
    found = [best,
             TileConfig(best.block_p, best.block_co, best.block_k, best.num_warps, best.num_stages + 1, best.maxnreg),
             TileConfig(best.block_p, best.block_co, 2 * best.block_k, best.num_warps, 2, best.maxnreg),
             TileConfig(max(16, best.block_p // 2), best.block_co, best.block_k, 4, 3),
             TileConfig(best.block_p, max(16, best.block_co // 2), best.block_k, 4, 3)]
    return list(dict.fromkeys(found))


def conv_mish2(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               padding: tuple[int, int], dilation: tuple[int, int],
               memory_format: torch.memory_format = torch.contiguous_format,
               config: TileConfig | None = None, out: torch.Tensor | None = None,
               mish_count: int = 2, preactivation: torch.Tensor | None = None) -> torch.Tensor:
    """``mish(mish(conv2d(x, weight, bias, 1, padding, dilation)))`` (one ``mish`` for
    ``mish_count=1``), written in ``memory_format``
    (contiguous NCHW or channels_last) into a new tensor or ``out``. It computes in the weight's
    dtype: a wider ``x`` (fp32 under bf16 autocast) is cast as the input pass reads it. fp32
    operands are rounded to TF32. ``preactivation`` (a tensor like the output) also receives
    ``conv2d(...) + bias``, from the same accumulators."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    n, cin, _, _ = x.shape
    cout, _, kh, kw = weight.shape
    dh, dw = dilation
    dtype = weight.dtype
    out = block_output(x, weight, padding, dilation, memory_format, out)
    if preactivation is not None:
        block_output(x, weight, padding, dilation, memory_format, preactivation)  # checks it is like out
    out_h, out_w = out.shape[2:]
    if mish_count not in (1, 2):
        raise ValueError(f"mish_count must be 1 or 2, not {mish_count!r}")
    if out.numel() == 0:
        return out
    cfg = config or tile_config(dtype, out_w, cout)
    block_k = min(cfg.block_k, max(16, 1 << (cin - 1).bit_length()))  # tl.dot needs K >= 16
    channels = -(-cin // block_k) * block_k
    round_tf32 = dtype == torch.float32
    xp = padded_input(x, padding, channels, round_tf32, dtype)
    wk = packed_weight(weight, channels, round_tf32)
    x_desc = TensorDescriptor(xp, [xp.shape[0] * xp.shape[1] * xp.shape[2], channels], [channels, 1],
                              [cfg.block_p, block_k])
    w_desc = TensorDescriptor(wk, list(wk.shape), [wk.shape[1], 1], [cfg.block_co, block_k])
    # fp32 NCHW tiles go out through TMA (8% faster on the H100); 16-bit ones were 40% slower that way.
    # TMA wants 16-byte aligned rows and tile starts, so rows of a multiple of 4 pixels only (the
    # reference problem's 254 are not: there it is plain stores).
    tma_store = dtype == torch.float32 and memory_format == torch.contiguous_format and out_w % 4 == 0
    out_desc = TensorDescriptor(out, list(out.shape), list(out.stride()), [1, cfg.block_co, 1, cfg.block_p]) \
        if tma_store else None
    grid = (out_h * -(-out_w // cfg.block_p), -(-cout // cfg.block_co), n)
    _, conv_kernel = _kernels(_interpreting())
    conv_kernel[grid](x_desc, w_desc, out_desc, bias if bias is not None else wk, out,
                      out if preactivation is None else preactivation, out_h, out_w, xp.shape[1],
                      xp.shape[2], cout, kw, dh, dw, TAPS=kh * kw, CP=channels, HAS_BIAS=bias is not None,
                      MISH_COUNT=mish_count, CHANNELS_LAST=memory_format == torch.channels_last,
                      STORE_PRE=preactivation is not None, TMA_STORE=tma_store, BLOCK_P=cfg.block_p,
                      BLOCK_CO=cfg.block_co, BLOCK_K=block_k, NUM_STAGES=cfg.num_stages, num_warps=cfg.num_warps,
                      **({"maxnreg": cfg.maxnreg} if cfg.maxnreg else {}))
    return out


@register_plan
class TritonConvPlan(Plan):
    name = "triton_conv"
    priority = 15
    casts_input = True
    #: in training its epilogue also stores conv + bias (one more store of the output's size), where
    #: recomputing it would cost the backward a conv
    stores_preactivation = True
    dtypes = frozenset({torch.float16, torch.bfloat16, torch.float32})

    @property
    def devices(self) -> frozenset[str]:
        """CUDA; also CPU tensors while ``TRITON_INTERPRET=1`` (so CI runs the kernels' code)."""
        return frozenset({"cuda", "cpu"}) if _interpreting() else frozenset({"cuda"})

    def is_available(self) -> Availability:
        if importlib.util.find_spec("triton") is None:
            return Availability.no("triton is not installed: pip install mishops[triton]")
        # the GPU first: importing triton takes a third of a second, which a CPU-only first call must not pay
        if not _interpreting() and not torch.cuda.is_available():
            return Availability.no("no CUDA GPU (set TRITON_INTERPRET=1 to run Triton's interpreter on CPU tensors)")
        try:
            from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
        except Exception as exc:
            return Availability.no(f"this triton has no host tensor descriptors (needs 3.4+): {exc}")
        return Availability.yes()

    def device_reasons(self, device: torch.device) -> list[str]:
        if device.type == "cuda" and torch.cuda.get_device_capability(device) < (9, 0):
            return ["needs a GPU with TMA (compute capability 9.0+)"]
        return []

    def not_supported_reasons(self, x, weight, bias, spec: ConvSpec) -> list[str]:
        reasons = super().not_supported_reasons(x, weight, bias, spec) + operand_reasons(x, weight, bias, spec)
        if x.dim() != 4:
            return reasons
        reasons += spec.kernel_reasons()
        padding = spec.numeric_padding()
        if bias is not None and not bias.is_contiguous():
            reasons.append("bias is not contiguous")
        if x.numel() and x.dtype == torch.float32 and not torch.backends.cudnn.allow_tf32:
            reasons.append("fp32 with TF32 off (torch.backends.cudnn.allow_tf32 = False): this kernel "
                           "multiplies in TF32")
        if x.shape[0] > MAX_GRID_YZ:
            reasons.append(f"more than {MAX_GRID_YZ} images")
        if padding is not None:
            (ph, pw), (dh, dw) = padding, spec.dilation
            n, cin, h, w = x.shape
            hp, wp = h + 2 * ph, w + 2 * pw
            if hp - dh * (weight.shape[2] - 1) <= 0 or wp - dw * (weight.shape[3] - 1) <= 0:
                reasons.append("empty output")
            if n * hp * wp >= 2**31 or hp * wp * max(cin, 64) >= 2**31:  # TMA rows; 32-bit offsets per image
                reasons.append("the padded input has 2^31 pixels or more")
            out_h, out_w = hp - dh * (weight.shape[2] - 1), wp - dw * (weight.shape[3] - 1)
            if weight.shape[0] * out_h * out_w >= 2**31:  # the stored pre-activation's offsets are 32-bit per image
                reasons.append("one output image has 2^31 elements or more")
        return reasons

    def configs(self, x, weight, bias, spec: ConvSpec) -> list[TileConfig]:
        """One under the interpreter (which checks the code, not the speed), else ``tile_configs``."""
        padding, dw = spec.numeric_padding(), spec.dilation[1]
        out_w = x.shape[3] + 2 * padding[1] - dw * (weight.shape[3] - 1)
        found = tile_configs(weight.dtype, out_w, weight.shape[0])
        return found[:1] if _interpreting() else found

    def forward(self, x, weight, bias, spec: ConvSpec, config: TileConfig | None = None,
                preactivation: torch.Tensor | None = None) -> torch.Tensor:
        with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
            return conv_mish2(x, weight, bias, spec.numeric_padding(), tuple(spec.dilation),
                              expected_memory_format(x, weight), config or self.config_for(x, weight, bias, spec),
                              mish_count=spec.mish_count, preactivation=preactivation)

    def forward_storing(self, x, weight, bias, spec: ConvSpec) -> tuple[torch.Tensor, torch.Tensor]:
        pre = block_output(x, weight, spec.numeric_padding(), tuple(spec.dilation), expected_memory_format(x, weight))
        return self.forward(x, weight, bias, spec, preactivation=pre), pre
