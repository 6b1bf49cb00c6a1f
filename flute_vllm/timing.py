"""GPU timing shared by the benchmarks, the multi-GPU test and ``autotune``: CUDA-graph timing of
many calls with the L2 defeated by rotating over weight copies (the method in DESIGN.md)."""
from __future__ import annotations

import math
import statistics
import time

import torch

from . import cuda_op


def l2_bytes() -> int:
    """L2 cache size of the current GPU."""
    return getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", 50 * 2**20)


def time_graph(fns, calls_hint: int, replays: int = 7) -> float:
    """Median µs per call of ``fns[i % len(fns)]()`` captured ``calls`` times in one CUDA graph."""
    for f in fns[:2]:
        f()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fns[0]()
    torch.cuda.synchronize()
    est = max(1e-6, time.perf_counter() - t0)
    calls = max(len(fns), min(calls_hint, int(math.ceil(0.02 / est))))
    calls = int(math.ceil(calls / len(fns)) * len(fns))
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls):
            fns[i % len(fns)]()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / calls)
    del g
    return statistics.median(times)


def measure_read_bw() -> float:
    """Bytes/s of a read-only streaming reduction over 4 GiB (the roofline of this GPU)."""
    x = torch.empty(1 << 30, dtype=torch.float32, device="cuda").uniform_()
    best = float("inf")
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        x.sum()
        b.record()
        b.synchronize()
        best = min(best, a.elapsed_time(b) * 1e-3)
    del x
    torch.cuda.empty_cache()
    return (4 << 30) / best


def copies_for(nbytes: int) -> int:
    """Copies of an operand of ``nbytes`` whose rotation exceeds 4x the L2 cache."""
    return max(1, math.ceil(4 * l2_bytes() / max(1, nbytes)))


def dense_copies(n: int, k: int, dtype) -> list[torch.Tensor]:
    """cuBLAS's operand for the same layer: R copies of a random dense [N, K] weight (L2 defeated)."""
    return [torch.randn(n, k, device="cuda").to(dtype) * 0.02
            for _ in range(copies_for(n * k * torch.empty(0, dtype=dtype).element_size()))]


class Layer:
    """R copies of one random quantized layer in the kernel layout."""

    def __init__(self, n, k, bits, g, dtype):
        dev = torch.device("cuda")
        qw = torch.randint(-2**31, 2**31 - 1, (n, k * bits // 32), dtype=torch.int32, device=dev)
        sc = (torch.rand(n, k // g, device=dev) * 0.02 + 0.005).to(dtype)
        tab = torch.randn(1, 2**bits, device=dev)
        q0, s0, t0 = cuda_op.prepare(qw, sc, tab, [n], bits, g)
        del qw
        self.nbytes = q0.numel() * 4 + s0.numel() * s0.element_size()
        r = copies_for(self.nbytes)
        self.copies = [(q0, s0, t0)] + [(q0.clone(), s0.clone(), t0) for _ in range(r - 1)]
        self.n, self.k, self.bits, self.g, self.dtype = n, k, bits, g, dtype
