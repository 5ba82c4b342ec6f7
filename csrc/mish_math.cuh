// Mish in fp32 arithmetic, with as few special-function (MUFU) instructions as the accuracy allows:
// the one definition of the math that every kernel uses (mish2.cu's elementwise passes and the
// fused backward, epilogue_nchw.cu's bias + double Mish + transpose, and the CuPy backend, which
// compiles this file's text with NVRTC). No headers and no types beyond float, so NVRTC takes it
// as it is.
//
// Why it is written this way. On an H200 a same-run copy moves ~2 fp32 or ~4 bf16 elements per SM
// per clock; an SM retires 16 MUFU results (ex2, rcp) and 128 other instructions per clock. The
// straightforward double Mish spends two exps and two reciprocals per element, 4 MUFU: in bf16 that
// is the whole MUFU budget (16 / 4), which is why the kernels fell below the copy there. So:
// - the reciprocal of each Mish is shared by a group of G elements (Montgomery's trick: one rcp of
//   the product, then multiplies), 1/G MUFU per element instead of 1;
// - in fp32, where 2 elements a clock leave room on the FMA pipe, the outer Mish's exp is a
//   polynomial on the FMA pipe (exp_fma), 0 MUFU; the inner keeps the accurate expf.
// Per element and direction that is 1.5 MUFU in fp32 (1 + 2/4) and 2.5 in fp16/bf16 (2 + 2/4),
// where it was 4.

#pragma once

namespace mishops {

// Inputs at or above this give tanh(softplus(v)) = 1 in fp32 (1 - 2/(n + 2) with n + 2 > 1.3e9
// rounds to 1) and mish'(v) = 1 (the slope's tail, 4 v e^(-2v), is below half an ulp of 1). It
// also bounds n + 2 by 1.3e9, so a product of four of them (3e36) cannot overflow.
constexpr float kMishClamp = 10.5f;
// Elements per shared reciprocal in the vector paths: 4 keeps the product finite (above) and adds
// about 2 ulp to the reciprocal in the worst case (five roundings and the rcp's own ulp, one of the
// roundings cancelling), which the fp32 tolerance (1e-6 relative) absorbs with room.
constexpr int kRcpGroup = 4;

// The hardware's approximate 2^v and 1/v, flushing denormal results to zero: exp(v) underflows to 0
// a little earlier (v < -87.3 instead of -103), where mish(v) is below 1e-36 anyway.
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

// e^v on the FMA pipe, for -87 <= v <= 88 (the caller's range: the outer Mish's input is >= -0.31).
// Cody-Waite: v log2(e) = k + f with k = rint(v log2 e) from the 1.5 * 2^23 shifter (k lands in the
// low mantissa bits of j) and |f| <= 0.5 taken with the split log2(e), so f carries no rounding of
// the product; 2^f by a degree-6 polynomial (relative error 1.9e-9, fitted to 2^f on [-0.5, 0.5]);
// the result's exponent raised by k with one integer add (bits(j) << 23 is k << 23: the shifter's
// own bits shift out).
__device__ __forceinline__ float exp_fma(float v) {
  constexpr float kLog2eHi = 1.44269502162933349609375f;
  constexpr float kLog2eLo = 1.925963033500011079e-8f;
  constexpr float kShifter = 12582912.f;  // 1.5 * 2^23
  const float j = fmaf(v, kLog2eHi, kShifter);
  const float k = j - kShifter;
  float f = fmaf(v, kLog2eHi, -k);
  f = fmaf(v, kLog2eLo, f);
  float p = 1.5345795e-4f;
  p = fmaf(p, f, 1.3399932e-3f);
  p = fmaf(p, f, 9.6184891e-3f);
  p = fmaf(p, f, 5.5503286e-2f);
  p = fmaf(p, f, 2.4022646e-1f);
  p = fmaf(p, f, 6.9314718e-1f);
  p = fmaf(p, f, 1.f);
  return __int_as_float(__float_as_int(p) + (__float_as_int(j) << 23));
}

// inv[i] = 1 / d[i] for d[i] in [2, 1.3e9] with one rcp for the group (G = 1, 2 or 4): each
// reciprocal is the group's reciprocal times the other elements' product.
template <int G>
__device__ __forceinline__ void reciprocals(const float (&d)[G], float (&inv)[G]) {
  static_assert(G == 1 || G == 2 || G == 4, "groups of 1, 2 or 4");
  if constexpr (G == 1) {
    inv[0] = rcp_approx(d[0]);
  } else if constexpr (G == 2) {
    const float r = rcp_approx(d[0] * d[1]);
    inv[0] = r * d[1];
    inv[1] = r * d[0];
  } else {
    const float p01 = d[0] * d[1];
    const float p23 = d[2] * d[3];
    const float r = rcp_approx(p01 * p23);
    const float r01 = r * p23;
    const float r23 = r * p01;
    inv[0] = r01 * d[1];
    inv[1] = r01 * d[0];
    inv[2] = r23 * d[3];
    inv[3] = r23 * d[2];
  }
}

// v[i] <- mish(v[i]) for G elements, and slope[i] <- mish'(v[i]) when kSlope.
//
// tanh(softplus(v)) = n / (n + 2) with n = e (e + 2), e = exp(v): one exp and one (shared)
// reciprocal r = 1 / (n + 2). With kFull (fp32 storage) t is n r only while n < 2 and 1 - 2 r beyond,
// where n r would carry r's error into a value near 1; fp16/bf16 keep 11 and 8 bits, which hide the
// bare ex2.approx's error (relative |v| * 2^-24 from rounding v * log2(e)).
// mish'(v) = t + v sigmoid(v) (1 - t^2); with sigmoid = e / (1 + e), 1 - t^2 = 4 (1 + e)^2 r^2 and
// e (1 + e) = n - e the second term is 4 v (n - e) r^2, free of the cancellation in 1 - t^2. From
// the clamp on it is taken as v * 0, so +-inf and NaN give NaN as autograd through F.mish does.
// kOuter: v is the output of a Mish (>= -0.31, or NaN, or +inf), where exp_fma is in range: with
// kFull its exp goes to the FMA pipe.
template <bool kFull, bool kOuter, bool kSlope, int G>
__device__ __forceinline__ void mish_group(float (&v)[G], float (&slope)[G]) {
  constexpr float kLog2e = 1.4426950408889634f;
  float e[G], n[G], d[G], r[G];
#pragma unroll
  for (int i = 0; i < G; ++i) {
    const float c = fminf(v[i], kMishClamp);  // fminf(NaN, clamp) = clamp: the NaN flows on through v
    // exp_fma's floor only guards the group: an input below it (never a Mish's output) would give
    // a NaN d and spoil its neighbours' shared reciprocal.
    e[i] = kFull ? (kOuter ? exp_fma(fmaxf(c, -80.f)) : expf(c)) : exp2_approx(c * kLog2e);
    n[i] = e[i] * (e[i] + 2.f);
    d[i] = n[i] + 2.f;
  }
  reciprocals<G>(d, r);
#pragma unroll
  for (int i = 0; i < G; ++i) {
    const float t = kFull && n[i] >= 2.f ? fmaf(-2.f, r[i], 1.f) : n[i] * r[i];
    if constexpr (kSlope) {
      const float tail = v[i] < kMishClamp ? 4.f * r[i] * (n[i] - e[i]) * r[i] : 0.f;
      slope[i] = fmaf(v[i], tail, t);
    }
    v[i] = v[i] * t;
  }
}

// y[i] = mish(mish(x[i])) in place.
template <bool kFull, int G>
__device__ __forceinline__ void mish2_group(float (&x)[G]) {
  float unused[G];
  mish_group<kFull, false, false, G>(x, unused);
  mish_group<kFull, true, false, G>(x, unused);
}

// g[i] <- g[i] * d/dx mish(mish(x[i])), recomputed from x.
template <bool kFull, int G>
__device__ __forceinline__ void mish2_grad_group(const float (&x)[G], float (&g)[G]) {
  float v[G], inner[G], outer[G];
#pragma unroll
  for (int i = 0; i < G; ++i) v[i] = x[i];
  mish_group<kFull, false, true, G>(v, inner);
  mish_group<kFull, true, true, G>(v, outer);
#pragma unroll
  for (int i = 0; i < G; ++i) g[i] = g[i] * outer[i] * inner[i];
}

}  // namespace mishops
