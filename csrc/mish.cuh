// Mish in fp32 over fp32, fp16 or bf16 storage: the one definition every kernel of the extension
// uses (mish2.cu's elementwise passes, epilogue_nchw.cu's bias + double Mish + transpose), so they
// round alike.

#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

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

// fp32 storage keeps 24 bits, so it gets the accurate expf (about 2 ulp at any |v|) and the more
// careful form of t below. fp16 and bf16 keep 11 and 8 bits, which hide the error of the bare
// ex2.approx (relative |v| * 2^-24 from rounding v * log2(e)), and their narrower loads leave
// fewer cycles per element: 3 instructions for the exp instead of about 10 counts there.
template <typename T>
constexpr bool kFullPrecision = std::is_same_v<T, float>;

// The hardware's approximate 2^v and 1/v, flushing denormal results to zero: exp(v) underflows
// to 0 a little earlier (v < -87.3 instead of -103), where mish(v) is below 1e-36 anyway.
__device__ __forceinline__ float exp2_approx(float v) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(v));
  return y;
}

__device__ __forceinline__ float rcp_approx(float v) {
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(v));
  return y;
}

struct MishAt {
  float value;  // mish(v)
  float slope;  // mish'(v)
};

// tanh(softplus(v)) = n / (n + 2) with n = e (e + 2), e = exp(v): one exp and one reciprocal
// r = 1 / (n + 2). Clamping v at 20, where the ratio is already 1 in fp32, keeps n finite. In fp32
// t is n r only while n < 2 and 1 - 2 r beyond, where n r would carry r's 1-ulp error into a
// value near 1.
// mish'(v) = t + v sigmoid(v) (1 - t^2); with sigmoid = e / (1 + e), 1 - t^2 = 4 (1 + e)^2 r^2
// and e (1 + e) = n - e the second term is 4 v (n - e) r^2, free of the cancellation in 1 - t^2.
// Past the clamp it is below 1e-16 and taken as v * 0, so +-inf and NaN give NaN as autograd
// through F.mish does.
template <typename T>
__device__ __forceinline__ MishAt mish(float v) {
  constexpr float kLog2e = 1.4426950408889634f;
  const float c = fminf(v, 20.f);  // fminf(NaN, 20) = 20: the NaN flows on through v
  const float e = kFullPrecision<T> ? expf(c) : exp2_approx(c * kLog2e);
  const float n = e * (e + 2.f);
  const float r = rcp_approx(n + 2.f);
  const float t = kFullPrecision<T> && n >= 2.f ? fmaf(-2.f, r, 1.f) : n * r;
  const float tail = v < 20.f ? 4.f * r * (n - e) * r : 0.f;
  return {v * t, fmaf(v, tail, t)};
}

// kWidth consecutive elements moved by one load or store: 16 bytes, or one element when a
// pointer is not 16-byte aligned (a view with a storage offset).
template <typename T, int kWidth>
struct alignas(sizeof(T) * kWidth) Pack {
  T v[kWidth];
};

}  // namespace mishops
