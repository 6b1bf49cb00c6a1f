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
