"""kernels/flute_dispatch.h (the launchers' runtime value -> template argument helper), compiled
with the host C++ compiler: every listed value reaches its own instantiation, others the fallback."""
import shutil
import subprocess

import pytest

from flute_vllm import _build

PROGRAM = r"""
#include <cstdio>
#include "flute_dispatch.h"
template <int B, int MT> int code() { return 100 * B + MT; }
int main() {
  int bad = 0;
  const int bits[] = {2, 3, 4}, mts[] = {1, 2, 4, 8};
  for (int b : bits)
    for (int mt : mts) {
      const int got = flute::with_int<2, 3, 4>(b, -1, [&](auto cb) {
        return flute::with_int<1, 2, 4, 8>(mt, -2, [&](auto cm) { return code<decltype(cb)::value, decltype(cm)::value>(); });
      });
      if (got != 100 * b + mt) { std::printf("bits=%d mt=%d -> %d\n", b, mt, got); ++bad; }
    }
  if (flute::with_int<2, 3, 4>(5, -1, [](auto) { return 0; }) != -1) { std::puts("bits=5 not refused"); ++bad; }
  if (flute::with_int<1, 2, 4, 8>(3, -2, [](auto) { return 0; }) != -2) { std::puts("mt=3 not refused"); ++bad; }
  int calls = 0;
  flute::with_int<64, 128, 256>(128, 0, [&](auto) { return ++calls; });
  if (calls != 1) { std::printf("%d calls for one match\n", calls); ++bad; }
  return bad;
}
"""


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to compile the host-side dispatch test")
def test_with_int_dispatches_each_value_once_cpu(tmp_path):
    src = tmp_path / "dispatch_test.cpp"
    src.write_text(PROGRAM)
    exe = tmp_path / "dispatch_test"
    subprocess.run(["g++", "-std=c++17", "-O1", "-I", str(_build.KERNEL_DIR), str(src), "-o", str(exe)], check=True,
                   capture_output=True)
    res = subprocess.run([str(exe)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout


K_SLICES_PROGRAM = r"""
#include <cstdio>
#include <initializer_list>
#include "flute_kernel.h"
int main() {
  for (int bits = 2; bits <= 4; ++bits)
    for (int mt : {1, 2, 4, 8})
      for (int warps : {4, 8})
        for (int xa = 0; xa <= 1; ++xa)
          for (int ks = 0; ks <= 9; ++ks)
            std::printf("%d %d %d %d %d %d %d\n", bits, mt, warps, xa, ks, flute::gemm_k_slices_ok(bits, mt, warps, xa, ks),
                        flute::gemm_k_slices_ok(bits, mt, warps, xa, ks) ? flute::gemm_grid_x(6144, mt, warps, ks) : 0);
  return 0;
}
"""


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to compile the host-side header test")
def test_k_slices_rule_matches_the_header_cpu(tmp_path):
    """cuda_op.k_slices_ok (the Python mirror) and the grid along N with K slices agree with
    kernels/flute_kernel.h's gemm_k_slices_ok / gemm_grid_x for every (bits, m_tiles, warps, x_ahead,
    k_slices); the header is compiled with the host compiler against a stub cuda_runtime.h."""
    from flute_vllm import cuda_op

    (tmp_path / "cuda_runtime.h").write_text("typedef int cudaError_t;\ntypedef struct CUstream_st* cudaStream_t;\n")
    src = tmp_path / "k_slices.cpp"
    src.write_text(K_SLICES_PROGRAM)
    exe = tmp_path / "k_slices"
    subprocess.run(["g++", "-std=c++17", "-O1", "-I", str(tmp_path), "-I", str(_build.KERNEL_DIR), str(src), "-o",
                    str(exe)], check=True, capture_output=True)
    lines = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.split("\n")
    rows = [tuple(int(v) for v in line.split()) for line in lines if line]
    assert len(rows) == 3 * 4 * 2 * 2 * 10
    for bits, mt, warps, xa, ks, ok, grid_x in rows:
        assert cuda_op.k_slices_ok(bits, mt, warps, xa, ks) == bool(ok), (bits, mt, warps, xa, ks)
        if ok:
            assert grid_x == -(-6144 // (cuda_op.rows_per_cta(mt, warps) // ks)), (bits, mt, warps, ks)
    assert sum(r[5] for r in rows if r[4] > 1) > 0  # some kernels do slice
