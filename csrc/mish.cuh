// Mish over fp32, fp16 or bf16 storage, with fp32 arithmetic: the storage conversions and the
// 16-byte packs of the extension's kernels, on top of the math in mish_math.cuh (shared with the
// CuPy backend, which compiles it without these headers), so every kernel rounds alike.

#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "mish_math.cuh"

namespace mishops {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v) {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(v);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(v);
  } else {
    return v;
  }
}

// fp32 storage keeps 24 bits, so it gets the accurate expf (about 2 ulp at any |v|), the FMA-pipe
// exp for the outer Mish and the more careful form of t (mish_math.cuh). fp16 and bf16 keep 11 and
// 8 bits, which hide the error of the bare ex2.approx, and their narrower loads leave fewer cycles
// per element: 2 instructions for the exp instead of about 10 counts there.
template <typename T>
constexpr bool kFullPrecision = std::is_same_v<T, float>;

struct MishAt {
  float value;  // mish(v)
  float slope;  // mish'(v)
};

// One element's Mish and slope (its own reciprocal): for kernels that take elements one at a time.
template <typename T>
__device__ __forceinline__ MishAt mish(float v) {
  float x[1] = {v}, slope[1];
  mish_group<kFullPrecision<T>, false, true, 1>(x, slope);
  return {x[0], slope[0]};
}

// kWidth consecutive elements moved by one load or store: 16 bytes, or one element when a
// pointer is not 16-byte aligned (a view with a storage offset).
template <typename T, int kWidth>
struct alignas(sizeof(T) * kWidth) Pack {
  T v[kWidth];
};

}  // namespace mishops
