"""humming-kernels (vLLM 0.32's int4 GEMM backend) as a baseline of ``benchmarks/kernel.py``.

The humming package (pip ``humming-kernels``) is called directly; vLLM is not imported (the GPU
image has none). This module copies the minimal logic of vLLM 0.32:

- vllm/model_executor/kernels/linear/mixed_precision/humming.py (HummingLinearKernel: quant_config,
  process_weights_after_loading, apply_weights)
- vllm/model_executor/layers/quantization/utils/humming/linear.py (convert_linear_layer_to_humming_
  standard, prepare_humming_linear_layer_config, get_humming_linear_compute_config, apply_humming_linear)
- vllm/utils/humming.py (create_humming_locks)

(Not named ``humming.py``: that would shadow the package, this folder being ``sys.path[0]``.)
"""
from __future__ import annotations

import importlib
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flute_vllm.timing import copies_for  # noqa: E402

HUMMING_COMPUTE_CONFIG = json.dumps({"use_batch_invariant": False, "use_f16_accum": False, "gemm_type": "dense"})
HUMMING_MAX_REL_ERR = 2e-2  # rel. Frobenius error at M=16 vs x @ W_dequant.T in float32
HUMMING_CHECK_M = 16
humming_state = {}


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
    if "error" not in humming_state:
        try:
            for mod in ("humming", "humming.forward", "humming.kernel.humming", "humming.schema", "humming.transform",
                        "humming.tune"):
                importlib.import_module(mod)
            humming_state["error"] = None
        except Exception as e:  # noqa: BLE001
            humming_state["error"] = f"{type(e).__name__}: {e}"
    return humming_state["error"]


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
        humming_state["error"] = errors[0]
        humming_state["reported"] = True
        print(f"humming unavailable: {errors[0]}", flush=True)
        return
    print(f"humming: kernels for {len(todo) - len(errors)}/{len(todo)} layers compiled in {time.time() - t0:.0f}s"
          + (f" (first error: {errors[0][:300]})" if errors else ""), flush=True)


def humming_prepare_run(cases) -> None:
    """Before a run that times ``cases`` ({(n, k, g, dtype): ms}): report a missing package once, or
    compile the kernels all cases need."""
    if not cases:
        return
    err = humming_import_error()
    if err:
        print(f"humming unavailable: {err}", flush=True)
        humming_state["reported"] = True
    else:
        humming_precompile(cases)


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
        if not humming_state.get("reported"):
            print(f"  humming unavailable: {err}", flush=True)
            humming_state["reported"] = True
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
