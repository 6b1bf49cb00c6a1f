// Thin torch binding of the torch-free launch API (flute_kernel.h). All argument validation with
// readable messages happens in flute_vllm/cuda_op.py before these are called; the checks here guard
// memory safety (ValueError through FLUTE_CHECK below). Launches go to the current CUDA stream:
// capture-safe, no allocation, no sync.
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <stdexcept>
#include <string>
#include <type_traits>

#include "flute_kernel.h"

namespace {

// Errors are raised by pybind11 inside this module: bad arguments as ValueError, failed launches as
// RuntimeError, each message starting "flute: ". Messages are built with std::to_string and string
// appends only: on the H200 image (torch 2.11.0+cu130, this file JIT-built by g++ 13.3) formatting a
// number through an std::ostream (TORCH_CHECK's c10::str, std::ostringstream) killed the process
// with SIGSEGV, while plain strings and std::to_string worked (v20 probe).
inline void append(std::string& s, const char* v) { s += v; }
inline void append(std::string& s, const std::string& v) { s += v; }
inline void append(std::string& s, c10::ScalarType v) { s += c10::toString(v); }
template <typename V, typename = std::enable_if_t<std::is_arithmetic_v<V>>>
void append(std::string& s, V v) { s += std::to_string(v); }
template <typename E, typename... Args>
[[noreturn]] void throw_error(const Args&... args) {
  std::string msg = "flute: ";
  (append(msg, args), ...);
  throw E(msg);
}
#define FLUTE_CHECK(cond, ...) \
  do {                         \
    if (!(cond)) throw_error<pybind11::value_error>(__VA_ARGS__); \
  } while (0)
#define FLUTE_CHECK_CUDA(err, ...) \
  do {                             \
    if ((err) != cudaSuccess) throw_error<std::runtime_error>(__VA_ARGS__); \
  } while (0)

flute::DType dtype_of(const torch::Tensor& t) {
  switch (t.scalar_type()) {
    case torch::kFloat16: return flute::DType::kF16;
    case torch::kBFloat16: return flute::DType::kBF16;
    case torch::kFloat32: return flute::DType::kF32;
    default: throw_error<pybind11::value_error>("unsupported dtype ", t.scalar_type());
  }
}

void check_cuda(const torch::Tensor& t, const char* name) {
  FLUTE_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  FLUTE_CHECK(t.is_contiguous(), name, " must be contiguous");
  FLUTE_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, name, " must be 16-byte aligned");
}

// Shared checks of the GEMM entry points and their launch parameters. x is [M, K] (or, for the
// tensor-core path, [M, Kp] permuted). workspace_floats / counter_slots: what the launch needs of the
// fp32 workspace and the int32 counters (0 when it uses none: they may then be empty).
flute::GemmParams gemm_params(const torch::Tensor& x, int64_t K, const torch::Tensor& qweight,
                              const torch::Tensor& scales, const torch::Tensor& tables, torch::Tensor& out,
                              torch::Tensor& workspace, torch::Tensor& counters, int64_t bits, int64_t group_size,
                              int64_t splits, int64_t chunks_per_split, int64_t m_tiles, int64_t workspace_floats,
                              int64_t counter_slots) {
  check_cuda(x, "x");
  check_cuda(qweight, "qweight");
  check_cuda(scales, "scales");
  check_cuda(tables, "tables");
  check_cuda(out, "out");
  const int64_t M = x.size(0), N = out.size(1);
  FLUTE_CHECK(out.size(0) == M, "out rows");
  FLUTE_CHECK(qweight.numel() * 32 == N * ((K + 63) / 64 * 64) * bits, "qweight size");
  FLUTE_CHECK(scales.numel() == N * (K / group_size), "scales size");
  FLUTE_CHECK(tables.numel() == (N / 16) * flute::kTableWords, "tables size");
  const bool reduces = workspace_floats > 0;  // split-K or stream-K: partials + arrival counters
  if (reduces) {
    check_cuda(workspace, "workspace");
    check_cuda(counters, "counters");
    FLUTE_CHECK(workspace.numel() >= workspace_floats, "workspace too small: ", workspace.numel(),
                " floats, the launch needs ", workspace_floats);
    FLUTE_CHECK(counters.numel() >= counter_slots, "counters too small: ", counters.numel(),
                " ints, the launch needs ", counter_slots);
  }
  flute::GemmParams p{};
  p.x = x.data_ptr();
  p.qweight = reinterpret_cast<const uint32_t*>(qweight.data_ptr());
  p.scales = scales.data_ptr();
  p.tables = reinterpret_cast<const uint32_t*>(tables.data_ptr());
  p.out = out.data_ptr();
  p.workspace = reduces ? workspace.data_ptr<float>() : nullptr;
  p.counters = reduces ? counters.data_ptr<int>() : nullptr;
  p.M = (int)M; p.N = (int)N; p.K = (int)K;
  p.bits = (int)bits; p.group_size = (int)group_size;
  p.splits = (int)splits; p.chunks_per_split = (int)chunks_per_split; p.m_tiles = (int)m_tiles;
  p.dtype = dtype_of(x);
  p.k_slices = 1;
  return p;
}

// out[M, N] = x @ W^T, mma.sync kernel (m_tiles 8-row activation tiles per CTA).
void gemm(const torch::Tensor& x, const torch::Tensor& qweight, const torch::Tensor& scales,
          const torch::Tensor& tables, torch::Tensor& out, torch::Tensor& workspace, torch::Tensor& counters,
          int64_t bits, int64_t group_size, int64_t splits, int64_t chunks_per_split, int64_t m_tiles,
          int64_t warps, int64_t x_ahead, int64_t k_slices) {
  FLUTE_CHECK(warps == flute::kWarpsPerCta || (warps == flute::kWideWarpsPerCta && flute::gemm_wide_ok((int)m_tiles)),
              "warps=", warps, " must be ", flute::kWarpsPerCta, ", or ", flute::kWideWarpsPerCta,
              " with m_tiles <= ", FLUTE_LUT_WIDE_MAX_MT);
  FLUTE_CHECK(flute::gemm_k_slices_ok((int)bits, (int)m_tiles, (int)warps, (int)x_ahead, (int)k_slices),
              "k_slices=", k_slices, " is not built for bits=", bits, ", m_tiles=", m_tiles, ", warps=", warps,
              ", x_ahead=", x_ahead, " (1, or 2 / 4 / 8 <= warps with m_tiles <= bits: flute_kernel.h gemm_k_slices_ok)");
  const int64_t M = x.size(0), N = out.size(1);
  const int64_t m_chunks = flute::gemm_m_chunks((int)M, (int)m_tiles);
  flute::GemmParams p = gemm_params(x, x.size(1), qweight, scales, tables, out, workspace, counters, bits,
                                    group_size, splits, chunks_per_split, m_tiles,
                                    splits > 1 ? m_chunks * splits * 8 * m_tiles * N : 0,
                                    m_chunks * flute::gemm_grid_x((int)N, (int)m_tiles, (int)warps, (int)k_slices));
  p.warps = (int)warps;
  p.k_slices = (int)k_slices;
  p.x_ahead = (int)x_ahead;
  const at::cuda::CUDAGuard guard(x.device());
  const cudaError_t err = flute::launch_gemm(p, at::cuda::getCurrentCUDAStream());
  FLUTE_CHECK_CUDA(err, "gemm launch failed: ", cudaGetErrorString(err));
}

// The tensor-core entry points' shared checks and launch. x is [M, K] when the kernel gathers the
// K order itself (gathers), else permuted to the kernel layout, [M, K rounded up to 64].
void check_wgmma_x(const torch::Tensor& x, int64_t K, bool gathers) {
  FLUTE_CHECK(K % 32 == 0, "K must be a multiple of 32");
  if (gathers) {
    FLUTE_CHECK(x.size(1) == K, "at block_m <= ", flute::kWgmmaGatherMaxRows, " x must be [M, K], not permuted");
  } else {
    FLUTE_CHECK(x.size(1) == (K + 63) / 64 * 64, "x_perm must be [M, K rounded up to 64]");
  }
}
void check_wgmma_supported() {
  FLUTE_CHECK(flute::wgmma_supported(),
              "the tensor-core path needs an sm_90 GPU, an sm_90a build and a driver with cuTensorMapEncodeTiled");
}
void launch_wgmma_or_raise(const flute::GemmParams& p) {
  const char* step = "";
  const cudaError_t err = flute::launch_gemm_wgmma(p, at::cuda::getCurrentCUDAStream(), &step);
  FLUTE_CHECK_CUDA(err, "wgmma gemm failed at ", step, ": ", cudaGetErrorString(err));
}

// Tensor-core path (sm_90a): out[M, N] = x @ W^T with x_perm the activations permuted to the kernel
// layout's K order, [M, Kp] (Kp = K rounded up to 64, zero pad), or at block_m <= kWgmmaGatherMaxRows
// x itself, [M, K]; block_m = activation rows per CTA (8-256); workspace fp32 >= splits * M * N when
// splits > 1.
void gemm_wgmma(const torch::Tensor& x_perm, int64_t K, const torch::Tensor& qweight, const torch::Tensor& scales,
                const torch::Tensor& tables, torch::Tensor& out, torch::Tensor& workspace, torch::Tensor& counters,
                int64_t bits, int64_t group_size, int64_t splits, int64_t chunks_per_split, int64_t block_m) {
  const at::cuda::CUDAGuard guard(x_perm.device());  // wgmma_supported() asks the current device
  const int64_t M = x_perm.size(0), N = out.size(1);
  check_wgmma_x(x_perm, K, block_m <= flute::kWgmmaGatherMaxRows);
  FLUTE_CHECK(block_m == 8 || block_m == 16 || block_m == 32 || block_m == 64 || block_m == 128 || block_m == 256,
              "block_m must be 8, 16, 32, 64, 128 or 256");
  check_wgmma_supported();
  const flute::GemmParams p = gemm_params(x_perm, K, qweight, scales, tables, out, workspace, counters, bits,
                                          group_size, splits, chunks_per_split, block_m / 8, splits > 1 ? splits * M * N : 0,
                                          flute::wgmma_grid_x((int)N) * ((M + block_m - 1) / block_m));
  launch_wgmma_or_raise(p);
}

// The same GEMM with the stream-K schedule (block_m 64 or 256; cuda_op.plan_stream_k): sk_ctas
// persistent CTAs, the first sk_dp_tiles output tiles whole, then sk_units K chunks per CTA; workspace
// fp32 >= 2 * sk_ctas * block_m * 128, counters >= kSkFlagBase + 2 * sk_ctas ints, zero on entry.
void gemm_wgmma_sk(const torch::Tensor& x_perm, int64_t K, const torch::Tensor& qweight, const torch::Tensor& scales,
                   const torch::Tensor& tables, torch::Tensor& out, torch::Tensor& workspace, torch::Tensor& counters,
                   int64_t bits, int64_t group_size, int64_t block_m, int64_t sk_ctas, int64_t sk_dp_tiles,
                   int64_t sk_units) {
  const at::cuda::CUDAGuard guard(x_perm.device());
  const int64_t M = x_perm.size(0), N = out.size(1);
  FLUTE_CHECK(block_m == 64 || block_m == 256, "stream-K is built for block_m 64 and 256, not ", block_m);
  check_wgmma_x(x_perm, K, /*gathers=*/false);
  const int64_t nch = (K + 63) / 64, tiles = flute::wgmma_grid_x((int)N) * ((M + block_m - 1) / block_m);
  FLUTE_CHECK(sk_ctas > 0 && sk_units > 0 && sk_dp_tiles >= 0 && sk_dp_tiles <= tiles &&
                  sk_ctas * sk_units >= (tiles - sk_dp_tiles) * nch,
              "stream-K schedule (sk_ctas, sk_dp_tiles, sk_units) does not cover the GEMM");
  FLUTE_CHECK(flute::sk_max_items((int)sk_ctas, (int)sk_dp_tiles, (int)sk_units, (int)nch) <= flute::kSkMaxItems,
              "stream-K schedule gives a CTA more than ", flute::kSkMaxItems, " items");
  check_wgmma_supported();
  // (splits: unused by the stream-K kernel)
  flute::GemmParams p = gemm_params(x_perm, K, qweight, scales, tables, out, workspace, counters, bits, group_size,
                                    1, nch, block_m / 8, 2 * sk_ctas * block_m * flute::kWgmmaRowsPerCta,
                                    flute::kSkFlagBase + 2 * sk_ctas);
  FLUTE_CHECK(tiles - sk_dp_tiles <= flute::kSkFlagBase, "stream-K region too large for the counters");
  p.sk_ctas = (int)sk_ctas;
  p.sk_dp_tiles = (int)sk_dp_tiles;
  p.sk_units = (int)sk_units;
  launch_wgmma_or_raise(p);
}

bool wgmma_supported(int64_t device_index) {
  const c10::cuda::CUDAGuard guard((c10::DeviceIndex)device_index);
  return flute::wgmma_supported();
}

// out[N, K] = dequantized weight in out's dtype.
void dequant(const torch::Tensor& qweight, const torch::Tensor& scales, const torch::Tensor& tables,
             torch::Tensor& out, int64_t bits, int64_t group_size) {
  check_cuda(qweight, "qweight");
  check_cuda(scales, "scales");
  check_cuda(tables, "tables");
  check_cuda(out, "out");
  const int64_t N = out.size(0), K = out.size(1);
  FLUTE_CHECK(qweight.numel() * 32 == N * ((K + 63) / 64 * 64) * bits, "qweight size");
  FLUTE_CHECK(scales.numel() == N * (K / group_size), "scales size");
  FLUTE_CHECK(scales.scalar_type() == out.scalar_type(), "scales dtype must match out");
  const at::cuda::CUDAGuard guard(out.device());
  flute::DequantParams p{};
  p.qweight = reinterpret_cast<const uint32_t*>(qweight.data_ptr());
  p.scales = scales.data_ptr();
  p.tables = reinterpret_cast<const uint32_t*>(tables.data_ptr());
  p.out = out.data_ptr();
  p.N = (int)N; p.K = (int)K; p.bits = (int)bits; p.group_size = (int)group_size;
  p.dtype = dtype_of(out);
  const cudaError_t err = flute::launch_dequant(p, at::cuda::getCurrentCUDAStream());
  FLUTE_CHECK_CUDA(err, "dequant launch failed: ", cudaGetErrorString(err));
}

int64_t ctas_per_sm(int64_t bits, int64_t m_tiles, const std::string& dtype, int64_t warps, int64_t x_ahead) {
  const flute::DType dt = dtype == "bfloat16" ? flute::DType::kBF16 : flute::DType::kF16;
  return flute::gemm_ctas_per_sm((int)bits, (int)m_tiles, dt, (int)warps, (int)x_ahead);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemm", &gemm, "flute LUT-GEMM (kernel layout)");
  m.def("gemm_wgmma", &gemm_wgmma, "flute LUT-GEMM, sm_90a tensor-core path (kernel layout)");
  m.def("gemm_wgmma_sk", &gemm_wgmma_sk, "flute LUT-GEMM, sm_90a tensor-core path, stream-K schedule (kernel layout)");
  m.def("wgmma_ctas_per_sm", [](int64_t bits, int64_t block_m, const std::string& dtype, bool stream_k) {
          return (int64_t)flute::wgmma_ctas_per_sm((int)bits, (int)block_m,
                                                   dtype == "bfloat16" ? flute::DType::kBF16 : flute::DType::kF16, stream_k);
        }, "resident CTAs per SM of the tensor-core kernel for (bits, block_m, dtype, stream_k)");
  m.def("wgmma_supported", &wgmma_supported, "whether the sm_90a tensor-core path runs on this device");
  m.def("wgmma_gather_max_rows", [] { return (int64_t)flute::kWgmmaGatherMaxRows; },
        "largest block_m at which the tensor-core path reads x unpermuted (gathers the K order itself)");
  m.def("dequant", &dequant, "flute dequantize (kernel layout) to dense");
  m.def("ctas_per_sm", &ctas_per_sm, "resident CTAs per SM of the gemm kernel for (bits, m_tiles, dtype, warps, x_ahead)");
  m.def("wide_ok", [](int64_t m_tiles) { return flute::gemm_wide_ok((int)m_tiles); },
        "whether 8-warp CTAs exist for m_tiles in this build (gemm_wide_ok)");
  m.def("x_ahead_variant", [](int64_t bits, int64_t m_tiles, int64_t warps) {
          return flute::gemm_x_ahead_variant((int)bits, (int)m_tiles, (int)warps);
        }, "whether the (bits, m_tiles, warps) kernel has an x-ahead variant (gemm_x_ahead_variant)");
  m.def("rows_per_cta", [](int64_t m_tiles, int64_t warps) { return (int64_t)flute::gemm_rows_per_cta((int)m_tiles, (int)warps); },
        "output rows per CTA of the gemm kernel for (m_tiles, warps) (the launcher's grid along N)");
}
