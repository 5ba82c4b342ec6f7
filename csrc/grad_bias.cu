// The block's backward up to the conv: dz = g * d/dz act(z) (act = Mish twice, or once) and the
// bias gradient, sum of dz over every position of its channel, in one pass over z and g.
//
// Without it the bias gradient is a second pass over dz (cuDNN's or a reduction kernel's), 2 GB
// more traffic at the reference shape. Here each block sums the dz it writes per channel in
// registers and shared memory and leaves one fp32 partial per (block, channel); the caller adds
// the few partials up (mishops.backends.cuda.act_grad_bias), so the result never depends on
// atomics' order. Two walks, one per layout of z (g and dz share it):
// - planes (NCHW): z is [N*C planes][HW]; a block takes one chunk of one plane, all one channel;
// - rows (channels_last): z is [N*H*W rows][C]; a thread keeps one pack of channels and walks
//   rows, so its sums stay per channel without any index arithmetic.

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "mish.cuh"

#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>

namespace {

using namespace mishops;

constexpr int kThreads = 256;
// Packs of each input a thread keeps in flight, and a register cap that buys occupancy, per walk,
// as measured on the H200 at the reference shape. Planes: 4 packs, no cap (fewer packs make more,
// smaller blocks, whose reductions then dominate). Rows: fp32 4 packs, no cap; fp16 2 packs under
// 64 registers (4 blocks an SM); bf16 1 pack under 64 (its conversions hold more values live; with
// 2 it spilled or needed 80). With 4 packs the 16-bit rows kernels took 127 registers, 2 blocks an SM.
constexpr int kPlanePacks = 4;
template <typename T>
constexpr int kRowPacks = sizeof(T) == 4 ? 4 : std::is_same_v<T, __half> ? 2 : 1;
template <typename T>
constexpr int kRowMinBlocks = sizeof(T) == 4 ? 0 : 4;
constexpr int64_t kMaxGridY = 65535;

// g[i] <- g[i] * d/dz act(z[i]) for G elements sharing each Mish's reciprocal.
template <typename T, int kMish, int G>
__device__ __forceinline__ void act_grad(const float (&z)[G], float (&g)[G]) {
  if constexpr (kMish == 2) {
    mish2_grad_group<kFullPrecision<T>, G>(z, g);
  } else {
    float v[G], slope[G];
#pragma unroll
    for (int i = 0; i < G; ++i) v[i] = z[i];
    mish_group<kFullPrecision<T>, false, true, G>(v, slope);
#pragma unroll
    for (int i = 0; i < G; ++i) g[i] = g[i] * slope[i];
  }
}

// One pack: dz = g * act'(z), stored; the dz values (as stored, rounded to T) added into acc.
template <typename T, int kWidth, int kMish>
__device__ __forceinline__ void pack_grad(const Pack<T, kWidth>& zs, Pack<T, kWidth>& gs, float (&acc)[kWidth]) {
  constexpr int kGroup = kWidth < kRcpGroup ? kWidth : kRcpGroup;
#pragma unroll
  for (int k0 = 0; k0 < kWidth; k0 += kGroup) {
    float z[kGroup], g[kGroup];
#pragma unroll
    for (int k = 0; k < kGroup; ++k) {
      z[k] = to_float(zs.v[k0 + k]);
      g[k] = to_float(gs.v[k0 + k]);
    }
    act_grad<T, kMish, kGroup>(z, g);
#pragma unroll
    for (int k = 0; k < kGroup; ++k) {
      gs.v[k0 + k] = from_float<T>(g[k]);
      acc[k0 + k] += to_float(gs.v[k0 + k]);
    }
  }
}

__device__ __forceinline__ float block_sum(float v, float* scratch) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < kThreads / 32 ? scratch[lane] : 0.f;
  if (warp == 0) {
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  return v;  // the total, in thread 0
}

// planes x plane_len elements; block (x, y) takes chunk x of planes y, y + gridDim.y, ...;
// partial[plane * gridDim.x + chunk] = that chunk's sum of dz.
template <typename T, int kWidth, int kMish>
__global__ void __launch_bounds__(kThreads)
    grad_bias_planes_kernel(const T* __restrict__ z, const T* __restrict__ g, T* __restrict__ dz,
                            float* __restrict__ partial, int64_t planes, int64_t plane_len) {
  using P = Pack<T, kWidth>;
  __shared__ float scratch[kThreads / 32];
  const int64_t plane_packs = plane_len / kWidth;  // plane_len % kWidth == 0 when kWidth > 1
  for (int64_t plane = blockIdx.y; plane < planes; plane += gridDim.y) {
    const auto* zp = reinterpret_cast<const P*>(z + plane * plane_len);
    const auto* gp = reinterpret_cast<const P*>(g + plane * plane_len);
    auto* dp = reinterpret_cast<P*>(dz + plane * plane_len);
    float acc[kWidth] = {};
    const int64_t first = int64_t(blockIdx.x) * kThreads * kPlanePacks + threadIdx.x;
    P zs[kPlanePacks], gs[kPlanePacks];
#pragma unroll
    for (int u = 0; u < kPlanePacks; ++u) {
      const int64_t i = first + u * kThreads;
      if (i < plane_packs) {
        zs[u] = zp[i];
        gs[u] = gp[i];
      }
    }
#pragma unroll
    for (int u = 0; u < kPlanePacks; ++u) {
      const int64_t i = first + u * kThreads;
      if (i < plane_packs) {
        pack_grad<T, kWidth, kMish>(zs[u], gs[u], acc);
        dp[i] = gs[u];
      }
    }
    float sum = 0.f;
#pragma unroll
    for (int k = 0; k < kWidth; ++k) sum += acc[k];
    sum = block_sum(sum, scratch);
    if (threadIdx.x == 0) partial[plane * gridDim.x + blockIdx.x] = sum;
    __syncthreads();  // scratch is reused by the next plane
  }
}

// rows x channels elements (channels % kWidth == 0, channels / kWidth <= kThreads); block b takes
// rows [b * rows_per_block, (b + 1) * rows_per_block); partial[b * channels + c] = its sum of dz.
template <typename T, int kWidth, int kMish>
__global__ void __launch_bounds__(kThreads, kRowMinBlocks<T>)
    grad_bias_rows_kernel(const T* __restrict__ z, const T* __restrict__ g, T* __restrict__ dz,
                          float* __restrict__ partial, int64_t rows, int64_t channels, int64_t rows_per_block) {
  using P = Pack<T, kWidth>;
  extern __shared__ float sums[];  // [rows_at_once][channels]
  const int cols = int(channels / kWidth);
  const int rows_at_once = kThreads / cols;
  const int col = threadIdx.x % cols;
  const int row_in_step = threadIdx.x / cols;
  float acc[kWidth] = {};
  if (row_in_step < rows_at_once) {
    const int64_t begin = int64_t(blockIdx.x) * rows_per_block;
    const int64_t end = std::min(rows, begin + rows_per_block);
    const auto* zp = reinterpret_cast<const P*>(z);
    const auto* gp = reinterpret_cast<const P*>(g);
    auto* dp = reinterpret_cast<P*>(dz);
    for (int64_t row = begin + row_in_step; row < end; row += int64_t(rows_at_once) * kRowPacks<T>) {
      P zs[kRowPacks<T>], gs[kRowPacks<T>];
#pragma unroll
      for (int u = 0; u < kRowPacks<T>; ++u) {
        const int64_t r = row + int64_t(u) * rows_at_once;
        if (r < end) {
          zs[u] = zp[r * cols + col];
          gs[u] = gp[r * cols + col];
        }
      }
#pragma unroll
      for (int u = 0; u < kRowPacks<T>; ++u) {
        const int64_t r = row + int64_t(u) * rows_at_once;
        if (r < end) {
          pack_grad<T, kWidth, kMish>(zs[u], gs[u], acc);
          dp[r * cols + col] = gs[u];
        }
      }
    }
#pragma unroll
    for (int k = 0; k < kWidth; ++k) sums[row_in_step * channels + col * kWidth + k] = acc[k];
  }
  __syncthreads();
  for (int c = threadIdx.x; c < channels; c += kThreads) {
    float sum = 0.f;
    for (int r = 0; r < rows_at_once; ++r) sum += sums[r * channels + c];
    partial[int64_t(blockIdx.x) * channels + c] = sum;
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

std::string launched(const char* what) {
  const cudaError_t status = cudaGetLastError();
  return status == cudaSuccess ? std::string() : std::string(what) + ": kernel launch failed: " + cudaGetErrorString(status);
}

template <typename T, int kMish>
std::string launch_typed(const at::Tensor& z, const at::Tensor& g, const at::Tensor& dz, const at::Tensor& partial,
                         int64_t channels, int64_t inner, int64_t blocks) {
  const auto* zs = reinterpret_cast<const T*>(z.const_data_ptr());
  const auto* gs = reinterpret_cast<const T*>(g.const_data_ptr());
  auto* ds = reinterpret_cast<T*>(dz.mutable_data_ptr());
  auto* ps = partial.mutable_data_ptr<float>();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  constexpr int kWidth = 16 / sizeof(T);
  const bool aligned = aligned16(zs) && aligned16(gs) && aligned16(ds);
  if (inner > 1) {  // planes of `inner` elements, one channel each
    const int64_t planes = z.numel() / inner;
    const dim3 grid(unsigned(blocks), unsigned(std::min(planes, kMaxGridY)));
    if (aligned && inner % kWidth == 0) {
      grad_bias_planes_kernel<T, kWidth, kMish><<<grid, kThreads, 0, stream>>>(zs, gs, ds, ps, planes, inner);
    } else {
      grad_bias_planes_kernel<T, 1, kMish><<<grid, kThreads, 0, stream>>>(zs, gs, ds, ps, planes, inner);
    }
    return launched("grad_bias_planes");
  }
  const int64_t rows = z.numel() / channels;
  const bool wide = aligned && channels % kWidth == 0 && channels / kWidth <= kThreads;
  if (!wide && channels > kThreads) return "grad_bias: channels_last rows of more than 256 single elements";
  const int width = wide ? kWidth : 1;
  const int64_t rows_at_once = kThreads / (channels / width);
  const int64_t rows_per_block = (rows + blocks - 1) / blocks;
  const size_t shared = size_t(rows_at_once) * channels * sizeof(float);
  if (wide) {
    grad_bias_rows_kernel<T, kWidth, kMish><<<unsigned(blocks), kThreads, shared, stream>>>(
        zs, gs, ds, ps, rows, channels, rows_per_block);
  } else {
    grad_bias_rows_kernel<T, 1, kMish><<<unsigned(blocks), kThreads, shared, stream>>>(
        zs, gs, ds, ps, rows, channels, rows_per_block);
  }
  return launched("grad_bias_rows");
}

template <int kMish>
std::string run(const at::Tensor& z, const at::Tensor& g, const at::Tensor& dz, const at::Tensor& partial,
                int64_t channels, int64_t inner, int64_t blocks) {
  if (z.numel() == 0) return {};
  const c10::cuda::CUDAGuard guard(z.device());
  switch (z.scalar_type()) {
    case at::kFloat: return launch_typed<float, kMish>(z, g, dz, partial, channels, inner, blocks);
    case at::kHalf: return launch_typed<__half, kMish>(z, g, dz, partial, channels, inner, blocks);
    case at::kBFloat16: return launch_typed<__nv_bfloat16, kMish>(z, g, dz, partial, channels, inner, blocks);
    default: return "grad_bias: unsupported dtype";
  }
}

}  // namespace

// Checked by the binding: z, g, dz flat 1-D views of dense storage with one dtype and length, laid
// out as [outer][channels][inner] with inner = 1 (channels_last: rows of channels) or inner > 1
// (NCHW: planes); partial fp32 with blocks * channels (rows) or planes * blocks (planes) elements.
std::string grad_bias_unchecked(const at::Tensor& z, const at::Tensor& g, const at::Tensor& dz,
                                const at::Tensor& partial, int64_t channels, int64_t inner, int64_t blocks,
                                int64_t mish_count) {
  return mish_count == 2 ? run<2>(z, g, dz, partial, channels, inner, blocks)
                         : run<1>(z, g, dz, partial, channels, inner, blocks);
}
