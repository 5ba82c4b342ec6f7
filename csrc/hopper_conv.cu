// Implicit-GEMM Conv2d + bias + Mish (once or twice) for Hopper (sm_90a): wgmma on TMA-loaded tiles,
// warp-specialised and persistent, writing the block's output once in NCHW or channels_last.
//
// The conv is a GEMM over a zero-padded NHWC copy of the input (channels contiguous, padded to the
// K block; fp32 already rounded to TF32 to nearest by the pass that made it), seen by TMA as
// [N Hp][Wp / sw][sw][Cp]: the padded row's pixels as (pixel / sw, pixel % sw). The BM output
// pixels w0 .. w0 + BM - 1 of output row h at tap (kh, kw) read padded pixels (w0 + j) sw + kw dw
// of padded row h sh + kh dh, which in that view are BM consecutive entries (w0 + (kw dw) / sw + j)
// at the fixed phase (kw dw) % sw: every (tap, channel block) operand tile is one TMA box, whatever
// the stride, and the main loop does no index arithmetic. Pixels past the row's end read TMA's
// zero fill and are never stored. The weight is repacked to [Cout, KH * KW * Cp], K-major, as
// wgmma needs for 32-bit operands.
//
// Row boxes (Params::rowbox): the KW taps of one kernel row read the same pixels shifted by kw dw
// rows, so one box of 128 + 8 rows at kw = 0 serves them all, each tap's descriptor pointing kw dw
// rows further into it (the swizzle follows the absolute shared-memory address, so a shifted
// descriptor reads the shifted rows; checked bitwise against per-tap boxes on the H200). That cuts
// the activation's TMA traffic from L2 by KW: with the per-tap boxes the main loop alone kept L2
// 84% busy, and the epilogue's stores compete with it there. The stage holding the box is given
// back only after the row's last tap, so the ring must be deeper than KW.
//
// Roles: warpgroup 0 is the producer (one thread issues TMA into a ring of stages, each guarded by
// a "full" mbarrier, which TMA completes by byte count, and an "empty" one, which the consuming
// warps arrive at once their wgmmas have read it); the other warpgroups are consumers, each taking
// every second tile of the CTA's share of the static tile schedule (tile = blockIdx.x + i *
// gridDim.x). The ring is filled in tile order, so while one consumer runs bias + Mish + stores
// for its tile, the other's MMAs for the next tile proceed: the epilogue, whose ex2/rcp and
// uncoalescable NCHW stores would otherwise stall the tensor cores, overlaps them (as far as it is
// no longer than a tile's main loop; where it is longer, the difference is the kernel's excess over
// its main loop: benchmarks/results/h200/hopper-conv.md says where it goes). With the split
// epilogue (kSplit) two more warpgroups take every tile's accumulators from the consumers through
// shared memory and do the epilogue alone.

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cudaTypedefs.h>

#include <cstdint>
#include <cstdio>
#include <string>
#include <type_traits>

#include "mish.cuh"

namespace hopper_conv {

using mishops::from_float;
using mishops::to_float;

constexpr int kBM = 128;                // output pixels per tile (two m64 wgmma slices)
constexpr int kBN = 128;                // output channels per tile (the wgmma N)
constexpr int kRowBytes = 128;          // one K block: one 128-byte swizzle row per pixel / channel
constexpr int kTileBytes = kBM * kRowBytes;  // a B tile (and a per-tap A box): 128 rows of 128 bytes
constexpr int kRowBoxRows = kBM + 8;         // a row box: room for shifts up to 8 rows
constexpr int kABytes = kRowBoxRows * kRowBytes;  // A's place in a stage: a multiple of 1024, as the swizzle needs
constexpr int kStageBytes = kABytes + kTileBytes;
constexpr int kMaxStages = 6;
constexpr int kMaxSmem = 227 * 1024;  // an sm_90 CTA's dynamic shared memory at most
constexpr int kSliceRows = 64;  // output pixels of one m64 wgmma slice: the unit the staged epilogue stages
// The split epilogue's buffer: one m64 slice's fp32 accumulators (half a tile, so that the ring
// keeps 5 stages beside it; a whole tile's took it down to 4), [channel][pixel] rows for NCHW and
// [pixel][channel] rows for channels_last, each row padded so that the consumers' writes from the
// wgmma fragment layout hit 32 distinct banks (NCHW: a warp's scalar writes span 4 channel rows of
// 8 pixels, 2 x 68 = 8 mod 32 words apart; channels_last: its pair writes span 8 pixel rows of 4
// pairs, half a warp at a time, 136 = 8 mod 32 apart).
constexpr int kSplitPitchNchw = kSliceRows + 4;
constexpr int kSplitPitchCl = kBN + 8;
constexpr int kSplitBytes = kSliceRows * kSplitPitchCl * 4;
static_assert(kBN * kSplitPitchNchw * 4 == kSplitBytes, "both layouts of a slice take the same buffer");
// A tile is handed over in two fills of the buffer, fill f = 2 i + slice for the CTA's i-th tile;
// acc_empty has a barrier per f % kFillBarriers (the kernel's hand-over says why 4).
constexpr int kFillBarriers = 4;
constexpr int kSplitWarpgroups = 2;
enum Epilogue { kDirect = 0, kStaged = 1, kSplit = 2 };

struct Params {
  int out_h, out_w, cout, hp, wp;
  int taps, taps_w, dh, dw, sh, sw;
  int cp;              // padded channels (a multiple of the K block)
  int kblocks;         // channel blocks per tap
  int tiles_w, tiles_co;
  long long num_tiles;
  int stages;
  int consumers;
  int rowbox;  // one A box per (kernel row, channel block), read by its KW taps at shifted rows
  int channels_last;
  int epilogue;   // Epilogue: from registers (store_direct), staged a slice at a time (store_slice_staged),
                  // or by warpgroups of its own (split_epilogue)
  int pair_rows;  // NCHW rows start on a pair of elements: staged and split NCHW stores write pairs
  // 0: the block. Measurement modes (benchmarks/bench_hopper_conv.py): 1 epilogue computed but
  // not stored, 2 no epilogue (the main loop alone).
  int mode;
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

// The producer's wait for a free stage: the ring holds several stages of slack, so it may sleep up
// to 20 us between checks (it wakes as soon as the phase completes). Spinning with the plain wait
// took about a quarter of the issue slots of its scheduler, whose consumer warps the other three
// schedulers' warps then wait for at every wgmma.
__device__ __forceinline__ void mbar_wait_idle(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n"
      ".reg .pred P1;\n"
      "LAB_WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 P1, [%0], %1, %2;\n"
      "@P1 bra DONE;\n"
      "bra LAB_WAIT;\n"
      "DONE:\n"
      "}\n" ::"r"(bar),
      "r"(parity), "r"(20000)
      : "memory");
}

__device__ __forceinline__ void tma_load_2d(uint32_t dst, const CUtensorMap* map, uint32_t bar, int c0, int c1) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], [%2];" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(c0), "r"(c1)
      : "memory");
}

__device__ __forceinline__ void tma_load_4d(uint32_t dst, const CUtensorMap* map, uint32_t bar, int c0, int c1, int c2,
                                            int c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5, %6}], [%2];" ::"r"(
          dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
      : "memory");
}

__device__ __forceinline__ void tma_store_3d(const CUtensorMap* map, uint32_t src, int c0, int c1, int c2) {
  asm volatile("cp.async.bulk.tensor.3d.global.shared::cta.bulk_group [%0, {%2, %3, %4}], [%1];" ::"l"(
                   reinterpret_cast<uint64_t>(map)),
               "r"(src), "r"(c0), "r"(c1), "r"(c2)
               : "memory");
}
__device__ __forceinline__ void tma_store_commit() { asm volatile("cp.async.bulk.commit_group;" ::: "memory"); }
// The staged slice's earlier stores have read their shared memory (they may still be writing).
__device__ __forceinline__ void tma_store_wait_read() { asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory"); }
__device__ __forceinline__ void tma_store_wait_all() { asm volatile("cp.async.bulk.wait_group 0;" ::: "memory"); }
// Generic-proxy writes to shared memory made visible to the TMA unit (the async proxy).
__device__ __forceinline__ void fence_async_shared() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }
// A barrier among one consumer warpgroup's 128 threads (barrier 0 is __syncthreads').
__device__ __forceinline__ void consumer_sync(int c) { asm volatile("bar.sync %0, 128;" ::"r"(1 + c) : "memory"); }

// wgmma's shared-memory descriptor of a K-major operand in TMA's 128-byte swizzle: rows of 128
// bytes, 8-row groups 1024 bytes apart (the stride byte offset), the leading byte offset unused in
// this mode. The high word is the same for every tile; the low word is the address / 16 (14 bits:
// shared memory ends below 2^18, so adding an offset / 16 never carries out of the field) and a
// leading byte offset of 1. So a stage's or a K step's descriptor is the base's low word plus a
// constant, which the main loop adds in uniform registers instead of rebuilding each descriptor.
constexpr uint32_t kDescHi = (1024 >> 4) | (1u << 30);
__device__ __forceinline__ uint32_t desc_lo(uint32_t addr) { return ((addr & 0x3FFFF) >> 4) | (1u << 16); }
__device__ __forceinline__ uint64_t desc(uint32_t lo) { return (static_cast<uint64_t>(kDescHi) << 32) | lo; }

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

// The channels' bias of a lane (channel co_base + 8 q + c at 2 q + c), read before the tile's main
// loop so that the loads' latency hides behind the MMAs instead of opening the epilogue (they
// were a tenth of the kernel's stall samples there). Channels past Cout take the last one's.
template <typename T>
__device__ __forceinline__ void load_bias(const T* __restrict__ bias, int co_base, int cout, float (&bias_v)[32]) {
#pragma unroll
  for (int q = 0; q < 16; ++q) {
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      bias_v[2 * q + c] = bias != nullptr ? to_float(bias[min(co_base + 8 * q + c, cout - 1)]) : 0.f;
    }
  }
}

// v <- mish(v), once or twice, for a group of G values with one shared reciprocal a Mish (kRcpGroup
// in mish_math.cuh says why 4): ex2.approx for both exps (the accurate expf is for the elementwise
// passes' 1e-6; here the TF32 or 16-bit operands' error is far larger) and one reciprocal per group,
// 2.5 MUFU an element where each Mish's own reciprocal made 4, which kept the MUFU pipe the
// epilogue's limit.
template <int kMish, int G>
__device__ __forceinline__ void mish_times(float (&v)[G]) {
  float unused[G];
  mishops::mish_group<false, false, false, G>(v, unused);
  if constexpr (kMish == 2) mishops::mish_group<false, true, false, G>(v, unused);
}

// Bias + Mish over one accumulator slice, with no branch between the evaluations, so the compiler
// interleaves dozens of independent ex2/rcp chains (with a guard between pairs of values only two
// were in flight, and the one epilogue warp per scheduler waited on their latency). Lanes whose
// channels lie past Cout compute on the last channel's bias and store nothing; pixels past the
// row likewise.
template <int kMish>
__device__ __forceinline__ void bias_mish(float* acc, const float (&bias_v)[32]) {
#pragma unroll
  for (int j = 0; j < 64; j += mishops::kRcpGroup) {
    float v[mishops::kRcpGroup];
#pragma unroll
    for (int i = 0; i < mishops::kRcpGroup; ++i) v[i] = acc[j + i] + bias_v[2 * ((j + i) >> 2) + ((j + i) & 1)];
    mish_times<kMish>(v);
#pragma unroll
    for (int i = 0; i < mishops::kRcpGroup; ++i) acc[j + i] = v[i];
  }
}

// The staged epilogue (kStaged): slice m (64 pixels x 128 channels) goes to the consumer's
// buffer as boxes of 128-byte rows in TMA's 128-byte swizzle (16-byte chunk index XOR row % 8
// within each 1024-byte block), which also keeps the accumulators' writes free of bank conflicts:
// NCHW boxes are [128 channels][kInner pixels], channels_last boxes [64 pixels][kInner channels].
// From there channels_last goes out by TMA stores, which one thread issues, so no register waits
// on the memory system (with direct stores, 82% of the stores' stall samples were registers held
// until the memory system took them). NCHW cannot: TMA needs 16-byte aligned box starts, and a
// 254-wide fp32 row starts 8 bytes off every second row (on the H200 such stores stop the kernel
// with an illegal instruction). There each warp writes whole channel rows of the slice, two
// pixels a lane where rows are pair-aligned: 256 contiguous bytes an instruction instead of four
// 32-byte pieces of four rows, half the store instructions of the direct epilogue.
template <typename T>
__device__ __forceinline__ void store_slice_staged(const float* acc, int m, const Tile& tile, const Params& p,
                                                   const CUtensorMap* map_o, uint8_t* buf, T* __restrict__ out, int c,
                                                   int tid) {
  constexpr int kInner = kRowBytes / sizeof(T);
  constexpr int kElem = sizeof(T);
  const int warp = tid >> 5, lane = tid & 31;
  auto at = [&](int ch, int px) {  // NCHW: element (ch, px) of the slice
    return buf + (px / kInner) * (kBN * kRowBytes) + ch * kRowBytes + (((px % kInner) * kElem) ^ ((ch & 7) << 4));
  };
  if (tid == 0 && p.channels_last) tma_store_wait_read();  // the previous slice's stores are done with the buffer
  consumer_sync(c);  // ... and so are the other warps' reads (NCHW)
  // accumulator register 4 q + 2 half + cc: pixel px0 + 8 half, channel ch0 + 8 q + cc
  const int px0 = 16 * warp + (lane >> 2), ch0 = 2 * (lane & 3);
#pragma unroll
  for (int q = 0; q < 16; ++q) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int px = px0 + 8 * half, ch = ch0 + 8 * q;
      const float* a = acc + 4 * q + 2 * half;
      if (p.channels_last) {  // the pair of channels is one 8- or 4-byte write
        const int byte = (ch / kInner) * (kSliceRows * kRowBytes) + px * kRowBytes + (((ch % kInner) * kElem) ^ ((px & 7) << 4));
        *reinterpret_cast<mishops::Pack<T, 2>*>(buf + byte) = mishops::Pack<T, 2>{{from_float<T>(a[0]), from_float<T>(a[1])}};
      } else {
#pragma unroll
        for (int cc = 0; cc < 2; ++cc) *reinterpret_cast<T*>(at(ch + cc, px)) = from_float<T>(a[cc]);
      }
    }
  }
  if (p.channels_last) fence_async_shared();
  consumer_sync(c);
  const int ws = tile.w0 + kSliceRows * m;
  if (ws >= p.out_w) return;
  if (p.channels_last) {  // the map's pixel dimension is the row: TMA clips the row's end itself
    if (tid == 0) {
      for (int b = 0; b < kBN / kInner && tile.co0 + b * kInner < p.cout; ++b)
        tma_store_3d(map_o, smem_u32(buf) + b * kSliceRows * kRowBytes, tile.co0 + b * kInner, ws, tile.n * p.out_h + tile.h);
      tma_store_commit();
    }
    return;
  }
  // NCHW: lanes along the row's pixels, warps along channels
  const long long hw = static_cast<long long>(p.out_h) * p.out_w;
  const int valid = min(kSliceRows, p.out_w - ws), rows = min(kBN, p.cout - tile.co0);
  T* const o = out + (static_cast<long long>(tile.n) * p.cout + tile.co0) * hw + static_cast<long long>(tile.h) * p.out_w + ws;
  if (p.pair_rows) {  // rows start on a pair: even W, pair-aligned output, and valid is even
    const int px = 2 * lane;
    if (px < valid)
      for (int ch = warp; ch < rows; ch += 4)
        *reinterpret_cast<mishops::Pack<T, 2>*>(o + ch * hw + px) = *reinterpret_cast<const mishops::Pack<T, 2>*>(at(ch, px));
  } else {
    for (int ch = warp; ch < rows; ch += 4)
      for (int px = lane; px < valid; px += 32) o[ch * hw + px] = *reinterpret_cast<const T*>(at(ch, px));
  }
}

// The direct epilogue's stores, from registers. They walk pointers instead of recomputing each
// element's 64-bit address (which cost about seven integer instructions a store, a quarter of the
// epilogue's issue slots): a thread's elements of one channel differ by constant pixel offsets (8
// between the halves of an m16 row group, 64 between the m64 slices), so in NCHW one pointer per
// channel of a pair serves all of them, stepped 8 channels (8 H W elements) per group; in
// channels_last a channel group is a constant offset (8 elements) from one pointer per pixel.
template <typename T>
__device__ __forceinline__ void store_direct(const float* acc0, const float* acc1, const Tile& tile, const Params& p,
                                             T* __restrict__ out, int warp, int lane) {
  const int co_base = tile.co0 + 2 * (lane & 3);
  // accumulator (slice m, register 4 q + 2 half + c) holds pixel w + 64 m + 8 half, channel co_base + 8 q + c
  const int w = tile.w0 + 16 * warp + (lane >> 2);
  bool in_row[2][2];
#pragma unroll
  for (int m = 0; m < 2; ++m)
#pragma unroll
    for (int half = 0; half < 2; ++half) in_row[m][half] = w + 64 * m + 8 * half < p.out_w;
  // channel groups inside Cout: Cout and co0 are multiples of 8, so this is the same for every lane
  const int groups = min(16, (p.cout - tile.co0) >> 3);
  if (p.channels_last) {
    const long long pix = (static_cast<long long>(tile.n) * p.out_h + tile.h) * p.out_w + w;
    T* const base = out + pix * p.cout + co_base;
#pragma unroll
    for (int m = 0; m < 2; ++m) {
      const float* acc = m == 0 ? acc0 : acc1;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        if (!in_row[m][half]) continue;
        mishops::Pack<T, 2>* o = reinterpret_cast<mishops::Pack<T, 2>*>(base + static_cast<long long>(64 * m + 8 * half) * p.cout);
#pragma unroll
        for (int q = 0; q < 16; ++q) {
          if (q >= groups) break;
          // Cout is even: co + 1 < Cout; pairs are 2-element aligned, the stride between groups is 8
          o[4 * q] = mishops::Pack<T, 2>{{from_float<T>(acc[4 * q + 2 * half]), from_float<T>(acc[4 * q + 2 * half + 1])}};
        }
      }
    }
  } else {
    const long long hw = static_cast<long long>(p.out_h) * p.out_w;
    // NCHW: out[n][co][h][w] = image n's base + co H W + h W + w
    T* o = out + (static_cast<long long>(tile.n) * p.cout + co_base) * hw + static_cast<long long>(tile.h) * p.out_w + w;
#pragma unroll
    for (int q = 0; q < 16; ++q) {
      if (q >= groups) break;
      T* const o1 = o + hw;
#pragma unroll
      for (int m = 0; m < 2; ++m) {
        const float* acc = m == 0 ? acc0 : acc1;
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          if (!in_row[m][half]) continue;
          o[64 * m + 8 * half] = from_float<T>(acc[4 * q + 2 * half]);
          o1[64 * m + 8 * half] = from_float<T>(acc[4 * q + 2 * half + 1]);
        }
      }
      o += 8 * hw;
    }
  }
}

// A tile's epilogue: bias + Mish a slice at a time (both at once would hold twice the
// temporaries), each slice staged and stored as soon as it is done, or both slices' values stored
// from registers at the end.
template <typename T, int kMish>
__device__ __forceinline__ void epilogue(float* acc0, float* acc1, const float (&bias_v)[32], const Tile& tile,
                                         const Params& p, const CUtensorMap* map_o, uint8_t* buf,
                                         T* __restrict__ out, int c, int tid) {
#pragma unroll
  for (int m = 0; m < 2; ++m) {
    float* acc = m == 0 ? acc0 : acc1;
    bias_mish<kMish>(acc, bias_v);
    if (p.epilogue == kStaged && p.mode == 0) store_slice_staged<T>(acc, m, tile, p, map_o, buf, out, c, tid);
  }
  if (p.mode == 1) {  // computed, kept alive, not stored
    if (acc0[0] == 1234.5f && acc1[63] == -1234.5f) out[0] = from_float<T>(acc0[1]);
    return;
  }
  if (p.epilogue == kDirect) store_direct<T>(acc0, acc1, tile, p, out, tid >> 5, tid & 31);
}

// The split epilogue (kSplit): the consumer only writes its accumulators to the shared buffer, a
// slice at a time, and goes back to its MMAs; two warpgroups of their own (8 warps, 2 a scheduler)
// add the bias, apply Mish and store. In the consumer's own epilogue one warp a scheduler ran the
// math beside 128 live accumulators and bias registers, too few registers left for enough
// independent chains: over half its samples waited on a dependency or the MUFU queue, and it
// outlasted the other consumer's main loop. Here the math has its own warps, registers and a
// tile's whole main loop; what it costs instead is the hand-over's shared-memory traffic, beside
// the main loop's own (gpu-run8.md).
__device__ __forceinline__ void write_slice(const float* acc, bool channels_last, float* buf, int warp, int lane) {
  // accumulator register 4 q + 2 half + cc: pixel px0 + 8 half of the slice, channel ch0 + 8 q + cc
  const int px0 = 16 * warp + (lane >> 2), ch0 = 2 * (lane & 3);
  float* const at = channels_last ? buf + px0 * kSplitPitchCl + ch0 : buf + ch0 * kSplitPitchNchw + px0;
#pragma unroll
  for (int q = 0; q < 16; ++q) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int px = 8 * half, ch = 8 * q;
      const float* a = acc + 4 * q + 2 * half;
      if (channels_last) {
        *reinterpret_cast<float2*>(at + px * kSplitPitchCl + ch) = make_float2(a[0], a[1]);
      } else {
        at[ch * kSplitPitchNchw + px] = a[0];
        at[(ch + 1) * kSplitPitchNchw + px] = a[1];
      }
    }
  }
}

// A split epilogue thread's rows of a slice: warp w takes rows kRows w .. kRows w + kRows - 1 of
// kVals values a lane (NCHW: 16 channel rows of 64 pixels, a pixel pair a lane; channels_last: 8
// pixel rows of 128 channels, 4 a lane), 32 values a thread.
template <bool kCl>
struct SplitRows {
  static constexpr int kVals = kCl ? 4 : 2;
  static constexpr int kRows = 32 / kVals;
  static constexpr int kPitch = kCl ? kSplitPitchCl : kSplitPitchNchw;
};

// The split epilogue's bias for a tile, read before its first slice is waited for. NCHW: b[0] is
// the channel of row lane % 16 of the warp's (rows reach it by a shuffle from an immediate lane);
// channels_last: b[k] is channel 4 lane + k.
template <typename T, bool kCl>
__device__ __forceinline__ void split_bias(const T* __restrict__ bias, const Tile& tile, int cout, int warp, int lane,
                                           float (&b)[4]) {
#pragma unroll
  for (int k = 0; k < (kCl ? 4 : 1); ++k) {
    const int ch = tile.co0 + (kCl ? 4 * lane + k : SplitRows<kCl>::kRows * warp + (lane & 15));
    b[k] = bias != nullptr ? to_float(bias[min(ch, cout - 1)]) : 0.f;
  }
}

// Slice m of a tile: bias + Mish + stores by the split epilogue's thread et (0..255), its rows
// (SplitRows) 16 values at a time. A store writes a row's 64 pixels (NCHW: 256 contiguous bytes in
// fp32) or a pixel's 128 channels (channels_last). The output pointer steps a row at a time:
// per-row 64-bit offsets, which the compiler hoists out of the tile loop, spilled.
template <typename T, int kMish, bool kCl>
__device__ __forceinline__ void split_slice(const float* buf, const Tile& tile, int m, const Params& p,
                                            const float (&b)[4], T* __restrict__ out, int et) {
  using R = SplitRows<kCl>;
  constexpr int kBatch = 16 / R::kVals;  // rows whose Mish runs at once
  const int warp = et >> 5, lane = et & 31;
  const int ws = tile.w0 + kSliceRows * m, row0 = R::kRows * warp;
  const int pixels = min(kSliceRows, p.out_w - ws), channels = min(kBN, p.cout - tile.co0);
  const long long hw = static_cast<long long>(p.out_h) * p.out_w;
  T* o;  // this thread's first element of row row0, and the step to the next row
  long long step;
  if constexpr (kCl) {
    o = out + ((static_cast<long long>(tile.n) * p.out_h + tile.h) * p.out_w + ws + row0) * p.cout + tile.co0 + 4 * lane;
    step = p.cout;
  } else {
    o = out + (static_cast<long long>(tile.n) * p.cout + tile.co0 + row0) * hw + static_cast<long long>(tile.h) * p.out_w +
        ws + 2 * lane;
    step = hw;
  }
  const float* const in = buf + row0 * R::kPitch + R::kVals * lane;
#pragma unroll
  for (int r0 = 0; r0 < R::kRows; r0 += kBatch) {
    float v[4][4];  // row r0 + r's value j is v[e / 4][e % 4], e = r kVals + j: groups of 4 for Mish
#pragma unroll
    for (int r = 0; r < kBatch; ++r) {
      const float* x = in + (r0 + r) * R::kPitch;
      float* const vr = &v[r * R::kVals / 4][r * R::kVals % 4];
      if constexpr (kCl) {
        const float4 x4 = *reinterpret_cast<const float4*>(x);
        vr[0] = x4.x + b[0];
        vr[1] = x4.y + b[1];
        vr[2] = x4.z + b[2];
        vr[3] = x4.w + b[3];
      } else {
        const float bc = __shfl_sync(0xffffffffu, b[0], r0 + r);
        const float2 x2 = *reinterpret_cast<const float2*>(x);
        vr[0] = x2.x + bc;
        vr[1] = x2.y + bc;
      }
    }
#pragma unroll
    for (int g = 0; g < 4; ++g) mish_times<kMish>(v[g]);
    if (p.mode == 1) {  // computed, kept alive, not stored
      if (v[0][0] == 1234.5f && v[3][3] == -1234.5f) out[0] = from_float<T>(v[0][1]);
      continue;
    }
#pragma unroll
    for (int r = 0; r < kBatch; ++r, o += step) {
      const int row = row0 + r0 + r;
      const float* const vr = &v[r * R::kVals / 4][r * R::kVals % 4];
      if constexpr (kCl) {  // Cout and co0 are multiples of 8: a lane's 4 channels are all in or all out
        if (row < pixels && 4 * lane < channels)
          *reinterpret_cast<mishops::Pack<T, 4>*>(o) = mishops::Pack<T, 4>{
              {from_float<T>(vr[0]), from_float<T>(vr[1]), from_float<T>(vr[2]), from_float<T>(vr[3])}};
      } else if (row < channels) {
        const int px = 2 * lane;
        if (p.pair_rows) {  // pixels is even
          if (px < pixels) *reinterpret_cast<mishops::Pack<T, 2>*>(o) = mishops::Pack<T, 2>{{from_float<T>(vr[0]), from_float<T>(vr[1])}};
        } else {
          if (px < pixels) o[0] = from_float<T>(vr[0]);
          if (px + 1 < pixels) o[1] = from_float<T>(vr[1]);
        }
      }
    }
  }
}

// The split epilogue's warpgroups: every tile of the CTA in order, a slice a fill of the buffer.
// Their waits sleep, so that waiting warps take no issue slots from the consumers' (in fp32 the
// epilogue waits for the consumers; in bf16, whose main loop is half as long, the other way round).
template <typename T, int kMish, bool kCl, typename AccEmpty>
__device__ __forceinline__ void split_epilogue(const float* buf, const Params& p, const T* __restrict__ bias,
                                               T* __restrict__ out, uint32_t acc_full, AccEmpty acc_empty) {
  const int et = threadIdx.x - 128 * (1 + p.consumers);
  uint32_t f = 0;  // a CTA has fewer than 2^31 tiles
  for (long long t = blockIdx.x; t < p.num_tiles; t += gridDim.x) {
    const Tile tile = decode(t, p);
    float b[4];
    split_bias<T, kCl>(bias, tile, p.cout, et >> 5, et & 31, b);
#pragma unroll 1
    for (int m = 0; m < 2; ++m, ++f) {
      mbar_wait_idle(acc_full, f & 1);
      split_slice<T, kMish, kCl>(buf, tile, m, p, b, out, et);
      mbar_arrive(acc_empty(f));
    }
  }
}

// Shared memory beside the ring for a tile's output: a slice per consumer (kStaged), a slice's
// accumulators (kSplit), or none.
__host__ __device__ constexpr int epilogue_buffer_bytes(int epilogue, int consumers, int elem) {
  return epilogue == kStaged ? consumers * kSliceRows * kBN * elem : epilogue == kSplit ? kSplitBytes : 0;
}
// The barriers after it: full and empty per stage, done per consumer, acc_full, acc_empty[].
__host__ __device__ constexpr int kBarrierBytes(int stages) { return 8 * (2 * stages + 3 + kFillBarriers); }

// kSplitWgs: the split epilogue's two warpgroups follow the consumers (640 threads). A CTA gets its
// launch registers (96 a thread at 640) and setmaxnreg only moves them between warpgroups, so the
// shares must add up to 5 x 96 = 480: producer 32, consumers 160 (the 128 accumulators and the main
// loop; 152 spilled), epilogue 64 a thread (32 + 2 * 160 + 2 * 64). Asking for more than was given
// back blocks the consumers' setmaxnreg forever (the first split build, 168 and 72, hung on the
// H200). Without the split: 168 at launch, producer 40, consumers 232 (40 + 2 * 232 = 3 * 168).
template <bool kSplitWgs>
struct Registers {
  static constexpr int kThreads = kSplitWgs ? 640 : 384;
  static constexpr int kLaunch = 65536 / kThreads / 8 * 8;
  static constexpr int kProducer = kSplitWgs ? 32 : 40;
  static constexpr int kConsumer = kSplitWgs ? 160 : 232;
  static constexpr int kEpilogue = 64;
  static_assert(kProducer + 2 * kConsumer + (kSplitWgs ? kSplitWarpgroups * kEpilogue : 0) <= kLaunch * kThreads / 128,
                "setmaxnreg cannot hand out more registers than the launch gave the CTA");
};
template <int kRegs>
__device__ __forceinline__ void set_max_registers_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegs) : "memory");
}
template <int kRegs>
__device__ __forceinline__ void set_max_registers_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegs) : "memory");
}

template <typename T, int kMish, bool kSplitWgs>
__global__ void __launch_bounds__(Registers<kSplitWgs>::kThreads, 1)
    conv_mish_kernel(const __grid_constant__ CUtensorMap map_a, const __grid_constant__ CUtensorMap map_b,
                     const __grid_constant__ CUtensorMap map_o, const Params p, const T* __restrict__ bias,
                     T* __restrict__ out) {
  extern __shared__ uint8_t smem_raw[];
  // TMA's 128-byte swizzle repeats every 1024 bytes and wgmma reads it from the address bits:
  // stage buffers start on 1024-byte boundaries.
  const uint32_t raw = smem_u32(smem_raw);
  const uint32_t base = (raw + 1023) & ~1023u;
  const int stages = p.stages;
  const int consumers = p.consumers;
  // the ring's stages, then the epilogue's buffer, then the barriers: full[s] at bars + 8 s, then
  // empty[s], then done[c], then (kSplit) acc_full and acc_empty[kFillBarriers], which hand the
  // buffer over
  constexpr int kSliceBytes = kSliceRows * kBN * sizeof(T);
  uint8_t* const out_buf = smem_raw + (base - raw) + stages * kStageBytes;
  const uint32_t bars = base + stages * kStageBytes + epilogue_buffer_bytes(p.epilogue, consumers, sizeof(T));
  auto full = [&](int s) { return bars + 8 * s; };
  auto empty = [&](int s) { return bars + 8 * (stages + s); };
  auto done = [&](int c) { return bars + 8 * (2 * stages + c); };
  const uint32_t acc_full = bars + 8 * (2 * stages + 2);
  auto acc_empty = [&](long long f) { return acc_full + 8 + 8 * static_cast<uint32_t>(f % kFillBarriers); };
  auto tile_a = [&](int s) { return base + s * kStageBytes; };
  auto tile_b = [&](int s) { return base + s * kStageBytes + kABytes; };

  // A shuffle's result is warp-uniform to the compiler, so what derives from the warpgroup index (the
  // ring position, the wgmma descriptors) lives in uniform registers, which wgmma reads directly.
  const int wg = __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x / 128), 0);
  if (threadIdx.x == 0) {
    for (int s = 0; s < stages; ++s) {
      mbar_init(full(s), 1);
      mbar_init(empty(s), 4);  // one arrival per warp of the consuming warpgroup
    }
    mbar_init(done(0), 4);
    mbar_init(done(1), 4);
    mbar_init(acc_full, 128);                    // every thread of the writing consumer
    for (int f = 0; f < kFillBarriers; ++f) mbar_init(acc_empty(f), 128 * kSplitWarpgroups);  // every epilogue thread
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();

  const int kiters = p.taps * p.kblocks;
  constexpr int kElems = kRowBytes / sizeof(T);  // K elements per block
  const uint32_t a_box_bytes = (p.rowbox ? kRowBoxRows : kBM) * kRowBytes;

  if (wg == 0) {
    set_max_registers_dec<Registers<kSplitWgs>::kProducer>();
    if (threadIdx.x == 0) {
      asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(&map_a)) : "memory");
      asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(&map_b)) : "memory");
      if (p.epilogue == kStaged && p.channels_last) asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(&map_o)) : "memory");
      int s = 0;
      uint32_t phase = 0;  // parity of the ring's current round
      for (long long t = blockIdx.x; t < p.num_tiles; t += gridDim.x) {
        const Tile tile = decode(t, p);
        const int row0 = tile.n * p.hp + tile.h * p.sh;  // padded row of kernel row 0
        // kernel rows, channel blocks, then the taps of the row: the consumers' K order
        for (int kh = 0; kh < p.taps / p.taps_w; ++kh) {
          for (int cb = 0; cb < p.kblocks; ++cb) {
            for (int kw = 0; kw < p.taps_w; ++kw) {
              const bool load_a = !p.rowbox || kw == 0;
              mbar_wait_idle(empty(s), phase ^ 1);
              mbar_expect_tx(full(s), kTileBytes + (load_a ? a_box_bytes : 0));
              if (load_a) {  // row boxes: sw is 1 and the box starts at kw = 0
                const int shift = p.rowbox ? 0 : kw * p.dw;
                tma_load_4d(tile_a(s), &map_a, full(s), cb * kElems, shift % p.sw, tile.w0 + shift / p.sw,
                            row0 + kh * p.dh);
              }
              tma_load_2d(tile_b(s), &map_b, full(s), (kh * p.taps_w + kw) * p.cp + cb * kElems, tile.co0);
              if (++s == stages) {
                s = 0;
                phase ^= 1;
              }
            }
          }
        }
      }
    }
  } else if (wg <= consumers) {
    set_max_registers_inc<Registers<kSplitWgs>::kConsumer>();
    const int c = wg - 1;
    const int tid = threadIdx.x & 127;
    const int lane = tid & 31;
    const uint32_t desc_a = desc_lo(tile_a(0)), desc_b = desc_lo(tile_b(0));
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
      const Tile tile = decode(t, p);
      float bias_v[32];
      if (!kSplitWgs && p.mode != 2) load_bias(bias, tile.co0 + 2 * (lane & 3), p.cout, bias_v);
      const long long g = i * kiters;
      int s = static_cast<int>(g % stages);
      uint32_t phase = static_cast<uint32_t>(g / stages) & 1;
      // Iteration k reads B from stage s and A from stage s_a (s itself with per-tap boxes, else the
      // stage of its row's kw = 0, kw dw rows in). A stage is given back once the wgmmas of the
      // iteration after its last reader have been issued and its own are done (wait<1>): a row
      // box's stage after the row's last tap, the others after their own iteration.
      int kw = 0, s_a = s, prev = s, prev_kw = 0, prev_s_a = s;
      auto give_back = [&](int stage, int stage_kw, int stage_a) {
        if (lane != 0) return;
        if (!p.rowbox || stage_kw != 0) mbar_arrive(empty(stage));
        if (p.rowbox && stage_kw == p.taps_w - 1) mbar_arrive(empty(stage_a));
      };
      for (int k = 0; k < kiters; ++k) {
        mbar_wait(full(s), phase);
        fence_regs(acc0);
        fence_regs(acc1);
        wgmma_fence();
        if (!p.rowbox || kw == 0) s_a = s;
        const uint32_t a = desc_a + s_a * (kStageBytes >> 4) + (p.rowbox ? kw * p.dw * (kRowBytes >> 4) : 0);
        const uint32_t b = desc_b + s * (kStageBytes >> 4);
#pragma unroll
        for (int kk = 0; kk < kRowBytes / 32; ++kk) {  // wgmma K = 32 bytes
          const int scale = (k > 0 || kk > 0) ? 1 : 0;
          wgmma<T>(acc0, desc(a + 2 * kk), desc(b + 2 * kk), scale);
          wgmma<T>(acc1, desc(a + ((64 * kRowBytes) >> 4) + 2 * kk), desc(b + 2 * kk), scale);
        }
        wgmma_commit();
        fence_regs(acc0);
        fence_regs(acc1);
        wgmma_wait<1>();  // the previous iteration's wgmmas are done
        if (k > 0) give_back(prev, prev_kw, prev_s_a);
        prev = s;
        prev_kw = kw;
        prev_s_a = s_a;
        if (++kw == p.taps_w) kw = 0;
        if (++s == stages) {
          s = 0;
          phase ^= 1;
        }
      }
      // The other consumer's turn starts once this tile's last wgmmas are issued, not done: its
      // MMAs queue behind them instead of the tensor pipe draining at every tile (the main loop
      // alone was 10% slower with two consumers than with one when the turn passed after
      // wait<0>). Every stage of this tile has been waited on, so the other's waits are for later
      // phases, and the stages still being read are not given back until they are done.
      if (lane == 0 && consumers == 2) mbar_arrive(done(c));
      wgmma_wait<0>();
      fence_regs(acc0);
      fence_regs(acc1);
      give_back(prev, prev_kw, prev_s_a);

      if (p.mode == 2) continue;
      if constexpr (kSplitWgs) {
        // Fill f = 2 i + m of the buffer waits for the epilogue to be done with fill f - 1, which
        // acc_empty[(f - 1) % 4] records as its phase (f - 1) / 4. A barrier's even/odd phase only
        // tells the right one apart from the one before if that one is known complete: fill f - 5
        // before fill f's wait. For slice 0 this consumer waited for fill 2 i - 4 itself before
        // its slice 1 of tile i - 2, while the other consumer may still be waiting for fill 2 i - 2
        // (run 8's one barrier for every tile let a wait through a phase early, and the epilogue
        // then waited forever: bf16, whose main loop is half fp32's). Slice 1 waits for this
        // consumer's own slice 0. The waits sleep: their warps' issue slots are the other
        // consumer's wgmmas'.
#pragma unroll
        for (int m = 0; m < 2; ++m) {
          const long long f = 2 * i + m;
          if (f > 0) mbar_wait_idle(acc_empty(f - 1), static_cast<uint32_t>(((f - 1) / kFillBarriers) & 1));
          write_slice(m == 0 ? acc0 : acc1, p.channels_last, reinterpret_cast<float*>(out_buf), tid >> 5, lane);
          mbar_arrive(acc_full);
        }
      } else {
        // Epilogue: accumulator (slice m, register j) holds pixel 64 m + 16 warp + lane / 4 + 8 ((j >> 1) & 1)
        // and channel 8 (j >> 2) + 2 (lane & 3) + (j & 1).
        epilogue<T, kMish>(acc0, acc1, bias_v, tile, p, &map_o, out_buf + c * kSliceBytes, out, c, tid);
      }
    }
    if (p.epilogue == kStaged && p.channels_last && tid == 0) tma_store_wait_all();  // the buffer outlives its last stores
  } else if constexpr (kSplitWgs) {  // the split epilogue's warpgroups
    set_max_registers_dec<Registers<kSplitWgs>::kEpilogue>();
    if (p.mode == 2) return;
    const float* const buf = reinterpret_cast<const float*>(out_buf);
    if (p.channels_last) {
      split_epilogue<T, kMish, true>(buf, p, bias, out, acc_full, acc_empty);
    } else {
      split_epilogue<T, kMish, false>(buf, p, bias, out, acc_full, acc_empty);
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

// A tensor map of up to 4 dimensions (dims[0] contiguous; strides of the others in bytes) whose
// boxes are 128-byte rows of dims[0] in the 128-byte swizzle: box_rows along dimension row_dim,
// one along the others.
static bool make_map(CUtensorMap* map, CUtensorMapDataType dtype, int elem, const void* ptr, int rank,
                     const uint64_t (&dims)[4], const uint64_t (&strides)[3], int row_dim, uint32_t box_rows,
                     std::string& error) {
  EncodeTiled fn = encode_fn(error);
  if (fn == nullptr) return false;
  cuuint32_t box[4] = {static_cast<cuuint32_t>(kRowBytes / elem), 1, 1, 1};
  box[row_dim] = box_rows;
  const cuuint64_t sizes[4] = {dims[0], dims[1], dims[2], dims[3]};
  const cuuint64_t byte_strides[3] = {strides[0], strides[1], strides[2]};
  const cuuint32_t estrides[4] = {1, 1, 1, 1};
  CUresult r = fn(map, dtype, rank, const_cast<void*>(ptr), sizes, byte_strides, box, estrides, CU_TENSOR_MAP_INTERLEAVE_NONE,
                  CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) {
    error = "hopper_conv: cuTensorMapEncodeTiled failed with CUresult " + std::to_string(static_cast<int>(r));
    return false;
  }
  return true;
}

// Dynamic shared memory of a launch: the ring, the epilogue's buffer, the barriers, and room to
// align the ring to 1024 bytes.
static int smem_bytes(int stages, int consumers, int epilogue, int elem) {
  return stages * kStageBytes + epilogue_buffer_bytes(epilogue, consumers, elem) + kBarrierBytes(stages) + 1024;
}

template <typename T, int kMish, bool kSplitWgs>
static std::string launch_typed(CUtensorMapDataType dtype, const void* xp, const void* wk, const void* bias, void* out,
                                const Params& p, long long rows, int sms, cudaStream_t stream) {
  std::string error;
  CUtensorMap map_a, map_b, map_o = {};
  const uint64_t e = sizeof(T), cp = p.cp, sw = p.sw, wp = p.wp;
  // the padded input as [N Hp][Wp / sw][sw][Cp] (the file's head says why)
  if (!make_map(&map_a, dtype, e, xp, 4, {cp, sw, wp / sw, static_cast<uint64_t>(rows) / wp},
                {cp * e, sw * cp * e, wp * cp * e}, 2, p.rowbox ? kRowBoxRows : kBM, error))
    return error;
  const uint64_t k = static_cast<uint64_t>(p.taps) * cp;
  if (!make_map(&map_b, dtype, e, wk, 2, {k, static_cast<uint64_t>(p.cout), 1, 1}, {k * e, 0, 0}, 1, kBN, error))
    return error;
  if (p.epilogue == kStaged && p.channels_last) {  // the output [N H][W][Cout] as TMA boxes (store_slice_staged)
    const uint64_t images = rows / (static_cast<uint64_t>(p.hp) * p.wp), cout = p.cout, ow = p.out_w;
    if (!make_map(&map_o, dtype, e, out, 3, {cout, ow, images * p.out_h, 1}, {cout * e, ow * cout * e, 0}, 1,
                  kSliceRows, error))
      return error;
  }
  const int smem = smem_bytes(p.stages, p.consumers, p.epilogue, sizeof(T));
  auto kernel = conv_mish_kernel<T, kMish, kSplitWgs>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return std::string("hopper_conv: cudaFuncSetAttribute: ") + cudaGetErrorString(err);
  const long long grid = p.num_tiles < sms ? p.num_tiles : sms;
  const int threads = 128 * (1 + p.consumers + (kSplitWgs ? kSplitWarpgroups : 0));  // at most Registers::kThreads
  kernel<<<static_cast<unsigned>(grid), threads, smem, stream>>>(
      map_a, map_b, map_o, p, static_cast<const T*>(bias), static_cast<T*>(out));
  err = cudaGetLastError();
  if (err != cudaSuccess) return std::string("hopper_conv: launch: ") + cudaGetErrorString(err);
  return "";
}

// dtype: 0 fp32 (TF32 operands), 1 bf16, 2 fp16. Returns an empty string or why it failed.
std::string launch(int dtype, int mish_count, const void* xp, const void* wk, const void* bias, void* out,
                   long long rows, int out_h, int out_w, int cout, int hp, int wp, int kh, int kw, int dh, int dw,
                   int sh, int sw, int cp, int stages, int consumers, int rowbox, int channels_last, int epilogue,
                   int sms, int mode, cudaStream_t stream) {
  const int elem = dtype == 0 ? 4 : 2;
  const int kelems = kRowBytes / elem;
  if (cp % kelems != 0) return "hopper_conv: padded channels not a multiple of the K block";
  if (stages < 2 || stages > kMaxStages) return "hopper_conv: stages must be 2.." + std::to_string(kMaxStages);
  if (consumers < 1 || consumers > 2) return "hopper_conv: consumers must be 1 or 2";
  if (rows >= (1LL << 31)) return "hopper_conv: 2^31 padded pixels or more in one launch";
  if (epilogue < kDirect || epilogue > kSplit) return "hopper_conv: epilogue must be 0 (direct), 1 (staged) or 2 (split)";
  if (smem_bytes(stages, consumers, epilogue, elem) > kMaxSmem)
    return "hopper_conv: " + std::to_string(stages) + " stages" +
           (epilogue == kStaged ? " and the staged epilogue" : epilogue == kSplit ? " and the split epilogue" : "") +
           " need more than " + std::to_string(kMaxSmem) + " bytes of shared memory";
  // TMA's global addresses and strides are multiples of 16 bytes
  if (epilogue == kStaged && channels_last && (reinterpret_cast<uintptr_t>(out) % 16 != 0 || (cout * elem) % 16 != 0))
    return "hopper_conv: the staged epilogue in channels_last needs a 16-byte aligned output and Cout * element size a multiple of 16 bytes (TMA)";
  if (epilogue == kSplit && channels_last && reinterpret_cast<uintptr_t>(out) % (4 * elem) != 0)
    return "hopper_conv: the split epilogue in channels_last needs an output aligned to 4 elements";
  if (sh < 1 || sw < 1 || wp % sw != 0) return "hopper_conv: strides must be positive and divide the padded width";
  if (rowbox && (sw != 1 || kw < 2 || kw >= stages || (kw - 1) * dw > kRowBoxRows - kBM))
    return "hopper_conv: row boxes need stride 1 along the width, 2 <= kernel width < stages and (width - 1) * "
           "dilation <= " + std::to_string(kRowBoxRows - kBM);
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
  p.sh = sh;
  p.sw = sw;
  p.cp = cp;
  p.kblocks = cp / kelems;
  p.tiles_w = (out_w + kBM - 1) / kBM;
  p.tiles_co = (cout + kBN - 1) / kBN;
  p.num_tiles = (rows / (static_cast<long long>(hp) * wp)) * out_h * p.tiles_w * p.tiles_co;
  p.stages = stages;
  p.consumers = consumers;
  p.rowbox = rowbox;
  p.channels_last = channels_last;
  p.epilogue = epilogue;
  p.pair_rows = out_w % 2 == 0 && reinterpret_cast<uintptr_t>(out) % (2 * elem) == 0;
  p.mode = mode;
  if (p.num_tiles == 0) return "";
#define HOPPER_CONV_CASE(T, CU, M)                                                      \
  return epilogue == kSplit ? launch_typed<T, M, true>(CU, xp, wk, bias, out, p, rows, sms, stream) \
                            : launch_typed<T, M, false>(CU, xp, wk, bias, out, p, rows, sms, stream)
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
