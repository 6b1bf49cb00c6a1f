"""Kernel benchmark (DESIGN.md "How to benchmark the kernel").

Same process, same run: cuBLAS (``F.linear`` in the record's dtype), torch's int4 tinygemm
(``aten._weight_int4pack_mm``, bf16, W4 only), humming-kernels (``humming``: the int4 GEMM library
vLLM 0.32 ships a backend for; uniform symmetric int4 with the record's group size, fp16 and bf16,
W4 only, converted and called the way vLLM's HummingLinearKernel does, with humming's heuristic
kernel choice), and ours (``flute``: the mma.sync LUT kernel; ``flute_tc``: the sm_90a wgmma
tensor-core kernel, timed at M >= 16 on Hopper; ``flute_dense``: our dequantize + cuBLAS fallback,
timed at M >= 256).

humming is optional: without the ``humming`` package (pip ``humming-kernels``; it JIT-compiles its
kernels with NVRTC) the run prints ``humming unavailable: <reason>`` and records nothing for it. Its
output at M=16 is checked against ``x @ W_dequant.T`` in float32 before a shape is timed.

L2 is defeated by rotating over R weight copies with R x bytes >= 4 x L2; many calls are captured
in one CUDA graph, timed with CUDA events, and the median per-call time of several replays is
reported. Writes ``benchmarks/results/<gpu>.json`` (a list of records) and ``<gpu>.md``.

    python benchmarks/kernel.py             # the full plan (~ a few minutes on an H100)
    python benchmarks/kernel.py --quick     # fp16 W4 g128 only, fewer M (no humming)
    python benchmarks/kernel.py --resume    # go on from a run stopped by a time limit (same --out)

With no network on the GPU machine, carry the wheels (``pip download --no-deps humming-kernels packaging``
into .whl/; humming imports ``packaging`` without declaring it) and
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site:$PYTHONPATH python3 benchmarks/kernel.py --plan full
"""
from __future__ import annotations

import argparse
import functools
import json
import re
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flute_vllm import cuda_op  # noqa: E402
from flute_vllm.timing import Layer, copies_for, dense_copies, measure_read_bw, time_graph  # noqa: E402
from humming_int4 import humming_prepare_run, humming_setup  # noqa: E402

HBM_BW = 3.06e12  # read-only bandwidth of the H100 (DESIGN.md); replaced by a measurement at start
SHAPES = {  # name: (N, K)
    "8B-qkv": (6144, 4096), "8B-o": (4096, 4096), "8B-gate_up": (28672, 4096), "8B-down": (4096, 14336),
    "70B-qkv": (10240, 8192), "70B-o": (8192, 8192), "70B-gate_up": (57344, 8192), "70B-down": (8192, 28672),
}
FULL = list(SHAPES)
for _name in FULL:  # TP=2 slices: column-parallel halves N, row-parallel halves K
    _n, _k = SHAPES[_name]
    SHAPES[_name + "/tp2"] = (_n // 2, _k) if _name.endswith(("qkv", "gate_up")) else (_n, _k // 2)
# The streaming floor (µs) for W4 g128 at M=1 on the H100 (DESIGN.md), full shapes only.
FLOOR_US = dict(zip(FULL, (5.9, 4.5, 20.9, 11.3, 15.4, 12.7, 78.1, 40.0)))
MS = (1, 4, 16, 32, 64, 256, 1024, 4096, 8192)  # 32: batch-32 decode, the wgmma block_m = 32 path


def gpu_name() -> str:
    return torch.cuda.get_device_name()


def bench_shape(name, n, k, dtype, bits, g, ms, kernels, records, gpu, dense_ms=(64, 256, 1024, 4096, 8192)):
    dev = torch.device("cuda")
    layer = Layer(n, k, bits, g, dtype)
    if "cublas" in kernels:
        ws = dense_copies(n, k, dtype)
    tiny = None
    if "tinygemm" in kernels and dtype == torch.bfloat16 and bits == 4 and k % 128 == 0:
        try:
            tb = []
            wbytes = n * k // 2
            for _ in range(copies_for(wbytes)):
                w8 = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=dev)
                wp = torch.ops.aten._convert_weight_to_int4pack(w8, 8)
                sz = torch.rand(k // g, n, 2, device=dev).to(torch.bfloat16)
                tb.append((wp, sz))
            tiny = tb
        except Exception as e:  # noqa: BLE001
            print(f"  tinygemm unavailable: {type(e).__name__}: {e}")
    hum = None
    if "humming" in kernels and bits == 4 and dtype in (torch.float16, torch.bfloat16):
        hum = humming_setup(name, n, k, g, dtype, ms)
    for m in ms:
        x = torch.randn(m, k, device=dev).to(dtype)
        row = dict(gpu=gpu, dtype=str(dtype).split(".")[-1], bits=bits, group_size=g, shape=name, N=n, K=k, M=m)
        results = {}
        if "cublas" in kernels:
            results["cublas"] = time_graph([lambda w=w: F.linear(x, w) for w in ws], 200)
        if tiny is not None:
            results["tinygemm"] = time_graph(
                [lambda wp=wp, sz=sz: torch.ops.aten._weight_int4pack_mm(x, wp, g, sz) for wp, sz in tiny], 200)
        if hum is not None:
            try:
                results["humming"] = time_graph(
                    [lambda i=i, h=hum: h.forward(x, i) for i in range(len(hum.copies))], 200)
            except Exception as e:  # noqa: BLE001
                print(f"  humming unavailable: {type(e).__name__}: {e}", flush=True)
                hum = None
        if "flute" in kernels and (m <= 256 or not cuda_op.tc_available(torch.cuda.current_device())):
            results["flute"] = time_graph(
                [lambda c=c: cuda_op.gemm(x, c[0], c[1], c[2], bits, g, force_path="lut") for c in layer.copies], 200)
        if "flute" in kernels and m >= 16 and cuda_op.tc_available(torch.cuda.current_device()):
            results["flute_tc"] = time_graph(
                [lambda c=c: cuda_op.gemm(x, c[0], c[1], c[2], bits, g, force_path="tc") for c in layer.copies], 100)
        if "flute" in kernels and m in dense_ms:
            results["flute_dense"] = time_graph(
                [lambda c=c: cuda_op.gemm(x, c[0], c[1], c[2], bits, g, force_path="dense") for c in layer.copies], 50)
        base = results.get("cublas")
        floor = FLOOR_US.get(name) if (bits == 4 and g == 128 and m == 1 and "H100" in gpu) else None
        for kern, us in results.items():
            nbytes = layer.nbytes if kern.startswith("flute") else hum.nbytes if kern == "humming" else None
            rec = dict(row, kernel=kern, us=round(us, 3),
                       speedup_vs_cublas=round(base / us, 3) if base else None,
                       roofline_frac=round(nbytes / HBM_BW * 1e6 / us, 3) if nbytes else None,
                       floor_frac=round(floor / us, 3) if (floor and kern.startswith("flute")) else None)
            records.append(rec)
        print(f"  {name:15s} {str(dtype)[6:]:8s} W{bits} g{g:<4d} M={m:<5d} "
              + "  ".join(f"{kk}={v:8.2f}us" for kk, v in results.items())
              + (f"  x{base / results['flute']:.2f}" if base and "flute" in results else ""), flush=True)
    del layer, hum
    torch.cuda.empty_cache()


def geo(xs):
    xs = [x for x in xs if x]
    return statistics.geometric_mean(xs) if xs else float("nan")


def best_flute(recs):
    """Per (dtype, bits, g, shape, M): the faster of our two paths (what the op's heuristic aims at)."""
    best = {}
    for r in recs:
        if r["kernel"].startswith("flute"):
            key = (r["dtype"], r["bits"], r["group_size"], r["shape"], r["M"])
            if key not in best or r["us"] < best[key]["us"]:
                best[key] = r
    return best


def write_markdown(records, path, gpu):
    lines = [f"# flute kernel benchmark on {gpu}", "", f"Run {time.strftime('%Y-%m-%d')}.", "",
             "Times in µs (median per call of a CUDA graph of many calls, L2 defeated by rotating weight copies). "
             "`flute` is the mma.sync LUT kernel; `flute_tc` the sm_90a wgmma kernel (M >= 16, Hopper); "
             "`flute_dense` is dequantize + cuBLAS (measured at M = 64 and M >= 256); "
             "`humming` is humming-kernels (vLLM's int4 backend; symmetric int4, same G, its heuristic kernel "
             "choice; W4 fp16/bf16); "
             "`best` takes the fastest of ours per case. Speedup is vs cuBLAS `F.linear` in the same dtype, same run. "
             f"Roofline: {HBM_BW / 1e12:.2f} TB/s read bandwidth measured in the same run (4 GiB sum).",
             ""]
    if not any(r["kernel"] == "humming" for r in records):
        lines += ["**No humming-kernels rows in this run**: it was not importable (or failed) on this machine "
                  "(the run log says why); install its wheel there (`.whl/` travels only when carried).", ""]
    best = best_flute(records)
    # humming-kernels' geo-means beside ours (the issue's targets are set by the best int4 kernels)
    others = {"humming": {(r["dtype"], r["bits"], r["group_size"], r["shape"], r["M"]): r
                          for r in records if r["kernel"] == "humming"}}
    combos = sorted({(r["dtype"], r["bits"], r["group_size"]) for r in records})
    lines += ["## Geo-mean speedup vs cuBLAS over shapes", "",
              "`flute`: the best of our paths per case; `humming`: humming-kernels in the same run.", "",
              "| dtype | bits | G | shapes | kernel | " + " | ".join(f"M={m}" for m in MS) + " |",
              "|---|---|---|---|---|" + "---|" * len(MS)]
    for dt, b, g in combos:
        for kern, recs_by in (("flute", best), *others.items()):
            for subset, names in (("full", FULL), ("all", list(SHAPES))):
                cells = []
                for m in MS:
                    v = [recs_by[(dt, b, g, s, m)]["speedup_vs_cublas"] for s in names if (dt, b, g, s, m) in recs_by]
                    cells.append(f"{geo(v):.2f}x" if v else "")
                if any(cells):
                    lines.append(f"| {dt} | {b} | {g} | {subset} | {kern} | " + " | ".join(cells) + " |")
    # the 8B decode number: qkv + o + gate_up + down at M = 1, W4 g128
    layer_sum = {}
    for r in records:
        if r["shape"] in ("8B-qkv", "8B-o", "8B-gate_up", "8B-down") and r["M"] == 1 and (r["bits"], r["group_size"]) == (4, 128):
            kern = "flute" if r["kernel"].startswith("flute") else r["kernel"]
            if kern != "flute" or best.get((r["dtype"], 4, 128, r["shape"], 1)) is r:
                layer_sum.setdefault((r["dtype"], kern), []).append(r["us"])
    sums = {k: sum(v) for k, v in layer_sum.items() if len(v) == 4}
    if sums:
        lines += ["", "8B layer sum at M = 1 (qkv + o + gate_up + down, W4 g128, µs): " + "; ".join(
            f"{dt} " + ", ".join(f"{kern} {us:.1f}" for (d, kern), us in sorted(sums.items()) if d == dt)
            for dt in sorted({d for d, _ in sums}))]
    lines += ["", "## M=1 W3/W2 vs W4 (same dtype, g128, time ratio W4/Wb, geo-mean over the 8 full shapes)", ""]
    for dt in sorted({r["dtype"] for r in records}):
        for b in (3, 2):
            v = [best[(dt, 4, 128, s, 1)]["us"] / best[(dt, b, 128, s, 1)]["us"] for s in FULL
                 if (dt, 4, 128, s, 1) in best and (dt, b, 128, s, 1) in best]
            if v:
                lines.append(f"- {dt} W{b}: {geo(v):.2f}x faster than W4")
    v = {}
    for m in MS:
        r = [best[("float16", 4, 128, s, m)]["us"] / best[("bfloat16", 4, 128, s, m)]["us"] for s in SHAPES
             if ("float16", 4, 128, s, m) in best and ("bfloat16", 4, 128, s, m) in best]
        if r:
            v[m] = geo(r)
    if v:
        lines += ["", "bf16 vs fp16 (W4 g128, time fp16/bf16, >1 = bf16 faster): "
                  + ", ".join(f"M={m}: {x:.3f}" for m, x in v.items())]
    for dt, b, g in combos:
        rows = [r for r in records if (r["dtype"], r["bits"], r["group_size"]) == (dt, b, g)]
        ms = sorted({r["M"] for r in rows})
        lines += ["", f"## {dt} W{b} g{g}: µs (speedup vs cuBLAS)", "",
                  "| shape | N | K | kernel | " + " | ".join(f"M={m}" for m in ms) + " |",
                  "|---|---|---|---|" + "---|" * len(ms)]
        for s in SHAPES:
            for kern in ("cublas", "tinygemm", "humming", "flute", "flute_tc", "flute_dense"):
                cells, any_ = [], False
                for m in ms:
                    r = next((r for r in rows if r["shape"] == s and r["M"] == m and r["kernel"] == kern), None)
                    if r:
                        any_ = True
                        sp = f" ({r['speedup_vs_cublas']:.2f}x)" if kern != "cublas" and r["speedup_vs_cublas"] else ""
                        cells.append(f"{r['us']:.1f}{sp}")
                    else:
                        cells.append("")
                if any_:
                    n, k = SHAPES[s]
                    lines.append(f"| {s} | {n} | {k} | {kern} | " + " | ".join(cells) + " |")
        m1 = [r for r in rows if r["M"] == 1 and r["kernel"] == "flute" and r["floor_frac"]]
        if m1:
            lines.append("")
            lines.append("M=1 fraction of the streaming floor: " + ", ".join(f"{r['shape']} {r['floor_frac']:.2f}" for r in m1))
    Path(path).write_text("\n".join(lines) + "\n")


def _time_gemm(copies, x, bits, g, iters, **kw):
    """µs per cuda_op.gemm call with options ``kw`` (a CUDA graph of ``iters`` calls over the weight copies)."""
    return time_graph([lambda c=c: cuda_op.gemm(x, c[0], c[1], c[2], bits, g, **kw) for c in copies], iters)


def _sweep(label, names, ms, dtype, bits, g, cells_for):
    """For each shape and M, print ``label``, the shape, M and the cells that
    ``cells_for(timed, m, n, k, cfg)`` returns; ``timed(iters, **gemm options)`` is µs per call."""
    cfg = cuda_op.device_config(0)
    for name in names:
        n, k = SHAPES[name]
        layer = Layer(n, k, bits, g, dtype)
        for m in ms:
            x = torch.randn(m, k, device="cuda").to(dtype)
            timed = functools.partial(_time_gemm, layer.copies, x, bits, g)
            print(f"{label} {name:15s} M={m:<4d} " + " ".join(cells_for(timed, m, n, k, cfg)), flush=True)
            del timed
        del layer
        torch.cuda.empty_cache()


def tune(names, ms=(1, 16, 64), splits=(1, 2, 4, 8, 16, 32), dtype=torch.float16, bits=4, g=128):
    """Print our time per split-K choice (to calibrate configs/*.json), plus the heuristic's pick."""
    def cells_for(timed, m, n, k, cfg):
        auto = cuda_op.device_plan(m, n, k, bits, dtype, 0, cfg)["splits"]
        cells = [f"{'auto=' + str(auto) if sp is None else sp}:{timed(200, force_path='lut', splits=sp):.1f}"
                 for sp in splits + (None,)]
        if m >= 16 and cuda_op.tc_available(0):
            cells += [f"tc{bm}:{timed(100, force_path='tc', block_m=bm):.1f}" for bm in cuda_op.TC_BLOCK_MS]
        if m >= 33:
            cells += [f"mt{mt}:{timed(200, force_path='lut', m_tiles=mt):.1f}" for mt in (4, 8)]
            cells.append(f"dense:{timed(100, force_path='dense'):.1f}")
        return cells

    _sweep("tune", names, ms, dtype, bits, g, cells_for)


def tune_ks(names, ms=(1, 16), k_slices=(1, 2, 4, 8), splits=(1, 2, 4, 8, 16), dtype=torch.float16, bits=4, g=128):
    """Print the LUT kernel's time per (K slices, split-K) and the heuristic's plan, to calibrate
    ``lut_k_slices`` / ``lut_split_reduce_chunks`` in configs/*.json."""
    def cells_for(timed, m, n, k, cfg):
        auto = cuda_op.device_plan(m, n, k, bits, dtype, 0, cfg)
        cells = [f"plan=ks{auto['k_slices']}/s{auto['splits']}:{timed(200, force_path='lut'):.1f}"]
        for ks in k_slices:
            if cuda_op.k_slices_ok(bits, auto["m_tiles"], auto["warps"], auto["x_ahead"], ks):
                cells += [f"ks{ks}/{sp}:{timed(200, force_path='lut', k_slices=ks, splits=sp):.1f}" for sp in splits]
        return cells

    _sweep("tune_ks", names, ms, dtype, bits, g, cells_for)


def tune_tc(names, ms=(256, 512), block_ms=(64, 128, 256), splits=(1, 2, 3, 4), dtype=torch.float16, bits=4, g=128):
    """Print the tensor-core path's time per (block_m, split-K) and the heuristic's plan, to
    calibrate ``tc_block_m`` / ``tc_overhead_chunks`` in configs/*.json."""
    def cells_for(timed, m, n, k, cfg):
        auto = cuda_op.plan_tc(m, n, k, cfg)
        cells = [f"plan=bm{auto['block_m']}/s{auto['splits']}"]
        for bm in block_ms:
            auto_bm = cuda_op.plan_tc(m, n, k, cfg, block_m=bm)["splits"]
            cells += [f"bm{bm}/{'auto=' + str(auto_bm) if sp is None else sp}:"
                      f"{timed(50, force_path='tc', block_m=bm, splits=sp):.1f}" for sp in splits + (None,)]
        return cells

    _sweep("tune_tc", names, ms, dtype, bits, g, cells_for)


def plan_jobs(plan):
    """(dtype, bits, g, Ms, kernels) per job of a plan."""
    w4 = ("cublas", "humming", "flute") if plan in ("full", "core") else ("cublas", "flute")
    jobs = [(torch.float16, 4, 128, MS, w4)]
    if plan in ("full", "core"):
        jobs += [(torch.bfloat16, 4, 128, MS, ("cublas", "tinygemm", "humming", "flute")),
                 (torch.float16, 3, 128, (1, 16, 64), ("cublas", "flute")),
                 (torch.float16, 2, 128, (1, 16, 64), ("cublas", "flute")),
                 (torch.float16, 4, 64, (1, 16, 64), ("cublas", "humming", "flute"))]
    if plan == "full":
        jobs += [(torch.bfloat16, 3, 128, (1, 16), ("cublas", "flute")),
                 (torch.bfloat16, 2, 128, (1, 16), ("cublas", "flute"))]
    return jobs


def case_key(record) -> tuple:
    """(dtype, bits, G, shape) of a benchmark record: the unit --resume skips when present."""
    return (record["dtype"], record["bits"], record["group_size"], record["shape"])


def humming_cases(jobs, names):
    """{(N, K, G, dtype): Ms} of the humming layers a run times (bench_shape's conditions)."""
    cases = {}
    for dtype, bits, g, ms, kernels in jobs:
        if "humming" in kernels and bits == 4 and dtype in (torch.float16, torch.bfloat16):
            for name in names:
                n, k = SHAPES[name]
                cases[(n, k, g, dtype)] = tuple(sorted(set(cases.get((n, k, g, dtype), ())) | set(ms)))
    return cases


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fp16 W4 g128 only")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--plan", default="full", choices=["full", "quick", "core"])
    ap.add_argument("--resume", action="store_true",
                    help="keep the records of <out>/<gpu>.json and run only the (job, shape) pairs it lacks")
    ap.add_argument("--tune", default="", help="comma-separated shapes: split-K sweep only")
    ap.add_argument("--tune-ms", default="1,16,64", help="M values for --tune")
    ap.add_argument("--tune-ks", default="", help="comma-separated shapes: LUT kernel K slices x split-K sweep "
                    "at --tune-ms")
    ap.add_argument("--tune-tc", default="", help="comma-separated shapes: tensor-core block_m x split-K sweep "
                    "at --tune-tc-ms")
    ap.add_argument("--tune-tc-ms", default="256,512", help="M values for --tune-tc")
    ap.add_argument("--tune-tc-splits", default="1,2,3,4", help="split-K counts of the --tune-tc sweep")
    ap.add_argument("--tune-tc-block-ms", default="64,128,256", help="block_m values of the --tune-tc sweep")
    ap.add_argument("--tune-bits", type=int, default=4, choices=[2, 3, 4], help="index bits of the --tune* sweeps")
    args = ap.parse_args(argv)
    if args.tune:
        tune([t for t in args.tune.split(",") if t], ms=tuple(int(m) for m in args.tune_ms.split(",")), bits=args.tune_bits)
        return
    if args.tune_ks:
        tune_ks([t for t in args.tune_ks.split(",") if t], ms=tuple(int(m) for m in args.tune_ms.split(",")),
                bits=args.tune_bits)
        return
    if args.tune_tc:
        tune_tc([t for t in args.tune_tc.split(",") if t], ms=tuple(int(m) for m in args.tune_tc_ms.split(",")),
                splits=tuple(int(s) for s in args.tune_tc_splits.split(",")),
                block_ms=tuple(int(b) for b in args.tune_tc_block_ms.split(",")), bits=args.tune_bits)
        return
    plan = "quick" if args.quick else args.plan
    gpu = gpu_name()
    global HBM_BW
    HBM_BW = measure_read_bw()
    print(f"{gpu}: read bandwidth {HBM_BW / 1e12:.2f} TB/s", flush=True)
    names = [s for s in args.shapes.split(",") if s]
    torch.backends.cuda.matmul.allow_tf32 = False
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[^A-Za-z0-9]+", "_", gpu).strip("_")
    json_path = out / f"{stem}.json"
    records = json.loads(json_path.read_text()) if args.resume and json_path.exists() else []
    done = {case_key(r) for r in records}
    # (job, shape) pairs still to run; each one's records are written as soon as it finishes, so a
    # run stopped by a time limit keeps what it measured and --resume goes on from there
    todo = [(job, name) for job in plan_jobs(plan) for name in names
            if (str(job[0]).split(".")[-1], job[1], job[2], name) not in done]
    json_path.write_text(json.dumps(records, indent=1))  # the file holds this run's records from now on
    t0 = time.time()
    humming_prepare_run(humming_cases([job for job, _ in todo], sorted({name for _, name in todo})))
    for (dtype, bits, g, ms, kernels), name in todo:
        n, k = SHAPES[name]
        bench_shape(name, n, k, dtype, bits, g, ms, kernels, records, gpu)
        json_path.write_text(json.dumps(records, indent=1))
    write_markdown(records, out / f"{stem}.md", gpu)
    print(f"wrote {out / stem}.json/.md ({len(records)} records, {time.time() - t0:.0f}s)")
    print((out / f"{stem}.md").read_text().split("## float16 W4")[0])


if __name__ == "__main__":
    main()
