// y = mish(mish(x)) and its gradient, one memory pass each, over fp32, fp16 or bf16 storage.
//
// The pass is memory-bound (fp32: 8 bytes per element forward, 12 backward), so the kernels move
// 16-byte packs, put several loads in flight per thread before any math, and spend one exp and
// a quarter of a reciprocal per Mish (mish_math.cuh). Arithmetic is fp32 whatever the storage type. Tensors arrive as flat
// 1-D views of dense storage (mishops.layout.flat), so the kernels never see shapes or strides.

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "mish.cuh"

#include <algorithm>
#include <string>
#include <cstdint>

namespace {

constexpr int kThreads = 256;
// 16-byte packs each thread loads before computing on any: 64 bytes (128 backward) in flight per
// thread covers HBM latency at full occupancy without pushing registers into spills. For fp16/bf16
// this costs registers (the bf16 backward takes 95, so 2 blocks an SM), yet 2 packs under a
// 64-register cap (4 blocks an SM) measured slower on the H200 in every 16-bit case.
constexpr int kPacksPerThread = 4;

using namespace mishops;

// Each op maps G elements of x (and of grad) to G outputs, in place in x: G elements share each
// Mish's reciprocal (mish_math.cuh).
struct Forward {
  static constexpr bool kReadsGrad = false;
  template <typename T, int G>
  static __device__ __forceinline__ void apply(float (&x)[G], const float (&)[G]) {
    mish2_group<kFullPrecision<T>, G>(x);
  }
};

struct Backward {
  static constexpr bool kReadsGrad = true;
  template <typename T, int G>
  static __device__ __forceinline__ void apply(float (&x)[G], const float (&grad)[G]) {
    float g[G];
#pragma unroll
    for (int i = 0; i < G; ++i) g[i] = grad[i];
    mish2_grad_group<kFullPrecision<T>, G>(x, g);
#pragma unroll
    for (int i = 0; i < G; ++i) x[i] = g[i];
  }
};

// out[i] = Op(x[i], grad[i]) for i < n. Grid-stride over whole packs, 64-bit indices; the last
// n % kWidth elements, fewer than one pack, go one per thread.
template <typename T, int kWidth, typename Op>
__global__ void __launch_bounds__(kThreads)
    mish2_kernel(const T* __restrict__ x, const T* __restrict__ grad, T* __restrict__ out, int64_t n) {
  using P = Pack<T, kWidth>;
  constexpr int kGroup = kWidth < kRcpGroup ? kWidth : kRcpGroup;
  const auto* xp = reinterpret_cast<const P*>(x);
  const auto* gp = reinterpret_cast<const P*>(grad);
  auto* op = reinterpret_cast<P*>(out);
  const int64_t packs = n / kWidth;
  const int64_t block_packs = int64_t(kThreads) * kPacksPerThread;
  const int64_t step = int64_t(gridDim.x) * block_packs;

  for (int64_t first = blockIdx.x * block_packs + threadIdx.x; first < packs; first += step) {
    P xs[kPacksPerThread];
    P gs[kPacksPerThread];
#pragma unroll
    for (int u = 0; u < kPacksPerThread; ++u) {
      const int64_t i = first + u * kThreads;
      if (i < packs) {
        xs[u] = xp[i];
        if constexpr (Op::kReadsGrad) gs[u] = gp[i];
      }
    }
#pragma unroll
    for (int u = 0; u < kPacksPerThread; ++u) {
      const int64_t i = first + u * kThreads;
      if (i < packs) {
#pragma unroll
        for (int k0 = 0; k0 < kWidth; k0 += kGroup) {
          float v[kGroup], g[kGroup];
#pragma unroll
          for (int k = 0; k < kGroup; ++k) {
            v[k] = to_float(xs[u].v[k0 + k]);
            g[k] = Op::kReadsGrad ? to_float(gs[u].v[k0 + k]) : 0.f;
          }
          Op::template apply<T, kGroup>(v, g);
#pragma unroll
          for (int k = 0; k < kGroup; ++k) xs[u].v[k0 + k] = from_float<T>(v[k]);
        }
        op[i] = xs[u];
      }
    }
  }

  const int64_t i = packs * kWidth + blockIdx.x * int64_t(kThreads) + threadIdx.x;
  if (i < n) {
    float v[1] = {to_float(x[i])};
    const float g[1] = {Op::kReadsGrad ? to_float(grad[i]) : 0.f};
    Op::template apply<T, 1>(v, g);
    out[i] = from_float<T>(v[0]);
  }
}

// One block per kPacksPerThread * kThreads packs: on H100 a full grid of short-lived blocks kept the
// copy engine's pace where a persistent one-wave grid lost ~10% of bandwidth. The kernel still
// strides, so tensors needing more than 2^31 - 1 blocks stay correct.
template <typename T, int kWidth, typename Op>
std::string launch(const T* x, const T* grad, T* out, int64_t n) {
  const int64_t block_packs = int64_t(kThreads) * kPacksPerThread;
  const int64_t wanted = std::max<int64_t>(1, (n / kWidth + block_packs - 1) / block_packs);
  const int blocks = int(std::min<int64_t>(wanted, 0x7fffffff));
  mish2_kernel<T, kWidth, Op><<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(x, grad, out, n);
  const cudaError_t status = cudaGetLastError();
  return status == cudaSuccess ? std::string() : std::string("mish2: kernel launch failed: ") + cudaGetErrorString(status);
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename Op, typename T>
std::string launch_typed(const at::Tensor& x, const at::Tensor* grad, const at::Tensor& out) {
  const auto* xs = reinterpret_cast<const T*>(x.const_data_ptr());
  const auto* gs = grad ? reinterpret_cast<const T*>(grad->const_data_ptr()) : nullptr;
  auto* os = reinterpret_cast<T*>(out.mutable_data_ptr());
  const bool vectorized = aligned16(xs) && aligned16(os) && (!gs || aligned16(gs));
  return vectorized ? launch<T, 16 / sizeof(T), Op>(xs, gs, os, x.numel()) : launch<T, 1, Op>(xs, gs, os, x.numel());
}

template <typename Op>
std::string run(const at::Tensor& x, const at::Tensor* grad, const at::Tensor& out) {
  if (x.numel() == 0) return {};
  const c10::cuda::CUDAGuard guard(x.device());
  switch (x.scalar_type()) {
    case at::kFloat: return launch_typed<Op, float>(x, grad, out);
    case at::kHalf: return launch_typed<Op, __half>(x, grad, out);
    case at::kBFloat16: return launch_typed<Op, __nv_bfloat16>(x, grad, out);
    default: return "mish2: unsupported dtype";
  }
}

}  // namespace

// Checked by the binding (mish2_binding.cpp) before they get here: flat 1-D CUDA views of dense
// storage with one dtype, device and length. Failures come back as messages (see the binding).
std::string mish2_forward_unchecked(const at::Tensor& x, const at::Tensor& out) {
  return run<Forward>(x, nullptr, out);
}

std::string mish2_backward_unchecked(const at::Tensor& x, const at::Tensor& grad_out, const at::Tensor& grad_in) {
  return run<Backward>(x, &grad_out, grad_in);
}
