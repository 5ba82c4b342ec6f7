// Implicit-GEMM Conv2d + bias + Mish (once or twice) for Hopper (sm_90a): wgmma on TMA-loaded tiles,
// warp-specialised and persistent, writing the block's output once in NCHW or channels_last.
//
// The conv is a GEMM over a zero-padded NHWC copy of the input ([N * Hp * Wp, Cp], channels
// contiguous, fp32 already rounded to TF32 to nearest by the pass that made it): with stride 1, the
// BM pixels of one output row at tap (kh, kw) are BM consecutive rows of that view, starting at
// row0 + kh * dh * Wp + kw * dw, so every (tap, channel block) operand tile is one 2-D TMA box and
// the main loop does no index arithmetic. Pixels past the row's end read the next row's data (or
// TMA's zero fill past the tensor) and are never stored. The weight is repacked to
// [Cout, KH * KW * Cp], K-major, as wgmma needs for 32-bit operands.
//
// Roles: warpgroup 0 is the producer (one thread issues TMA into a ring of stages, each guarded by
// a "full" mbarrier, which TMA completes by byte count, and an "empty" one, which the consuming
// warps arrive at once their wgmmas have read it); the other warpgroups are consumers, each taking
// every second tile of the CTA's share of the static tile schedule (tile = blockIdx.x + i *
// gridDim.x). The ring is filled in tile order, so while one consumer runs bias + Mish + stores
// for its tile, the other's MMAs for the next tile proceed: the epilogue, whose ex2/rcp and
// uncoalescable NCHW stores would otherwise stall the tensor cores, is hidden.

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cudaTypedefs.h>

#include <cstdint>
#include <cstdio>
#include <string>
#include <type_traits>

namespace hopper_conv {

constexpr int kBM = 128;                // output pixels per tile (two m64 wgmma slices)
constexpr int kBN = 128;                // output channels per tile (the wgmma N)
constexpr int kRowBytes = 128;          // one K block: one 128-byte swizzle row per pixel / channel
constexpr int kTileBytes = kBM * kRowBytes;  // A and B tiles are both 128 rows of 128 bytes
constexpr int kStageBytes = 2 * kTileBytes;
constexpr int kMaxStages = 6;

struct Params {
  int out_h, out_w, cout, hp, wp;
  int taps, taps_w, dh, dw;
  int cp;              // padded channels (a multiple of the K block)
  int kblocks;         // channel blocks per tap
  int tiles_w, tiles_co;
  long long num_tiles;
  int stages;
  int channels_last;
  // 0: the block. Measurement and experiment modes (benchmarks/bench_hopper_conv.py): 1 epilogue
  // without stores, 2 no epilogue (main loop alone); 3, 4 load each tap's A box at kw = 0 and read
  // it kw rows further in shared memory (the reuse of one box across a kernel row), with the
  // descriptor's base offset 0 (3) or the row phase (4): pixels past 127 - kw of a tile are then
  // garbage, the rest must equal mode 0 bit for bit.
  int mode;
  // 0: bias + Mish two values at a time between the stores (measured); 1: a whole m64 slice first,
  // with no branch between evaluations, then its stores (slice_batched)
  int epilogue;
};

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}

__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}

__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}

__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n"
      ".reg .pred P1;\n"
      "LAB_WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 P1, [%0], %1;\n"
      "@P1 bra DONE;\n"
      "bra LAB_WAIT;\n"
      "DONE:\n"
      "}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}

__device__ __forceinline__ void tma_load_2d(uint32_t dst, const CUtensorMap* map, uint32_t bar, int c0, int c1) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], [%2];" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(c0), "r"(c1)
      : "memory");
}

// K-major operand, 128-byte swizzle (as TMA wrote it): rows of 128 bytes, 8-row groups 1024 bytes
// apart (the stride byte offset); the leading byte offset is unused in this mode.
__device__ __forceinline__ uint64_t smem_desc(uint32_t addr, uint32_t base_offset = 0) {
  uint64_t d = static_cast<uint64_t>(base_offset & 7) << 49;
  d |= static_cast<uint64_t>((addr & 0x3FFFF) >> 4);
  d |= static_cast<uint64_t>(1) << 16;
  d |= static_cast<uint64_t>(1024 >> 4) << 32;
  d |= static_cast<uint64_t>(1) << 62;
  return d;
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}

// Keeps the compiler from moving accumulator reads or writes across the asynchronous wgmmas.
__device__ __forceinline__ void fence_regs(float* d) {
#pragma unroll
  for (int i = 0; i < 64; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

__device__ __forceinline__ void wgmma_tf32(float* d, uint64_t desc_a, uint64_t desc_b, int scale_d) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k8.f32.tf32.tf32 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
      "%64, %65, p, 1, 1;\n"
      "}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "l"(desc_a), "l"(desc_b), "r"(scale_d));
}

__device__ __forceinline__ void wgmma_bf16(float* d, uint64_t desc_a, uint64_t desc_b, int scale_d) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
      "%64, %65, p, 1, 1, 0, 0;\n"
      "}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "l"(desc_a), "l"(desc_b), "r"(scale_d));
}

__device__ __forceinline__ void wgmma_f16(float* d, uint64_t desc_a, uint64_t desc_b, int scale_d) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
      "%64, %65, p, 1, 1, 0, 0;\n"
      "}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "l"(desc_a), "l"(desc_b), "r"(scale_d));
}

template <typename T>
__device__ __forceinline__ void wgmma(float* d, uint64_t a, uint64_t b, int scale_d) {
  if constexpr (std::is_same_v<T, float>) {
    wgmma_tf32(d, a, b, scale_d);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    wgmma_bf16(d, a, b, scale_d);
  } else {
    wgmma_f16(d, a, b, scale_d);
  }
}

__device__ __forceinline__ float ex2(float v) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(v));
  return y;
}

__device__ __forceinline__ float rcp(float v) {
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(v));
  return y;
}

// mish(v) = v tanh(softplus(v)) = v n / (n + 2), n = e (e + 2), e = 2^(min(v, 20) log2 e): one ex2
// and one reciprocal. The clamp keeps n finite (the ratio is 1 in fp32 there); fminf(NaN, 20) = 20,
// so NaN flows on through v, +inf gives inf and -inf gives -inf * 0 = NaN, as F.mish does.
__device__ __forceinline__ float mish(float v) {
  const float e = ex2(fminf(v, 20.f) * 1.4426950408889634f);
  const float n = e * (e + 2.f);
  return v * (n * rcp(n + 2.f));
}

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

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

template <typename T>
struct Pair;
template <>
struct alignas(8) Pair<float> {
  float a, b;
};
template <>
struct alignas(4) Pair<__nv_bfloat16> {
  __nv_bfloat16 a, b;
};
template <>
struct alignas(4) Pair<__half> {
  __half a, b;
};

struct Tile {
  int n, h, w0, co0;
};

__device__ __forceinline__ Tile decode(long long t, const Params& p) {
  Tile r;
  r.co0 = static_cast<int>(t % p.tiles_co) * kBN;
  t /= p.tiles_co;
  r.w0 = static_cast<int>(t % p.tiles_w) * kBM;
  t /= p.tiles_w;
  r.h = static_cast<int>(t % p.out_h);
  r.n = static_cast<int>(t / p.out_h);
  return r;
}

// Bias + Mish over a whole m64 slice of the accumulator before any of its stores, with no branch
// between the evaluations, so the compiler can interleave many independent ex2/rcp chains (in the
// pairwise epilogue the per-channel guard between pairs keeps only two in flight, and one warp per
// scheduler then waits on their latency). Lanes whose channels lie past Cout compute on the last
// channel's bias and store nothing; pixels past the row likewise.
template <typename T, int kMish>
__device__ __forceinline__ void slice_batched(float* acc, int m, const Tile& tile, const Params& p,
                                              const T* __restrict__ bias, T* __restrict__ out, int warp, int lane) {
  const int co_base = tile.co0 + 2 * (lane & 3);
  const int last = p.cout - 1;
#pragma unroll
  for (int q = 0; q < 16; ++q) {
    const int co = co_base + 8 * q;
    const float b0 = bias != nullptr ? to_float(bias[min(co, last)]) : 0.f;
    const float b1 = bias != nullptr ? to_float(bias[min(co + 1, last)]) : 0.f;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      float v = acc[4 * q + j] + ((j & 1) ? b1 : b0);
      v = mish(v);
      if constexpr (kMish == 2) v = mish(v);
      acc[4 * q + j] = v;
    }
  }
  if (p.mode == 1) {  // computed, kept alive, not stored
    if (acc[0] == 1234.5f && acc[63] == -1234.5f) out[0] = from_float<T>(acc[1]);
    return;
  }
  const long long hw = static_cast<long long>(p.out_h) * p.out_w;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int w = tile.w0 + 64 * m + 16 * warp + (lane >> 2) + 8 * half;
    if (w >= p.out_w) continue;
    const long long pix = (static_cast<long long>(tile.n) * p.out_h + tile.h) * p.out_w + w;
    const long long nchw = static_cast<long long>(tile.n) * p.cout * hw + static_cast<long long>(tile.h) * p.out_w + w;
#pragma unroll
    for (int q = 0; q < 16; ++q) {
      const int co = co_base + 8 * q;
      if (co >= p.cout) continue;
      const float v0 = acc[4 * q + 2 * half], v1 = acc[4 * q + 2 * half + 1];
      if (p.channels_last) {
        Pair<T> pr{from_float<T>(v0), from_float<T>(v1)};  // Cout is even: co + 1 < Cout
        *reinterpret_cast<Pair<T>*>(out + pix * p.cout + co) = pr;
      } else {
        const long long o = nchw + static_cast<long long>(co) * hw;
        out[o] = from_float<T>(v0);
        out[o + hw] = from_float<T>(v1);
      }
    }
  }
}

template <typename T, int kMish>
__global__ void __launch_bounds__(384, 1)
    conv_mish_kernel(const __grid_constant__ CUtensorMap map_a, const __grid_constant__ CUtensorMap map_b,
                     const Params p, const T* __restrict__ bias, T* __restrict__ out) {
  extern __shared__ uint8_t smem_raw[];
  // TMA's 128-byte swizzle repeats every 1024 bytes and wgmma reads it from the address bits:
  // stage buffers start on 1024-byte boundaries.
  const uint32_t raw = smem_u32(smem_raw);
  const uint32_t base = (raw + 1023) & ~1023u;
  const int stages = p.stages;
  // full[s] at bars + 8 s, then empty[s], then done[c]
  const uint32_t bars = base + stages * kStageBytes;
  auto full = [&](int s) { return bars + 8 * s; };
  auto empty = [&](int s) { return bars + 8 * (stages + s); };
  auto done = [&](int c) { return bars + 8 * (2 * stages + c); };
  auto tile_a = [&](int s) { return base + s * kStageBytes; };
  auto tile_b = [&](int s) { return base + s * kStageBytes + kTileBytes; };

  const int wg = threadIdx.x / 128;
  const int consumers = blockDim.x / 128 - 1;
  if (threadIdx.x == 0) {
    for (int s = 0; s < stages; ++s) {
      mbar_init(full(s), 1);
      mbar_init(empty(s), 4);  // one arrival per warp of the consuming warpgroup
    }
    mbar_init(done(0), 4);
    mbar_init(done(1), 4);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();

  const int kiters = p.taps * p.kblocks;
  constexpr int kElems = kRowBytes / sizeof(T);  // K elements per block

  if (wg == 0) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
    if (threadIdx.x == 0) {
      asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(&map_a)) : "memory");
      asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(&map_b)) : "memory");
      int s = 0;
      uint32_t phase = 0;  // parity of the ring's current round
      for (long long t = blockIdx.x; t < p.num_tiles; t += gridDim.x) {
        const Tile tile = decode(t, p);
        const int row0 = (tile.n * p.hp + tile.h) * p.wp + tile.w0;
        for (int tap = 0; tap < p.taps; ++tap) {
          const int kh = tap / p.taps_w, kw = tap - kh * p.taps_w;
          const int arow = row0 + kh * p.dh * p.wp + (p.mode >= 3 ? 0 : kw * p.dw);
          for (int cb = 0; cb < p.kblocks; ++cb) {
            mbar_wait(empty(s), phase ^ 1);
            mbar_expect_tx(full(s), kStageBytes);
            tma_load_2d(tile_a(s), &map_a, full(s), cb * kElems, arow);
            tma_load_2d(tile_b(s), &map_b, full(s), tap * p.cp + cb * kElems, tile.co0);
            if (++s == stages) {
              s = 0;
              phase ^= 1;
            }
          }
        }
      }
    }
  } else {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");
    const int c = wg - 1;
    const int tid = threadIdx.x & 127;
    const int warp = tid >> 5, lane = tid & 31;
    float acc0[64], acc1[64];
    long long i = c;
    for (long long t = blockIdx.x + static_cast<long long>(c) * gridDim.x; t < p.num_tiles;
         t += static_cast<long long>(consumers) * gridDim.x, i += consumers) {
      // Main loops alternate strictly between the consumers: this tile's waits start once the
      // previous tile's main loop (the other consumer's) is done. A ring stage's barrier phase
      // only says even or odd, so a consumer that waited for its next tile's stages while the
      // other was still consuming its own would take a phase two rounds early for its own.
      if (consumers == 2 && i > 0) mbar_wait(done(static_cast<int>((i - 1) & 1)), static_cast<uint32_t>(((i - 1) >> 1) & 1));
      // This tile's place in the ring: the producer filled it in tile order, kiters stages a tile.
      const long long g = i * kiters;
      int s = static_cast<int>(g % stages);
      uint32_t phase = static_cast<uint32_t>(g / stages) & 1;
      int prev = s;
      for (int k = 0; k < kiters; ++k) {
        mbar_wait(full(s), phase);
        fence_regs(acc0);
        fence_regs(acc1);
        wgmma_fence();
        uint32_t a = tile_a(s), phase_a = 0;
        const uint32_t b = tile_b(s);
        if (p.mode >= 3) {
          const int shift = ((k / p.kblocks) % p.taps_w) * p.dw;
          a += shift * kRowBytes;
          phase_a = p.mode == 4 ? ((a >> 7) & 7) : 0;
        }
#pragma unroll
        for (int kk = 0; kk < kRowBytes / 32; ++kk) {  // wgmma K = 32 bytes
          const uint64_t db = smem_desc(b + 32 * kk);
          const int scale = (k > 0 || kk > 0) ? 1 : 0;
          wgmma<T>(acc0, smem_desc(a + 32 * kk, phase_a), db, scale);
          wgmma<T>(acc1, smem_desc(a + 64 * kRowBytes + 32 * kk, phase_a), db, scale);
        }
        wgmma_commit();
        fence_regs(acc0);
        fence_regs(acc1);
        wgmma_wait<1>();  // the previous stage's wgmmas are done: give it back
        if (k > 0 && lane == 0) mbar_arrive(empty(prev));
        prev = s;
        if (++s == stages) {
          s = 0;
          phase ^= 1;
        }
      }
      wgmma_wait<0>();
      fence_regs(acc0);
      fence_regs(acc1);
      if (lane == 0) {
        mbar_arrive(empty(prev));
        if (consumers == 2) mbar_arrive(done(c));
      }

      if (p.mode == 2) continue;
      // Epilogue: accumulator (slice m, register j) holds pixel 64 m + 16 warp + lane / 4 + 8 ((j >> 1) & 1)
      // and channel 8 (j >> 2) + 2 (lane & 3) + (j & 1).
      const Tile tile = decode(t, p);
      if (p.epilogue == 1) {
        slice_batched<T, kMish>(acc0, 0, tile, p, bias, out, warp, lane);
        slice_batched<T, kMish>(acc1, 1, tile, p, bias, out, warp, lane);
        continue;
      }
      const int co_base = tile.co0 + 2 * (lane & 3);
      float bias_v[32];
#pragma unroll
      for (int q = 0; q < 16; ++q) {
        const int co = co_base + 8 * q;
        bias_v[2 * q] = (bias != nullptr && co < p.cout) ? to_float(bias[co]) : 0.f;
        bias_v[2 * q + 1] = (bias != nullptr && co + 1 < p.cout) ? to_float(bias[co + 1]) : 0.f;
      }
      const long long hw = static_cast<long long>(p.out_h) * p.out_w;
#pragma unroll
      for (int m = 0; m < 2; ++m) {
        float* acc = m == 0 ? acc0 : acc1;
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int w = tile.w0 + 64 * m + 16 * warp + (lane >> 2) + 8 * half;
          if (w >= p.out_w) continue;
          const long long pix = (static_cast<long long>(tile.n) * p.out_h + tile.h) * p.out_w + w;
#pragma unroll
          for (int q = 0; q < 16; ++q) {
            const int co = co_base + 8 * q;
            if (co >= p.cout) continue;
            float v0 = acc[4 * q + 2 * half] + bias_v[2 * q];
            float v1 = acc[4 * q + 2 * half + 1] + bias_v[2 * q + 1];
            v0 = mish(v0);
            v1 = mish(v1);
            if constexpr (kMish == 2) {
              v0 = mish(v0);
              v1 = mish(v1);
            }
            if (p.mode == 1) {  // computed, kept alive, not stored
              if (v0 == 1234.5f && v1 == -1234.5f) out[0] = from_float<T>(v0);
            } else if (p.channels_last) {
              Pair<T> pr{from_float<T>(v0), from_float<T>(v1)};  // Cout is even: co + 1 < Cout
              *reinterpret_cast<Pair<T>*>(out + pix * p.cout + co) = pr;
            } else {
              // NCHW: out[n][co][h][w] = base of image n + co * H * W + h * W + w
              const long long o = (static_cast<long long>(tile.n) * p.cout + co) * hw +
                                  static_cast<long long>(tile.h) * p.out_w + w;
              out[o] = from_float<T>(v0);
              out[o + hw] = from_float<T>(v1);
            }
          }
        }
      }
    }
  }
}

using EncodeTiled = PFN_cuTensorMapEncodeTiled_v12000;

static EncodeTiled encode_fn(std::string& error) {
  static EncodeTiled fn = nullptr;
  if (fn == nullptr) {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult status;
    cudaError_t err = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault, &status);
    if (err != cudaSuccess || status != cudaDriverEntryPointSuccess || ptr == nullptr) {
      error = "hopper_conv: cuTensorMapEncodeTiled not found in the driver";
      return nullptr;
    }
    fn = reinterpret_cast<EncodeTiled>(ptr);
  }
  return fn;
}

static bool make_map(CUtensorMap* map, CUtensorMapDataType dtype, int elem, const void* ptr, uint64_t inner,
                     uint64_t rows, std::string& error) {
  EncodeTiled fn = encode_fn(error);
  if (fn == nullptr) return false;
  const cuuint64_t dims[2] = {inner, rows};
  const cuuint64_t strides[1] = {inner * elem};
  const cuuint32_t box[2] = {static_cast<cuuint32_t>(kRowBytes / elem), 128};
  const cuuint32_t estrides[2] = {1, 1};
  CUresult r = fn(map, dtype, 2, const_cast<void*>(ptr), dims, strides, box, estrides, CU_TENSOR_MAP_INTERLEAVE_NONE,
                  CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) {
    error = "hopper_conv: cuTensorMapEncodeTiled failed with CUresult " + std::to_string(static_cast<int>(r));
    return false;
  }
  return true;
}

template <typename T, int kMish>
static std::string launch_typed(CUtensorMapDataType dtype, const void* xp, const void* wk, const void* bias, void* out,
                                const Params& p, long long rows, int consumers, int sms, cudaStream_t stream) {
  std::string error;
  CUtensorMap map_a, map_b;
  if (!make_map(&map_a, dtype, sizeof(T), xp, p.cp, rows, error)) return error;
  if (!make_map(&map_b, dtype, sizeof(T), wk, static_cast<uint64_t>(p.taps) * p.cp, p.cout, error)) return error;
  const int smem = p.stages * kStageBytes + 16 * p.stages + 16 + 1024;
  auto kernel = conv_mish_kernel<T, kMish>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return std::string("hopper_conv: cudaFuncSetAttribute: ") + cudaGetErrorString(err);
  const long long grid = p.num_tiles < sms ? p.num_tiles : sms;
  kernel<<<static_cast<unsigned>(grid), 128 * (1 + consumers), smem, stream>>>(
      map_a, map_b, p, static_cast<const T*>(bias), static_cast<T*>(out));
  err = cudaGetLastError();
  if (err != cudaSuccess) return std::string("hopper_conv: launch: ") + cudaGetErrorString(err);
  return "";
}

// dtype: 0 fp32 (TF32 operands), 1 bf16, 2 fp16. Returns an empty string or why it failed.
std::string launch(int dtype, int mish_count, const void* xp, const void* wk, const void* bias, void* out,
                   long long rows, int out_h, int out_w, int cout, int hp, int wp, int kh, int kw, int dh, int dw,
                   int cp, int stages, int consumers, int channels_last, int sms, int mode, int epilogue,
                   cudaStream_t stream) {
  const int elem = dtype == 0 ? 4 : 2;
  const int kelems = kRowBytes / elem;
  if (cp % kelems != 0) return "hopper_conv: padded channels not a multiple of the K block";
  if (stages < 2 || stages > kMaxStages) return "hopper_conv: stages must be 2.." + std::to_string(kMaxStages);
  if (consumers < 1 || consumers > 2) return "hopper_conv: consumers must be 1 or 2";
  if (rows >= (1LL << 31)) return "hopper_conv: 2^31 padded pixels or more in one launch";
  Params p;
  p.out_h = out_h;
  p.out_w = out_w;
  p.cout = cout;
  p.hp = hp;
  p.wp = wp;
  p.taps = kh * kw;
  p.taps_w = kw;
  p.dh = dh;
  p.dw = dw;
  p.cp = cp;
  p.kblocks = cp / kelems;
  p.tiles_w = (out_w + kBM - 1) / kBM;
  p.tiles_co = (cout + kBN - 1) / kBN;
  p.num_tiles = (rows / (static_cast<long long>(hp) * wp)) * out_h * p.tiles_w * p.tiles_co;
  p.stages = stages;
  p.channels_last = channels_last;
  p.mode = mode;
  p.epilogue = epilogue;
  if (p.num_tiles == 0) return "";
#define HOPPER_CONV_CASE(T, CU, M) \
  return launch_typed<T, M>(CU, xp, wk, bias, out, p, rows, consumers, sms, stream)
  if (dtype == 0) {
    if (mish_count == 1) HOPPER_CONV_CASE(float, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, 1);
    HOPPER_CONV_CASE(float, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, 2);
  } else if (dtype == 1) {
    if (mish_count == 1) HOPPER_CONV_CASE(__nv_bfloat16, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 1);
    HOPPER_CONV_CASE(__nv_bfloat16, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2);
  } else {
    if (mish_count == 1) HOPPER_CONV_CASE(__half, CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 1);
    HOPPER_CONV_CASE(__half, CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 2);
  }
#undef HOPPER_CONV_CASE
}

}  // namespace hopper_conv
