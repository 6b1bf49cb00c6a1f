// Device helpers shared by the LUT-GEMM kernels (flute_gemm.cu: mma.sync decode kernel and
// dequantize; flute_wgmma.cu: the sm_90a warpgroup-MMA kernel): PTX wrappers, the per-type MMA,
// and the decode of the kernel layout's packed indices into 16-bit A-fragment registers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>
#include <type_traits>

namespace flute {
namespace {

__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
  uint32_t d;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
  return d;
}

// Zero every element of a register array of any rank (unrolled at compile time).
__device__ __forceinline__ void zero_fill(float& v) { v = 0.f; }
template <typename E, int N>
__device__ __forceinline__ void zero_fill(E (&a)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) zero_fill(a[i]);
}

// The value, through a register the compiler cannot see into (so it is not re-derived later).
template <bool ON = true>
__device__ __forceinline__ uint32_t hold_in_reg(uint32_t v) {
  if constexpr (ON) asm volatile("" : "+r"(v));
  return v;
}

// Streaming 16/8/4-byte loads that do not pollute L1 (weights are read once).
__device__ __forceinline__ uint4 ld_stream_v4(const uint32_t* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}
__device__ __forceinline__ uint2 ld_stream_v2(const uint32_t* p) {
  uint2 v;
  asm volatile("ld.global.nc.L1::no_allocate.v2.u32 {%0,%1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(p));
  return v;
}
__device__ __forceinline__ uint32_t ld_stream_u32(const uint32_t* p) {
  uint32_t v;
  asm volatile("ld.global.nc.L1::no_allocate.u32 %0, [%1];" : "=r"(v) : "l"(p));
  return v;
}

// threadIdx.x read with an opaque instruction: a value the compiler cannot reuse from an earlier read
// (so it is not kept live through a loop for a use after it).
__device__ __forceinline__ int thread_index_x() {
  int t;
  asm volatile("mov.u32 %0, %%tid.x;" : "=r"(t));
  return t;
}
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ uint4 lds128(uint32_t addr) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(addr));
  return v;
}
__device__ __forceinline__ void cp_async16_s(uint32_t dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(src));
}
__device__ __forceinline__ void cp_async8_s(uint32_t dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8;" ::"r"(dst), "l"(src));
}
__device__ __forceinline__ void cp_async4_s(uint32_t dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(dst), "l"(src));
}
// 4 bytes, or 4 zero bytes when !valid (src is then not read, but must still be a valid address).
__device__ __forceinline__ void cp_async4_zfill_s(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(dst), "l"(src), "r"(valid ? 4 : 0));
}
// Split-K arrival, called by every thread of the CTA after it wrote its fp32 partials: true in the
// last CTA of the output tile to arrive, which then reads every split's partials. CUTLASS's
// generic-barrier pattern: a CTA barrier, then one thread adds to the tile's counter with acq_rel
// semantics at GPU scope (cumulative through the barrier: it releases the whole CTA's partials
// and acquires the other CTAs'), then a CTA barrier again. v16 and before fenced every thread
// (__threadfence, sequentially consistent) before an atomicAdd and again after it: v17 A/B on H200,
// 10 shapes, 0.975x the time at M = 1-16 (mma.sync kernel), 0.978x at M = 32-256 (wgmma kernel).
// (s_last: a shared int for the answer; the two-argument form declares its own.)
__device__ __forceinline__ bool splitk_arrive_last(int* counter, int splits, int* s_last) {
  __syncthreads();
  if (threadIdx.x == 0) {
    int old;
    asm volatile("atom.add.acq_rel.gpu.global.s32 %0, [%1], 1;" : "=r"(old) : "l"(counter) : "memory");
    *s_last = old == splits - 1;
  }
  __syncthreads();
  return *s_last;
}
__device__ __forceinline__ bool splitk_arrive_last(int* counter, int splits) {
  __shared__ int s_last;
  return splitk_arrive_last(counter, splits, &s_last);
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory"); }

// c += a * [b0, b1] (mma.sync m16n8k16, fp32 accumulate); TY is the 16-bit input type.
#define FLUTE_MMA16816(TY)                                                                            \
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." TY "." TY ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, " \
               "{%8,%9}, {%0,%1,%2,%3};"                                                               \
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                                        \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1))

template <typename T> struct TypeOps;
template <> struct TypeOps<half> {
  static __device__ __forceinline__ float to_float(half v) { return __half2float(v); }
  static __device__ __forceinline__ half from_float(float v) { return __float2half_rn(v); }
  static __device__ __forceinline__ void mma(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    FLUTE_MMA16816("f16");
  }
};
template <> struct TypeOps<__nv_bfloat16> {
  static __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
  static __device__ __forceinline__ void mma(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    FLUTE_MMA16816("bf16");
  }
};
template <> struct TypeOps<float> {
  static __device__ __forceinline__ float to_float(float v) { return v; }
  static __device__ __forceinline__ float from_float(float v) { return v; }
};

// The split-K sum of the last CTA to arrive (both kernels): out[ml][n] = sum over sp, in split order
// (deterministic), of part[sp * split_stride + ml * N + n] for the tile's ml < mvalid, n < nvalid
// (nvalid % 4 == 0), 4 consecutive n per unit, converted to T once. U units per thread at a time and
// their loads SB splits deep are issued before any is used, so U * SB float4 loads are in flight per
// thread: this sum is one CTA's serial work after every split finished. The v17 loops (one unit per
// thread, 1 (wgmma) or 4 (mma.sync) loads in flight, each iteration waiting an L2 round trip) made
// split-K cost most of a small layer's time at block_m 256; v18 A/B on H200 (11 shapes, M = 32 / 64 /
// 256, wgmma kernel): 0.926x the time, 8B o M=256 45.4 -> 35.0 us (kernels/NOTES.md).
template <typename T, int U, int SB>
__device__ __forceinline__ void splitk_sum_tile(const float* part, size_t split_stride, int splits, T* out, int N,
                                                int mvalid, int nvalid, int tid, int nthreads) {
  struct alignas(4 * sizeof(T)) Vec4 { T v[4]; };
  const int cols = nvalid >> 2;
  const int units = mvalid * cols;
  for (int u0 = tid; u0 < units; u0 += U * nthreads) {
    int off[U];
    bool ok[U];
    float4 v[U];
#pragma unroll
    for (int j = 0; j < U; ++j) {
      const int u = u0 + j * nthreads;
      ok[j] = u < units;
      off[j] = ok[j] ? (u / cols) * N + 4 * (u % cols) : 0;
      v[j] = make_float4(0.f, 0.f, 0.f, 0.f);
    }
    auto add_from = [&](int sp0, auto depth) {
      constexpr int D = decltype(depth)::value;
      float4 a[U][D];
#pragma unroll
      for (int j = 0; j < U; ++j)
#pragma unroll
        for (int q = 0; q < D; ++q)
          if (ok[j]) a[j][q] = __ldcg(reinterpret_cast<const float4*>(part + (sp0 + q) * split_stride + off[j]));
#pragma unroll
      for (int j = 0; j < U; ++j)
#pragma unroll
        for (int q = 0; q < D; ++q)
          if (ok[j]) { v[j].x += a[j][q].x; v[j].y += a[j][q].y; v[j].z += a[j][q].z; v[j].w += a[j][q].w; }
    };
    int sp = 0;
    for (; sp + SB <= splits; sp += SB) add_from(sp, std::integral_constant<int, SB>{});
    for (; sp < splits; ++sp) add_from(sp, std::integral_constant<int, 1>{});
#pragma unroll
    for (int j = 0; j < U; ++j) {
      if (!ok[j]) continue;
      Vec4 r;
      r.v[0] = TypeOps<T>::from_float(v[j].x);
      r.v[1] = TypeOps<T>::from_float(v[j].y);
      r.v[2] = TypeOps<T>::from_float(v[j].z);
      r.v[3] = TypeOps<T>::from_float(v[j].w);
      *reinterpret_cast<Vec4*>(out + off[j]) = r;
    }
  }
}

// a * s2 on two 16-bit lanes (scale folded into decoded weights: one extra rounding).
template <typename T> __device__ __forceinline__ uint32_t mul2(uint32_t a, uint32_t s2);
template <> __device__ __forceinline__ uint32_t mul2<half>(uint32_t a, uint32_t s2) {
  __half2 r = __hmul2(*reinterpret_cast<const __half2*>(&a), *reinterpret_cast<const __half2*>(&s2));
  return *reinterpret_cast<uint32_t*>(&r);
}
template <> __device__ __forceinline__ uint32_t mul2<__nv_bfloat16>(uint32_t a, uint32_t s2) {
  __nv_bfloat162 r = __hmul2(*reinterpret_cast<const __nv_bfloat162*>(&a), *reinterpret_cast<const __nv_bfloat162*>(&s2));
  return *reinterpret_cast<uint32_t*>(&r);
}

// Packed indices of one lane for one 64-wide K chunk (4 mma k-steps, 8 indices per step).
template <int BITS> struct Frag { uint32_t w[BITS]; };

// Shifts that place the msb plane of 3-bit indices at bit 2 of each selector nibble, for
// (step, half) = q in 0..7; negative means shift left.
__device__ __forceinline__ uint32_t msb_nibbles(uint32_t w2, int q) {
  switch (q) {
    case 0: return (w2 << 2) & 0x4444u;
    case 1: return (w2 << 1) & 0x4444u;
    case 2: return w2 & 0x4444u;
    case 3: return (w2 >> 1) & 0x4444u;
    case 4: return (w2 >> 14) & 0x4444u;
    case 5: return (w2 >> 15) & 0x4444u;
    case 6: return (w2 >> 16) & 0x4444u;
    default: return (w2 >> 17) & 0x4444u;
  }
}

// Chunk layout per (tile, chunk): 32 * BITS words.
//   4-bit: lane L owns words [4L, 4L+4): word s = step s, nibble i = element i.
//   2-bit: lane L owns words [2L, 2L+2): word j = steps 2j (bits 0-15) and 2j+1 (bits 16-31);
//          in a 16-bit half, element i < 4 at bits 4i..4i+1, element i >= 4 at 4(i-4)+2.
//   3-bit: words [2L, 2L+2) hold the low 2 bits like 2-bit; word 64 + L holds the msbs.
// Element i of a step: row g + 8*((i>>1)&1), mma k = 2t + (i&1) + 8*(i>>2): a[r] = (e_{2r}, e_{2r+1}).
template <int BITS>
__device__ __forceinline__ void load_frag(Frag<BITS>& f, const uint32_t* chunk, int lane) {
  if constexpr (BITS == 4) {
    uint4 v = ld_stream_v4(chunk + 4 * lane);
    f.w[0] = v.x; f.w[1] = v.y; f.w[2] = v.z; f.w[3] = v.w;
  } else if constexpr (BITS == 2) {
    uint2 v = ld_stream_v2(chunk + 2 * lane);
    f.w[0] = v.x; f.w[1] = v.y;
  } else {
    uint2 v = ld_stream_v2(chunk + 2 * lane);
    f.w[0] = v.x; f.w[1] = v.y;
    f.w[2] = ld_stream_u32(chunk + 64 + lane);
  }
}

struct ByteTable { uint32_t lo[4], hi[4]; };
// The byte tables (words 0-7) of a kernel-layout table.
__device__ __forceinline__ ByteTable load_byte_table(const uint32_t* tp) {
  const uint4 l = __ldg(reinterpret_cast<const uint4*>(tp)), h = __ldg(reinterpret_cast<const uint4*>(tp) + 1);
  return ByteTable{{l.x, l.y, l.z, l.w}, {h.x, h.y, h.z, h.w}};
}
// Whether two byte tables hold the same 16-bit values (a warp may use the CTA's shared pair table
// only if its own tile's table is the one the pair table was built from).
__device__ __forceinline__ bool same_byte_table(const ByteTable& x, const ByteTable& y) {
  bool same = true;
#pragma unroll
  for (int i = 0; i < 4; ++i) same = same && x.lo[i] == y.lo[i] && x.hi[i] == y.hi[i];
  return same;
}

__device__ __forceinline__ void interleave(uint32_t lo, uint32_t hi, uint32_t& a0, uint32_t& a1) {
  a0 = prmt(lo, hi, 0x5140);
  a1 = prmt(lo, hi, 0x7362);
}

// Dequantize (without scale) the 16x16 A fragment of k-step S: a[0..3] as 16-bit pairs.
template <int BITS, int S>
__device__ __forceinline__ void decode(const Frag<BITS>& f, const ByteTable& tb, uint32_t a[4]) {
  if constexpr (BITS == 4) {
    const uint32_t w = f.w[S];
    const uint32_t c = w & 0x77777777u;
    const uint32_t ch = c >> 16;
    const uint32_t sh = w << 4;
    {
      const uint32_t m = prmt(sh, w, 0xD9C8);  // 0xFF per byte where the index's msb is set
      const uint32_t la = prmt(tb.lo[0], tb.lo[1], c), lb = prmt(tb.lo[2], tb.lo[3], c);
      const uint32_t ha = prmt(tb.hi[0], tb.hi[1], c), hb = prmt(tb.hi[2], tb.hi[3], c);
      interleave((la & ~m) | (lb & m), (ha & ~m) | (hb & m), a[0], a[1]);
    }
    {
      const uint32_t m = prmt(sh, w, 0xFBEA);
      const uint32_t la = prmt(tb.lo[0], tb.lo[1], ch), lb = prmt(tb.lo[2], tb.lo[3], ch);
      const uint32_t ha = prmt(tb.hi[0], tb.hi[1], ch), hb = prmt(tb.hi[2], tb.hi[3], ch);
      interleave((la & ~m) | (lb & m), (ha & ~m) | (hb & m), a[2], a[3]);
    }
  } else {
    const uint32_t wl = f.w[S >> 1] >> (16 * (S & 1));
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      uint32_t c = (wl >> (2 * h)) & 0x3333u;
      uint32_t lo, hi;
      if constexpr (BITS == 3) {
        c |= msb_nibbles(f.w[2], 2 * S + h);
        lo = prmt(tb.lo[0], tb.lo[1], c);
        hi = prmt(tb.hi[0], tb.hi[1], c);
      } else {
        lo = prmt(tb.lo[0], tb.lo[0], c);
        hi = prmt(tb.hi[0], tb.hi[0], c);
      }
      interleave(lo, hi, a[2 * h], a[2 * h + 1]);
    }
  }
}

// The 4-bit pair table (FLUTE's trick) in shared memory: entry e (two 4-bit indices) -> the 16-bit
// pair (T[e & 15], T[e >> 4]) = one mma A register, stored COPIES times side by side (lane l reads
// copy l % COPIES). 16 copies (16 KB): a warp's lookups have <= 2-way bank conflicts (lanes l and
// l + 16 share a copy); 32 copies (32 KB): none.
template <int COPIES>
struct PairTable {
  static_assert(COPIES == 16 || COPIES == 32, "pair table copies: 16 or 32");
  static constexpr int kCopies = COPIES;
  static constexpr int kBytes = 256 * COPIES * 4;
  static constexpr uint32_t kEntryBytes = 4 * COPIES;
  __device__ static uint32_t lane_offset(int lane) { return 4u * (uint32_t)(lane & (COPIES - 1)); }
};

// 4-bit decode through the shared-memory pair table: byte j of the step's word holds the
// indices of a[j]'s two halves; one PRMT + one IMAD + one LDS per register.
// pair_lane = table base + PairTable<COPIES>::lane_offset(lane).
template <int S, int COPIES>
__device__ __forceinline__ void decode_pair(uint32_t w, uint32_t pair_lane, uint32_t a[4]) {
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const uint32_t idx = prmt(w, 0u, 0x4440u | j);
    asm volatile("ld.shared.b32 %0, [%1];" : "=r"(a[j]) : "r"(idx * PairTable<COPIES>::kEntryBytes + pair_lane));
  }
}

// The byte-addressed pair table (FLUTE_LUT_BYTE_PAIR): the pair-table entries at a 256-byte stride
// (64 KB), so that one PRMT forms a lookup's whole address: byte 1 = the pair index (entry * 256),
// byte 0 = the lane's copy (4 * lane: 32 conflict-free copies in the first 128 bytes of an entry),
// bytes 2-3 = the CTA's cluster-rank bits of the shared window; the table's offset in the window is
// the LDS immediate. One PRMT + one LDS per A register instead of PRMT + IMAD + LDS. That needs the
// table at a compile-time offset: it starts the kernel's shared memory, which is all dynamic
// (kSmemUserBase: the first byte after the 1 KB the hardware reserves per CTA on sm_80+; the kernel
// traps if its table is elsewhere). Bytes 128-255 of each entry hold the kernel's cp.async ring.
struct BytePairTable {
  static constexpr int kBytes = 256 * 256;
  static constexpr uint32_t kSmemUserBase = 0x400;
  // PRMT operand: the window's rank bits (bytes 2-3 of the table address) and the lane's copy
  __device__ static uint32_t lane_bits(uint32_t table_addr, int lane) { return (table_addr & 0xFF000000u) | (4u * lane); }
  // shared byte offset of ring byte o (from the table start): the upper halves of the entries in order
  __device__ static uint32_t ring_offset(uint32_t o) { return ((o >> 7) << 8) + 128 + (o & 127); }
};
// The pair of byte j of w (one A register) from the byte-addressed table.
__device__ __forceinline__ uint32_t lookup_pair_b(uint32_t w, uint32_t lane_bits, int j) {
  const uint32_t addr = prmt(w, lane_bits, 0x7604u | (j << 4));  // (4 * lane, byte j of w, rank bits)
  uint32_t v;
  asm volatile("ld.shared.b32 %0, [%1+%2];" : "=r"(v) : "r"(addr), "n"(BytePairTable::kSmemUserBase));
  return v;
}
template <int S>
__device__ __forceinline__ void decode_pair_b(uint32_t w, uint32_t lane_bits, uint32_t a[4]) {
#pragma unroll
  for (int j = 0; j < 4; ++j) a[j] = lookup_pair_b(w, lane_bits, j);
}

// The kernel-layout byte tables (words 0-7) in registers, for building the shared tables.
struct TableRegs {
  uint4 lo, hi;
  __device__ explicit TableRegs(const uint32_t* tp)
      : lo(__ldg(reinterpret_cast<const uint4*>(tp))), hi(__ldg(reinterpret_cast<const uint4*>(tp) + 1)) {}
  // the 16-bit value of entry i (< 16): byte i of the low and of the high byte table
  __device__ uint32_t u16(uint32_t i) const { return byte_of(lo, i) | (byte_of(hi, i) << 8); }
  __device__ static uint32_t byte_of(const uint4& v, uint32_t i) {
    const uint32_t a = prmt(v.x, v.y, i & 7), b = prmt(v.z, v.w, i & 7);
    return ((i & 8) ? b : a) & 0xFFu;
  }
};

// Builds the pair table with all threads of the CTA from one kernel-layout table. Consecutive
// threads write consecutive 16-byte pieces (4 copies of one entry each), so a warp's stores are
// conflict-free (v10 wrote all copies of an entry from one thread: ncu counted 88% of the build's
// store wavefronts as bank conflicts; v11's build is 3-13% faster end to end at M = 1). The caller
// puts a barrier between this and the first lookup.
template <int COPIES>
__device__ __forceinline__ void build_pair_table(uint32_t* s_pair, const uint32_t* tp) {
  constexpr int kPieces = COPIES / 4;  // 16-byte pieces per entry
  const TableRegs tr(tp);
  for (int j = threadIdx.x; j < 256 * kPieces; j += blockDim.x) {
    const uint32_t e = j / kPieces;
    const uint32_t pair = tr.u16(e & 15) | (tr.u16(e >> 4) << 16);
    reinterpret_cast<uint4*>(s_pair)[j] = make_uint4(pair, pair, pair, pair);
  }
}

// Builds the byte-addressed pair table (copies 0-31 of each 256-byte entry), as build_pair_table.
__device__ __forceinline__ void build_byte_pair_table(uint32_t* s_pair, const uint32_t* tp) {
  const TableRegs tr(tp);
  for (int j = threadIdx.x; j < 256 * 8; j += blockDim.x) {
    const uint32_t e = j >> 3;
    const uint32_t pair = tr.u16(e & 15) | (tr.u16(e >> 4) << 16);
    reinterpret_cast<uint4*>(s_pair)[e * 16 + (j & 7)] = make_uint4(pair, pair, pair, pair);
  }
}

// The 2-bit quad table (an experiment, FLUTE_LUT_W2_QUAD_STEPS in flute_gemm.cu): in the 2-bit
// layout, byte j of a step's 16-bit half holds elements (j, j+4 | j+1, j+5) at bits (0-1, 2-3 |
// 4-5, 6-7) for j = 0, 2, ... i.e. byte 0 = (e0, e4, e1, e5) -> a[0] = (e0, e1), a[2] = (e4, e5) and
// byte 1 = (e2, e6, e3, e7) -> a[1], a[3]. Entry v -> {a_lo, a_hi} as 8 bytes, so one 64-bit
// shared load decodes 4 weights into 2 A registers. 16 copies (copy = lane & 15, 32 KB): a
// half-warp's 8-byte lookups are conflict-free.
struct QuadTable {
  static constexpr int kCopies = 16;
  static constexpr int kBytes = 256 * kCopies * 8;
  static constexpr uint32_t kEntryBytes = 8 * kCopies;
  __device__ static uint32_t lane_offset(int lane) { return 8u * (uint32_t)(lane & (kCopies - 1)); }
};

__device__ __forceinline__ void build_quad_table(uint32_t* s_quad, const uint32_t* tp) {
  constexpr int kPieces = QuadTable::kCopies / 2;  // 16-byte pieces (2 copies) per entry; conflict-free as above
  const TableRegs tr(tp);
  for (int j = threadIdx.x; j < 256 * kPieces; j += blockDim.x) {
    const uint32_t e = j / kPieces;
    const uint32_t lo = tr.u16(e & 3) | (tr.u16((e >> 4) & 3) << 16);         // (e0, e1)
    const uint32_t hi = tr.u16((e >> 2) & 3) | (tr.u16((e >> 6) & 3) << 16);  // (e4, e5)
    reinterpret_cast<uint4*>(s_quad)[j] = make_uint4(lo, hi, lo, hi);
  }
}

// 2-bit decode of k-step S through the quad table: w = the lane's word of steps 2(S>>1), 2(S>>1)+1.
template <int S>
__device__ __forceinline__ void decode_quad(uint32_t w, uint32_t quad_lane, uint32_t a[4]) {
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const uint32_t idx = prmt(w, 0u, 0x4440u | (2 * (S & 1) + j));
    asm volatile("ld.shared.v2.b32 {%0, %1}, [%2];" : "=r"(a[j]), "=r"(a[j + 2]) : "r"(idx * QuadTable::kEntryBytes + quad_lane));
  }
}

// Mixed 4-bit decode (v6): a[0], a[1] through the pair table, a[2], a[3] by byte permutes in
// registers. Moves work from the L1/shared-memory pipe (90% busy at M=1 in ncu, the pair-table
// loads have 2-way bank conflicts) to the ALU pipe, which has headroom.
__device__ __forceinline__ void decode_high_regs(uint32_t w, const ByteTable& tb, uint32_t a[4]);

template <int COPIES>
__device__ __forceinline__ void decode_mixed(uint32_t w, uint32_t pair_lane, const ByteTable& tb, uint32_t a[4]) {
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const uint32_t idx = prmt(w, 0u, 0x4440u | j);
    asm volatile("ld.shared.b32 %0, [%1];" : "=r"(a[j]) : "r"(idx * PairTable<COPIES>::kEntryBytes + pair_lane));
  }
  decode_high_regs(w, tb, a);
}

// decode_mixed's register half: a[2], a[3] by byte permutes.
__device__ __forceinline__ void decode_high_regs(uint32_t w, const ByteTable& tb, uint32_t a[4]) {
  const uint32_t ch = (w & 0x77777777u) >> 16;
  const uint32_t m = prmt(w << 4, w, 0xFBEA);
  const uint32_t la = prmt(tb.lo[0], tb.lo[1], ch), lb = prmt(tb.lo[2], tb.lo[3], ch);
  const uint32_t ha = prmt(tb.hi[0], tb.hi[1], ch), hb = prmt(tb.hi[2], tb.hi[3], ch);
  interleave((la & ~m) | (lb & m), (ha & ~m) | (hb & m), a[2], a[3]);
}

// Index of element i (0..7) of k-step s from a lane's fragment (used by the dequant kernel).
template <int BITS>
__device__ __forceinline__ int frag_index(const Frag<BITS>& f, int s, int i) {
  if constexpr (BITS == 4) {
    return (f.w[s] >> (4 * i)) & 15;
  } else {
    const uint32_t wl = f.w[s >> 1] >> (16 * (s & 1));
    const int pos = (i < 4) ? 4 * i : 4 * (i - 4) + 2;
    int v = (wl >> pos) & 3;
    if constexpr (BITS == 3) v |= ((msb_nibbles(f.w[2], 2 * s + (i >> 2)) >> (4 * (i & 3) + 2)) & 1) << 2;
    return v;
  }
}

}  // namespace
}  // namespace flute
