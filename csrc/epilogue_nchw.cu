// out = mish(mish(y + bias)) in NCHW (or mish(y + bias), for a block with one Mish), from y, a
// conv's NHWC output: the block's epilogue and the layout change in one pass, each element read
// once and written once.
//
// A pixel's channels are contiguous in y and a channel's pixels in out, so a block moves one tile
// of kTilePixels x kTileChannels of one image through shared memory: read along channels (16-byte
// packs where C and y's address allow), bias and both Mish applied in fp32 on the way in, written
// along pixels. Every warp-wide global access then covers whole 32-byte sectors. Offsets are
// 64-bit; images beyond the grid's 65535 are walked by the blocks in a loop.

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "mish.cuh"

#include <algorithm>
#include <cstdint>
#include <string>

namespace {

using namespace mishops;

constexpr int kThreads = 256;
constexpr int kTilePixels = 64;
constexpr int kTileChannels = 64;
// At most 64 registers a thread, so 4 blocks (1024 threads, 64 KiB of tiles) fit an SM and keep
// enough loads in flight; the fp32 Mish, unrolled over 16 elements, would otherwise take 99.
constexpr int kMinBlocksPerSM = 4;
constexpr int64_t kMaxGridY = 65535;
constexpr int64_t kMaxGridZ = 65535;

template <typename T, int kWidth, bool kBias, int kMishCount>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM)
    bias_mish2_nhwc_to_nchw_kernel(const T* __restrict__ y, const T* __restrict__ bias, T* __restrict__ out,
                                   int64_t images, int64_t pixels, int64_t channels) {
  // One padding column: the write pass reads rows of the tile, conflict-free; the read pass
  // writes columns, 2-way conflicted at worst, which shared memory absorbs at HBM's pace.
  __shared__ float tile[kTileChannels][kTilePixels + 1];
  using P = Pack<T, kWidth>;

  // Reading: kPacksPerPixel threads share one pixel's channels, kWidth each.
  constexpr int kPacksPerPixel = kTileChannels / kWidth;
  constexpr int kPixelsPerPass = kThreads / kPacksPerPixel;
  constexpr int kReadPasses = kTilePixels / kPixelsPerPass;
  const int read_channel = threadIdx.x % kPacksPerPixel * kWidth;
  const int read_pixel = threadIdx.x / kPacksPerPixel;
  // Writing: a warp writes 32 consecutive pixels of one channel.
  constexpr int kChannelsPerPass = kThreads / kTilePixels;
  const int write_pixel = threadIdx.x % kTilePixels;
  const int write_channel = threadIdx.x / kTilePixels;

  const int64_t first_pixel = int64_t(blockIdx.x) * kTilePixels;
  const int64_t first_channel = int64_t(blockIdx.y) * kTileChannels;
  const int64_t channel = first_channel + read_channel;  // whole packs: C % kWidth == 0 when kWidth > 1

  float b[kWidth];
#pragma unroll
  for (int k = 0; k < kWidth; ++k) b[k] = kBias && channel + k < channels ? to_float(bias[channel + k]) : 0.f;

  for (int64_t image = blockIdx.z; image < images; image += gridDim.z) {
    const T* src = y + image * pixels * channels;
    T* dst = out + image * pixels * channels;

    P packs[kReadPasses] = {};  // every load in flight before any math
#pragma unroll
    for (int i = 0; i < kReadPasses; ++i) {
      const int64_t pixel = first_pixel + read_pixel + i * kPixelsPerPass;
      if (pixel < pixels && channel < channels) packs[i] = *reinterpret_cast<const P*>(src + pixel * channels + channel);
    }
#pragma unroll
    for (int i = 0; i < kReadPasses; ++i) {
#pragma unroll
      for (int k = 0; k < kWidth; ++k) {
        const float v = mish<T>(to_float(packs[i].v[k]) + b[k]).value;
        tile[read_channel + k][read_pixel + i * kPixelsPerPass] = kMishCount == 2 ? mish<T>(v).value : v;
      }
    }
    __syncthreads();

    const int64_t pixel = first_pixel + write_pixel;
#pragma unroll
    for (int i = 0; i < kTileChannels / kChannelsPerPass; ++i) {
      const int64_t c = first_channel + write_channel + i * kChannelsPerPass;
      if (c < channels && pixel < pixels) {
        dst[c * pixels + pixel] = from_float<T>(tile[write_channel + i * kChannelsPerPass][write_pixel]);
      }
    }
    __syncthreads();  // the next image reuses the tile
  }
}

template <typename T, int kWidth, bool kBias, int kMishCount>
std::string launch(const T* y, const T* bias, T* out, int64_t images, int64_t pixels, int64_t channels) {
  const int64_t pixel_tiles = (pixels + kTilePixels - 1) / kTilePixels;
  const int64_t channel_tiles = (channels + kTileChannels - 1) / kTileChannels;
  if (pixel_tiles > 0x7fffffff || channel_tiles > kMaxGridY) {
    return "bias_mish2_nhwc_to_nchw: more pixels or channels per image than the grid can hold";
  }
  const dim3 grid(unsigned(pixel_tiles), unsigned(channel_tiles), unsigned(std::min(images, kMaxGridZ)));
  bias_mish2_nhwc_to_nchw_kernel<T, kWidth, kBias, kMishCount>
      <<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(y, bias, out, images, pixels, channels);
  const cudaError_t status = cudaGetLastError();
  return status == cudaSuccess ? std::string()
                               : std::string("bias_mish2_nhwc_to_nchw: kernel launch failed: ") + cudaGetErrorString(status);
}

template <typename T, int kMishCount>
std::string launch_typed(const at::Tensor& y, const at::Tensor* bias, const at::Tensor& out) {
  constexpr int kWide = 16 / sizeof(T);
  const auto* ys = reinterpret_cast<const T*>(y.const_data_ptr());
  const auto* bs = bias ? reinterpret_cast<const T*>(bias->const_data_ptr()) : nullptr;
  auto* os = reinterpret_cast<T*>(out.mutable_data_ptr());
  const int64_t images = y.size(0), channels = y.size(1), pixels = y.size(2) * y.size(3);
  const bool wide = reinterpret_cast<uintptr_t>(ys) % 16 == 0 && channels % kWide == 0;
  if (bias) {
    return wide ? launch<T, kWide, true, kMishCount>(ys, bs, os, images, pixels, channels)
                : launch<T, 1, true, kMishCount>(ys, bs, os, images, pixels, channels);
  }
  return wide ? launch<T, kWide, false, kMishCount>(ys, bs, os, images, pixels, channels)
              : launch<T, 1, false, kMishCount>(ys, bs, os, images, pixels, channels);
}

template <int kMishCount>
std::string launch_dtype(const at::Tensor& y, const at::Tensor* bias, const at::Tensor& out) {
  switch (y.scalar_type()) {
    case at::kFloat: return launch_typed<float, kMishCount>(y, bias, out);
    case at::kHalf: return launch_typed<__half, kMishCount>(y, bias, out);
    case at::kBFloat16: return launch_typed<__nv_bfloat16, kMishCount>(y, bias, out);
    default: return "bias_mish2_nhwc_to_nchw: unsupported dtype";
  }
}

}  // namespace

// Checked by the binding (mish2_binding.cpp): y a 4-D channels_last CUDA tensor, out contiguous
// with y's shape, bias (or null) C contiguous elements, one dtype and device. mish_count: 1 or 2.
std::string bias_mish_nhwc_to_nchw_unchecked(const at::Tensor& y, const at::Tensor* bias, const at::Tensor& out,
                                             int64_t mish_count) {
  if (mish_count != 1 && mish_count != 2) return "bias_mish_nhwc_to_nchw: mish_count must be 1 or 2";
  if (y.numel() == 0) return {};
  const c10::cuda::CUDAGuard guard(y.device());
  return mish_count == 2 ? launch_dtype<2>(y, bias, out) : launch_dtype<1>(y, bias, out);
}

std::string bias_mish2_nhwc_to_nchw_unchecked(const at::Tensor& y, const at::Tensor* bias, const at::Tensor& out) {
  return bias_mish_nhwc_to_nchw_unchecked(y, bias, out, 2);
}
