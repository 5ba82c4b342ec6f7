"""The double Mish as CuPy raw kernels: CUDA without a C++ toolchain at install time.

CuPy compiles the kernels below with NVRTC at first use, for the architecture of the device in
use only, and keeps the binaries in its own disk cache (``~/.cupy/kernel_cache``), so a wheel of
CuPy is all this backend needs. Tensors never leave torch: the kernels get their data pointers
(wrapped as CuPy ``UnownedMemory``, zero copy) and run on torch's current stream of their device.
bfloat16 has no CuPy dtype, which is why the kernels take raw 16-bit words and convert them
themselves instead of going through CuPy arrays.

This module is ``mishops.backends.cupy``; the real package is always reached by its absolute
name through ``_cupy()``, never at import time, so ``import mishops`` works without CuPy.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import re
from pathlib import Path

import numpy as np
import torch

from mishops.registry import KERNEL_DTYPES, Availability, Backend, csrc_path, register

NOT_INSTALLED = "cupy is not installed: pip install mishops[cupy13] (CUDA 13) or mishops[cupy12]"

SOURCE = r"""
// Storage formats: the bits one element occupies in memory, and their conversion to and from the
// fp32 that all arithmetic uses. No headers: NVRTC compiles this without the CUDA toolkit's.
struct Float32 {
    typedef float bits;
    static __device__ __forceinline__ float load(float b) { return b; }
    static __device__ __forceinline__ float store(float v) { return v; }
};

struct Float16 {
    typedef unsigned short bits;
    static __device__ __forceinline__ float load(unsigned short b) {
        float v;
        asm("cvt.f32.f16 %0, %1;" : "=f"(v) : "h"(b));
        return v;
    }
    static __device__ __forceinline__ unsigned short store(float v) {
        unsigned short b;
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(b) : "f"(v));
        return b;
    }
};

// bfloat16 is the high half of a float: widening is a shift; narrowing rounds to nearest even, by
// the convert instruction from sm_80 on (one instruction where the integer form takes five, which
// left the bf16 pass short of issue slots), else by integer ops.
struct BFloat16 {
    typedef unsigned short bits;
    static __device__ __forceinline__ float load(unsigned short b) {
        return __uint_as_float((unsigned)b << 16);
    }
    static __device__ __forceinline__ unsigned short store(float v) {
#if __CUDA_ARCH__ >= 800
        unsigned short b;
        asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(b) : "f"(v));
        return b;
#else
        unsigned u = __float_as_uint(v);
        if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);  // quiet NaN
        return (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
#endif
    }
};

// The math is csrc/mish_math.cuh, prepended to this text (MATH below): mish2_group and
// mish2_grad_group over G elements that share each Mish's reciprocal. fp32 storage takes its
// accurate form (expf, the FMA-pipe exp, the careful t), 16-bit storage the bare ex2.approx.
template <class Format> struct Full { static const bool value = false; };
template <> struct Full<Float32> { static const bool value = true; };

// Packs a thread loads before computing on any: two 16-byte loads in flight per input instead of
// one keeps HBM busy while the arithmetic of the previous ones runs.
const int kPacks = 2;

// kVec elements moved as one access: 16 bytes when every pointer is 16-byte aligned, else 1.
template <class Format, int kVec>
struct alignas(sizeof(typename Format::bits) * kVec) Pack { typename Format::bits v[kVec]; };

// The kernels walk the tensors' storage as flat arrays of n elements with 64-bit indices: thread
// i takes pack i (and i + stride, ... when the grid is capped), and the n % kVec elements after the last whole
// pack go to the first threads.
template <class Format, int kVec>
__global__ void mish2_forward(const typename Format::bits* __restrict__ x,
                              typename Format::bits* __restrict__ y, long long n) {
    typedef Pack<Format, kVec> P;
    const int kGroup = kVec < mishops::kRcpGroup ? kVec : mishops::kRcpGroup;
    const long long packs = n / kVec;
    const long long thread = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long first = (long long)blockIdx.x * blockDim.x * kPacks + threadIdx.x;
    const long long stride = (long long)gridDim.x * blockDim.x * kPacks;
    for (long long i = first; i < packs; i += stride) {
        P p[kPacks];
#pragma unroll
        for (int u = 0; u < kPacks; ++u)
            if (i + u * blockDim.x < packs) p[u] = reinterpret_cast<const P*>(x)[i + u * blockDim.x];
#pragma unroll
        for (int u = 0; u < kPacks; ++u) {
            if (i + u * blockDim.x >= packs) continue;
#pragma unroll
            for (int k0 = 0; k0 < kVec; k0 += kGroup) {
                float v[kGroup];
#pragma unroll
                for (int k = 0; k < kGroup; ++k) v[k] = Format::load(p[u].v[k0 + k]);
                mishops::mish2_group<Full<Format>::value, kGroup>(v);
#pragma unroll
                for (int k = 0; k < kGroup; ++k) p[u].v[k0 + k] = Format::store(v[k]);
            }
            reinterpret_cast<P*>(y)[i + u * blockDim.x] = p[u];
        }
    }
    const long long rest = packs * kVec + thread;
    if (rest < n) {
        float v[1] = {Format::load(x[rest])};
        mishops::mish2_group<Full<Format>::value, 1>(v);
        y[rest] = Format::store(v[0]);
    }
}

template <class Format, int kVec>
__global__ void mish2_backward(const typename Format::bits* __restrict__ x,
                               const typename Format::bits* __restrict__ grad_out,
                               typename Format::bits* __restrict__ grad_in, long long n) {
    typedef Pack<Format, kVec> P;
    const int kGroup = kVec < mishops::kRcpGroup ? kVec : mishops::kRcpGroup;
    const long long packs = n / kVec;
    const long long thread = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long first = (long long)blockIdx.x * blockDim.x * kPacks + threadIdx.x;
    const long long stride = (long long)gridDim.x * blockDim.x * kPacks;
    for (long long i = first; i < packs; i += stride) {
        P px[kPacks], pg[kPacks];
#pragma unroll
        for (int u = 0; u < kPacks; ++u) {
            if (i + u * blockDim.x < packs) {
                px[u] = reinterpret_cast<const P*>(x)[i + u * blockDim.x];
                pg[u] = reinterpret_cast<const P*>(grad_out)[i + u * blockDim.x];
            }
        }
#pragma unroll
        for (int u = 0; u < kPacks; ++u) {
            if (i + u * blockDim.x >= packs) continue;
#pragma unroll
            for (int k0 = 0; k0 < kVec; k0 += kGroup) {
                float v[kGroup], g[kGroup];
#pragma unroll
                for (int k = 0; k < kGroup; ++k) {
                    v[k] = Format::load(px[u].v[k0 + k]);
                    g[k] = Format::load(pg[u].v[k0 + k]);
                }
                mishops::mish2_grad_group<Full<Format>::value, kGroup>(v, g);
#pragma unroll
                for (int k = 0; k < kGroup; ++k) px[u].v[k0 + k] = Format::store(g[k]);
            }
            reinterpret_cast<P*>(grad_in)[i + u * blockDim.x] = px[u];
        }
    }
    const long long rest = packs * kVec + thread;
    if (rest < n) {
        const float v[1] = {Format::load(x[rest])};
        float g[1] = {Format::load(grad_out[rest])};
        mishops::mish2_grad_group<Full<Format>::value, 1>(v, g);
        grad_in[rest] = Format::store(g[0]);
    }
}
"""

#: the Mish arithmetic, the CUDA backend's own (compiled ahead of SOURCE, which uses it).
MATH_FILE = csrc_path("mish_math.cuh")

_FORMATS = {torch.float32: "Float32", torch.float16: "Float16", torch.bfloat16: "BFloat16"}
_THREADS = 256
_PACKS = 2  # SOURCE's kPacks
#: NVRTC options. CuPy adds the rest itself: -arch=sm_XY of the current device (a cubin for that
#: device only) and -ftz=true, which spares the exp and the reciprocal their denormal fix-ups
#: (F.mish only yields denormals, below 1.2e-38, where this gives 0).
COMPILE_OPTIONS = ("-std=c++17",)


def _kernel_name(op: str, dtype: torch.dtype, vec: int) -> str:
    return f"mish2_{op}<{_FORMATS[dtype]}, {vec}>"


#: every instantiation NVRTC compiles: both ops, each format, 16-byte packs and single elements.
KERNEL_NAMES = tuple(_kernel_name(op, dtype, vec)
                     for op in ("forward", "backward")
                     for dtype in _FORMATS
                     for vec in (16 // dtype.itemsize, 1))


def _cupy():
    return importlib.import_module("cupy")  # the real package, not this module


def kernel_source() -> str:
    """What NVRTC compiles: the shared Mish arithmetic, then this module's kernels."""
    return Path(MATH_FILE).read_text() + SOURCE


@functools.cache
def _module():
    cp = _cupy()
    return cp.RawModule(code=kernel_source(), options=COMPILE_OPTIONS, name_expressions=KERNEL_NAMES)


@functools.cache
def _kernel(name: str):
    """CuPy compiles the module and loads each kernel once per device (the current one at call)."""
    return _module().get_function(name)


def _launch(op: str, tensors: tuple[torch.Tensor, ...]) -> None:
    """Run ``op`` over equally laid out dense tensors (inputs first, output last) on torch's stream."""
    x = tensors[0]
    n = x.numel()
    if n == 0:
        return
    cp = _cupy()
    device = x.device.index
    aligned = all(t.data_ptr() % 16 == 0 for t in tensors)
    vec = 16 // x.element_size() if aligned else 1
    # _PACKS packs per thread and no cap on the grid: on H100 a one-wave persistent grid lost ~8% of
    # bandwidth to a full grid of short blocks. The kernels still stride, past 2^31 - 1 blocks.
    blocks = min((max(n // vec, 1) + _THREADS * _PACKS - 1) // (_THREADS * _PACKS), 2**31 - 1)
    pointers = tuple(cp.cuda.MemoryPointer(cp.cuda.UnownedMemory(t.data_ptr(), t.nbytes, t, device), 0)
                     for t in tensors)
    with cp.cuda.Device(device):
        stream = cp.cuda.ExternalStream(torch.cuda.current_stream(x.device).cuda_stream, device)
        _kernel(_kernel_name(op, x.dtype, vec))((blocks,), (_THREADS,), (*pointers, np.int64(n)),
                                                stream=stream)


# --- availability: each check gives the real reason ---------------------------------------------

_CUPY_DISTRIBUTION = re.compile(r"cupy(-(cuda|rocm)[a-z0-9-]*)?")


def _cupy_distributions(path: list[str] | None = None) -> list[str]:
    """Installed CuPy distributions as "name version", one per name, in ``sys.path`` order.

    Each CUDA or ROCm build of CuPy is a differently named wheel (cupy-cuda12x, cupy-cuda13x,
    ...) that installs the same ``cupy`` package, so two of them overwrite each other's files.
    """
    found: dict[str, str] = {}
    kwargs = {} if path is None else {"path": path}
    for dist in importlib.metadata.distributions(**kwargs):
        name = re.sub(r"[-_.]+", "-", dist.metadata["Name"] or "").lower()
        if _CUPY_DISTRIBUTION.fullmatch(name) and name not in found:
            found[name] = f"{name} {dist.version}"
    return list(found.values())


def _cuda_major_mismatch(cupy_runtime_version: int, torch_cuda: str | None) -> str | None:
    """Why CuPy (runtime version as ``runtimeGetVersion`` gives it, e.g. 12080) cannot share a
    process with this torch (``torch.version.cuda``, e.g. "13.0"), or None when they match."""
    if torch_cuda is None:
        return "torch is not built with CUDA (torch.version.cuda is None)"
    cupy_major, torch_major = cupy_runtime_version // 1000, int(torch_cuda.split(".")[0])
    if cupy_major == torch_major:
        return None
    return (f"CuPy is built for CUDA {cupy_major} but torch uses CUDA {torch_major}: "
            f"uninstall that CuPy wheel and pip install cupy-cuda{torch_major}x")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


@register
class CupyBackend(Backend):
    name = "cupy"
    devices = frozenset({"cuda"})
    dtypes = KERNEL_DTYPES
    priority = 30
    source_files = (MATH_FILE,)

    def is_available(self) -> Availability:
        try:
            return self._check()
        except Exception as exc:  # never raise: whatever broke is the reason
            return Availability.no(f"CuPy check failed: {_first_line(exc)}")

    def _check(self) -> Availability:
        installed = _cupy_distributions()
        if len(installed) > 1:
            return Availability.no(f"several CuPy packages installed: {', '.join(installed)}; "
                                   "uninstall all but one")
        try:
            cp = _cupy()
        except ModuleNotFoundError as exc:  # cupy itself, or a module cupy imports
            return Availability.no(NOT_INSTALLED if exc.name == "cupy" else f"import cupy failed: {_first_line(exc)}")
        except Exception as exc:
            return Availability.no(f"import cupy failed: {_first_line(exc)}")
        if not torch.cuda.is_available():
            return Availability.no("no CUDA GPU: torch.cuda.is_available() is False")
        mismatch = _cuda_major_mismatch(cp.cuda.runtime.runtimeGetVersion(), torch.version.cuda)
        if mismatch:
            return Availability.no(mismatch)
        try:
            with cp.cuda.Device(torch.cuda.current_device()):
                for name in KERNEL_NAMES:
                    _kernel(name)
        except Exception as exc:
            return Availability.no(f"CuPy could not build the kernels: {_first_line(exc)}")
        return Availability.yes()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.empty_like(x)  # same strides: the kernel maps storage slot i of x to slot i of y
        _launch("forward", (x, y))
        return y

    def backward(self, x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
        grad_in = torch.empty_like(x)
        _launch("backward", (x, grad_out, grad_in))
        return grad_in
