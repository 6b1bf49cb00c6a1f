// flute_vllm LUT-GEMM: torch-free C++ launch API on raw device pointers + a CUDA stream.
//
// Y[M, N] = X[M, K] @ W_hat[N, K]^T with W_hat[n, k] = table_s[q[n, k]] * scale[n, k / G].
// The weight tensors are in the *kernel layout* made by flute_vllm.cuda_op.prepare():
//   qweight  uint32, per 16-row tile T and 64-wide K chunk c, 32 lanes x BITS words
//            (see kernels/NOTES.md "Layout" and cuda_op._pack_kernel_layout)
//   scales   act dtype, [T][K/G][16]  (rows of one tile contiguous per group)
//   tables   uint32 [N/16][kTableWords]: words 0-3 low bytes of the 16 entries in the act dtype,
//            words 4-7 high bytes, words 8-23 the float32 table (entries >= 2^BITS are zero).
// Requirements (checked in Python before launch): N % 16 == 0, K % 32 == 0, G in {32, 64, 128,
// 256} or G == K, x row-major contiguous and 16-byte aligned, every pointer 16-byte aligned.
#pragma once

#include <cuda_runtime.h>
#include <cstdint>

namespace flute {

enum class DType : int { kF16 = 0, kBF16 = 1, kF32 = 2 };

constexpr int kTableWords = 24;
constexpr int kWarpsPerCta = 4;
constexpr int kWideWarpsPerCta = 8;  // the mma.sync kernel's wide CTAs (m_tiles <= 4, gemm_wide_ok)

struct GemmParams {
  const void* x;             // [M, K] act dtype (fp16 / bf16)
  const uint32_t* qweight;   // kernel layout
  const void* scales;        // kernel layout, act dtype
  const uint32_t* tables;    // [N/16, kTableWords]
  void* out;                 // [M, N] act dtype
  float* workspace;          // split-K partials: [m_chunks][splits][8*m_tiles][N] fp32 (splits > 1)
  int* counters;             // >= grid_x * m_chunks ints, zero on entry, left zero on exit
  int M, N, K;
  int bits;                  // 2, 3, 4
  int group_size;            // G (G == K for channel-wise)
  int splits;                // CTAs along K
  int chunks_per_split;      // 64-wide K chunks per split
  int m_tiles;               // 8-row activation tiles per CTA: 1, 2, 4, 8
  int warps;                 // warps per CTA of the mma.sync kernel: kWarpsPerCta, or kWideWarpsPerCta (gemm_wide_ok)
  int x_ahead;               // 1: the kernel variant that loads activations one chunk ahead, where
                             // gemm_x_ahead_variant() (elsewhere fixed by the build; ignored)
  DType dtype;
  int k_slices;              // 1, or 2 / 4 / 8 (dividing warps, gemm_k_slices_ok): warps of a CTA split its K range
                             // in groups of k_slices sharing their weight tiles (rows per CTA / k_slices)
  // Tensor-core path, stream-K schedule (lut_wgmma_sk_kernel, flute_wgmma.cu) when sk_ctas > 0:
  int sk_ctas;               // persistent CTAs (the grid)
  int sk_dp_tiles;           // output tiles taken whole first: CTA c takes tiles c, c + sk_ctas, ...
  int sk_units;              // then K chunks per CTA over the remaining tiles, in (tile, chunk) order
};

// Weight tiles (16 rows) per warp of the decode-size kernel at m_tiles = 1, 2 and 4 (experiment knobs,
// see kernels/flute_gemm.cu; the build passes FLUTE_VLLM_NVCC_FLAGS to nvcc and the host compiler
// alike, so launcher, binding and kernel agree; cuda_op.N_TILES_PER_WARP mirrors the defaults).
#ifndef FLUTE_LUT_MT1_TILES
#define FLUTE_LUT_MT1_TILES 2
#endif
#ifndef FLUTE_LUT_MT2_TILES
#define FLUTE_LUT_MT2_TILES 2
#endif
#ifndef FLUTE_LUT_MT4_TILES
#define FLUTE_LUT_MT4_TILES 2
#endif
// Wide CTAs at m_tiles = 4 (built when FLUTE_LUT_WIDE_MAX_MT >= 4, the default): one weight tile per warp,
// scales folded into the decoded weights (no per-group partials), so they fit 128 registers.
#ifndef FLUTE_LUT_WIDE_MT4_TILES
#define FLUTE_LUT_WIDE_MT4_TILES 1
#endif
// Tiles of 16 output rows handled by one warp for a given m_tiles (the kernel's NT parameter).
constexpr int gemm_n_tiles_per_warp(int m_tiles) {
  return m_tiles == 1 ? FLUTE_LUT_MT1_TILES : m_tiles == 2 ? FLUTE_LUT_MT2_TILES : m_tiles == 4 ? FLUTE_LUT_MT4_TILES : 1;
}
// ... and for a given CTA width (wide CTAs differ at m_tiles = 4 only).
constexpr int gemm_n_tiles_per_warp(int m_tiles, int warps) {
  return warps == kWideWarpsPerCta && m_tiles == 4 ? FLUTE_LUT_WIDE_MT4_TILES : gemm_n_tiles_per_warp(m_tiles);
}
// Wide CTAs (kWideWarpsPerCta warps sharing one conflict-free 32 KB pair table) exist for
// m_tiles <= FLUTE_LUT_WIDE_MAX_MT (4; v13, was 2); the caller picks them per layer
// (cuda_op.warps_for: at m_tiles <= 2 large N*K, where the L1/shared pipe is the limit; at
// m_tiles = 4 small N*K, where 4-warp CTAs are too few).
#ifndef FLUTE_LUT_WIDE_MAX_MT
#define FLUTE_LUT_WIDE_MAX_MT 4
#endif
constexpr bool gemm_wide_ok(int m_tiles) { return m_tiles <= FLUTE_LUT_WIDE_MAX_MT; }
// The (bits, m_tiles, warps) kernels built in two variants, chosen per launch by GemmParams::x_ahead:
// the 4-bit 8-warp kernel at m_tiles = 1 with the activations loaded one chunk ahead (2 CTAs per SM,
// 128 registers) or not (3 CTAs, 80 registers). The caller picks per layer (cuda_op.x_ahead_for:
// v13 A/B on H200 at M = 1, x-ahead 5-12% faster on large layers but 6% slower on 70B gate_up,
// which needs the third CTA).
constexpr bool gemm_x_ahead_variant(int bits, int m_tiles, int warps) {
  return bits == 4 && m_tiles == 1 && warps == kWideWarpsPerCta;
}
// Output rows per CTA, and CTAs along N, for a given N, m_tiles and warps per CTA (and K slices: the
// warps of a CTA in groups of k_slices that share their tiles and split the CTA's K range).
constexpr int gemm_rows_per_cta(int m_tiles, int warps) { return 16 * gemm_n_tiles_per_warp(m_tiles, warps) * warps; }
inline int gemm_grid_x(int N, int m_tiles, int warps, int k_slices = 1) {
  const int rows = gemm_rows_per_cta(m_tiles, warps) / k_slices;
  return (N + rows - 1) / rows;
}
// Whether the mma.sync kernel runs with k_slices (1, 2, 4 or 8, at most warps) for (bits, m_tiles, warps,
// x_ahead): slices > 1 sum their partial tiles through each warp's drained cp.async ring (4 stages of
// bits * 128 bytes per tile), which holds the m_tiles * 4 floats per lane and tile when m_tiles <= bits;
// not in the 4-bit 8-warp m_tiles = 1 kernel without x-ahead (3 CTAs/SM at 80 registers: the slice
// bookkeeping spills in its main loop; it runs the largest layers, which need no slices).
constexpr bool gemm_k_slices_ok(int bits, int m_tiles, int warps, int x_ahead, int k_slices) {
  return k_slices == 1 || ((k_slices == 2 || k_slices == 4 || k_slices == 8) && k_slices <= warps && m_tiles <= bits &&
                           !(gemm_x_ahead_variant(bits, m_tiles, warps) && !x_ahead));
}
inline int gemm_m_chunks(int M, int m_tiles) { return (M + 8 * m_tiles - 1) / (8 * m_tiles); }

cudaError_t launch_gemm(const GemmParams& p, cudaStream_t stream);

// Tensor-core path (flute_wgmma.cu, sm_90a): same parameters, except that m_tiles * 8 is the
// activation rows per CTA (8, 16, 32, 64, 128 or 256), a CTA covers kWgmmaRowsPerCta weight rows, the split-K
// workspace is [splits][M][N] fp32 and counters need grid_x * ceil(M / (8 * m_tiles)) ints.
constexpr int kWgmmaRowsPerCta = 128;
// Stream-K (GemmParams::sk_ctas > 0) exists for block_m 64 and 256 (flute_wgmma.cu wgmma_stream_k);
// its workspace is 2 * sk_ctas partial slots of block_m x kWgmmaRowsPerCta fp32, its counters one int per
// tile of the stream-K region (< kSkFlagBase) and, from kSkFlagBase on, one "partial written" flag per slot.
constexpr int kSkFlagBase = 32768;
constexpr int kSkMaxItems = 128;  // (tile, chunk range) items per stream-K CTA, listed in its shared memory
// The most items a CTA of the stream-K schedule (sk_ctas, sk_dp_tiles, sk_units) gets, for nch chunks per tile:
// its whole tiles, then at most sk_units / nch + 2 pieces.
inline int sk_max_items(int sk_ctas, int sk_dp_tiles, int sk_units, int nch) {
  return (sk_dp_tiles + sk_ctas - 1) / sk_ctas + sk_units / nch + 2;
}
// The tensor-core kernels with at most this many activation rows per CTA (decode sizes) read X in
// its own order, [M, K] (they gather the kernel layout's K order with 4-byte copies: a separate
// permute kernel would cost more than the copies there); larger ones take X permuted, [M, Kp].
// (v15 A/B on H200, M = 33-64: gathering at BN = 64 too was 1.17x the time, 1.27x with the producer
// warp; the Python side asks the extension for this value: wgmma_gather_max_rows.)
#ifndef FLUTE_WG_GATHER_MAX_ROWS
#define FLUTE_WG_GATHER_MAX_ROWS 32
#endif
constexpr int kWgmmaGatherMaxRows = FLUTE_WG_GATHER_MAX_ROWS;
inline int wgmma_grid_x(int N) { return (N + kWgmmaRowsPerCta - 1) / kWgmmaRowsPerCta; }
// On failure *failed_step names the step (parameters, shared-memory attribute, the activations'
// TMA descriptor, launch) for the caller's error message.
cudaError_t launch_gemm_wgmma(const GemmParams& p, cudaStream_t stream, const char** failed_step);
// True when the device is sm_90, the extension holds sm_90a code and the driver encodes TMA
// descriptors (probed once, synchronously: call it outside CUDA-graph capture).
bool wgmma_supported();
// Resident CTAs per SM of the tensor-core kernel for (bits, block_m, dtype), one-pass or stream-K; 0 on error.
int wgmma_ctas_per_sm(int bits, int block_m, DType dtype, bool stream_k);

// Resident CTAs per SM of the kernel that launch_gemm picks for (bits, m_tiles, dtype, warps, x_ahead); 0 on error.
int gemm_ctas_per_sm(int bits, int m_tiles, DType dtype, int warps, int x_ahead);

struct DequantParams {
  const uint32_t* qweight;
  const void* scales;
  const uint32_t* tables;
  void* out;                 // [N, K] in dtype (fp16 / bf16 / fp32)
  int N, K, bits, group_size;
  DType dtype;
};

cudaError_t launch_dequant(const DequantParams& p, cudaStream_t stream);

}  // namespace flute
