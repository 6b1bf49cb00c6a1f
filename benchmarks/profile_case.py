"""One launch per (shape, M) of the op's chosen path (or a forced one), for Nsight Compute.

    ncu --clock-control none --section SpeedOfLight --section WarpStateStats -k regex:lut_ \\
        python3 benchmarks/profile_case.py --shapes 8B-gate_up --ms 64,4096 [--path tc]

``--humming``: the same cases with humming-kernels' uniform int4 (its heuristic kernel choice, fp16,
same G; ``benchmarks/humming_int4.py``) instead, to read its counters next to ours
(``-k regex:humming``).

Warm-up calls run before the profiled ones (use ``--launch-skip`` in ncu to skip them).
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kernel import SHAPES  # noqa: E402

from flute_vllm import cuda_op  # noqa: E402
from flute_vllm.timing import Layer  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="8B-gate_up")
    ap.add_argument("--ms", default="64,4096")
    ap.add_argument("--path", default=None, choices=[None, "lut", "tc", "dense"])
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--block-m", type=int, default=None, choices=cuda_op.TC_BLOCK_MS,
                    help="tensor-core path: activation rows per CTA (default: the config's tc_block_m)")
    ap.add_argument("--stream-k", type=int, default=-1, choices=[-1, 0, 1],
                    help="tensor-core path: stream-K (1) or split-K (0) plan (-1: the config's rule)")
    ap.add_argument("--humming", action="store_true", help="profile humming-kernels' int4 GEMM instead (W4 only)")
    args = ap.parse_args(argv)
    if args.humming:
        return profile_humming(args)
    for name in args.shapes.split(","):
        n, k = SHAPES[name]
        q, s, t = Layer(n, k, args.bits, args.group_size, torch.float16).copies[0]
        for m in (int(v) for v in args.ms.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            cuda_op.gemm(x, q, s, t, args.bits, args.group_size, force_path=args.path, block_m=args.block_m,
                         stream_k=None if args.stream_k < 0 else bool(args.stream_k))
            torch.cuda.synchronize()
            print(f"{name} M={m} path={args.path or 'auto'}", flush=True)


def profile_humming(args):
    from humming_int4 import HummingLayer, humming_import_error
    err = humming_import_error()
    if err:
        raise SystemExit(f"humming unavailable: {err}")
    if args.bits != 4:
        raise SystemExit(f"--humming: humming's baseline is uniform int4, not --bits {args.bits}")
    ms = [int(v) for v in args.ms.split(",")]
    for name in args.shapes.split(","):
        n, k = SHAPES[name]
        layer = HummingLayer(n, k, args.group_size, torch.float16, ms)
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            layer.forward(x)
            torch.cuda.synchronize()
            print(f"{name} M={m} humming", flush=True)


if __name__ == "__main__":
    main()
