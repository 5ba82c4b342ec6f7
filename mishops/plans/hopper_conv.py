"""A Hopper (sm_90a) implicit-GEMM conv with bias + Mish (once or twice) in its epilogue, in CUDA C++.

``triton_conv`` does the same GEMM, but Triton on Hopper gives each program one tile at a time and
no warp specialisation, so a tile's epilogue (bias, two Mish, and NCHW stores that cannot be
coalesced into 128-byte lines) stalls that program's tensor cores. ``csrc/hopper_conv.cu`` is
persistent (one CTA per SM walking a static tile schedule) and warp-specialised: one thread of a
producer warpgroup issues TMA loads into an mbarrier ring, and two consumer warpgroups take
alternate tiles, their main loops in strict turn, so one runs its epilogue while the other's
wgmmas run (``consumers=2``, "ping-pong"). With ``epilogue="split"`` a consumer instead hands its
accumulators, half a tile at a time, through shared memory to two epilogue warpgroups of their own,
and goes straight back to its MMAs.

The input goes through ``triton_conv``'s pass first (``padded_input``): zero-padded NHWC with the
channels padded to the K block (32 fp32 or 64 16-bit values, one 128-byte swizzle row), fp32
rounded to TF32 to nearest, as cuDNN's TF32 conv rounds (wgmma would otherwise truncate, which
gives several times the eager block's error). Without Triton the same buffer is made with torch ops.

Any stride, groups 1, numeric zero padding, any kernel size and dilation, Cout a multiple of 8;
fp32 (TF32, so only with ``torch.backends.cudnn.allow_tf32``), bf16 and fp16; output NCHW or
channels_last as PyTorch's rule asks. Batches whose padded input has 2^31 pixels or more (TMA
coordinates are 32-bit) run in chunks of images.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import logging
import os
import platform
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

from mishops.plans import ConvSpec, Plan, expected_memory_format, operand_reasons, register_plan
from mishops.plans.base import block_output
from mishops.registry import Availability, csrc_path

log = logging.getLogger("mishops")

MODULE_NAME = "mishops_hopper_conv"
SOURCES = (csrc_path("hopper_conv.cu"), csrc_path("hopper_conv_binding.cpp"))
#: the Mish math the epilogue shares with the ``cuda`` backend: part of what a build depends on
HEADERS = (csrc_path("mish.cuh"), csrc_path("mish_math.cuh"))
EXTRA_CUDA_CFLAGS = ("-O3", "-std=c++17", "-gencode=arch=compute_90a,code=sm_90a")
EXTRA_CFLAGS = ("-O3",)
#: bytes of K per pipeline stage and operand row: one 128-byte swizzle row (``kRowBytes`` in the kernel).
K_BLOCK_BYTES = 128


#: how a tile's output leaves, by the kernel's code for it (``Epilogue`` in the kernel): from the
#: consumer's registers; staged by the consumer a slice at a time in shared memory (channels_last
#: then leaves by TMA stores, NCHW by whole rows a warp); or handed through shared memory to two
#: warpgroups that do only the epilogue, so the consumer's registers and issue slots go back to MMAs.
EPILOGUES = ("direct", "staged", "split")


@dataclass(frozen=True)
class HopperConfig:
    """How the kernel runs a launch: ring depth, one or two consumer warpgroups, whether a kernel
    row's taps share one activation box (``rowbox``: a third of the activation's L2 reads for
    3-wide kernels; needs a ring deeper than the kernel's width), and the epilogue (one of
    ``EPILOGUES``; its buffers take shared memory from the ring)."""

    stages: int = 6
    #: 2: ping-pong (one consumer's epilogue, or its hand-over, overlaps the other's MMAs);
    #: 1: the tensor pipe drains at each tile's end
    consumers: int = 2
    rowbox: bool = False
    epilogue: str = "direct"

    def __post_init__(self):
        if self.epilogue not in EPILOGUES:
            raise ValueError(f"epilogue {self.epilogue!r}: one of {EPILOGUES}")

    @property
    def name(self) -> str:
        return (f"s{self.stages}_{'pingpong' if self.consumers == 2 else 'single'}"
                + ("_rowbox" if self.rowbox else "") + ("" if self.epilogue == "direct" else f"_{self.epilogue}"))

    @property
    def kernel_args(self) -> tuple[int, int, bool, int]:
        """``stages, consumers, rowbox, epilogue`` as the extension's ``conv_mish`` takes them."""
        return self.stages, self.consumers, self.rowbox, EPILOGUES.index(self.epilogue)

    def fits(self, weight: torch.Tensor, dilation_w: int, channels_last: bool, stride_w: int = 1) -> bool:
        """Row boxes hold 8 rows of shift, their stage is held until the row's last tap, and a kernel
        row's taps read the same box only at stride 1. The staged and split epilogues need room in
        shared memory beside the ring; the staged one in channels_last a pixel of 16-byte multiples
        (TMA's global strides)."""
        kernel_w, elem, cout = weight.shape[3], weight.element_size(), weight.shape[0]
        if self.rowbox and not (stride_w == 1 and 2 <= kernel_w < self.stages
                                and (kernel_w - 1) * dilation_w <= ROWBOX_SHIFT):
            return False
        if self.epilogue == "staged" and channels_last and cout * elem % 16:
            return False
        return self.shared_memory(elem) <= MAX_SHARED_MEMORY

    def shared_memory(self, elem: int) -> int:
        """Bytes of dynamic shared memory a launch takes (``smem_bytes`` in the kernel)."""
        buffer = {"direct": 0, "staged": self.consumers * SLICE_PIXELS * TILE_CHANNELS * elem,
                  "split": SPLIT_BUFFER_BYTES}[self.epilogue]
        return self.stages * STAGE_BYTES + buffer + 8 * (2 * self.stages + 7) + 1024


#: rows a row box holds beyond the tile's 128 (``kRowBoxRows - kBM`` in the kernel)
ROWBOX_SHIFT = 8
#: the kernel's layout of shared memory: a stage's bytes (``kStageBytes``), an m64 slice's pixels
#: (``kSliceRows``), a tile's channels (``kBN``), the split epilogue's buffer (``kSplitBytes``: a
#: slice's fp32 accumulators in rows padded to 136 words), what a CTA may have (``kMaxSmem``), and
#: the barriers after them (``kBarrierBytes``: 2 a stage and 7 more)
STAGE_BYTES = (128 + ROWBOX_SHIFT) * K_BLOCK_BYTES + 128 * K_BLOCK_BYTES
SLICE_PIXELS = 64
TILE_CHANNELS = 128
SPLIT_BUFFER_BYTES = SLICE_PIXELS * (TILE_CHANNELS + 8) * 4
MAX_SHARED_MEMORY = 227 * 1024
#: what the plan offers the tuner, and every config the benchmarks and the GPU test of every config
#: run. The first that fits is what runs where nothing has been tuned: the fastest for fp32 NCHW at
#: the reference shape on the H200 (benchmarks/results/h200/gpu-run9.md); one consumer stays as the
#: baseline that hides nothing.
CONFIGS = (HopperConfig(5, 2, True, "split"), HopperConfig(5, 2, False, "split"),
           HopperConfig(6, 2, True), HopperConfig(6, 2), HopperConfig(4, 2), HopperConfig(4, 2, True),
           HopperConfig(3, 2), HopperConfig(4, 2, True, "staged"), HopperConfig(4, 2, False, "staged"),
           HopperConfig(5, 2, True, "staged"), HopperConfig(6, 1))


# --- building --------------------------------------------------------------------------------------

#: what tests read: ``builds`` counts compilations of the extension in this process.
stats = {"builds": 0}
_build_lock = threading.Lock()
_module: ModuleType | None = None
_build_error: Exception | None = None


def _sources_digest() -> str:
    h = hashlib.sha256()
    for path in SOURCES + HEADERS:
        h.update(Path(path).name.encode())
        h.update(Path(path).read_bytes())
    return h.hexdigest()[:16]


def build_facts() -> dict[str, str]:
    """What the compiled library depends on (see ``mishops.backends.cuda.build_facts``)."""
    from mishops.backends import cuda

    nvcc = cuda.nvcc_path()
    return {
        "arch": "sm_90a",
        "torch": torch.__version__,
        "torch_cuda": str(torch.version.cuda),
        "nvcc": cuda.nvcc_version(nvcc) if nvcc else "not found",
        "cxx11_abi": str(int(torch._C._GLIBCXX_USE_CXX11_ABI)),
        "python": sys.implementation.cache_tag,
        "machine": platform.machine(),
        "flags": " ".join(EXTRA_CFLAGS + EXTRA_CUDA_CFLAGS),
        "sources": _sources_digest(),
        "module": MODULE_NAME,
    }


def extension() -> ModuleType:
    """The built extension: imported from a finished build in the cache, else compiled once
    under the CUDA backend's build lock; a failed build is not retried in this process."""
    global _module, _build_error
    from mishops.backends import cuda

    if _module is not None:
        return _module
    with _build_lock:
        if _module is not None:
            return _module
        if _build_error is not None:
            raise _build_error
        try:
            facts = build_facts()
            build_dir = cuda.build_directory(facts)
            done = build_dir / cuda.DONE_MARKER
            if done.exists():
                _module = cuda.import_built(build_dir)
                return _module
            with cuda.build_lock(build_dir):
                if not done.exists():
                    module = _compile(build_dir)
                    partial = done.with_suffix(".tmp")
                    partial.write_text(json.dumps({**facts, "library": Path(module.__file__).name}, indent=1))
                    os.replace(partial, done)
                    _module = module
                else:
                    _module = cuda.import_built(build_dir)
        except Exception as exc:
            _build_error = exc if isinstance(exc, cuda.CudaBuildError) else cuda.CudaBuildError(
                f"{type(exc).__name__}: {exc}")
            raise _build_error from exc
        return _module


def _compile(build_dir: Path) -> ModuleType:
    from torch.utils import cpp_extension

    from mishops.backends import cuda

    cuda.ninja_on_path()
    stats["builds"] += 1
    log.info("mishops: compiling the Hopper conv kernel in %s (about a minute, once per environment)", build_dir)
    started = time.perf_counter()
    try:
        module = cpp_extension.load(
            name=MODULE_NAME, sources=[str(s) for s in SOURCES], build_directory=str(build_dir),
            extra_cflags=list(EXTRA_CFLAGS), extra_cuda_cflags=list(EXTRA_CUDA_CFLAGS), verbose=False)
    except Exception as exc:
        output = str(exc).strip()
        first = cuda.first_error_line(output) or f"{type(exc).__name__}: {output.splitlines()[0] if output else ''}"
        raise cuda.CudaBuildError(f"{first}\nmishops: building the Hopper conv kernel in {build_dir} failed:\n"
                                  f"{output[-8000:]}") from exc
    log.info("mishops: Hopper conv kernel built in %.0f s", time.perf_counter() - started)
    return module


# --- operands ----------------------------------------------------------------------------------------


def k_block(dtype: torch.dtype) -> int:
    """Channels per K block: one 128-byte swizzle row."""
    return K_BLOCK_BYTES // (4 if dtype == torch.float32 else 2)


def padded_channels(cin: int, dtype: torch.dtype) -> int:
    kb = k_block(dtype)
    return -(-cin // kb) * kb


def padded_input(x: torch.Tensor, padding: tuple[int, int], channels: int, dtype: torch.dtype,
                 width: int | None = None) -> torch.Tensor:
    """Zero-padded NHWC ``[N, Hp, Wp, channels]`` of ``dtype``, fp32 rounded to TF32 to nearest;
    ``width`` widens Wp with zero columns (to a multiple of the stride)."""
    from mishops.plans import triton_conv

    round_tf32 = dtype == torch.float32
    if importlib.util.find_spec("triton") is not None and x.is_cuda:
        return triton_conv.padded_input(x, padding, channels, round_tf32, dtype, width)
    n, c, h, w = x.shape
    ph, pw = padding
    xp = torch.zeros((n, h + 2 * ph, width or w + 2 * pw, channels), dtype=dtype, device=x.device)
    xp[:, ph:ph + h, pw:pw + w, :c] = x.permute(0, 2, 3, 1).to(dtype)
    return triton_conv.tf32_rounded(xp) if round_tf32 else xp


def packed_weight(weight: torch.Tensor, channels: int) -> torch.Tensor:
    from mishops.plans import triton_conv

    return triton_conv.packed_weight(weight, channels, weight.dtype == torch.float32)


def conv_mish(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: tuple[int, int],
              dilation: tuple[int, int], mish_count: int = 2,
              memory_format: torch.memory_format = torch.contiguous_format,
              config: HopperConfig | None = None, out: torch.Tensor | None = None,
              stride: tuple[int, int] = (1, 1)) -> torch.Tensor:
    """``mish^mish_count(conv2d(x, weight, bias, stride, padding, dilation))`` in ``memory_format``,
    computed in the weight's dtype (a wider ``x`` is cast by the input pass), into a new tensor
    or ``out``."""
    n, cin, h, w = x.shape
    cout, _, kh, kw = weight.shape
    (ph, pw), (dh, dw), (sh, sw) = padding, dilation, stride
    hp, wp = h + 2 * ph, -(-(w + 2 * pw) // sw) * sw  # the kernel views a row as (pixel / sw, pixel % sw)
    dtype = weight.dtype
    out = block_output(x, weight, padding, dilation, memory_format, out, stride)
    if out.numel() == 0:
        return out
    channels_last = memory_format == torch.channels_last
    config = config or next(c for c in CONFIGS if c.fits(weight, dw, channels_last, sw))
    if config.epilogue != "direct" and channels_last and out.data_ptr() % 16:  # a caller's view
        config = dataclasses.replace(config, epilogue="direct")  # (TMA, or the split's 4-element stores)
    channels = padded_channels(cin, dtype)
    xp = padded_input(x, padding, channels, dtype, wp)
    wk = packed_weight(weight, channels)
    b = None if bias is None else bias.to(dtype).contiguous()
    ext = extension()
    per_launch = max(1, (2**31 - 1) // (hp * wp))  # TMA row coordinates are 32-bit
    for n0 in range(0, n, per_launch):
        n1 = min(n, n0 + per_launch)
        message = ext.conv_mish(xp[n0:n1], wk, b, out[n0:n1], kh, kw, dh, dw, sh, sw, mish_count, channels_last,
                                *config.kernel_args)
        if message:
            raise RuntimeError(f"{message} (input {tuple(x.shape)} {x.dtype}, weight {tuple(weight.shape)})")
    return out


@register_plan
class HopperConvPlan(Plan):
    name = "hopper_conv"
    #: after triton_conv (15) when timing is off: it has not yet been measured faster than it everywhere
    priority = 16
    devices = frozenset({"cuda"})
    casts_input = True
    dtypes = frozenset({torch.float16, torch.bfloat16, torch.float32})
    source_files = SOURCES + HEADERS

    def is_available(self) -> Availability:
        from mishops.backends import cuda

        if torch.version.cuda is None:
            return Availability.no(f"PyTorch {torch.__version__} is built without CUDA")
        if not torch.cuda.is_available():
            return Availability.no("no CUDA GPU visible to torch")
        if not any(torch.cuda.get_device_capability(i) == (9, 0) for i in range(torch.cuda.device_count())):
            return Availability.no("needs a Hopper GPU (compute capability 9.0: wgmma, TMA); none is visible")
        problem = cuda.toolchain_problem()
        if problem:
            return Availability.no(problem)
        try:
            extension()
        except Exception as exc:
            return Availability.no(str(exc).splitlines()[0])
        return Availability.yes()

    def not_supported_reasons(self, x, weight, bias, spec: ConvSpec) -> list[str]:
        reasons = super().not_supported_reasons(x, weight, bias, spec)
        ops = [r for r in operand_reasons(x, weight, bias, spec)
               if not r.startswith("its epilogue applies Mish twice")]  # this kernel does 1 or 2
        reasons += ops
        if x.dim() != 4 or weight.dim() != 4:
            return reasons
        if x.is_cuda and torch.cuda.get_device_capability(x.device) != (9, 0):
            reasons.append(f"{x.device} is compute capability {torch.cuda.get_device_capability(x.device)}; "
                           "this kernel is built for sm_90a (Hopper) only")
        reasons += spec.kernel_reasons(strided=True)
        padding = spec.numeric_padding()
        if spec.mish_count not in (1, 2):
            reasons.append(f"mish_count={spec.mish_count} (1 or 2 only)")
        cout = weight.shape[0]
        if cout % 8 != 0:
            reasons.append(f"{cout} output channels, not a multiple of 8")
        if bias is not None and not bias.is_contiguous():
            reasons.append("bias is not contiguous")
        if x.dtype == torch.float32 and weight.dtype == torch.float32 and not torch.backends.cudnn.allow_tf32:
            reasons.append("fp32 with TF32 off (torch.backends.cudnn.allow_tf32 = False): this kernel "
                           "multiplies in TF32")
        if padding is not None:
            (ph, pw), (dh, dw) = padding, spec.dilation
            n, cin, h, w = x.shape
            hp, wp = h + 2 * ph, w + 2 * pw
            if hp - dh * (weight.shape[2] - 1) <= 0 or wp - dw * (weight.shape[3] - 1) <= 0:
                reasons.append("empty output")
            if hp * wp >= 2**31 or hp * wp * padded_channels(cin, weight.dtype) >= 2**31:
                reasons.append("one image's padded input has 2^31 elements or more")
        return reasons

    def configs(self, x, weight, bias, spec: ConvSpec) -> list[HopperConfig]:
        """The ring depths and schedules worth timing for this shape: a ring deeper than two
        tiles' K loop buys nothing, and with fewer tiles than SMs nothing overlaps an epilogue."""
        taps = weight.shape[2] * weight.shape[3]
        kiters = taps * padded_channels(x.shape[1], weight.dtype) // k_block(weight.dtype)
        channels_last = expected_memory_format(x, weight) == torch.channels_last
        found = [c for c in CONFIGS
                 if c.stages <= max(3, 2 * kiters)
                 and c.fits(weight, spec.dilation[1], channels_last, spec.stride[1])]
        return found or [CONFIGS[-1]]

    def forward(self, x, weight, bias, spec: ConvSpec, config: HopperConfig | None = None) -> torch.Tensor:
        if config is None:
            config = self.config_for(x, weight, bias, spec)
        with torch.no_grad(), torch.cuda.device(x.device):
            return conv_mish(x, weight, bias, spec.numeric_padding(), tuple(spec.dilation), spec.mish_count,
                             expected_memory_format(x, weight), config, stride=tuple(spec.stride))
