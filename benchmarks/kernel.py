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

With no network on the GPU machine, carry the wheels (``pip download --no-deps humming-kernels packaging``
into .whl/; humming imports ``packaging`` without declaring it) and
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site:$PYTHONPATH python3 benchmarks/kernel.py --plan full
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flute_vllm import cuda_op  # noqa: E402
from flute_vllm.timing import Layer, copies_for, measure_read_bw, time_graph  # noqa: E402

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
MS = (1, 4, 16, 64, 256, 1024, 4096, 8192)


# --- humming-kernels -------------------------------------------------------------------------------
# The humming package (pip humming-kernels) is called directly; vLLM is not imported (the GPU image has
# none). What follows copies the minimal logic of vLLM 0.32:
#   vllm/model_executor/kernels/linear/mixed_precision/humming.py  (HummingLinearKernel: quant_config,
#       process_weights_after_loading, apply_weights)
#   vllm/model_executor/layers/quantization/utils/humming/linear.py  (convert_linear_layer_to_humming_
#       standard, prepare_humming_linear_layer_config, get_humming_linear_compute_config,
#       apply_humming_linear)
#   vllm/utils/humming.py  (create_humming_locks)
# Note: no file named benchmarks/humming.py, which would shadow the package (this script's folder is
# sys.path[0]).
HUMMING_COMPUTE_CONFIG = json.dumps({"use_batch_invariant": False, "use_f16_accum": False, "gemm_type": "dense"})
HUMMING_MAX_REL_ERR = 2e-2  # rel. Frobenius error at M=16 vs x @ W_dequant.T in float32
HUMMING_CHECK_M = 16
_humming_state = {}


def humming_quant_config(g: int) -> dict:
    """HummingLinearKernel's quant_config for symmetric int4 (GPTQ uint4b8-like: value = code - 8)."""
    return {"quant_method": "humming", "dtype": "int4", "group_size": g, "has_zero_point": False}


def pack_int4(codes: torch.Tensor, rows: int = 4096) -> torch.Tensor:
    """[N, K] codes 0..15 -> [N, K/8] int32, code k of a row at bits 4*(k%8) of word k//8: the layout of
    humming's pack_weight, of GPTQ/compressed-tensors ``weight_packed`` (vLLM's MPLinear ``w_q``)."""
    n, k = codes.shape
    assert k % 8 == 0
    out = torch.empty(n, k // 8, dtype=torch.int32, device=codes.device)
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=codes.device)
    for i in range(0, n, rows):
        c = (codes[i:i + rows].to(torch.int64) & 15).view(-1, k // 8, 8)
        w = (c << shifts).sum(-1)  # 0 .. 2^32 - 1
        out[i:i + rows] = torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)
    return out


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: [N, K/8] int32 -> [N, K] uint8 codes."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=packed.device)
    w = packed.to(torch.int64) & 0xFFFFFFFF
    return ((w.unsqueeze(-1) >> shifts) & 15).to(torch.uint8).flatten(-2)


def dequant_int4(codes: torch.Tensor, scales: torch.Tensor, g: int) -> torch.Tensor:
    """float32 weights of symmetric int4 with group scales: (code - 8) * scale[n, k // g] (humming's
    dequantize_weight for an unsigned integer type without zero point)."""
    return (codes.float() - 8) * scales.float().repeat_interleave(g, dim=1)


def humming_import_error():
    """None when the humming package imports, else the reason (computed once)."""
    if "error" not in _humming_state:
        try:
            for mod in ("humming", "humming.forward", "humming.kernel.humming", "humming.schema", "humming.transform",
                        "humming.tune"):
                importlib.import_module(mod)
            _humming_state["error"] = None
        except Exception as e:  # noqa: BLE001
            _humming_state["error"] = f"{type(e).__name__}: {e}"
    return _humming_state["error"]


def humming_ms(ms) -> tuple:
    """The M values humming's kernels are prepared for: the timed ones, the check's M and M=1 (the
    launcher reads the kernel of the interval holding M=1 for every call)."""
    return tuple(sorted(set(ms) | {1, HUMMING_CHECK_M}))


def select_intervals(intervals, ms):
    """The entries ``[lo, hi, config]`` of humming's heuristic list (the launcher runs config for
    lo < M <= hi) holding one of ``ms``; each M then gets the very kernel the full list gives it, and only
    these are compiled (vLLM compiles the whole list, ~90 kernels per layer)."""
    out = [e for e in intervals if any(e[0] < m <= e[1] for m in ms)]
    missing = [m for m in ms if not any(e[0] < m <= e[1] for e in out)]
    if missing:
        raise ValueError(f"humming's heuristic list covers no interval for M={missing}")
    return out


def humming_tuning(config, ms, device) -> str:
    """JSON of humming's heuristic kernel choice (tuning_config=None in vLLM), restricted to ``ms``."""
    from humming.tune import get_heuristics_config
    intervals = get_heuristics_config(config, **json.loads(HUMMING_COMPUTE_CONFIG), device=device)
    return json.dumps(select_intervals(intervals, humming_ms(ms)))


def _humming_schemas(g, dtype):
    from humming.schema import BaseWeightSchema, HummingInputSchema
    return BaseWeightSchema.from_config(humming_quant_config(g)), HummingInputSchema()


def humming_layer_config(n, k, g, dtype, device):
    """The LayerConfig of :class:`HummingLayer` without building the weights (to compile ahead). Random
    uniform codes hold code 0 (value -8), so humming keeps the uint4 type (its e0m3 re-coding of
    symmetric ints needs |value| <= 7)."""
    from humming.transform import prepare_layer_config
    ws, ins = _humming_schemas(g, dtype)
    return prepare_layer_config(shape_n=n, shape_k=k, weight_schema=ws.to_humming_schema(dtype), input_schema=ins,
                                pad_n_to_multiple=256, pad_k_to_multiple=128, has_bias=False, torch_dtype=dtype,
                                device=device)


def humming_precompile(cases) -> None:
    """Compile, in parallel and before any timing, the kernels humming picks for ``cases``
    ({(n, k, g, dtype): ms}); humming JIT-compiles one kernel per layer shape and tile (seconds each)."""
    from concurrent.futures import ThreadPoolExecutor

    from humming.kernel.humming import HummingKernel
    from humming.ops.utils import init_humming_launcher
    t0 = time.time()
    dev = torch.cuda.current_device()
    try:
        init_humming_launcher()  # once, here, rather than racing in the threads below
        todo = []
        for (n, k, g, dtype), ms in cases.items():
            cfg = humming_layer_config(n, k, g, dtype, dev)
            todo.append(((n, k, g), cfg.to_str(), humming_tuning(cfg, ms, dev)))
    except Exception as e:  # noqa: BLE001
        todo, errors = [], [f"{type(e).__name__}: {e}"]
    else:
        # same strings as HummingLayer.forward passes: its calls then find these kernels in humming's cache
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        with ThreadPoolExecutor(max(1, cpus // 4)) as ex:  # each case compiles its kernels in parallel too
            futs = [(key, ex.submit(HummingKernel.prepare_kernels, lc, HUMMING_COMPUTE_CONFIG, tc, dev))
                    for key, lc, tc in todo]
            errors = []
            for key, f in futs:
                try:
                    f.result()
                except Exception as e:  # noqa: BLE001  (that shape compiles, or reports, when it is prepared)
                    errors.append(f"{key}: {type(e).__name__}: {e}")
    if errors and len(errors) >= len(todo):  # nothing compiled: one line, no retry per shape
        _humming_state["error"] = errors[0]
        _humming_state["reported"] = True
        print(f"humming unavailable: {errors[0]}", flush=True)
        return
    print(f"humming: kernels for {len(todo) - len(errors)}/{len(todo)} layers compiled in {time.time() - t0:.0f}s"
          + (f" (first error: {errors[0][:300]})" if errors else ""), flush=True)


class HummingLayer:
    """One random symmetric int4 layer (codes uniform in 0..15, group scales like flute's Layer) in
    humming's layout, converted as vLLM converts a uint4b8 MPLinear layer, and R copies of it."""

    def __init__(self, n, k, g, dtype, ms, device="cuda"):
        from humming.forward import humming_forward
        from humming.transform import prepare_and_transform_humming_tensors

        dev = torch.device(device)
        self.n, self.k, self.g, self.dtype = n, k, g, dtype
        self.codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, device=dev)
        self.scales = (torch.rand(n, k // g, device=dev) * 0.02 + 0.005).to(dtype)
        # convert_linear_layer_to_humming_standard: weight [N, K/8] int32, weight_scale [N, K/G]
        source = {"weight": pack_int4(self.codes), "weight_scale": self.scales}
        # prepare_humming_linear_layer_config (input: HummingInputSchema(), i.e. 16-bit activations)
        ws, ins = _humming_schemas(g, dtype)
        ws, tensors = ws.convert_humming(tensors=source, shape_n_stacks=[n], shape_k_stacks=[k], param_dtype=dtype)
        ins, in_tensors = ins.convert_humming(tensors=source, shape_n_stacks=[n], shape_k_stacks=[k],
                                              param_dtype=dtype)
        del source
        if not ins.is_compatible_with(ws, dtype):  # vLLM's check_and_fallback_input_schema keeps a16 then
            raise RuntimeError(f"humming: {ws.b_dtype} weights with {dtype} activations not supported here")
        tensors.update(in_tensors)
        self.config, tensors = prepare_and_transform_humming_tensors(
            tensors=tensors, shape_n=n, shape_k=k, weight_schema=ws, input_schema=ins, pad_n_to_multiple=256,
            pad_k_to_multiple=128, has_bias=False, torch_dtype=dtype, device=dev)
        tensors.update(in_tensors)
        self.hadamard = ws.hadamard_block_size
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        self.tuning = humming_tuning(self.config, ms, index)
        self.nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        self._forward = humming_forward
        # create_humming_locks: one lock buffer per layer (here per copy)
        self._n_locks = torch.cuda.get_device_properties(dev).multi_processor_count * 8
        self.copies = [(tensors, torch.zeros(self._n_locks, dtype=torch.int32, device=dev))]

    def forward(self, x, i=0):
        """apply_humming_linear (no bias, 16-bit input: no input quantization)."""
        t, locks = self.copies[i]
        return self._forward(self.config, inputs=x, weight=t["weight"], weight_scale=t.get("weight_scale"),
                             zero_point=t.get("zero_point"), bias=None, weight_scale_2=t.get("weight_scale_2"),
                             input_scale=None, input_scale_2=None, hadamard_block_size=self.hadamard, locks=locks,
                             compute_config=HUMMING_COMPUTE_CONFIG, tuning_config=self.tuning)

    def rel_error(self, m=HUMMING_CHECK_M, rows=8192) -> float:
        """Rel. Frobenius error of the kernel vs x @ W_dequant.T in float32 (same codes and scales)."""
        x = torch.randn(m, self.k, device=self.codes.device).to(self.dtype)
        y = self.forward(x).float()
        if tuple(y.shape) != (m, self.n):
            raise RuntimeError(f"humming output shape {tuple(y.shape)} != {(m, self.n)}")
        ref = torch.empty(m, self.n, device=x.device)
        for i in range(0, self.n, rows):
            ref[:, i:i + rows] = x.float() @ dequant_int4(self.codes[i:i + rows], self.scales[i:i + rows], self.g).T
        return (torch.linalg.norm(y - ref) / torch.linalg.norm(ref)).item()

    def make_copies(self, r):
        """R copies in all (clones of the first, as flute's Layer), each with its own locks."""
        self.codes = self.scales = None
        t0 = self.copies[0][0]
        self.copies += [({kk: v.clone() for kk, v in t0.items()}, torch.zeros_like(self.copies[0][1]))
                        for _ in range(r - 1)]


def humming_setup(name, n, k, g, dtype, ms):
    """A checked :class:`HummingLayer` with its copies, or None after printing why."""
    err = humming_import_error()
    if err:
        if not _humming_state.get("reported"):
            print(f"  humming unavailable: {err}", flush=True)
            _humming_state["reported"] = True
        return None
    try:
        hl = HummingLayer(n, k, g, dtype, ms)
        rel = hl.rel_error()
    except Exception as e:  # noqa: BLE001
        print(f"  humming unavailable: {type(e).__name__}: {e}", flush=True)
        return None
    if not rel < HUMMING_MAX_REL_ERR:
        print(f"  humming skipped for {name} {str(dtype)[6:]} g{g}: rel. error {rel:.3g} at M={HUMMING_CHECK_M} vs "
              f"x @ W_dequant.T in float32 (limit {HUMMING_MAX_REL_ERR})", flush=True)
        return None
    hl.make_copies(copies_for(hl.nbytes))
    return hl


def gpu_name() -> str:
    return torch.cuda.get_device_name()


def bench_shape(name, n, k, dtype, bits, g, ms, kernels, records, gpu, dense_ms=(64, 256, 1024, 4096, 8192)):
    dev = torch.device("cuda")
    layer = Layer(n, k, bits, g, dtype)
    if "cublas" in kernels:
        wbytes = n * k * 2
        ws = [torch.randn(n, k, device=dev).to(dtype) * 0.02 for _ in range(copies_for(wbytes))]
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
    lines = [f"# flute kernel benchmark on {gpu}", "",
             "Times in µs (median per call of a CUDA graph of many calls, L2 defeated by rotating weight copies). "
             "`flute` is the mma.sync LUT kernel; `flute_tc` the sm_90a wgmma kernel (M >= 16, Hopper); "
             "`flute_dense` is dequantize + cuBLAS (measured at M = 64 and M >= 256); "
             "`humming` is humming-kernels (vLLM's int4 backend; symmetric int4, same G, its heuristic kernel "
             "choice; W4 fp16/bf16); "
             "`best` takes the fastest of ours per case. Speedup is vs cuBLAS `F.linear` in the same dtype, same run. "
             f"Roofline: {HBM_BW / 1e12:.2f} TB/s read bandwidth measured in the same run (4 GiB sum).",
             ""]
    best = best_flute(records)
    combos = sorted({(r["dtype"], r["bits"], r["group_size"]) for r in records})
    lines += ["## Geo-mean speedup vs cuBLAS over shapes", "",
              "| dtype | bits | G | shapes | " + " | ".join(f"M={m}" for m in MS) + " |",
              "|---|---|---|---|" + "---|" * len(MS)]
    for dt, b, g in combos:
        for subset, names in (("full", FULL), ("all", list(SHAPES))):
            cells = []
            for m in MS:
                v = [best[(dt, b, g, s, m)]["speedup_vs_cublas"] for s in names if (dt, b, g, s, m) in best]
                cells.append(f"{geo(v):.2f}x" if v else "")
            if any(cells):
                lines.append(f"| {dt} | {b} | {g} | {subset} | " + " | ".join(cells) + " |")
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


def tune(names, ms=(1, 16, 64), splits=(1, 2, 4, 8, 16, 32), dtype=torch.float16, bits=4, g=128):
    """Print our time per split-K choice (to calibrate configs/*.json), plus the heuristic's pick."""
    cfg = cuda_op.device_config(0)
    for name in names:
        n, k = SHAPES[name]
        layer = Layer(n, k, bits, g, dtype)
        for m in ms:
            x = torch.randn(m, k, device="cuda").to(dtype)
            res = cuda_op._ctas_per_sm(bits, cuda_op.m_tiles_for(m), str(dtype).split(".")[-1], 0)
            auto = cuda_op.plan(m, n, k, cfg, resident=res)["splits"]
            cells = []
            for sp in splits + (None,):
                us = time_graph([lambda c=c: cuda_op.gemm(x, c[0], c[1], c[2], bits, g, force_path="lut", splits=sp)
                                 for c in layer.copies], 200)
                cells.append(f"{'auto=' + str(auto) if sp is None else sp}:{us:.1f}")
            if m >= 16 and cuda_op.tc_available(0):
                for bm in (64, 128, 256):
                    us = time_graph([lambda c=c: cuda_op.gemm(x, c[0], c[1], c[2], bits, g, force_path="tc", block_m=bm)
                                     for c in layer.copies], 100)
                    cells.append(f"tc{bm}:{us:.1f}")
            if m >= 33:
                for mt in (4, 8):
                    us = time_graph([lambda c=c: cuda_op.gemm(x, c[0], c[1], c[2], bits, g, force_path="lut", m_tiles=mt)
                                     for c in layer.copies], 200)
                    cells.append(f"mt{mt}:{us:.1f}")
                us = time_graph([lambda c=c: cuda_op.gemm(x, c[0], c[1], c[2], bits, g, force_path="dense")
                                 for c in layer.copies], 100)
                cells.append(f"dense:{us:.1f}")
            print(f"tune {name:15s} M={m:<4d} " + " ".join(cells), flush=True)
        del layer
        torch.cuda.empty_cache()


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
    ap.add_argument("--tune", default="", help="comma-separated shapes: split-K sweep only")
    ap.add_argument("--tune-ms", default="1,16,64", help="M values for --tune")
    args = ap.parse_args(argv)
    if args.tune:
        tune([t for t in args.tune.split(",") if t], ms=tuple(int(m) for m in args.tune_ms.split(",")))
        return
    plan = "quick" if args.quick else args.plan
    gpu = gpu_name()
    global HBM_BW
    HBM_BW = measure_read_bw()
    print(f"{gpu}: read bandwidth {HBM_BW / 1e12:.2f} TB/s", flush=True)
    names = [s for s in args.shapes.split(",") if s]
    torch.backends.cuda.matmul.allow_tf32 = False
    records = []
    jobs = plan_jobs(plan)
    t0 = time.time()
    hum_cases = humming_cases(jobs, names)
    if hum_cases:
        err = humming_import_error()
        if err:
            print(f"humming unavailable: {err}", flush=True)
            _humming_state["reported"] = True
        else:
            humming_precompile(hum_cases)
    for dtype, bits, g, ms, kernels in jobs:
        for name in names:
            n, k = SHAPES[name]
            bench_shape(name, n, k, dtype, bits, g, ms, kernels, records, gpu)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[^A-Za-z0-9]+", "_", gpu).strip("_")
    (out / f"{stem}.json").write_text(json.dumps(records, indent=1))
    write_markdown(records, out / f"{stem}.md", gpu)
    print(f"wrote {out / stem}.json/.md ({len(records)} records, {time.time() - t0:.0f}s)")
    print((out / f"{stem}.md").read_text().split("## float16 W4")[0])


if __name__ == "__main__":
    main()
