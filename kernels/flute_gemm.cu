// flute_vllm LUT-GEMM kernels (torch-free). See flute_kernel.h for the contract and
// kernels/NOTES.md for the design.
//
// One kernel family: lut_gemm_kernel<BITS, MT, NT, T>
//   BITS  index width (2, 3, 4)
//   MT    8-row activation tiles per CTA (1, 2, 4, 8): the mma N dimension
//   NT    16-row weight tiles per warp (1 or 2): reuse of activation fragments
//   W     warps per CTA (4; 8 at MT <= 2 for large layers: one conflict-free pair table for 8 warps)
//   T     activation type (half / bf16)
// runtime: M, N, K, group size, split-K (CTAs along K, summed by the last CTA to arrive), K slices
// (warps of a CTA in groups that share their tiles and split the CTA's K range, summed in shared memory).
//
// Each warp computes Y^T tiles with mma.sync.m16n8k16: A = dequantized weights (16 rows x 16 k),
// B = activations (loaded straight from global/L1 in fragment order; the kernel layout permutes K
// inside each 64-chunk so that a lane's activation fragments are 16 contiguous bytes), C = fp32.
// Decode: 4-bit through a shared-memory pair table (one LDS per A register, FLUTE's trick; 8-warp CTAs
// use the byte-addressed layout, whose lookup address is one PRMT);
// 2/3-bit (and 4-bit warps whose tile uses another shard's table) by byte-permute lookups in
// registers. Packed weights + group scales stream through a per-warp cp.async ring. Group scales
// are applied once per group to a per-group partial accumulator (acc += s * partial), not per
// weight element. Split-K partials are reduced by the last CTA to arrive (deterministic order).
#include <type_traits>

#include "flute_kernel.h"
#include "flute_device.cuh"
#include "flute_dispatch.h"

// Compile-time knobs for kernel experiments: benchmarks/ab_kernel.py builds variants with
// FLUTE_VLLM_NVCC_FLAGS="-DFLUTE_LUT_...=..." and times them in one run. The defaults are the
// shipped, measured choices (kernels/NOTES.md).
#ifndef FLUTE_LUT_STAGES
#define FLUTE_LUT_STAGES 4  // chunks in flight per warp, power of two (v5: 8 -> 4)
#endif
#ifndef FLUTE_LUT_FLOOR
#define FLUTE_LUT_FLOOR 0  // experiment, timing only (wrong results): 1 = no ring refills after the prologue,
#endif                     // the chunk loop decodes resident slots: the loop's floor without weight traffic
#ifndef FLUTE_LUT_BYTE_PAIR
#define FLUTE_LUT_BYTE_PAIR 1  // 8-warp 4-bit CTAs (MT below the mixed decode) decode through the byte-addressed pair
#endif                         // table (BytePairTable: PRMT + LDS per A register, no IMAD; v21 A/B on H200, M = 1 / 8 / 16,
                               // 8 shapes: 0.947x the time; 0: v20's PairTable<32>)
#ifndef FLUTE_LUT_MIXED_MIN_MT
#define FLUTE_LUT_MIXED_MIN_MT 4  // MT >= this: 4-bit odd k-steps decode a[2], a[3] by byte permutes (v6), else all
                                  // by pair table (v9 at MT <= 2; v6-v8 used 1, mixed everywhere)
#endif
#ifndef FLUTE_LUT_HOLD_ADDR
#define FLUTE_LUT_HOLD_ADDR 1  // MT <= 2: ring addresses held in registers (v8)
#endif
#ifndef FLUTE_LUT_W2_QUAD_STEPS
#define FLUTE_LUT_W2_QUAD_STEPS 0  // experiment: bit s set = 2-bit k-step s decodes through the shared quad table
#endif
#ifndef FLUTE_LUT_W2_WIDE_QUAD_STEPS
#define FLUTE_LUT_W2_WIDE_QUAD_STEPS 15  // the same for 2-bit 8-warp CTAs, which share one 32 KB quad table;
                                         // cuda_op.warps_for runs them per layer (lut_w2_wide_min_nk). v14 A/B
                                         // on H200 at M = 1 / 8 (both with 2-bit x-ahead), 8-warp quad vs 4-warp
                                         // permute decode: 70B down 49.7 -> 38.2 / 52.6 -> 44.4 us, 8B gate_up
                                         // 30.3 -> 24.4, 70B qkv 22.4 -> 18.7; 8B qkv even, 8B o 8.5 -> 9.4 at M = 8
#endif
#ifndef FLUTE_LUT_MT1_MIN_BLOCKS
#define FLUTE_LUT_MT1_MIN_BLOCKS 5  // MT = 1 resident CTAs per SM asked of ptxas (5: a 96-register cap; 8: 64)
#endif
#ifndef FLUTE_LUT_MT2_MIN_BLOCKS
#define FLUTE_LUT_MT2_MIN_BLOCKS 4  // MT = 2 likewise (4: 128 registers, for 2 weight tiles per warp)
#endif
#ifndef FLUTE_LUT_WIDE_MT1_MIN_BLOCKS
#define FLUTE_LUT_WIDE_MT1_MIN_BLOCKS 3  // 8-warp CTAs at MT = 1: resident CTAs asked of ptxas (3: 80 registers)
#endif
#ifndef FLUTE_LUT_WIDE_MT2_MIN_BLOCKS
#define FLUTE_LUT_WIDE_MT2_MIN_BLOCKS 2  // 8-warp CTAs at MT = 2 (2: 128 registers)
#endif
#ifndef FLUTE_LUT_FOLD_MIN_MT
#define FLUTE_LUT_FOLD_MIN_MT 99  // experiment: MT >= this folds the group scales into the decoded weights
                                  // (HMUL2, one more rounding) and accumulates straight into acc: no
                                  // per-group partials (frees 4 * NT * MT registers for more tiles per warp)
#endif
#ifndef FLUTE_LUT_X_AHEAD_MT
#define FLUTE_LUT_X_AHEAD_MT 2  // 4-bit kernels with MT == this load the activation fragments one chunk ahead
                                // (v11: M = 16 large layers 3-9% faster; 0: none). At MT = 1 the 8-warp
                                // kernel has it as a run-time variant instead (GemmParams::x_ahead).
#endif
#ifndef FLUTE_LUT_WIDE_MT1_XA_MIN_BLOCKS
#define FLUTE_LUT_WIDE_MT1_XA_MIN_BLOCKS 2  // ... its x-ahead variant: 2 CTAs (128 registers; at 80 it spills 40 B)
#endif
#ifndef FLUTE_LUT_X_AHEAD_W23_MT
#define FLUTE_LUT_X_AHEAD_W23_MT 1  // 2/3-bit kernels with MT == this load the activations one chunk ahead (the
                                    // 4-bit x-ahead's gain at M <= 8 was the LDG latency, which the register
                                    // decode of 2/3-bit waits on too; v14 A/B on H200, 8 shapes, M = 1 / 8:
                                    // 0.952x the time at 3 bits, 0.956x at 2 bits; 0: none)
#endif
#ifndef FLUTE_LUT_MT1_XA_MIN_BLOCKS
#define FLUTE_LUT_MT1_XA_MIN_BLOCKS 4  // 4-warp MT = 1 kernels with x-ahead (2/3-bit, above): 128 registers
#endif
// FLUTE_LUT_MT1_TILES / MT2_TILES / MT4_TILES (flute_kernel.h): weight tiles per warp at MT = 1 / 2 / 4.
// 2 tiles amortise the per-chunk ring, activation-load and loop work over two tiles (v9 at MT = 1).
// FLUTE_LUT_WIDE_MAX_MT (flute_kernel.h): the largest MT with 8-warp CTAs (4; v12 and before: 2).
static_assert((FLUTE_LUT_STAGES & (FLUTE_LUT_STAGES - 1)) == 0 && FLUTE_LUT_STAGES >= 2,
              "FLUTE_LUT_STAGES must be a power of two >= 2");

namespace flute {
namespace {

// Resident CTAs per SM asked of ptxas (register cap), from the knobs above: 4-warp CTAs MT = 1: 96
// registers (x-ahead: 128), MT = 2: 128, MT >= 4: 3 (<= 170 registers); 8-warp CTAs MT = 1: 80
// (x-ahead: 128), MT >= 2: 128.
template <int MT, int W, bool XA> struct MinBlocks {
  static constexpr int value = W == kWideWarpsPerCta
                                   ? (MT == 1 ? (XA ? FLUTE_LUT_WIDE_MT1_XA_MIN_BLOCKS : FLUTE_LUT_WIDE_MT1_MIN_BLOCKS)
                                              : FLUTE_LUT_WIDE_MT2_MIN_BLOCKS)
                                   : MT == 1 ? (XA ? FLUTE_LUT_MT1_XA_MIN_BLOCKS : FLUTE_LUT_MT1_MIN_BLOCKS)
                                   : MT == 2 ? FLUTE_LUT_MT2_MIN_BLOCKS : 3;
};
// Whether the (BITS, MT) kernels load the activations one chunk ahead: fixed by
// FLUTE_LUT_X_AHEAD_MT (4-bit) / FLUTE_LUT_X_AHEAD_W23_MT (2/3-bit), except where
// gemm_x_ahead_variant() offers both (chosen per launch).
template <int BITS, int MT>
constexpr bool kXAheadDefault = BITS == 4 ? MT == FLUTE_LUT_X_AHEAD_MT : MT == FLUTE_LUT_X_AHEAD_W23_MT;
// 2-bit k-steps (bit s = step s) that decode through the shared quad table, per CTA width.
template <int BITS, int W>
constexpr int kQuadSteps = BITS != 2 ? 0 : W == kWideWarpsPerCta ? FLUTE_LUT_W2_WIDE_QUAD_STEPS : FLUTE_LUT_W2_QUAD_STEPS;
// Kernels that decode (some) k-steps through a table in shared memory: 4-bit (pair table) and
// 2-bit with quad steps (quad table).
template <int BITS, int W> constexpr bool kSmemTable = BITS == 4 || kQuadSteps<BITS, W> != 0;

// Kernels that can slice K among the warps of a CTA (GemmParams::k_slices > 1, gemm_k_slices_ok): a
// warp's partial tile (NT * MT * 4 floats per lane) is summed through its own drained ring
// (FLUTE_LUT_STAGES * NT * 32 * BITS words).
template <int BITS, int MT, int W, bool XA>
constexpr bool kSlicedK = gemm_k_slices_ok(BITS, MT, W, XA, 2) && MT * 4 <= FLUTE_LUT_STAGES * BITS;

// Pair-table copies: a 4-warp CTA keeps 16 (16 KB, <= 2-way bank conflicts) to keep its occupancy;
// an 8-warp CTA shares 32 conflict-free copies (32 KB) among twice the warps.
template <int W> using LutPairTable = PairTable<W == kWideWarpsPerCta ? 32 : 16>;
// A static shared array of type A (TAG tells apart two of one type).
template <typename A, int TAG> __device__ __forceinline__ A& static_smem() {
  __shared__ __align__(16) A a;
  return a;
}
// lut_gemm_kernel's per-warp cp.async ring (packed weights, group scales) and its dynamic shared memory.
template <int BITS, int NT, int W> using LutRing = uint32_t[W][FLUTE_LUT_STAGES][NT][32 * BITS];
template <int NT, int W, typename T> using LutRingScales = T[W][FLUTE_LUT_STAGES][NT][2][16];
// Kernels that decode through the byte-addressed pair table instead (FLUTE_LUT_BYTE_PAIR): their
// weight ring must fit the table's unused upper halves (256 x 128 bytes; 32 KB at the default 4 stages).
template <int BITS, int MT, int W>
constexpr bool kBytePair = FLUTE_LUT_BYTE_PAIR && BITS == 4 && W == kWideWarpsPerCta && MT < FLUTE_LUT_MIXED_MIN_MT &&
                           sizeof(LutRing<BITS, gemm_n_tiles_per_warp(MT, W), W>) <= 256 * 128;
// XA: the activation fragments of the next chunk are loaded one chunk ahead (8 registers per MT: the
// first MMA of a chunk otherwise waits for its LDG, 22% of the stall samples at M = 1 in v12's ncu).
template <int BITS, int MT, int NT, int W, bool XA, typename T>
__global__ void __launch_bounds__(32 * W, (MinBlocks<MT, W, XA>::value)) lut_gemm_kernel(const GemmParams p) {
  using Ops = TypeOps<T>;
  using Pair = LutPairTable<W>;
  constexpr bool SMEM_TABLE = kSmemTable<BITS, W>;
  constexpr int QUAD_STEPS = kQuadSteps<BITS, W>;
  constexpr int STAGES = FLUTE_LUT_STAGES;
  // Wide CTAs at MT >= 4 always fold (their one tile per warp must fit the 128-register cap).
  constexpr bool FOLD = MT >= FLUTE_LUT_FOLD_MIN_MT || (W == kWideWarpsPerCta && MT >= 4);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int ntiles = p.N >> 4;
  const int nch = (p.K + 63) >> 6;
  const int ngroups = p.K / p.group_size;
  const bool g32 = p.group_size == 32;
  const bool half_last = (p.K & 63) != 0;
  // Sliced K (p.k_slices = KS > 1): the CTA's warps form W / KS groups of KS; the warps of a group
  // share their weight tiles and split the CTA's K range, and their partial tiles are summed in
  // shared memory at the end (kSlicedK). Gives a small layer many CTAs without split-K across CTAs,
  // whose reduction costs 1.6-2.3 us per call (kernels/NOTES.md v17).
  const int ks_shift = kSlicedK<BITS, MT, W, XA> ? 31 - __clz(p.k_slices) : 0;  // k_slices is a power of two
  // (kslice through a shuffle: ptxas then knows the warp's chunk range, and so its loop, is warp-uniform
  // and adds no convergence barriers to the chunk loop.)
  const int ks_n = 1 << ks_shift, kslice = __shfl_sync(0xffffffffu, warp, 0) & (ks_n - 1);
  const int tile_warps = W >> ks_shift;
  const int warp_tile0 = (blockIdx.x * tile_warps + (warp >> ks_shift)) * NT;
  const bool warp_active = warp_tile0 < ntiles;
  const int split = blockIdx.y;
  const int m0 = blockIdx.z * (8 * MT);
  const int split_cb = split * p.chunks_per_split;
  const int split_ce = min(nch, split_cb + p.chunks_per_split);
  int cb = split_cb, ce = split_ce;  // this warp's chunks
  if constexpr (kSlicedK<BITS, MT, W, XA>) {
    const int slice_chunks = (split_ce - split_cb + ks_n - 1) >> ks_shift;
    cb = min(split_ce, split_cb + kslice * slice_chunks);
    ce = min(split_ce, cb + slice_chunks);
  }

  int tile[NT];
  bool tile_ok[NT];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    tile_ok[nt] = warp_tile0 + nt < ntiles;
    tile[nt] = min(warp_tile0 + nt, ntiles - 1);
  }

  // acc: the output tile; part (below): the current group's MMA sums, folded into acc per group.
  float acc[NT][MT][4];
  zero_fill(acc);

  // Per-warp cp.async ring: STAGES chunks of packed weights (+ their group scales) in flight. Static
  // arrays, except in byte-pair kernels, whose shared memory is all dynamic: the table first (at the
  // window offset its lookups take as an immediate) with the weight ring in its entries' upper
  // halves (BytePairTable::ring_offset; s_w is not used there), then the scales, then a split-K flag.
  using Ring = LutRing<BITS, NT, W>;
  using RingScales = LutRingScales<NT, W, T>;
  constexpr bool BYTE_PAIR = kBytePair<BITS, MT, W>;
  static_assert(!BYTE_PAIR || sizeof(Ring) <= 256 * 128, "the byte-pair ring must fit the table's upper halves");
  extern __shared__ __align__(16) uint32_t s_pair[];  // 4-bit: Pair (LutPairTable) or BytePairTable; 2-bit: QuadTable
  Ring& s_w = [&]() -> Ring& {
    if constexpr (BYTE_PAIR) return *reinterpret_cast<Ring*>(s_pair);
    else return static_smem<Ring, 0>();
  }();
  RingScales& s_sc = [&]() -> RingScales& {
    if constexpr (BYTE_PAIR) return *reinterpret_cast<RingScales*>(reinterpret_cast<char*>(s_pair) + BytePairTable::kBytes);
    else return static_smem<RingScales, 1>();
  }();
  if constexpr (BYTE_PAIR) {
    if ((smem_addr(s_pair) & 0xFFFFFFu) != BytePairTable::kSmemUserBase) __trap();  // the lookups' immediate is wrong here
  }

  const int cta_tile0 = min((int)blockIdx.x * tile_warps * NT, ntiles - 1);
  const bool warp_work = warp_active && cb < ce;
  {
    ByteTable tb[NT];
    const T* scales = reinterpret_cast<const T*>(p.scales);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) tb[nt] = load_byte_table(p.tables + (size_t)tile[nt] * kTableWords);
    bool use_pair[NT];
    const uint32_t pair_lane = BYTE_PAIR ? hold_in_reg(BytePairTable::lane_bits(smem_addr(s_pair), lane))
                                         : smem_addr(s_pair) + (BITS == 4 ? Pair::lane_offset(lane) : QuadTable::lane_offset(lane));
    if constexpr (SMEM_TABLE) {
      // the table the CTA's shared table was built from (its first tile's)
      const ByteTable cta_tb = load_byte_table(p.tables + (size_t)cta_tile0 * kTableWords);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) use_pair[nt] = same_byte_table(tb[nt], cta_tb);
    } else {
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) use_pair[nt] = false;
    }
    const T* x = reinterpret_cast<const T*>(p.x);
    const T* xrow[MT];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) xrow[mt] = x + (size_t)min(m0 + 8 * mt + g, p.M - 1) * p.K + 8 * t;

    const uint32_t* wtile[NT];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) wtile[nt] = p.qweight + (size_t)tile[nt] * nch * (32 * BITS);

    // Group bookkeeping. A 64-wide chunk lies in one group unless G == 32 (then steps 0-1 are
    // group 2c and steps 2-3 group 2c+1). G is a power of two or the whole (single-group) K.
    const int cpg = g32 ? 1 : ((p.group_size & 63) ? 0x7fffffff : (p.group_size >> 6));
    int in_group = g32 ? 0 : cb % cpg;
    const int gshift = (ngroups == 1) ? 31 : (31 - __clz(p.group_size));  // k >> gshift = group

    float part[NT][MT][4];
    zero_fill(part);

    // Running per-lane state: the loop body does no index arithmetic beyond a few adds (v8: the
    // v7 loop recomputed ~60 instructions of addresses per chunk; at M = 1 that was most of it).
    constexpr int CW = 32 * BITS;                                   // words per chunk per tile
    constexpr int PIECE = BITS == 4 ? 4 : 2;                        // words per lane per chunk (low planes)
    constexpr uint32_t SLOT_W = NT * CW * 4;                        // bytes per ring slot (weights)
    constexpr uint32_t RS = BYTE_PAIR ? 2 : 1;                      // shared bytes per ring byte (byte pair: half entries)
    constexpr uint32_t SLOT_S = NT * 2 * 16 * sizeof(T);            // bytes per ring slot (scales)
    // hold_in_reg(): computed once and kept in a register; ptxas otherwise re-derives these shared
    // addresses (S2R/S2UR/LEA) inside the loop to save registers under the 64-register cap.
    // (MT <= 2 only: the larger tiles are register-bound and would spill instead.)
    constexpr bool PIN = FLUTE_LUT_HOLD_ADDR && MT <= 2;
    const uint32_t sw_lane = hold_in_reg<PIN>(
        BYTE_PAIR ? smem_addr(s_pair) + BytePairTable::ring_offset(warp * STAGES * SLOT_W + 4 * PIECE * lane)
                  : smem_addr(&s_w[warp][0][0][0]) + 4 * PIECE * lane);
    const bool sc_lane = lane < (g32 ? 16 : 8);
    const int sc_h = lane >> 3;
    const uint32_t ss_lane = hold_in_reg<PIN>(smem_addr(&s_sc[warp][0][0][0][0]) + (uint32_t)(sc_h * 16 * sizeof(T) + 4 * (lane & 7)));
    const T* sc_src[NT];
    const uint32_t* wnext[NT];  // this lane's piece of the next chunk to issue
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      sc_src[nt] = scales + (size_t)tile[nt] * ngroups * 16 + 2 * (lane & 7);
      wnext[nt] = wtile[nt] + PIECE * lane + (size_t)cb * CW;
    }
    int knext = (cb << 6) + 32 * sc_h;  // k of this lane's scale group in the next chunk to issue
    const int last_half = half_last ? nch - 1 : 0x7fffffff;

    auto issue = [&](uint32_t slot) {
      const uint32_t wdst = sw_lane + slot * SLOT_W * RS;
      const uint32_t sdst = ss_lane + slot * SLOT_S;
      const int grp = min(knext >> gshift, ngroups - 1);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        if constexpr (BITS == 4) {
          cp_async16_s(wdst + nt * CW * 4 * RS, wnext[nt]);
        } else {
          cp_async8_s(wdst + nt * CW * 4, wnext[nt]);
          if constexpr (BITS == 3) cp_async4_s(wdst + nt * CW * 4 + 256 - 4 * lane, wnext[nt] + 64 - lane);
        }
        if (sc_lane) cp_async4_s(sdst + nt * 2 * 16 * sizeof(T), sc_src[nt] + grp * 16);
        wnext[nt] += CW;
      }
      knext += 64;
    };
    auto flush = [&](uint32_t slot, int h) {
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const float s0 = Ops::to_float(s_sc[warp][slot][nt][h][g]);
        const float s1 = Ops::to_float(s_sc[warp][slot][nt][h][g + 8]);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          acc[nt][mt][0] = fmaf(s0, part[nt][mt][0], acc[nt][mt][0]);
          acc[nt][mt][1] = fmaf(s0, part[nt][mt][1], acc[nt][mt][1]);
          acc[nt][mt][2] = fmaf(s1, part[nt][mt][2], acc[nt][mt][2]);
          acc[nt][mt][3] = fmaf(s1, part[nt][mt][3], acc[nt][mt][3]);
          part[nt][mt][0] = part[nt][mt][1] = part[nt][mt][2] = part[nt][mt][3] = 0.f;
        }
      }
    };

    if (warp_work) {
#pragma unroll
      for (int st = 0; st < STAGES - 1; ++st) {
        if (cb + st < ce) issue(st);
        cp_async_commit();
      }
    }
    // The pair table is built while the prologue's copies are in flight (all threads, one barrier).
    // 4-bit: FLUTE-style pair table in shared memory (LutPairTable, see PairTable): entry e (two
    // 4-bit indices) -> (T[e & 15], T[e >> 4]) as a 16-bit pair = one mma A register. Built from the
    // table of the CTA's first tile; warps whose tile uses another table (a shard boundary inside
    // the CTA) decode with byte permutes instead. (2-bit with quad steps: the quad table, likewise.)
    if constexpr (BITS == 4) {
      if constexpr (BYTE_PAIR) build_byte_pair_table(s_pair, p.tables + (size_t)cta_tile0 * kTableWords);
      else build_pair_table<Pair::kCopies>(s_pair, p.tables + (size_t)cta_tile0 * kTableWords);
      __syncthreads();
    } else if constexpr (SMEM_TABLE) {
      build_quad_table(s_pair, p.tables + (size_t)cta_tile0 * kTableWords);
      __syncthreads();
    }

    // The chunk loop, compiled twice for 4-bit (pair-table decode or not, chosen once per warp) so
    // that no branch splits a chunk's k-steps and their shared-memory loads can be overlapped.
    auto chunk_loop = [&](auto pair_decode) {
      constexpr bool PAIR = decltype(pair_decode)::value;
      const T* xr[MT];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) xr[mt] = xrow[mt] + (cb << 6);
      [[maybe_unused]] uint4 xa_n[MT], xb_n[MT];  // XA: the next chunk's activation fragments
      auto load_x = [&](uint4 (&a)[MT], uint4 (&b)[MT], bool half) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          a[mt] = __ldg(reinterpret_cast<const uint4*>(xr[mt]));
          b[mt] = half ? make_uint4(0, 0, 0, 0) : __ldg(reinterpret_cast<const uint4*>(xr[mt] + 32));
          xr[mt] += 64;
        }
      };
      if constexpr (XA) load_x(xa_n, xb_n, cb == last_half);
      uint32_t slot = 0;
#pragma unroll 2
      for (int cc = cb; cc < ce; ++cc) {
        cp_async_wait<STAGES - 2>();  // chunk cc has landed (this lane's copies)
        __syncwarp();                  // ... and every lane's; everyone is done with the previous slot
        if (!FLUTE_LUT_FLOOR && cc + STAGES - 1 < ce) issue((slot + STAGES - 1) & (STAGES - 1));
        cp_async_commit();

        Frag<BITS> f[NT];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          if constexpr (BYTE_PAIR) {
            const uint4 v = lds128(sw_lane + (slot * SLOT_W + nt * CW * 4) * RS);
            f[nt].w[0] = v.x; f[nt].w[1] = v.y; f[nt].w[2] = v.z; f[nt].w[3] = v.w;
          } else if constexpr (BITS == 4) {
            const uint4 v = reinterpret_cast<const uint4*>(&s_w[warp][0][0][0])[slot * (SLOT_W / 16) + nt * (CW / 4) + lane];
            f[nt].w[0] = v.x; f[nt].w[1] = v.y; f[nt].w[2] = v.z; f[nt].w[3] = v.w;
          } else {
            const uint32_t* sw = s_w[warp][slot][nt];
            const uint2 v = *reinterpret_cast<const uint2*>(sw + 2 * lane);
            f[nt].w[0] = v.x; f[nt].w[1] = v.y;
            if constexpr (BITS == 3) f[nt].w[2] = sw[64 + lane];
          }
        }
        [[maybe_unused]] uint32_t s2[NT][2][2];  // FOLD: [tile][chunk half][row g / g + 8] scale pairs of this chunk
        if constexpr (FOLD) {
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) {
            const uint16_t* sc = reinterpret_cast<const uint16_t*>(s_sc[warp][slot][nt][0]);
            s2[nt][0][0] = sc[g] * 0x10001u;
            s2[nt][0][1] = sc[g + 8] * 0x10001u;
            s2[nt][1][0] = g32 ? sc[16 + g] * 0x10001u : s2[nt][0][0];
            s2[nt][1][1] = g32 ? sc[16 + g + 8] * 0x10001u : s2[nt][0][1];
          }
        }
        const bool only_half = cc == last_half;
        uint4 xa[MT], xb[MT];
        if constexpr (XA) {
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            xa[mt] = xa_n[mt];
            xb[mt] = xb_n[mt];
          }
          if (cc + 1 < ce) load_x(xa_n, xb_n, cc + 1 == last_half);
        } else {
          load_x(xa, xb, only_half);
        }
#define FLUTE_STEP(S)                                                                           \
  {                                                                                             \
    _Pragma("unroll") for (int nt = 0; nt < NT; ++nt) {                                         \
      uint32_t a[4];                                                                            \
      if constexpr (PAIR && BITS == 4) {                                                        \
        if ((S & 1) && MT >= FLUTE_LUT_MIXED_MIN_MT) decode_mixed<Pair::kCopies>(f[nt].w[S & (BITS - 1)], pair_lane, tb[nt], a); \
        else if constexpr (BYTE_PAIR) decode_pair_b<S>(f[nt].w[S & (BITS - 1)], pair_lane, a); \
        else decode_pair<S, Pair::kCopies>(f[nt].w[S & (BITS - 1)], pair_lane, a);              \
      } else if constexpr (PAIR && BITS == 2 && ((QUAD_STEPS >> S) & 1)) {                      \
        decode_quad<S>(f[nt].w[S >> 1], pair_lane, a);                                          \
      } else {                                                                                  \
        decode<BITS, S>(f[nt], tb[nt], a);                                                      \
      }                                                                                         \
      if constexpr (FOLD) {                                                                     \
        a[0] = mul2<T>(a[0], s2[nt][S >> 1][0]);                                                \
        a[1] = mul2<T>(a[1], s2[nt][S >> 1][1]);                                                \
        a[2] = mul2<T>(a[2], s2[nt][S >> 1][0]);                                                \
        a[3] = mul2<T>(a[3], s2[nt][S >> 1][1]);                                                \
      }                                                                                         \
      _Pragma("unroll") for (int mt = 0; mt < MT; ++mt) {                                       \
        const uint4& xv = (S < 2) ? xa[mt] : xb[mt];                                            \
        const uint32_t b0 = (S & 1) ? xv.z : xv.x;                                              \
        const uint32_t b1 = (S & 1) ? xv.w : xv.y;                                              \
        if constexpr (FOLD) Ops::mma(acc[nt][mt], a, b0, b1);                                   \
        else Ops::mma(part[nt][mt], a, b0, b1);                                                 \
      }                                                                                         \
    }                                                                                           \
  }
        FLUTE_STEP(0)
        FLUTE_STEP(1)
        if (!FOLD && g32) flush(slot, 0);
        if (!only_half) {
          FLUTE_STEP(2)
          FLUTE_STEP(3)
          if (!FOLD && g32) flush(slot, 1);
        }
#undef FLUTE_STEP
        if (!FOLD && !g32) {
          if (++in_group == cpg || cc == ce - 1) {
            flush(slot, 0);
            in_group = 0;
          }
        }
        slot = (slot + 1) & (STAGES - 1);
      }
    };
    if (warp_work) {
      bool pair_all = true;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) pair_all = pair_all && use_pair[nt];
      if constexpr (SMEM_TABLE) {
        if (pair_all) chunk_loop(std::true_type{});
        else chunk_loop(std::false_type{});
      } else {
        chunk_loop(std::false_type{});
      }
    }
    cp_async_wait<0>();
  }

  if constexpr (kSlicedK<BITS, MT, W, XA>) {
    if (ks_n > 1) {
      // Sum the group's K slices: each warp parks its partial tile in its own drained ring, the
      // group's first warp adds the others' in slice order (deterministic) and alone goes on.
      // (float i of warp w's ring; byte pair: through the ring's place in the table's entries)
      auto ring_float = [&](int w, int i) -> float* {
        if constexpr (BYTE_PAIR)
          return reinterpret_cast<float*>(reinterpret_cast<char*>(s_pair) + BytePairTable::ring_offset(w * (int)(sizeof(Ring) / W) + 4 * i));
        else return reinterpret_cast<float*>(&s_w[w][0][0][0]) + i;
      };
      __syncwarp();  // every lane of this warp is done reading its ring
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int j = 0; j < 4; ++j) *ring_float(warp, ((nt * MT + mt) * 4 + j) * 32 + lane) = acc[nt][mt][j];
      __syncthreads();
      if (kslice == 0) {
        for (int sl = 1; sl < ks_n; ++sl) {
#pragma unroll
          for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
              for (int j = 0; j < 4; ++j) acc[nt][mt][j] += *ring_float(warp + sl, ((nt * MT + mt) * 4 + j) * 32 + lane);
        }
      } else {
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) tile_ok[nt] = false;
      }
    }
  }

  // Epilogue. C fragment: acc[j] is (row n = tile*16 + g + 8*(j>>1), act row m = 2t + (j&1)).
  // (Two explicit store loops on purpose: one shared lambda for both changes ptxas's register
  // allocation of the whole kernel, main loop included.)
  T* out = reinterpret_cast<T*>(p.out);
  if (p.splits == 1) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      if (!tile_ok[nt]) continue;
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int m = m0 + 8 * mt + 2 * t + (j & 1);
          const int n = tile[nt] * 16 + g + 8 * (j >> 1);
          if (m < p.M) out[(size_t)m * p.N + n] = Ops::from_float(acc[nt][mt][j]);
        }
    }
    return;
  }

  // Split-K: write fp32 partials, the last CTA of this (x, z) sums them in split order.
  const size_t mrows = 8 * MT;
  float* ws_z = p.workspace + (size_t)blockIdx.z * p.splits * mrows * p.N;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    if (!tile_ok[nt]) continue;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int ml = 8 * mt + 2 * t + (j & 1);
        const int n = tile[nt] * 16 + g + 8 * (j >> 1);
        if (m0 + ml < p.M) ws_z[((size_t)split * mrows + ml) * p.N + n] = acc[nt][mt][j];
      }
  }
  int* counter = p.counters + blockIdx.z * gridDim.x + blockIdx.x;
  bool last;
  if constexpr (BYTE_PAIR) {
    last = splitk_arrive_last(counter, p.splits,
                              reinterpret_cast<int*>(reinterpret_cast<char*>(s_pair) + BytePairTable::kBytes + sizeof(RingScales)));
  } else {
    last = splitk_arrive_last(counter, p.splits);
  }
  if (!last) return;
  {
    // Sum the partials of this CTA's rows [n0, n0 + rows) x act rows [m0, m0 + 8*MT) in split order.
    const int rows = 16 * NT * tile_warps;
    const int n0 = blockIdx.x * rows;
    const int nvalid = min(rows, p.N - n0);
    const int mvalid = min((int)mrows, p.M - m0);
    // (M <= 8: one unit per thread at most, 8 splits deep; else 2 units, 4 deep: 8 loads in flight.)
    splitk_sum_tile<T, MT == 1 ? 1 : 2, MT == 1 ? 8 : 4>(ws_z + n0, mrows * p.N, p.splits, out + (size_t)m0 * p.N + n0,
                                                         p.N, mvalid, nvalid, threadIdx.x, blockDim.x);
  }
  if (threadIdx.x == 0) *counter = 0;
}

// Dequantize the kernel layout to a dense [N, K] matrix (float math, one rounding).
// One warp per (tile, chunk); a lane writes 8 consecutive k of rows g and g+8 per chunk half.
template <int BITS, typename TOut, typename TS>
__global__ void __launch_bounds__(128) dequant_kernel(const DequantParams p) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int nch = (p.K + 63) >> 6;
  const long long item = (long long)blockIdx.x * kWarpsPerCta + warp;
  const int ntiles = p.N >> 4;
  __shared__ float tab[kWarpsPerCta][16];
  const bool active = item < (long long)ntiles * nch;
  const int tile = active ? (int)(item / nch) : 0, c = active ? (int)(item % nch) : 0;
  if (lane < 16) tab[warp][lane] = __int_as_float(p.tables[(size_t)tile * kTableWords + 8 + lane]);
  __syncwarp();
  if (!active) return;
  const int ngroups = p.K / p.group_size;
  const int gshift = (ngroups == 1) ? 31 : (31 - __clz(p.group_size));
  Frag<BITS> f;
  load_frag<BITS>(f, p.qweight + ((size_t)tile * nch + c) * (32 * BITS), lane);
  const TS* scales = reinterpret_cast<const TS*>(p.scales);
  TOut* out = reinterpret_cast<TOut*>(p.out);
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int k = c * 64 + 32 * hh + 8 * t;
    if (k >= p.K) continue;
    const int grp = min((c * 64 + 32 * hh) >> gshift, ngroups - 1);
#pragma unroll
    for (int h8 = 0; h8 < 2; ++h8) {
      const int n = tile * 16 + g + 8 * h8;
      const float sc = TypeOps<TS>::to_float(scales[((size_t)tile * ngroups + grp) * 16 + g + 8 * h8]);
      alignas(16) TOut v[8];
#pragma unroll
      for (int sl = 0; sl < 2; ++sl)
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
          const int i = 4 * (kk >> 1) + 2 * h8 + (kk & 1);
          v[4 * sl + kk] = TypeOps<TOut>::from_float(tab[warp][frag_index<BITS>(f, 2 * hh + sl, i)] * sc);
        }
      TOut* dst = out + (size_t)n * p.K + k;
      if constexpr (sizeof(TOut) == 2) {
        *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(v);
      } else {
        reinterpret_cast<uint4*>(dst)[0] = reinterpret_cast<const uint4*>(v)[0];
        reinterpret_cast<uint4*>(dst)[1] = reinterpret_cast<const uint4*>(v)[1];
      }
    }
  }
}

// Dynamic shared memory of lut_gemm_kernel: its shared table (byte pair: with the ring, scales and flag).
template <int BITS, int MT, int NT, int W, typename T> constexpr int dyn_smem_bytes() {
  if constexpr (kBytePair<BITS, MT, W>) return BytePairTable::kBytes + sizeof(LutRingScales<NT, W, T>) + 16;  // + split-K flag
  return BITS == 4 ? LutPairTable<W>::kBytes : kSmemTable<BITS, W> ? QuadTable::kBytes : 0;
}

// Opt in to > 48 KB of shared memory (static ring + dynamic pair table); done once per kernel.
template <int BITS, int MT, int NT, int W, bool XA, typename T>
cudaError_t set_smem_attr() {
  static const cudaError_t err = cudaFuncSetAttribute(lut_gemm_kernel<BITS, MT, NT, W, XA, T>,
                                                      cudaFuncAttributeMaxDynamicSharedMemorySize, dyn_smem_bytes<BITS, MT, NT, W, T>());
  return err;
}

template <int BITS, int MT, int W, bool XA, typename T>
int occupancy_w() {
  constexpr int NT = gemm_n_tiles_per_warp(MT, W);
  int n = 0;
  if (set_smem_attr<BITS, MT, NT, W, XA, T>() != cudaSuccess) return 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, lut_gemm_kernel<BITS, MT, NT, W, XA, T>, 32 * W,
                                                    dyn_smem_bytes<BITS, MT, NT, W, T>()) != cudaSuccess)
    return 0;
  return n;
}

template <int BITS, int MT, int W, bool XA, typename T>
cudaError_t launch_gemm_w(const GemmParams& p, cudaStream_t stream) {
  constexpr int NT = gemm_n_tiles_per_warp(MT, W);
  if (p.k_slices != 1 && (!kSlicedK<BITS, MT, W, XA> || !gemm_k_slices_ok(BITS, MT, W, XA, p.k_slices)))
    return cudaErrorInvalidValue;
  dim3 grid(gemm_grid_x(p.N, MT, W, p.k_slices), p.splits, gemm_m_chunks(p.M, MT));
  const cudaError_t err = set_smem_attr<BITS, MT, NT, W, XA, T>();
  if (err != cudaSuccess) return err;
  lut_gemm_kernel<BITS, MT, NT, W, XA, T><<<grid, 32 * W, dyn_smem_bytes<BITS, MT, NT, W, T>(), stream>>>(p);
  return cudaGetLastError();
}

// x_ahead at run time -> f(integral_constant XA): both where gemm_x_ahead_variant(BITS, MT, W)
// (only those are instantiated twice), else the fixed kXAheadDefault (x_ahead ignored).
template <int BITS, int MT, int W, typename R, typename F>
R with_x_ahead(int x_ahead, F&& f) {
  if constexpr (gemm_x_ahead_variant(BITS, MT, W)) {
    return x_ahead ? f(std::true_type{}) : f(std::false_type{});
  } else {
    return f(std::integral_constant<bool, kXAheadDefault<BITS, MT>>{});
  }
}

// warps at run time -> f(integral_constant W): kWarpsPerCta, or kWideWarpsPerCta where
// gemm_wide_ok(MT) (only those are instantiated); fallback otherwise. For the launch and the
// occupancy query alike.
template <int MT, typename R, typename F>
R with_warps(int warps, R fallback, F&& f) {
  if constexpr (gemm_wide_ok(MT)) return with_int<kWarpsPerCta, kWideWarpsPerCta>(warps, fallback, f);
  else return with_int<kWarpsPerCta>(warps, fallback, f);
}

template <int BITS, int MT, typename T>
int occupancy_t(int warps, int x_ahead) {
  return with_warps<MT>(warps, 0, [&](auto w) {
    constexpr int W = decltype(w)::value;
    return with_x_ahead<BITS, MT, W, int>(x_ahead, [&](auto xa) { return occupancy_w<BITS, MT, W, decltype(xa)::value, T>(); });
  });
}

template <int BITS, int MT, typename T>
cudaError_t launch_gemm_t(const GemmParams& p, cudaStream_t stream) {
  return with_warps<MT>(p.warps, cudaErrorInvalidValue, [&](auto w) {
    constexpr int W = decltype(w)::value;
    return with_x_ahead<BITS, MT, W, cudaError_t>(
        p.x_ahead, [&](auto xa) { return launch_gemm_w<BITS, MT, W, decltype(xa)::value, T>(p, stream); });
  });
}

// (bits, m_tiles) at run time -> the instantiation: f(integral_constant BITS, integral_constant MT).
template <typename R, typename F>
R with_bits_mt(int bits, int m_tiles, R fallback, F&& f) {
  return with_int<2, 3, 4>(bits, fallback, [&](auto b) {
    return with_int<1, 2, 4, 8>(m_tiles, fallback, [&](auto mt) { return f(b, mt); });
  });
}

template <typename T>
cudaError_t launch_gemm_typed(const GemmParams& p, cudaStream_t stream) {
  return with_bits_mt(p.bits, p.m_tiles, cudaErrorInvalidValue, [&](auto b, auto mt) {
    return launch_gemm_t<decltype(b)::value, decltype(mt)::value, T>(p, stream);
  });
}

template <typename T>
int occupancy_typed(int bits, int m_tiles, int warps, int x_ahead) {
  return with_bits_mt(bits, m_tiles, 0, [&](auto b, auto mt) {
    return occupancy_t<decltype(b)::value, decltype(mt)::value, T>(warps, x_ahead);
  });
}

template <int BITS, typename TOut>
cudaError_t launch_dequant_t(const DequantParams& p, cudaStream_t stream) {
  const long long items = (long long)(p.N / 16) * ((p.K + 63) / 64);
  const unsigned blocks = (unsigned)((items + kWarpsPerCta - 1) / kWarpsPerCta);
  dequant_kernel<BITS, TOut, TOut><<<blocks, 128, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename TOut>
cudaError_t launch_dequant_typed(const DequantParams& p, cudaStream_t stream) {
  return with_int<2, 3, 4>(p.bits, cudaErrorInvalidValue,
                           [&](auto b) { return launch_dequant_t<decltype(b)::value, TOut>(p, stream); });
}

}  // namespace

cudaError_t launch_gemm(const GemmParams& p, cudaStream_t stream) {
  if (p.M <= 0 || p.N <= 0) return cudaSuccess;
  if (p.N % 16 || p.K % 32 || p.splits < 1 || p.chunks_per_split < 1 || p.k_slices < 1) return cudaErrorInvalidValue;
  switch (p.dtype) {
    case DType::kF16: return launch_gemm_typed<half>(p, stream);
    case DType::kBF16: return launch_gemm_typed<__nv_bfloat16>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

int gemm_ctas_per_sm(int bits, int m_tiles, DType dtype, int warps, int x_ahead) {
  switch (dtype) {
    case DType::kF16: return occupancy_typed<half>(bits, m_tiles, warps, x_ahead);
    case DType::kBF16: return occupancy_typed<__nv_bfloat16>(bits, m_tiles, warps, x_ahead);
    default: return 0;
  }
}

cudaError_t launch_dequant(const DequantParams& p, cudaStream_t stream) {
  if (p.N <= 0 || p.K <= 0) return cudaSuccess;
  if (p.N % 16 || p.K % 32) return cudaErrorInvalidValue;
  switch (p.dtype) {
    case DType::kF16: return launch_dequant_typed<half>(p, stream);
    case DType::kBF16: return launch_dequant_typed<__nv_bfloat16>(p, stream);
    case DType::kF32: return launch_dequant_typed<float>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace flute
