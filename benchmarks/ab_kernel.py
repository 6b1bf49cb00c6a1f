"""A/B timing of kernel build variants in one GPU session (for kernel work on a tight GPU budget).

A variant is a name and a set of nvcc flags, normally the ``FLUTE_LUT_*`` knobs at the top of
``kernels/flute_gemm.cu``. Every variant is built into its own cache entry (``FLUTE_VLLM_NVCC_FLAGS``
is part of the build key), all builds at once, then each is timed in a fresh process with the
method of ``benchmarks/kernel.py`` (one CUDA graph of many calls, L2 defeated by rotating weight
copies) on the same shapes, Ms and path, with cuBLAS timed in the same process as a yardstick.
Prints µs per case and variant, and the geo-mean time ratio of each variant to the first one.

    python benchmarks/ab_kernel.py -v base= -v s8=-DFLUTE_LUT_STAGES=8 -v mix=-DFLUTE_LUT_MIXED_MIN_MT=1 \\
        --ms 1,16 --bits 4 --out /tmp/ab.json

A variant's flags may also name another copy of ``kernels/`` with ``--src=DIR`` (``-v old=--src=out/v17``):
that variant builds from DIR (``$FLUTE_VLLM_KERNEL_DIR``), e.g. the last commit's kernels against a
restructured working tree that no flag can switch (``mkdir -p out/v17 && git archive HEAD kernels | tar -x -C out/v17 --strip-components 1``;
the binding's interface must match this tree's Python side; carry DIR to the GPU machine).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

# kernel.py puts the repo root on sys.path (this folder is on it already: the script's, or the tests')
from kernel import FULL, SHAPES  # noqa: E402

from flute_vllm import _build, cuda_op  # noqa: E402
from flute_vllm.timing import Layer, dense_copies, time_graph  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


REL_ERR_MAX = 1e-2  # vs the fp32 dequantize + matmul of the same weights (fp16/bf16 rounding is ~1e-3)


VARIANT_OPTIONS = {"4": ("--warps", "4"), "8": ("--warps", "8"), "xa0": ("--x-ahead", "0"), "xa1": ("--x-ahead", "1"),
                   **{f"ks{s}": ("--k-slices", str(s)) for s in cuda_op.K_SLICES},
                   **{p: ("--path", p) for p in ("lut", "tc", "dense")},
                   **{f"bm{b}": ("--block-m", str(b)) for b in cuda_op.TC_BLOCK_MS},
                   "sk0": ("--stream-k", "0"), "sk1": ("--stream-k", "1")}


def parse_variant(spec: str) -> tuple[str, str]:
    """``"name=flags"`` -> (name, flags); flags may be empty (the shipped build). The name may end
    in ``@OPT[,OPT]``: launch options of that variant (see :func:`variant_args`)."""
    name, sep, flags = spec.partition("=")
    base, at, opts = name.strip().partition("@")
    if (not sep or not base or not base.replace("_", "").replace("-", "").isalnum()
            or (at and not all(o in VARIANT_OPTIONS for o in opts.split(",")))):
        raise ValueError(f"--variant {spec!r}: use NAME=FLAGS or NAME@OPTS=FLAGS (OPTS: comma-separated "
                         f"{', '.join(VARIANT_OPTIONS)}), e.g. s8=-DFLUTE_LUT_STAGES=8 or xa@xa1= (FLAGS may be empty)")
    return name.strip(), flags.strip()


def split_src(flags: str) -> tuple[str, str]:
    """``"--src=DIR -DX=1"`` -> (``"-DX=1"``, absolute DIR): the nvcc flags and the kernel source directory
    of a variant ("" for this tree's kernels/)."""
    toks = flags.split()
    srcs = [t[len("--src="):] for t in toks if t.startswith("--src=")]
    if len(srcs) > 1 or any(not s for s in srcs):
        raise ValueError(f"--variant flags {flags!r}: at most one --src=DIR")
    src = str((ROOT / srcs[0]).resolve()) if srcs else ""
    return " ".join(t for t in toks if not t.startswith("--src=")), src


def variant_args(name: str, args) -> list[str]:
    """The worker's launch options for a variant: its ``@`` suffix (4 / 8: LUT-kernel CTA width;
    xa0 / xa1: the x-ahead variant, cuda_op.x_ahead_for; lut / tc / dense: the path; bm8 ... bm256:
    the tensor-core path's block_m; ks1 ... ks8: the LUT kernel's K slices per CTA; sk0 / sk1: the
    tensor-core path's split-K or stream-K plan), else ``--warps`` / ``--x-ahead`` / ``--path`` /
    ``--block-m`` / ``--k-slices`` / ``--stream-k``."""
    opts = {"--warps": str(args.warps), "--x-ahead": str(args.x_ahead), "--path": args.path,
            "--block-m": str(args.block_m), "--k-slices": str(args.k_slices), "--stream-k": str(args.stream_k)}
    _, at, suffix = name.partition("@")
    for o in suffix.split(",") if at else []:
        flag, value = VARIANT_OPTIONS[o]
        opts[flag] = value
    return [item for kv in opts.items() for item in kv]


def summarize(results: dict[str, list[dict]]) -> str:
    """Markdown: µs per (shape, M) for each variant (+ cuBLAS of the first), then the geo-mean
    time ratio of every variant to the first over the cases both have."""
    names = list(results)
    base = {(r["shape"], r["M"]): r for r in results[names[0]]}
    lines = ["| shape | M | cuBLAS | " + " | ".join(names) + " |", "|---|---|---|" + "---|" * len(names)]
    by = {n: {(r["shape"], r["M"]): r for r in results[n]} for n in names}
    for key, r0 in base.items():
        cells = [f"{by[n][key]['us']:.1f}" if key in by[n] else "" for n in names]
        lines.append(f"| {key[0]} | {key[1]} | {r0['cublas_us']:.1f} | " + " | ".join(cells) + " |")
    lines += ["", "| variant | flags | geo-mean time vs " + names[0] + " | geo-mean speedup vs cuBLAS | worst rel. err |",
              "|---|---|---|---|---|"]
    for n in names:
        common = [k for k in base if k in by[n]]
        if not common:
            lines.append(f"| {n} | {results[n][0]['flags'] if results[n] else ''} | (no results) | | |")
            continue
        ratio = statistics.geometric_mean([by[n][k]["us"] / base[k]["us"] for k in common])
        vs_cublas = statistics.geometric_mean([by[n][k]["cublas_us"] / by[n][k]["us"] for k in common])
        worst = max(by[n][k]["rel_err"] for k in common)
        flag = " WRONG" if worst > REL_ERR_MAX else ""
        lines.append(f"| {n} | `{by[n][common[0]]['flags'] or '(shipped)'}` | {ratio:.3f} | {vs_cublas:.2f}x | "
                     f"{worst:.1e}{flag} |")
    return "\n".join(lines) + "\n"


def worker(args) -> None:
    """Time the current build (this process's FLUTE_VLLM_NVCC_FLAGS); one JSON line per case."""
    dtype = getattr(torch, args.dtype)
    flags = os.environ.get("FLUTE_VLLM_NVCC_FLAGS", "")
    if os.environ.get("FLUTE_VLLM_KERNEL_DIR"):  # (a --src=DIR variant: say so in its records)
        flags = f"--src={os.environ['FLUTE_VLLM_KERNEL_DIR']} {flags}".strip()
    for name in args.shapes.split(","):
        n, k = SHAPES[name]
        layer = Layer(n, k, args.bits, args.group_size, dtype)
        dense = dense_copies(n, k, dtype)
        for m in (int(v) for v in args.ms.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            # a variant is only worth its time if it is right: vs dequantize + matmul (separate kernel)
            q, sc, tb = layer.copies[0]
            kw = dict(force_path=args.path, warps=args.warps or None, x_ahead=None if args.x_ahead < 0 else args.x_ahead,
                      block_m=args.block_m or None, k_slices=args.k_slices or None,
                      stream_k=None if args.stream_k < 0 else bool(args.stream_k),
                      slab_bytes=None if args.slab_bytes < 0 else args.slab_bytes)
            got = cuda_op.gemm(x, q, sc, tb, args.bits, args.group_size, **kw).float()
            w = cuda_op.dequantize_kernel_layout(q, sc, tb, args.bits, args.group_size, k).float()
            ref = x.float() @ w.T
            del w
            rel_err = ((got - ref).norm() / ref.norm()).item()
            us = time_graph([lambda c=c: cuda_op.gemm(x, c[0], c[1], c[2], args.bits, args.group_size, **kw)
                             for c in layer.copies], 200)
            cublas = time_graph([lambda w=w: F.linear(x, w) for w in dense], 200)
            print(json.dumps(dict(shape=name, N=n, K=k, M=m, us=round(us, 3), cublas_us=round(cublas, 3),
                                  rel_err=float(f"{rel_err:.2e}"),
                                  flags=flags, bits=args.bits, group_size=args.group_size, dtype=args.dtype,
                                  path=args.path, warps=args.warps, x_ahead=args.x_ahead, block_m=args.block_m,
                                  k_slices=args.k_slices, stream_k=args.stream_k,
                                  slab_bytes=args.slab_bytes)), flush=True)
        del layer, dense
        torch.cuda.empty_cache()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-v", "--variant", action="append", default=[],
                    help="NAME=NVCC_FLAGS (repeat; first = baseline); NAME@8=... times that variant with 8-warp "
                         "CTAs, NAME@xa1=... with the x-ahead kernel variant (NAME@8,xa1=...: both), NAME@tc,bm32=... on the "
                         "tensor-core path with block_m 32")
    ap.add_argument("--shapes", default=",".join(FULL), help="kernel.py shape names (TP slices: NAME/tp2)")
    ap.add_argument("--ms", default="1,16")
    ap.add_argument("--bits", type=int, default=4, choices=[2, 3, 4])
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    ap.add_argument("--path", default="lut", choices=["lut", "tc", "dense"], help="kernel path to force")
    ap.add_argument("--warps", type=int, default=0, choices=[0, 4, 8],
                    help="LUT kernel CTA width for every variant without an @WARPS suffix (0: the op's choice, "
                         "cuda_op.warps_for)")
    ap.add_argument("--block-m", type=int, default=0, choices=[0, *cuda_op.TC_BLOCK_MS],
                    help="tensor-core path: activation rows per CTA for every variant without an @bm suffix "
                         "(0: the config's tc_block_m)")
    ap.add_argument("--x-ahead", type=int, default=-1, choices=[-1, 0, 1],
                    help="x-ahead kernel variant for every variant without an @xa suffix, where the kernel has "
                         "one (-1: the op's choice, cuda_op.x_ahead_for)")
    ap.add_argument("--k-slices", type=int, default=0, choices=[0, *cuda_op.K_SLICES],
                    help="LUT kernel: K slices per CTA for every variant without an @ks suffix (0: the op's "
                         "choice, cuda_op.plan)")
    ap.add_argument("--stream-k", type=int, default=-1, choices=[-1, 0, 1],
                    help="tensor-core path: stream-K (1) or split-K (0) plans for every variant without an @sk "
                         "suffix (-1: the config's tc_stream_k)")
    ap.add_argument("--slab-bytes", type=int, default=-1,
                    help="dense path: dequantize by row slabs of at most this many bytes (0: whole matrix; "
                         "-1: the config's dense_slab_bytes)")
    ap.add_argument("--out", default="", help="write all results as JSON here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for s in args.shapes.split(","):
        if s not in SHAPES:
            ap.error(f"--shapes: unknown shape {s!r} (choose from {', '.join(SHAPES)})")
    if args.worker:
        worker(args)
        return {}
    try:
        variants = [parse_variant(v) for v in (args.variant or ["shipped="])]
    except ValueError as e:
        ap.error(str(e))
    if len({n for n, _ in variants}) != len(variants):
        ap.error("--variant: names must differ")

    if not torch.cuda.is_available():
        raise SystemExit("ab_kernel needs a CUDA GPU (none visible)")
    arch = _build.device_arch()
    env_of = {}
    for n, f in variants:
        nvcc, src = split_src(f)
        if src and not (Path(src) / "flute_gemm.cu").is_file():
            ap.error(f"--variant {n}: --src={src} has no flute_gemm.cu (a copy of kernels/ is expected)")
        env_of[n] = {**os.environ, "FLUTE_VLLM_NVCC_FLAGS": nvcc}
        if src:
            env_of[n]["FLUTE_VLLM_KERNEL_DIR"] = src
        else:
            env_of[n].pop("FLUTE_VLLM_KERNEL_DIR", None)
    # one build per distinct flag set (variants that differ only in launch options share it)
    first_of = {}
    for n, f in variants:
        first_of.setdefault(f, n)
    builds = {f: subprocess.Popen([sys.executable, "-m", "flute_vllm._build", "--arch", arch], cwd=ROOT,
                                  env=env_of[n], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
              for f, n in first_of.items()}
    failed = []
    for f, proc in builds.items():
        out, _ = proc.communicate()
        print(f"[build {first_of[f]}] {out.strip().splitlines()[-1] if out.strip() else ''}", flush=True)
        if proc.returncode != 0:
            print(out[-3000:], flush=True)
            failed += [n for n, g in variants if g == f]
    results: dict[str, list[dict]] = {}
    passthrough = ["--shapes", args.shapes, "--ms", args.ms, "--bits", str(args.bits), "--group-size",
                   str(args.group_size), "--dtype", args.dtype, "--slab-bytes", str(args.slab_bytes)]
    for n, _ in variants:
        if n in failed:
            results[n] = []
            continue
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", *passthrough,
                               *variant_args(n, args)], cwd=ROOT,
                              env=env_of[n], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        results[n] = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0:
            print(f"[time {n}] failed:\n{proc.stderr[-3000:]}", flush=True)
        print(f"[time {n}] {len(results[n])} cases", flush=True)
    if not results[variants[0][0]]:
        raise SystemExit(f"baseline variant {variants[0][0]!r} produced no results")
    print(summarize(results))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
