// flute_vllm LUT-GEMM, tensor-core path for Hopper (sm_90a): warpgroup MMA (wgmma) with the
// dequantized weights as the register operand ("RS"), activations from shared memory.
//
//   lut_wgmma_kernel<BITS, BN, T>   BITS 2/3/4, BN activation rows per CTA (the wgmma N: 8, 16, 32,
//                                   64, 128, 256), T half / bf16; runtime M, N, K, group size, split-K.
//   lut_wgmma_sk_kernel<BITS, BN, T>  the same work on persistent CTAs with a stream-K schedule
//                                   (BN 64 / 256; see "Stream-K" below).
//
// We compute Y^T = W_hat X^T: the weights are wgmma's A operand (M side, 64 rows per warpgroup),
// the activations its B operand (N side). A wgmma A fragment held in registers has, per warp, the
// layout of an mma.m16n8k16 A fragment, so the decode of flute_device.cuh (written for the
// mma.sync kernel, same kernel weight layout) produces it unchanged. Each CTA = 2 warpgroups =
// 8 warps = 128 weight rows (warp w owns 16-row tile w) x BN activation rows.
//
// Activations: the kernel layout permutes K inside each 64-wide chunk (so that the mma.sync
// kernel reads contiguous fragments); the B tile in shared memory must hold the activations in
// that same order. At BN >= 64 cuda_op permutes X once per call (a copy of M x K, small next to the
// GEMM) and one thread loads each chunk's X tile with a TMA copy into wgmma's K-major
// 128-byte-swizzled layout; at BN <= 32 a producer warp gathers it from X with 4-byte cp.asyncs.
// Packed weights and group scales go with it through one per-CTA ring synchronised by full/empty
// mbarriers (no CTA-wide barrier per chunk).
// Scales are applied to the decoded 16-bit weights (one HMUL2 per register), as in Marlin /
// Machete; accumulation is fp32. Split-K partials are reduced by the last CTA (deterministic).
#include <type_traits>

#include <cuda.h>  // CUtensorMap (the map itself is encoded through the runtime's driver entry point)
#if CUDART_VERSION < 12000
#error "flute_vllm's kernels need a CUDA 12.0 or newer toolkit (TMA descriptors, wgmma)"
#endif

#include "flute_kernel.h"
#include "flute_device.cuh"
#include "flute_dispatch.h"

namespace flute {
namespace {

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define FLUTE_HAS_WGMMA 1
#else
#define FLUTE_HAS_WGMMA 0
#endif

constexpr int kWgmmaTiles = 8;    // 16-row weight tiles per CTA (one per consumer warp: 2 warpgroups)
// Ring depth per BN >= 64 (shared memory ~110 / 105 / 190 KB at BN = 64 / 128 / 256: 2 / 2 / 1 CTAs
// per SM): STAGES - 2 chunks are in flight ahead of the one consumed, which is what keeps HBM busy
// when the kernel is memory bound (small M). 4-bit kernels also hold the pair table (32 / 16 / 16 KB),
// so they get fewer stages where that keeps 2 CTAs/SM. BN <= 32 (decode sizes): see WgmmaSmem.
// The 4-bit pair table: 32 copies (conflict-free, 32 KB) where shared memory allows it (BN <= 64),
// else 16 (lanes l and l + 16 share a copy: 2-way conflicts). v14 A/B on H200, 8 shapes: 32 copies
// 0.959x the time at M = 64 / 128 (BN = 64) and 0.914x at M = 8 (BN = 8); the v6 mixed decode
// (a[2], a[3] of odd k-steps by byte permutes) on top: no further gain (0.958x / 0.926x).
template <int BN> constexpr int wgmma_pair_copies() { return BN <= 64 ? 32 : 16; }
// (v18 A/B on H200, 8 shapes, M = 64 / 128 / 256: the byte-permute decode instead of the pair table
// at BN >= 64, where the pair-table lookups share the shared-memory pipe with wgmma's B reads, was
// 1.052x the time.)
template <int BITS, int BN> struct WgmmaStages {
  static constexpr int value = BN == 64 ? (BITS == 4 ? 6 : 8) : BN == 128 ? (BITS == 4 ? 4 : 5) : 5;
};
// Producer warp (`WgmmaProducer`) for the BN in the bit mask FLUTE_WG_PRODUCER_BNS (BN values are
// powers of two; default 8 | 16 | 32): a 9th warp issues every ring copy of the CTA (X, weights,
// scales) and waits on the `empty` barriers, so the 8 consumer warps only wait `full`, decode and
// MMA. At BN <= 32 the consumers' refill was the expensive 4-byte X gather (~70 of their ~200
// instructions per chunk, v14 ncu). v15 A/B on H200 (8 shapes, fp16 W4 g128): BN = 32 at M = 17 /
// 32 0.925x the time, BN = 16 at M = 16 0.90x; BN = 64 (X is one 16-byte piece per consumer thread
// there, so little to offload, and the register cap drops to 112) 1.165x.
// Scale reuse (on since v20): when G >= 64 both halves of a chunk lie in one group, so its scales are
// read once per chunk (2 LDS.U16 + 2 IMAD instead of 4 + 4 per thread). v20 A/B on H200 (8 shapes,
// fp16 W4 g128, tc path, benchmarks/results/ab_v20_*): 0.981x the time (M = 256 0.977x, M = 64 1.003x);
// a second run, shipped vs v19, 0.991x. 0 = read each half's scales (the v19 build).
#ifndef FLUTE_WG_SCALE_REUSE
#define FLUTE_WG_SCALE_REUSE 1
#endif
// Experiment, for timing only (the results are wrong): 1 = the one-pass kernel without a producer
// (BN >= 64) fills its first PD stages once and then runs its chunk loop over the resident stages
// with no refills and no barrier waits after the first pass: the consumer loop's floor (decode, scale,
// wgmma, loop) without memory or ring. v20 left open whether the ring or the loop bounds the tc path
// (fewer ring instructions did not pay); `ab_kernel.py -v b@tc= -v floor@tc=-DFLUTE_WG_FLOOR=1
// --ms 64,256` (the floor is flagged WRONG, as it should be) answers it.
#ifndef FLUTE_WG_FLOOR
#define FLUTE_WG_FLOOR 0
#endif
#ifndef FLUTE_WG_PRODUCER_BNS
#define FLUTE_WG_PRODUCER_BNS (8 | 16 | 32)
#endif
template <int BN> constexpr bool wgmma_producer() { return (FLUTE_WG_PRODUCER_BNS & BN) != 0; }
template <int BN> constexpr int wgmma_threads() { return (kWgmmaTiles + (wgmma_producer<BN>() ? 1 : 0)) * 32; }
// Resident CTAs per SM (__launch_bounds__ and ring depth; cuda_op.plan_tc's wave model mirrors it).
// 3 at BN <= 32 (80 registers) measured no faster than 2 (v14 A/B: 0.998x at BN = 16, BN = 32 spills).
template <int BN> constexpr int wgmma_min_blocks() { return BN == 256 ? 1 : 2; }

#if FLUTE_HAS_WGMMA
// wgmma.mma_async m64nBNk16, A (the decoded weights) from registers, B from shared memory via
// `desc`, fp32 accumulators d[BN / 2] per thread. The PTX operand lists are spelled out once per
// BN (FLUTE_WG_*); the f16 and bf16 forms differ only in the type string.
#define FLUTE_WG_D4(p) "+f"((p)[0]), "+f"((p)[1]), "+f"((p)[2]), "+f"((p)[3])
#define FLUTE_WG_D8(p) FLUTE_WG_D4(p), FLUTE_WG_D4((p) + 4)
#define FLUTE_WG_D16(p) FLUTE_WG_D8(p), FLUTE_WG_D8((p) + 8)
#define FLUTE_WG_D32(p) FLUTE_WG_D16(p), FLUTE_WG_D16((p) + 16)
#define FLUTE_WG_D64(p) FLUTE_WG_D32(p), FLUTE_WG_D32((p) + 32)
#define FLUTE_WG_D128(p) FLUTE_WG_D64(p), FLUTE_WG_D64((p) + 64)
#define FLUTE_WG_R4 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, %8"
#define FLUTE_WG_R8 "{%0, %1, %2, %3, %4, %5, %6, %7}, {%8, %9, %10, %11}, %12"
#define FLUTE_WG_R16 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, {%16, %17, %18, %19}, %20"
#define FLUTE_WG_R32 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36"
#define FLUTE_WG_R64 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68"
#define FLUTE_WG_R128 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, {%128, %129, %130, %131}, %132"
#define FLUTE_WGMMA(BN, NREG, TY)                                                                  \
  asm volatile("wgmma.mma_async.sync.aligned.m64n" #BN "k16.f32." TY "." TY " " FLUTE_WG_R##NREG \
               ", 1, 1, 1, 0;\n"                                                                   \
               : FLUTE_WG_D##NREG(d)                                                              \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc))

template <int BN, typename T> struct Wgmma {
  static_assert(BN == 8 || BN == 16 || BN == 32 || BN == 64 || BN == 128 || BN == 256,
                "wgmma N: 8, 16, 32, 64, 128 or 256");
  static __device__ __forceinline__ void mma(float* d, const uint32_t a[4], uint64_t desc) {
    constexpr bool F16 = std::is_same<T, half>::value;
    if constexpr (BN == 8) {
      if constexpr (F16) FLUTE_WGMMA(8, 4, "f16"); else FLUTE_WGMMA(8, 4, "bf16");
    } else if constexpr (BN == 16) {
      if constexpr (F16) FLUTE_WGMMA(16, 8, "f16"); else FLUTE_WGMMA(16, 8, "bf16");
    } else if constexpr (BN == 32) {
      if constexpr (F16) FLUTE_WGMMA(32, 16, "f16"); else FLUTE_WGMMA(32, 16, "bf16");
    } else if constexpr (BN == 64) {
      if constexpr (F16) FLUTE_WGMMA(64, 32, "f16"); else FLUTE_WGMMA(64, 32, "bf16");
    } else if constexpr (BN == 128) {
      if constexpr (F16) FLUTE_WGMMA(128, 64, "f16"); else FLUTE_WGMMA(128, 64, "bf16");
    } else {
      if constexpr (F16) FLUTE_WGMMA(256, 128, "f16"); else FLUTE_WGMMA(256, 128, "bf16");
    }
  }
};
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory"); }
// Keeps the accumulators in place across the asynchronous MMAs (CUTLASS's warpgroup_fence_operand).
__device__ __forceinline__ void pin(float& r) { asm volatile("" : "+f"(r)::"memory"); }

// Shared-memory matrix descriptor: K-major, 128-byte swizzle, 8-row core groups 1024 bytes apart.
__device__ __forceinline__ uint64_t smem_desc_sw128(uint32_t addr) {
  return (uint64_t)((addr & 0x3FFFF) >> 4) | ((uint64_t)1 << 16) | ((uint64_t)(1024 >> 4) << 32) | ((uint64_t)1 << 62);
}

// mbarriers of the ring: `full` completes a phase when every thread's cp.asyncs of a stage have
// landed, `empty` when every warp is done reading a stage (its wgmmas completed).
__device__ __forceinline__ void mbar_init(uint32_t bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}
// Arrives on `bar` once all of this thread's earlier cp.asyncs have completed (counted in init).
__device__ __forceinline__ void mbar_arrive_cp_async(uint32_t bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];" ::"r"(bar) : "memory");
}
// Blocks until the phase of parity `parity` has completed (a fresh barrier counts parity 1 as done).
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred p;\nLAB_WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
      "@p bra DONE;\nbra LAB_WAIT;\nDONE:\n}\n" ::"r"(bar), "r"(parity) : "memory");
}

// One arrival on `bar` that also expects `bytes` of asynchronous (TMA) writes before the phase completes.
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}
// TMA: the box at (c0 inner, c1 outer) of the 2-D tensor map `tmap` (a __grid_constant__ parameter)
// to shared memory at dst, completing `bar`'s transaction count.
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const void* tmap, int c0, int c1, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];" ::"r"(dst),
      "l"(tmap), "r"(c0), "r"(c1), "r"(bar)
      : "memory");
}
#endif  // FLUTE_HAS_WGMMA

template <int BITS, int BN, typename T>
struct WgmmaSmem {
  static constexpr int kX = BN * 128;                // activations: BN rows x 64 k x 2 bytes
  static constexpr int kW = kWgmmaTiles * 128 * BITS;  // packed weights: 8 tiles x 32 lanes x BITS words
  static constexpr int kS = kWgmmaTiles * 2 * 16 * (int)sizeof(T);  // scales: 8 tiles x 2 halves x 16 rows
  static constexpr int kStage = (kX + kW + kS + 1023) / 1024 * 1024;  // X tiles stay 1024-aligned (swizzle)
  using Pair = PairTable<wgmma_pair_copies<BN>()>;
  static constexpr int kPair = BITS == 4 ? Pair::kBytes : 0;  // after the ring
  // BN <= 32: as many stages as wgmma_min_blocks<BN>() CTAs fit in an SM's 228 KB (1 KB reserved per
  // CTA, 1 KB alignment slack, static barriers), at most the 8 the ring's barrier arrays hold.
  static constexpr int kSmallStages = (228 * 1024 / wgmma_min_blocks<BN>() - 2048 - 256 - kPair) / kStage;
  static constexpr int kStages = BN <= 32 ? (kSmallStages < 8 ? kSmallStages : 8) : WgmmaStages<BITS, BN>::value;
  static_assert(kStages >= 3, "the ring needs a stage in flight besides the two being consumed");
  static constexpr int kBytes = kStages * kStage + kPair + 1024;  // + slack to align the base to 1024
};

// Activation copies into the ring (both the per-thread refill and the producer warp): piece c (16
// bytes) of activation row r goes to 16-byte slot c ^ (r & 7) of the row (wgmma's 128-byte swizzle)
// and holds, in the kernel layout's K order, the chunk's pair slots 4c..4c+3. BN >
// kWgmmaGatherMaxRows: X comes pre-permuted (cuda_op.permute_activations: row stride Kp = K
// rounded up to 64, zero pad), so a piece is one 16-byte copy. Smaller BN gather the piece from X
// itself (row stride K): pair slot 16 b4 + 8 b1 + 4 b0 + j holds real pair b0 + 2 b1 + 16 b4 + 4 j
// (see permute_activations), so piece c = 4 b4 + 2 b1 + b0 is 4 pairs 16 bytes apart, zero-filled
// past K (K % 64 == 32: b4 = 1 of the last chunk).
template <int BN> constexpr bool wgmma_gathers_x() { return BN <= kWgmmaGatherMaxRows; }
// BN > kWgmmaGatherMaxRows without the producer warp: one thread loads each chunk's X tile with one
// TMA copy (2-D tensor map over the permuted X, 128-byte swizzle: the layout wgmma reads; rows past M
// zero-filled) instead of BN / 32 16-byte cp.asyncs and their address math in every thread; the
// stage's `full` barrier also waits for the TMA's bytes. v16 A/B on H200 (8 shapes, M = 64-1024,
// fp16 W4 g128): 0.920x the time (8B gate_up M = 64 60.3 -> 53.0 us, 70B gate_up M = 1024 1852 -> 1715).
template <int BN> constexpr bool wgmma_tma_x() { return !wgmma_gathers_x<BN>() && !wgmma_producer<BN>(); }
// The BN with a stream-K kernel (lut_wgmma_sk_kernel; TMA-activation kernels only). Not BN = 128: there
// ptxas serialises the persistent kernel's wgmmas for want of registers (C7512), and it lost to split-K
// on every layer measured (v19 A/B on H200, M = 128).
template <int BN> constexpr bool wgmma_stream_k() { return wgmma_tma_x<BN>() && BN != 128; }
template <int BN> __device__ __forceinline__ int wgmma_x_row_stride(int K) {
  return wgmma_gathers_x<BN>() ? K : (K + 63) & ~63;
}
// The stage offset of piece c of activation row r (128-byte rows, 128-byte swizzle).
__device__ __forceinline__ uint32_t wgmma_x_slot(int r, int c) { return (uint32_t)(r * 128 + ((c ^ (r & 7)) << 4)); }
// The first element (in X's row, from the chunk start) of piece c.
template <int BN> __device__ __forceinline__ int wgmma_x_piece_k(int c) {
  return wgmma_gathers_x<BN>() ? 2 * ((c & 3) + 16 * (c >> 2)) : 8 * c;
}

#if FLUTE_HAS_WGMMA
// The producer warp (wgmma_producer): copies one chunk of the CTA's ring stage per issue()
// (chunks in order), as 16-byte pieces where it can: X rows r = lane / 8 + 4 j, piece lane % 8
// (swizzled as the consumer-side copy does; BN <= kWgmmaGatherMaxRows gathers 4 x 4 bytes with
// zero fill past K); each tile's chunk of packed weights (contiguous, CW words) as 8 * BITS pieces;
// the scales of tile lane / 4, half (lane / 2) % 2, piece lane % 2.
template <int BITS, int BN, typename T>
struct WgmmaProducer {
  using Smem = WgmmaSmem<BITS, BN, T>;
  static constexpr bool kGatherX = wgmma_gathers_x<BN>();
  static constexpr int XJ = BN / 4;                   // X rows per lane
  static constexpr int CW = 32 * BITS;                // weight words per tile and chunk
  static constexpr int WP = 8 * BITS;                 // 16-byte weight pieces per tile and chunk
  static constexpr int WJ = kWgmmaTiles * WP / 32;    // ... per lane
  const T* x_next;                                    // row lane / 8 (clamped), this chunk
  uint32_t x_off[XJ];                                 // rows lane / 8 + 4 j relative to it, elements
  const T* x_first;                                   // a valid address for zero-filled copies
  uint32_t x_dst0;                                    // stage offset of piece lane % 8 of row lane / 8
  int xk_next;                                        // gather: first k of this lane's piece
  const uint32_t* w_next;                             // first tile's chunk, piece lane
  uint32_t w_off[WJ];                                 // words from w_next to piece lane + 32 j
  uint32_t w_dst[WJ];
  const T* sc_tile;                                   // scales of tile lane / 4, piece lane % 2
  int k_half;                                         // k of this lane's half in the next chunk
  int K, gshift, ngroups;

  __device__ WgmmaProducer(const GemmParams& p, int lane, int m0, int cb, int ngroups_, int gshift_)
      : K(p.K), gshift(gshift_), ngroups(ngroups_) {
    const int ntiles = p.N >> 4, nch = (p.K + 63) >> 6, tile0 = blockIdx.x * kWgmmaTiles;
    const int piece = lane & 7, row0 = lane >> 3;
    const int stride = wgmma_x_row_stride<BN>(p.K);
    x_first = reinterpret_cast<const T*>(p.x) + wgmma_x_piece_k<BN>(piece);
    const int first = min(m0 + row0, p.M - 1);
    x_next = x_first + (size_t)first * stride + (cb << 6);
#pragma unroll
    for (int j = 0; j < XJ; ++j) x_off[j] = (uint32_t)(min(m0 + row0 + 4 * j, p.M - 1) - first) * (uint32_t)stride;
    x_dst0 = wgmma_x_slot(row0, piece);
    xk_next = (cb << 6) + 32 * (piece >> 2);
    const uint32_t* wbase = p.qweight + (size_t)min(tile0, ntiles - 1) * nch * CW + (size_t)cb * CW;
    w_next = wbase;
#pragma unroll
    for (int j = 0; j < WJ; ++j) {
      const int q = lane + 32 * j, t = q / WP, pc = q % WP;
      w_off[j] = (uint32_t)(min(tile0 + t, ntiles - 1) - min(tile0, ntiles - 1)) * (uint32_t)(nch * CW) + 4 * pc;
      w_dst[j] = (uint32_t)(Smem::kX + t * CW * 4 + 16 * pc);
    }
    const int st_tile = min(tile0 + (lane >> 2), ntiles - 1);
    sc_tile = reinterpret_cast<const T*>(p.scales) + (size_t)st_tile * ngroups * 16 + 8 * (lane & 1);
    k_half = (cb << 6) + 32 * ((lane >> 1) & 1);
  }

  __device__ void issue(uint32_t stage, int lane) {
    if constexpr (kGatherX) {
      const bool in_k = xk_next < K;
#pragma unroll
      for (int j = 0; j < XJ; ++j) {
        const T* src = in_k ? x_next + x_off[j] : x_first;
        const uint32_t d = stage + (x_dst0 ^ (64u * (j & 1))) + 512u * j;
#pragma unroll
        for (int e = 0; e < 4; ++e) cp_async4_zfill_s(d + 4 * e, src + 8 * e, in_k);
      }
      xk_next += 64;
    } else {
#pragma unroll
      for (int j = 0; j < XJ; ++j) cp_async16_s(stage + (x_dst0 ^ (64u * (j & 1))) + 512u * j, x_next + x_off[j]);
    }
    x_next += 64;
#pragma unroll
    for (int j = 0; j < WJ; ++j) cp_async16_s(stage + w_dst[j], w_next + w_off[j]);
    w_next += CW;
    const int grp = min(k_half >> gshift, ngroups - 1);
    cp_async16_s(stage + Smem::kX + Smem::kW + ((lane >> 1) << 5) + 16 * (lane & 1), sc_tile + grp * 16);
    k_half += 64;
  }
};

// ---- pieces shared by the one-pass kernel (lut_wgmma_kernel) and the stream-K kernel ----

// This warp's share of one ring stage besides X (the consumer-side refill; the producer warp has
// its own): its tile's chunk of packed weights (BITS words per lane) and, in lanes < 16, two group
// scales of half (lane >> 3) & 1 (k-steps 0-1 / 2-3 lie in different groups only when G == 32).
template <int BITS, int BN, typename T>
__device__ __forceinline__ void wgmma_copy_ws(uint32_t stage, int warp, int lane, const uint32_t* w_next,
                                              const T* sc_src, int k_next, int gshift, int ngroups) {
  using Smem = WgmmaSmem<BITS, BN, T>;
  constexpr int CW = 32 * BITS;
  const uint32_t wd = stage + Smem::kX + warp * CW * 4;
  if constexpr (BITS == 4) {
    cp_async16_s(wd + 16 * lane, w_next);
  } else {
    cp_async8_s(wd + 8 * lane, w_next);
    if constexpr (BITS == 3) cp_async4_s(wd + 256 + 4 * lane, w_next + 64 - lane);
  }
  if (lane < 16) {
    const int grp = min(k_next >> gshift, ngroups - 1);
    const uint32_t sd = stage + Smem::kX + Smem::kW + (warp * 2 + ((lane >> 3) & 1)) * 16 * sizeof(T) + 4 * (lane & 7);
    cp_async4_s(sd, sc_src + grp * 16);
  }
}

// Decodes this warp's A fragments of one chunk from its ring stage (generic address `sg`): the packed
// weights through the shared pair table (4-bit, use_pair) or byte permutes (tb), times the group
// scales (one HMUL2 per register).
// (one_group: G >= 64, both halves of the chunk in one group; read only with FLUTE_WG_SCALE_REUSE.)
template <int BITS, int BN, typename T>
__device__ __forceinline__ void wgmma_decode_chunk(const uint8_t* sg, int warp, int lane, bool use_pair,
                                                   uint32_t pair_lane, const ByteTable& tb, uint32_t (&a)[4][4],
                                                   bool one_group) {
  using Smem = WgmmaSmem<BITS, BN, T>;
  using Pair = typename Smem::Pair;
  constexpr int CW = 32 * BITS;
  const int g = lane >> 2;
  Frag<BITS> f;
  {
    const uint32_t* sw = reinterpret_cast<const uint32_t*>(sg + Smem::kX) + warp * CW;
    if constexpr (BITS == 4) {
      const uint4 v = *reinterpret_cast<const uint4*>(sw + 4 * lane);
      f.w[0] = v.x; f.w[1] = v.y; f.w[2] = v.z; f.w[3] = v.w;
    } else {
      const uint2 v = *reinterpret_cast<const uint2*>(sw + 2 * lane);
      f.w[0] = v.x; f.w[1] = v.y;
      if constexpr (BITS == 3) f.w[2] = sw[64 + lane];
    }
  }
  const T* ssc = reinterpret_cast<const T*>(sg + Smem::kX + Smem::kW) + warp * 32;
  uint32_t s2[2][2];  // [half][row g / g + 8] scale pairs
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    if (FLUTE_WG_SCALE_REUSE && h == 1 && one_group) {
      s2[1][0] = s2[0][0];
      s2[1][1] = s2[0][1];
      continue;
    }
    const uint16_t lo = *reinterpret_cast<const uint16_t*>(ssc + 16 * h + g);
    const uint16_t hi = *reinterpret_cast<const uint16_t*>(ssc + 16 * h + g + 8);
    s2[h][0] = (uint32_t)lo * 0x10001u;
    s2[h][1] = (uint32_t)hi * 0x10001u;
  }
  if (BITS == 4 && use_pair) {
    decode_pair<0, Pair::kCopies>(f.w[0], pair_lane, a[0]);
    decode_pair<1, Pair::kCopies>(f.w[1 & (BITS - 1)], pair_lane, a[1]);
    decode_pair<2, Pair::kCopies>(f.w[2 & (BITS - 1)], pair_lane, a[2]);
    decode_pair<3, Pair::kCopies>(f.w[3 & (BITS - 1)], pair_lane, a[3]);
  } else {
    decode<BITS, 0>(f, tb, a[0]);
    decode<BITS, 1>(f, tb, a[1]);
    decode<BITS, 2>(f, tb, a[2]);
    decode<BITS, 3>(f, tb, a[3]);
  }
#pragma unroll
  for (int s = 0; s < 4; ++s) {
    a[s][0] = mul2<T>(a[s][0], s2[s >> 1][0]);
    a[s][1] = mul2<T>(a[s][1], s2[s >> 1][1]);
    a[s][2] = mul2<T>(a[s][2], s2[s >> 1][0]);
    a[s][3] = mul2<T>(a[s][3], s2[s >> 1][1]);
  }
}

// The chunk's 4 wgmmas (k-steps) on the X tile of ring stage st, as one commit group.
template <int BN, typename T, int STAGE_BYTES>
__device__ __forceinline__ void wgmma_chunk_mma(float* acc, uint32_t (&a)[4][4], uint32_t desc0_lo, uint32_t desc0_hi,
                                                int st) {
  uint64_t desc[4];
#pragma unroll
  for (int s = 0; s < 4; ++s) {
    // The ring lies below 256 KB, so the descriptor's address field (bits 0-13, address / 16) of
    // stage st, k-step s is the first stage's plus a 32-bit constant, with no carry into the other
    // fields: one add instead of rebuilding it (~6 uniform ops; v15 A/B 0.988x the time).
    desc[s] = ((uint64_t)desc0_hi << 32) | (desc0_lo + (uint32_t)st * (STAGE_BYTES >> 4) + 2u * s);
    // Materialise every wgmma input before the fence: an input defined between the wgmmas of
    // one group makes ptxas serialise them (C7513).
    asm volatile("" : "+l"(desc[s]), "+r"(a[s][0]), "+r"(a[s][1]), "+r"(a[s][2]), "+r"(a[s][3])::"memory");
  }
  wgmma_fence();
#pragma unroll
  for (int s = 0; s < 4; ++s) Wgmma<BN, T>::mma(acc, a[s], desc[s]);
  wgmma_commit();
}
#endif  // FLUTE_HAS_WGMMA

// put(m, n, v) for every output element of a warp's accumulators that lies inside the output (M rows):
// acc[4j + q] is weight row tile*16 + g + 8*(q>>1) and activation row m0 + 8j + 2t + (q&1)
// (the wgmma accumulator layout; g = lane / 4, t = lane % 4).
template <int BN, typename F>
__device__ __forceinline__ void wgmma_for_each_out(const float (&acc)[BN / 2], int lane, int tile, int m0, int M, F&& put) {
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int j = 0; j < BN / 8; ++j)
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int m = m0 + 8 * j + 2 * t + (q & 1);
      if (m < M) put(m, tile * 16 + g + 8 * (q >> 1), acc[4 * j + q]);
    }
}

// Register cap: 2 CTAs/SM (1 at BN = 256); with the producer warp (288 threads) ptxas caps at 96
// (BN <= 32 need 94-96, no spill; BN = 64 would spill, and `__maxnreg__` 112 lost there, v15).
template <int BITS, int BN, typename T>
__global__ void __launch_bounds__(wgmma_threads<BN>(), wgmma_min_blocks<BN>()) lut_wgmma_kernel(
    const GemmParams p, const __grid_constant__ CUtensorMap tmap_x) {  // (tmap_x: read only where wgmma_tma_x<BN>())
#if FLUTE_HAS_WGMMA
  using Smem = WgmmaSmem<BITS, BN, T>;
  constexpr int NACC = BN / 2;
  extern __shared__ __align__(16) uint8_t smem_raw[];
  const uint32_t sbase = (smem_addr(smem_raw) + 1023u) & ~1023u;
  uint8_t* const sgen = smem_raw + (sbase - smem_addr(smem_raw));

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int ntiles = p.N >> 4;
  const int nch = (p.K + 63) >> 6;
  const int ngroups = p.K / p.group_size;
  const int gshift = (ngroups == 1) ? 31 : (31 - __clz(p.group_size));
  const bool one_group = p.group_size >= 64;  // (FLUTE_WG_SCALE_REUSE)
  constexpr bool PRODUCER = wgmma_producer<BN>();
  const bool is_producer = PRODUCER && warp == kWgmmaTiles;  // the copying warp (wgmma_producer)
  const int tile_raw = blockIdx.x * kWgmmaTiles + warp;
  const bool tile_ok = tile_raw < ntiles && !is_producer;
  const int tile = min(tile_raw, ntiles - 1);
  const int m0 = blockIdx.y * BN;
  const int split = blockIdx.z;
  const int cb = split * p.chunks_per_split;
  const int ce = min(nch, cb + p.chunks_per_split);

  // ---- copy assignments (fixed across chunks; the activation pieces: see wgmma_x_piece_k) ----
  // (Per-thread activation copies are only the gather refill's: BN <= kWgmmaGatherMaxRows without
  // the producer warp, an A/B baseline. Larger BN load X by TMA, smaller ones by the producer.)
  constexpr bool kGatherX = wgmma_gathers_x<BN>();
  const int x_stride = wgmma_x_row_stride<BN>(p.K);
  const int x_piece = tid & 7;
  const int x_row0 = tid >> 3;  // + 32 j
  constexpr int XJ = BN >= 32 ? BN / 32 : 1;  // rows x_row0 + 32 j this thread copies
  const bool x_copies = BN >= 32 || x_row0 < BN;  // BN < 32: threads of rows >= BN copy no activations
  const uint32_t x_dst0 = wgmma_x_slot(x_row0, x_piece);
  const T* x = reinterpret_cast<const T*>(p.x) + wgmma_x_piece_k<BN>(x_piece);
  // Weights: warp copies its own tile's chunk (BITS words per lane); scales: lanes < 16 copy two
  // scales of half h = lane >> 3 (k-steps 0-1 / 2-3 may lie in different groups only when G == 32).
  constexpr int CW = 32 * BITS;
  const uint32_t* wsrc = p.qweight + (size_t)tile * nch * CW + (BITS == 4 ? 4 * lane : 2 * lane);
  const T* scales = reinterpret_cast<const T*>(p.scales);
  const T* sc_src = scales + (size_t)tile * ngroups * 16 + 2 * (lane & 7);
  const int sc_h = (lane >> 3) & 1;

  // The next chunk's sources, kept per thread and advanced by one chunk per issue (chunks are
  // issued in order, each once) instead of a row clamp and 64-bit address math per chunk: v12,
  // 8-11% fewer loop instructions, H200 tc path 1.12x faster over M = 64-4096 (kernels/NOTES.md).
  // Activation rows x_row0 + 32 j (clamped to M - 1) as 32-bit offsets from row x_row0: one
  // running pointer instead of BN / 32 (64-bit pointers made BN = 128 spill, before TMA).
  const int x_row_first = min(m0 + x_row0, p.M - 1);
  const T* x_next = x + (size_t)x_row_first * x_stride + (cb << 6);
  int xk_next = (cb << 6) + 32 * (x_piece >> 2);  // gather: this piece's first k in the next chunk (pad test)
  uint32_t x_off[XJ];  // x_off[0] == 0 (kept for the loop's uniformity; ptxas drops it)
  x_off[0] = 0;
#pragma unroll
  for (int j = 1; j < XJ; ++j) x_off[j] = (uint32_t)(min(m0 + x_row0 + 32 * j, p.M - 1) - x_row_first) * (uint32_t)x_stride;
  const uint32_t* w_next = wsrc + (size_t)cb * CW;
  int k_next = (cb << 6) + 32 * sc_h;  // k of this lane's scale group in the next chunk to issue
  // The ring's mbarriers (see below).
  __shared__ __align__(8) uint64_t s_full[8], s_empty[8];
  const uint32_t full0 = smem_addr(&s_full[0]), empty0 = smem_addr(&s_empty[0]);
  constexpr bool TMA_X = wgmma_tma_x<BN>();
  int x_col_next = cb << 6;  // TMA_X: the next chunk's first column of X (permuted, [M, Kp])
  auto issue = [&](int st) {
    const uint32_t xd = sbase + st * Smem::kStage + x_dst0;
    if constexpr (TMA_X) {
      if (tid == 0) {
        mbar_arrive_expect_tx(full0 + 8 * st, Smem::kX);
        tma_load_2d(sbase + st * Smem::kStage, &tmap_x, x_col_next, m0, full0 + 8 * st);
      }
      x_col_next += 64;
    } else if constexpr (kGatherX) {  // (else the producer warp copies X; this refill is not used)
      if (x_copies) {
        const bool in_k = xk_next < p.K;
#pragma unroll
        for (int j = 0; j < XJ; ++j) {
          const T* src = in_k ? x_next + x_off[j] : x;  // a zero-filled copy reads nothing but needs a valid address
#pragma unroll
          for (int e = 0; e < 4; ++e) cp_async4_zfill_s(xd + j * 4096 + 4 * e, src + 8 * e, in_k);
        }
      }
      xk_next += 64;
      x_next += 64;
    }
    wgmma_copy_ws<BITS, BN, T>(sbase + st * Smem::kStage, warp, lane, w_next, sc_src, k_next, gshift, ngroups);
    w_next += CW;
    k_next += 64;
  };

  const ByteTable tb = load_byte_table(p.tables + (size_t)tile * kTableWords);

  float acc[NACC];
  zero_fill(acc);

  constexpr int STAGES = Smem::kStages;
  constexpr int PD = STAGES - 2;  // prefetch distance (see the ring argument below)
  // Ring synchronisation by mbarriers, not by a CTA barrier per chunk: the two warpgroups drift
  // apart, so one decodes while the other's wgmmas run. full[s]: 256 arrivals, 32 with the producer
  // warp (every copying thread's cp.asyncs of the stage landed); empty[s]: 8 arrivals (every
  // consumer warp finished with the stage).
  if (tid == 0) {
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(full0 + 8 * s, PRODUCER ? 32 : kWgmmaTiles * 32 + (TMA_X ? 1 : 0));  // (+ the TMA's expect-tx arrival)
      mbar_init(empty0 + 8 * s, kWgmmaTiles);
    }
  }
  __syncthreads();  // barriers initialised before anyone arrives
  // Producer: fills every stage once before the pair-table build (no stage has been used yet, so
  // no `empty` wait), the rest of the chunks after it. (Without a producer warp `prod` is unused
  // and compiled away.)
  WgmmaProducer<BITS, BN, T> prod(p, lane, m0, cb, ngroups, gshift);
  int pi = cb;  // the producer's next chunk
  if constexpr (PRODUCER) {
    if (is_producer) {
      for (; pi < ce && pi - cb < STAGES; ++pi) {
        prod.issue(sbase + (pi - cb) * Smem::kStage, lane);
        mbar_arrive_cp_async(full0 + 8 * (pi - cb));
      }
    }
  }
  if constexpr (!PRODUCER) {
#pragma unroll
    for (int st = 0; st < PD; ++st) {
      if (cb + st < ce) {
        issue(st);
        mbar_arrive_cp_async(full0 + 8 * st);
      }
    }
  }
  // 4-bit: the pair table of the CTA's first tile, built while the prologue's copies fly; a warp
  // whose tile has another table (a fused-shard boundary inside the CTA) decodes with byte
  // permutes instead.
  bool use_pair = false;
  using Pair = typename Smem::Pair;
  const uint32_t pair_lane = sbase + STAGES * Smem::kStage + Pair::lane_offset(lane);
  if constexpr (BITS == 4) {
    const int cta_tile0 = min((int)blockIdx.x * kWgmmaTiles, ntiles - 1);
    const uint32_t* tp0 = p.tables + (size_t)cta_tile0 * kTableWords;
    build_pair_table<Pair::kCopies>(reinterpret_cast<uint32_t*>(sgen + STAGES * Smem::kStage), tp0);
    use_pair = same_byte_table(tb, load_byte_table(tp0));
    __syncthreads();  // the pair table is complete before any lookup
  }

  // One chunk: refill the ring, wait for chunk cc, decode its 4 k-steps into `a` (all 16
  // registers first: the decodes interleave), 4 wgmmas as one group, wait for the previous
  // chunk's group, then release its stage. The two register buffers alternate by chunk parity,
  // so a chunk's decode overlaps the previous chunk's MMAs.
  // Ring: chunk i (counted from cb) uses stage i % STAGES, its (i / STAGES)-th fill; the refill
  // for chunk i + PD reuses the stage of chunk i - 2, released by every warp in iteration i - 1.
  int st = 0, st_phase = 0;               // stage / full-parity of the chunk being consumed
  int ld = PD, ld_phase = 1;              // stage / empty-parity of the chunk being loaded
  int rel = 0;                            // stage of the previous chunk (to release)
  const uint64_t desc0 = smem_desc_sw128(sbase);  // the first ring stage's X tile
  const uint32_t desc0_lo = (uint32_t)desc0, desc0_hi = (uint32_t)(desc0 >> 32);
  constexpr bool FLOOR = FLUTE_WG_FLOOR && !PRODUCER;  // (the experiment above; BN >= 64 only)
  auto chunk = [&](int cc, uint32_t (&a)[4][4]) {
    if constexpr (!PRODUCER && !FLOOR) {
      if (cc + PD < ce) {
        mbar_wait(empty0 + 8 * ld, ld_phase);  // every warp is done with this stage's last chunk
        issue(ld);
        mbar_arrive_cp_async(full0 + 8 * ld);
      }
      if (++ld == STAGES) { ld = 0; ld_phase ^= 1; }
    }
    if (!FLOOR || cc - cb < PD) mbar_wait(full0 + 8 * st, st_phase);  // chunk cc has landed (every thread's copies)
    // cp.async wrote through the generic proxy; wgmma reads through the async proxy (a TMA-loaded X
    // tile was written by the async proxy already).
    if constexpr (!TMA_X) asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    wgmma_decode_chunk<BITS, BN, T>(sgen + st * Smem::kStage, warp, lane, use_pair, pair_lane, tb, a, one_group);
    wgmma_chunk_mma<BN, T, Smem::kStage>(acc, a, desc0_lo, desc0_hi, st);
    wgmma_wait<1>();  // chunk cc - 1's group is done: its registers and ring stage are free
    if (!FLOOR && cc > cb) {
      __syncwarp();
      if (lane == 0) mbar_arrive(empty0 + 8 * rel);
    }
    rel = st;
    if (++st == (FLOOR ? PD : STAGES)) { st = 0; st_phase ^= 1; }
  };
  if (PRODUCER && is_producer) {
    // Fill i (counted from cb) of stage i % STAGES waits for the consumers' release of fill i - STAGES:
    // completion (i / STAGES - 1) of that stage's `empty` barrier.
    for (; pi < ce; ++pi) {
      const int i = pi - cb, s = i % STAGES;
      mbar_wait(empty0 + 8 * s, (uint32_t)(i / STAGES - 1) & 1u);
      prod.issue(sbase + s * Smem::kStage, lane);
      mbar_arrive_cp_async(full0 + 8 * s);
    }
  } else
  {
    uint32_t a0[4][4], a1[4][4];
    // (The odd tail stays outside the loop: every path then alternates a0 / a1, which is what lets
    // ptxas keep the decode of one chunk overlapped with the wgmmas of the previous one.)
    int cc = cb;
    for (; cc + 1 < ce; cc += 2) {
      chunk(cc, a0);
      chunk(cc + 1, a1);
    }
    if (cc < ce) chunk(cc, a0);
    wgmma_wait<0>();
#pragma unroll
    for (int i = 0; i < NACC; ++i) pin(acc[i]);
  }
  cp_async_wait<0>();

  // Epilogue: put(m, n, v) for every valid output element of this warp.
  auto for_each_out = [&](auto&& put) {
    if (tile_ok) wgmma_for_each_out<BN>(acc, lane, tile, m0, p.M, put);
  };
  T* out = reinterpret_cast<T*>(p.out);
  if (p.splits == 1) {
    for_each_out([&](int m, int n, float v) { out[(size_t)m * p.N + n] = TypeOps<T>::from_float(v); });
    return;
  }
  // Split-K: fp32 partials [split][M][N]; the last CTA of this (x, y) sums them in split order.
  float* ws = p.workspace;
  for_each_out([&](int m, int n, float v) { ws[((size_t)split * p.M + m) * p.N + n] = v; });
  int* counter = p.counters + blockIdx.y * gridDim.x + blockIdx.x;
  if (!splitk_arrive_last(counter, p.splits)) return;
  const int n0 = blockIdx.x * kWgmmaTiles * 16;
  const int nvalid = min(kWgmmaTiles * 16, p.N - n0);
  const int mvalid = min(BN, p.M - m0);
  // (16 loads in flight per thread at BN >= 64; 8 in the producer-warp kernels, whose 96-register cap
  // spilled with more.)
  constexpr int U = wgmma_producer<BN>() ? 1 : 4;
  splitk_sum_tile<T, U, U == 1 ? 8 : 4>(ws + (size_t)m0 * p.N + n0, (size_t)p.M * p.N, p.splits,
                                        out + (size_t)m0 * p.N + n0, p.N, mvalid, nvalid, tid, wgmma_threads<BN>());
  if (tid == 0) *counter = 0;
#else
  __trap();  // built without sm_90a: the host never launches this (wgmma_supported() is false)
#endif
}


// ---- Stream-K: persistent CTAs over (tile, chunk) work, BN 64 / 256 --------------------------------
// The work of a launch is tiles of 128 weight rows x BN activation rows (tile t: activation block
// t / grid_x, weight block t % grid_x) of nch K chunks each. cuda_op.plan_stream_k divides it among
// sk_ctas CTAs (one per resident slot, so the grid is one full wave): tiles below sk_dp_tiles whole,
// CTA c taking c, c + sk_ctas, ...; then the remaining tiles' chunks in (tile, chunk) order,
// sk_units consecutive chunks per CTA. A tile whose chunks all fall to one CTA is written directly;
// of a tile cut between CTAs every contributor but the last to arrive writes its piece as fp32 to a
// slot (CTA c's first stream-K piece to slot c, its last to slot sk_ctas + c), and the last sums the
// pieces in K order (deterministic) into the output (details at the epilogue below). Unlike a split-K launch (one tile per CTA, every
// tile's CTAs in their own wave), the grid has no partial last wave and each CTA fills its ring
// once: the next tile's first chunks are in flight while a CTA finishes the previous one.
// A CTA's items, (tile, chunks [kb, ke)) in order, are listed in shared memory once at the start (one
// per thread), so that the issue side and the consumer side each walk them with one index: the chunk
// loop then holds no schedule state beyond it (the 128-register kernels spilled with two running
// cursors and their divisions inlined in the loop).
// (kSkMaxItems, flute_kernel.h: <= the CTA's threads; 1 KB of items: 2 KB would cost 4-bit BN = 64 its
// second CTA per SM. cuda_op.plan_stream_k keeps a CTA's items within it, the binding checks.)
struct SkItem {
  int bx_by;  // weight block bx | activation block by << 16
  int kb_ke;  // first chunk | end chunk << 16
  __device__ int bx() const { return bx_by & 0xFFFF; }
  __device__ int by() const { return bx_by >> 16; }
  __device__ int kb() const { return kb_ke & 0xFFFF; }
  __device__ int ke() const { return kb_ke >> 16; }
};
// The number of items of CTA c, and item i of them (i < that number).
__device__ __forceinline__ int sk_dp_items(const GemmParams& p, int c) {
  return c < p.sk_dp_tiles ? (p.sk_dp_tiles - 1 - c) / p.sk_ctas + 1 : 0;
}
__device__ __forceinline__ void sk_range(const GemmParams& p, int nch, int tiles, int c, int& it, int& end) {
  const int sk_total = (tiles - p.sk_dp_tiles) * nch;
  it = min(sk_total, c * p.sk_units);
  end = min(sk_total, it + p.sk_units);
}
__device__ __forceinline__ int sk_items(const GemmParams& p, int nch, int tiles, int c) {
  int it, end;
  sk_range(p, nch, tiles, c, it, end);
  return sk_dp_items(p, c) + (end > it ? (end - 1) / nch - it / nch + 1 : 0);
}
__device__ __forceinline__ SkItem sk_item(const GemmParams& p, int nch, int tiles, int grid_x, int c, int i) {
  const int ndp = sk_dp_items(p, c);
  int tile, kb = 0, ke = nch;
  if (i < ndp) {
    tile = c + i * p.sk_ctas;
  } else {
    int it, end;
    sk_range(p, nch, tiles, c, it, end);
    const int j = it / nch + (i - ndp);
    kb = max(it - j * nch, 0);
    ke = min(nch, end - j * nch);
    tile = p.sk_dp_tiles + j;
  }
  return SkItem{(tile % grid_x) | ((tile / grid_x) << 16), kb | (ke << 16)};
}

__device__ __forceinline__ void st_release_gpu(int* p, int v) {
  asm volatile("st.release.gpu.global.s32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}
__device__ __forceinline__ int ld_acquire_gpu(const int* p) {
  int v;
  asm volatile("ld.acquire.gpu.global.s32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// The partial slot of contributor c to stream-K tile j: c's first stream-K piece (slot c) or its last
// (slot sk_ctas + c).
__device__ __forceinline__ int sk_slot(const GemmParams& p, int nch, int j, int c) {
  return j == c * p.sk_units / nch ? c : p.sk_ctas + c;
}

template <int BITS, int BN, typename T>
__global__ void __launch_bounds__(kWgmmaTiles * 32, wgmma_min_blocks<BN>()) lut_wgmma_sk_kernel(
    const GemmParams p, const __grid_constant__ CUtensorMap tmap_x) {
  static_assert(wgmma_stream_k<BN>(), "stream-K is built for BN = 64 and 256 (wgmma_stream_k)");
#if FLUTE_HAS_WGMMA
  using Smem = WgmmaSmem<BITS, BN, T>;
  using Pair = typename Smem::Pair;
  constexpr int NACC = BN / 2, STAGES = Smem::kStages, PD = STAGES - 2, CW = 32 * BITS;
  constexpr int kSlotFloats = BN * kWgmmaRowsPerCta, kThreads = kWgmmaTiles * 32;
  extern __shared__ __align__(16) uint8_t smem_raw[];
  const uint32_t sbase = (smem_addr(smem_raw) + 1023u) & ~1023u;
  uint8_t* const sgen = smem_raw + (sbase - smem_addr(smem_raw));
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int ntiles = p.N >> 4, nch = (p.K + 63) >> 6, ngroups = p.K / p.group_size;
  const int gshift = (ngroups == 1) ? 31 : (31 - __clz(p.group_size));
  // (FLUTE_WG_SCALE_REUSE; not at BN = 64, where the 4-bit kernel then spills 12 B at its 128-register cap)
  const bool one_group = BN == 256 && p.group_size >= 64;
  const int grid_x = (p.N + kWgmmaRowsPerCta - 1) / kWgmmaRowsPerCta;
  const int tiles = grid_x * ((p.M + BN - 1) / BN);
  const T* scales = reinterpret_cast<const T*>(p.scales);

  __shared__ __align__(8) uint64_t s_full[8], s_empty[8];
  const uint32_t full0 = smem_addr(&s_full[0]), empty0 = smem_addr(&s_empty[0]);
  if (tid == 0) {
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(full0 + 8 * s, kWgmmaTiles * 32 + 1);  // every thread's cp.asyncs + the X tile's expect-tx arrival
      mbar_init(empty0 + 8 * s, kWgmmaTiles);
    }
  }
  __syncthreads();

  __shared__ SkItem s_items[kSkMaxItems];
  const int n_items = min(sk_items(p, nch, tiles, blockIdx.x), kSkMaxItems);
  if (tid < n_items) s_items[tid] = sk_item(p, nch, tiles, grid_x, blockIdx.x, tid);
  __syncthreads();

  // Issue side: walks the CTA's items PD chunks ahead of the consumer side, across item boundaries.
  int i_item = 0;                    // the issue side's current item
  int i_left = 0;                    // its chunks not yet issued
  const uint32_t* w_next = nullptr;  // this lane's piece of the next chunk's packed weights
  const T* sc_src = nullptr;         // this lane's scales of the item's tile
  int k_next = 0, x_col = 0, x_row = 0;
  auto issue_item = [&]() {  // sets up item i_item (< n_items)
    const SkItem it = s_items[i_item];
    const int bx = it.bx(), kb = it.kb();
    // (Everything here is re-derived from the parameters and %tid.x read afresh, so that the compiler
    // does not hoist these products out of the chunk loop and keep them live through it.)
    const uint32_t* qw = p.qweight;
    const T* sc = scales;
    int nc = nch, ng = ngroups, ntl = ntiles;
    asm volatile("" : "+l"(qw), "+l"(sc), "+r"(nc), "+r"(ng), "+r"(ntl));
    const int ltid = thread_index_x(), llane = ltid & 31, lwarp = ltid >> 5;
    const int wt = min(bx * kWgmmaTiles + lwarp, ntl - 1);
    w_next = qw + (size_t)wt * nc * CW + (BITS == 4 ? 4 * llane : 2 * llane) + (size_t)kb * CW;
    sc_src = sc + (size_t)wt * ng * 16 + 2 * (llane & 7);
    k_next = (kb << 6) + 32 * ((llane >> 3) & 1);
    x_col = kb << 6;
    x_row = it.by() * BN;
    i_left = it.ke() - kb;
  };
  bool i_more = n_items > 0;
  if (i_more) issue_item();
  int ld = 0;
  uint32_t ld_phase = 1;  // a fresh barrier's parity-1 phase counts as complete: the first STAGES fills pass
  auto refill = [&]() {
    mbar_wait(empty0 + 8 * ld, ld_phase);  // every warp is done with this stage's previous chunk
    const uint32_t stage = sbase + ld * Smem::kStage;
    if (tid == 0) {
      mbar_arrive_expect_tx(full0 + 8 * ld, Smem::kX);
      tma_load_2d(stage, &tmap_x, x_col, x_row, full0 + 8 * ld);
    }
    wgmma_copy_ws<BITS, BN, T>(stage, warp, lane, w_next, sc_src, k_next, gshift, ngroups);
    mbar_arrive_cp_async(full0 + 8 * ld);
    w_next += CW;
    k_next += 64;
    x_col += 64;
    if (++ld == STAGES) { ld = 0; ld_phase ^= 1; }
    if (--i_left == 0) {
      i_more = ++i_item < n_items;
      if (i_more) issue_item();
    }
  };
  for (int s = 0; s < PD && i_more; ++s) refill();

  // 4-bit: the pair table of the CTA's first tile, built while the first copies fly; a warp whose
  // item's tile has another table (a fused-shard boundary) decodes that item with byte permutes.
  const uint32_t pair_lane = sbase + STAGES * Smem::kStage + Pair::lane_offset(lane);
  const uint32_t* pair_src = p.tables + (size_t)min(n_items > 0 ? s_items[0].bx() * kWgmmaTiles : 0, ntiles - 1) * kTableWords;
  if constexpr (BITS == 4) {
    build_pair_table<Pair::kCopies>(reinterpret_cast<uint32_t*>(sgen + STAGES * Smem::kStage), pair_src);
    __syncthreads();
  }

  const uint64_t desc0 = smem_desc_sw128(sbase);
  const uint32_t desc0_lo = (uint32_t)desc0, desc0_hi = (uint32_t)(desc0 >> 32);
  int st = 0;
  uint32_t st_phase = 0;  // stage / full-parity of the chunk being consumed
  int rel = 0;
  bool have_rel = false;  // the previous chunk's stage is still to be released (after its wgmmas)
  float acc[NACC];
  ByteTable tb;  // the item's tile's byte tables (4-bit: for the byte-permute fallback)
  bool use_pair = false;
  auto chunk = [&](uint32_t (&a)[4][4]) {
    if (i_more) refill();
    mbar_wait(full0 + 8 * st, st_phase);
    wgmma_decode_chunk<BITS, BN, T>(sgen + st * Smem::kStage, warp, lane, use_pair, pair_lane, tb, a, one_group);
    wgmma_chunk_mma<BN, T, Smem::kStage>(acc, a, desc0_lo, desc0_hi, st);
    wgmma_wait<1>();  // the previous chunk's group is done: its registers and ring stage are free
    if (have_rel) {
      __syncwarp();
      if (lane == 0) mbar_arrive(empty0 + 8 * rel);
    }
    have_rel = true;
    rel = st;
    if (++st == STAGES) { st = 0; st_phase ^= 1; }
  };

  for (int item = 0; item < n_items; ++item) {
    const SkItem itm = s_items[item];
    const int bx = itm.bx(), by = itm.by(), kb = itm.kb(), ke = itm.ke();
    const int tile = by * grid_x + bx, m0 = by * BN;
    const int wt_raw = bx * kWgmmaTiles + warp;
    const bool tile_ok = wt_raw < ntiles;
    const int wt = min(wt_raw, ntiles - 1);
    tb = load_byte_table(p.tables + (size_t)wt * kTableWords);
    if constexpr (BITS == 4) use_pair = same_byte_table(tb, load_byte_table(pair_src));
    zero_fill(acc);
    {
      uint32_t a0[4][4], a1[4][4];
      int cc = kb;
      for (; cc + 1 < ke; cc += 2) {
        chunk(a0);
        chunk(a1);
      }
      if (cc < ke) chunk(a0);
    }
    wgmma_wait<0>();
#pragma unroll
    for (int i = 0; i < NACC; ++i) pin(acc[i]);
    __syncwarp();
    if (lane == 0) mbar_arrive(empty0 + 8 * rel);  // the item's last stage (its wgmmas are done)
    have_rel = false;

    const int j = tile - p.sk_dp_tiles;  // stream-K tile index (< 0: a data-parallel tile)
    const int c_first = j < 0 ? 0 : j * nch / p.sk_units;
    const int c_last = j < 0 ? 0 : ((j + 1) * nch - 1) / p.sk_units;
    if (c_first != c_last) {
      // A cut tile. Every contributor arrives first (one atomic per CTA); all but the last then write
      // their piece in the accumulators' own layout (float4 i of thread tid at i * 256 + tid: coalesced)
      // and raise their slot's flag; the last waits for the others' flags and sums the pieces in K
      // order, p_first + p_second + ..., which does not depend on which CTA is last: its own piece stays
      // in registers when it is the first (the usual case: a tile's first piece is its CTA's last item),
      // else it goes through its slot too. (A flag is only waited for once its CTA has arrived, i.e.
      // while it is running: no co-residency is assumed.)
      const int me = blockIdx.x;
      int* flags = p.counters + kSkFlagBase;
      auto slot_of = [&](int c) {
        return reinterpret_cast<float4*>(p.workspace + (size_t)sk_slot(p, nch, j, c) * kSlotFloats) + tid;
      };
      auto store_acc = [&](float4* dst) {
#pragma unroll
        for (int i = 0; i < NACC / 4; ++i)
          __stcg(dst + i * kThreads, make_float4(acc[4 * i], acc[4 * i + 1], acc[4 * i + 2], acc[4 * i + 3]));
      };
      if (!splitk_arrive_last(p.counters + j, c_last - c_first + 1)) {
        store_acc(slot_of(me));
        __syncthreads();
        if (tid == 0) {
          __threadfence();
          st_release_gpu(flags + sk_slot(p, nch, j, me), 1);
        }
        continue;
      }
      if (tid == 0) {
        for (int c = c_first; c <= c_last; ++c)
          if (c != me)
            while (ld_acquire_gpu(flags + sk_slot(p, nch, j, c)) == 0) {
            }
      }
      __syncthreads();
      if (me != c_first) {  // acc = p_first; this CTA's piece is read back in its place below
        store_acc(slot_of(me));
        const float4* src = slot_of(c_first);
#pragma unroll
        for (int i = 0; i < NACC / 4; ++i) {
          const float4 v = __ldcg(src + i * kThreads);
          acc[4 * i] = v.x; acc[4 * i + 1] = v.y; acc[4 * i + 2] = v.z; acc[4 * i + 3] = v.w;
        }
      }
      // acc += p_c for c = c_first + 1 ... c_last, in that order; 8 float4 per contributor and two
      // contributors at a time in flight (the sum is latency-bound: one load in flight per thread made
      // a cut tile's fix-up cost more than the balance it bought)
#pragma unroll
      for (int bt = 0; bt < NACC / 32; ++bt) {
        auto add = [&](const float4 (&x)[8]) {
#pragma unroll
          for (int e = 0; e < 8; ++e) {
            float* a = acc + 32 * bt + 4 * e;
            a[0] += x[e].x; a[1] += x[e].y; a[2] += x[e].z; a[3] += x[e].w;
          }
        };
        int c = c_first + 1;
        for (; c + 1 <= c_last; c += 2) {
          const float4* s0 = slot_of(c);
          const float4* s1 = slot_of(c + 1);
          float4 x0[8], x1[8];
#pragma unroll
          for (int e = 0; e < 8; ++e) {
            x0[e] = __ldcg(s0 + (8 * bt + e) * kThreads);
            x1[e] = __ldcg(s1 + (8 * bt + e) * kThreads);
          }
          add(x0);
          add(x1);
        }
        if (c <= c_last) {
          const float4* s0 = slot_of(c);
          float4 x0[8];
#pragma unroll
          for (int e = 0; e < 8; ++e) x0[e] = __ldcg(s0 + (8 * bt + e) * kThreads);
          add(x0);
        }
      }
      __syncthreads();  // every thread has read the pieces: the flags and the counter may be reset
      if (tid == 0) {
        p.counters[j] = 0;
        for (int c = c_first; c <= c_last; ++c)
          if (c != me) flags[sk_slot(p, nch, j, c)] = 0;
      }
    }
    // The whole tile (this CTA's alone, or summed above).
    if (tile_ok) {
      T* out = reinterpret_cast<T*>(p.out);
      wgmma_for_each_out<BN>(acc, lane, wt, m0, p.M,
                             [&](int m, int n, float v) { out[(size_t)m * p.N + n] = TypeOps<T>::from_float(v); });
    }
  }
  cp_async_wait<0>();
#else
  __trap();  // built without sm_90a: the host never launches this (wgmma_supported() is false)
#endif
}

__global__ void wgmma_probe_kernel(int* out) { *out = FLUTE_HAS_WGMMA; }

// The driver's cuTensorMapEncodeTiled, through the runtime's driver entry point (no libcuda link);
// null if the driver lacks it (then wgmma_supported() is false).
using EncodeTiled = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                 const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                 CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);
EncodeTiled tensor_map_encoder() {
  static const EncodeTiled fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult q;
#if CUDART_VERSION >= 12050
    const cudaError_t e = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &q);
#else  // CUDA 12.0-12.4 (the by-version query is 12.5+; the plain one is gone in 13)
    const cudaError_t e = cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &f, cudaEnableDefault, &q);
#endif
    cudaGetLastError();
    return e == cudaSuccess && q == cudaDriverEntryPointSuccess ? reinterpret_cast<EncodeTiled>(f) : nullptr;
  }();
  return fn;
}

// The 2-D tensor map of the permuted activations [M, Kp] (16-bit elements): box 64 x BN rows, 128-byte
// swizzle, rows past M read as zeros. Encoded on the host per launch (no device work, so CUDA-graph
// capture is fine).
inline bool encode_x_map(CUtensorMap* map, const GemmParams& p, int box_rows) {
  const EncodeTiled encode = tensor_map_encoder();
  if (encode == nullptr) return false;
  const cuuint64_t kp = (cuuint64_t)((p.K + 63) & ~63);
  const cuuint64_t dims[2] = {kp, (cuuint64_t)p.M};
  const cuuint64_t strides[1] = {kp * 2};  // bytes between rows
  const cuuint32_t box[2] = {64, (cuuint32_t)box_rows};
  const cuuint32_t estrides[2] = {1, 1};
  const CUresult r = encode(map, CU_TENSOR_MAP_DATA_TYPE_UINT16, 2, const_cast<void*>(p.x), dims, strides, box, estrides,
                            CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS;
}

template <int BITS, int BN, typename T>
cudaError_t launch_wgmma_t(const GemmParams& p, cudaStream_t stream, const char** failed_step) {
  constexpr int bytes = WgmmaSmem<BITS, BN, T>::kBytes;
  static const cudaError_t attr =
      cudaFuncSetAttribute(lut_wgmma_kernel<BITS, BN, T>, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (attr != cudaSuccess) {
    *failed_step = "cudaFuncSetAttribute (dynamic shared memory size)";
    return attr;
  }
  CUtensorMap map{};  // (a map is needed only by the TMA kernels; the others ignore it)
  if (wgmma_tma_x<BN>() && !encode_x_map(&map, p, BN)) {
    *failed_step = "the activations' TMA descriptor (cuTensorMapEncodeTiled; x_perm must be 16-byte aligned)";
    return cudaErrorInvalidValue;
  }
  if (p.sk_ctas > 0) {
    if constexpr (wgmma_stream_k<BN>()) {
      static const cudaError_t sk_attr = cudaFuncSetAttribute(
          lut_wgmma_sk_kernel<BITS, BN, T>, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
      if (sk_attr != cudaSuccess) {
        *failed_step = "cudaFuncSetAttribute (dynamic shared memory size, stream-K kernel)";
        return sk_attr;
      }
      lut_wgmma_sk_kernel<BITS, BN, T><<<p.sk_ctas, kWgmmaTiles * 32, bytes, stream>>>(p, map);
      *failed_step = "the kernel launch (stream-K)";
      return cudaGetLastError();
    } else {
      *failed_step = "the parameters (stream-K is built for block_m 64 and 256)";
      return cudaErrorInvalidValue;
    }
  }
  dim3 grid(wgmma_grid_x(p.N), (p.M + BN - 1) / BN, p.splits);
  lut_wgmma_kernel<BITS, BN, T><<<grid, wgmma_threads<BN>(), bytes, stream>>>(p, map);
  *failed_step = "the kernel launch";
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_wgmma_typed(const GemmParams& p, cudaStream_t stream, const char** failed_step) {
  return with_int<2, 3, 4>(p.bits, cudaErrorInvalidValue, [&](auto b) {
    return with_int<8, 16, 32, 64, 128, 256>(p.m_tiles * 8, cudaErrorInvalidValue, [&](auto bn) {
      return launch_wgmma_t<decltype(b)::value, decltype(bn)::value, T>(p, stream, failed_step);
    });
  });
}

template <typename T> struct TypeTag { using type = T; };

}  // namespace

bool wgmma_supported() {
  static int cached[64];  // per device: 0 unknown, 1 yes, 2 no
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return false;
  if (cached[dev] == 0) {
    bool ok = false;
    int major = 0;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess && major == 9 &&
        tensor_map_encoder() != nullptr) {
      int* d = nullptr;
      int h = 0;
      if (cudaMalloc(&d, sizeof(int)) == cudaSuccess) {
        wgmma_probe_kernel<<<1, 1>>>(d);
        ok = cudaMemcpy(&h, d, sizeof(int), cudaMemcpyDeviceToHost) == cudaSuccess && h == 1;
        cudaFree(d);
      }
      cudaGetLastError();
    }
    cached[dev] = ok ? 1 : 2;
  }
  return cached[dev] == 1;
}

int wgmma_ctas_per_sm(int bits, int block_m, DType dtype, bool stream_k) {
  int n = 0;
  auto query = [&](auto b, auto bn, auto t) {
    constexpr int B = decltype(b)::value, BN = decltype(bn)::value;
    using T = typename decltype(t)::type;
    constexpr int bytes = WgmmaSmem<B, BN, T>::kBytes;
    if (stream_k) {
      if constexpr (wgmma_stream_k<BN>()) {
        cudaFuncSetAttribute(lut_wgmma_sk_kernel<B, BN, T>, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, lut_wgmma_sk_kernel<B, BN, T>, kWgmmaTiles * 32, bytes);
      }
    } else {
      cudaFuncSetAttribute(lut_wgmma_kernel<B, BN, T>, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, lut_wgmma_kernel<B, BN, T>, wgmma_threads<BN>(), bytes);
    }
    cudaGetLastError();
    return 0;
  };
  auto with_type = [&](auto t) {
    return with_int<2, 3, 4>(bits, 0, [&](auto b) {
      return with_int<8, 16, 32, 64, 128, 256>(block_m, 0, [&](auto bn) { return query(b, bn, t); });
    });
  };
  if (dtype == DType::kF16) with_type(TypeTag<half>{});
  else if (dtype == DType::kBF16) with_type(TypeTag<__nv_bfloat16>{});
  return n;
}

cudaError_t launch_gemm_wgmma(const GemmParams& p, cudaStream_t stream, const char** failed_step) {
  *failed_step = "the parameters (bits, block_m, dtype, N % 16, K % 32, splits)";
  if (p.M <= 0 || p.N <= 0) return cudaSuccess;
  if (p.N % 16 || p.K % 32 || p.splits < 1 || p.chunks_per_split < 1) return cudaErrorInvalidValue;
  switch (p.dtype) {
    case DType::kF16: return launch_wgmma_typed<half>(p, stream, failed_step);
    case DType::kBF16: return launch_wgmma_typed<__nv_bfloat16>(p, stream, failed_step);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace flute
