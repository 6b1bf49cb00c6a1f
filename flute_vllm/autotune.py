"""``python -m flute_vllm autotune``: measure where this GPU's kernel paths cross over and write its
config, so that an untuned GPU gets tuned dispatch in about a minute.

The op has three CUDA paths (see ``cuda_op.choose_path``): the mma.sync LUT kernel (small M), the
sm_90a wgmma kernel (Hopper, mid M) and dequantize + cuBLAS (large M). Which is fastest at a given
M depends on the GPU. This times all of them (fp16, W4 g128, three Llama-3 shapes, L2 defeated,
CUDA graphs), takes the geo-mean over the shapes per M, and writes the thresholds to
``~/.cache/flute_vllm/configs/<gpu>.json`` (``$FLUTE_VLLM_CACHE``), which ``cuda_op.device_config``
prefers over the configs shipped in ``configs/``. Split-K keeps its wave model (no tuning needed).

It also times the LUT kernel's two CTA widths at M = 1 and 16 (4 warps, or 8 sharing one
conflict-free pair table: ``cuda_op.warps_for``) over layers of growing N*K and writes the N*K
from which the wide CTAs win (``lut_wide_cta_min_nk``; null when they never do).
"""
from __future__ import annotations

import json
import re
import statistics
import time
from pathlib import Path
from typing import Optional

import torch

SHAPES = {"8B-o": (4096, 4096), "8B-gate_up": (28672, 4096), "70B-down": (8192, 28672)}
MS = (8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
NEVER = 1 << 30
# layers of growing N*K for the CTA-width crossover (8B o / qkv / down / gate_up, 70B down)
WIDE_SHAPES = {"8B-o": (4096, 4096), "8B-qkv": (6144, 4096), "8B-down": (4096, 14336), "8B-gate_up": (28672, 4096),
               "70B-down": (8192, 28672)}
WIDE_MS = (1, 16)


def choose_thresholds(times: dict[str, dict[int, float]]) -> dict:
    """Thresholds from ``times[path][m]`` (µs, paths ``lut``, ``dense`` and optionally ``tc``).

    ``dequant_min_m``: the smallest measured M from which dense + cuBLAS beats the LUT kernel at
    every larger measured M. ``tc_min_m`` / ``tc_max_m``: the first run of measured Ms in which
    the tensor-core path beats both others (an empty range when it never does or is absent).
    """
    ms = sorted(times["lut"])
    lut, dense, tc = times["lut"], times["dense"], times.get("tc")
    dequant_min_m = NEVER
    for m in reversed(ms):
        if dense[m] < lut[m]:
            dequant_min_m = m
        else:
            break
    tc_min_m, tc_max_m = NEVER, 0
    if tc:
        wins = [m for m in ms if tc[m] < min(lut[m], dense[m])]
        if wins:
            tc_min_m = wins[0]
            tc_max_m = tc_min_m
            for m in ms[ms.index(tc_min_m) + 1:]:
                if m not in wins:
                    break
                tc_max_m = m
    return {"dequant_min_m": dequant_min_m, "tc_min_m": tc_min_m, "tc_max_m": tc_max_m}


def choose_wide_min_nk(times: dict[int, tuple[float, float]]) -> Optional[int]:
    """``lut_wide_cta_min_nk`` from ``times[n * k] = (µs with 4 warps, µs with 8 warps)``: the smallest
    measured N*K from which the wide CTAs are faster at every larger measured N*K; None if never."""
    min_nk = None
    for nk in sorted(times, reverse=True):
        narrow, wide = times[nk]
        if wide >= narrow:
            break
        min_nk = nk
    return min_nk


def measure(shapes: dict = SHAPES, wide_shapes: dict = WIDE_SHAPES, ms=MS, wide_ms=WIDE_MS, group_size: int = 128,
            dtype: torch.dtype = torch.float16) -> tuple[dict[str, dict[int, float]], dict[int, tuple[float, float]]]:
    """On the current GPU, 4-bit: geo-mean µs per path and M over ``shapes``, and ``{n * k: (µs 4
    warps, µs 8 warps)}`` of the LUT kernel summed over ``wide_ms`` for each of ``wide_shapes``. Each
    layer is built once, for both measurements."""
    from . import cuda_op
    from .timing import Layer, time_graph

    dev = torch.cuda.current_device()
    paths = ["lut", "dense"] + (["tc"] if cuda_op.tc_available(dev) else [])
    per: dict[str, dict[int, list[float]]] = {p: {m: [] for m in ms} for p in paths}
    wide: dict[int, tuple[float, float]] = {}
    for name, (n, k) in {**shapes, **wide_shapes}.items():
        layer = Layer(n, k, 4, group_size, dtype)

        def timed(m, **kw):
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            return time_graph([lambda c=c: cuda_op.gemm(x, c[0], c[1], c[2], 4, group_size, **kw)
                               for c in layer.copies], 50, replays=3)

        if name in shapes:
            for m in ms:
                for p in paths:
                    per[p][m].append(timed(m, force_path=p))
        if name in wide_shapes:
            narrow_us, wide_us = (sum(timed(m, force_path="lut", warps=w) for m in wide_ms)
                                  for w in (cuda_op.WARPS_PER_CTA, cuda_op.WIDE_WARPS_PER_CTA))
            wide[n * k] = (narrow_us, wide_us)
        del layer
        torch.cuda.empty_cache()
    return {p: {m: statistics.geometric_mean(v) for m, v in d.items()} for p, d in per.items()}, wide


def config_for(gpu: str, times: dict[str, dict[int, float]],
               wide_times: Optional[dict[int, tuple[float, float]]] = None) -> dict:
    """The config file content for ``gpu`` (exact device name) from measured times (path
    crossovers; with ``wide_times`` also the CTA-width crossover)."""
    cfg = {
        "name": f"{gpu} (autotuned {time.strftime('%Y-%m-%d')})",
        "match": [gpu],
        **choose_thresholds(times),
        "measured_us": {p: {str(m): round(v, 2) for m, v in d.items()} for p, d in times.items()},
        "notes": "Written by `python -m flute_vllm autotune` (fp16 W4 g128, geo-mean over "
                 + ", ".join(SHAPES) + "); other keys come from the shipped configs/ file for this GPU.",
    }
    if wide_times is not None:
        cfg["lut_wide_cta_min_nk"] = choose_wide_min_nk(wide_times)
        cfg["measured_wide_us"] = {str(nk): [round(a, 2), round(b, 2)] for nk, (a, b) in sorted(wide_times.items())}
    return cfg


def write_config(cfg: dict, out: Optional[Path] = None) -> Path:
    if out is None:
        from .cuda_op import user_config_dir

        slug = re.sub(r"[^A-Za-z0-9]+", "_", cfg["match"][0]).strip("_").lower()
        out = user_config_dir() / f"{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(cfg, indent=2) + "\n")
    return out


def autotune(out: Optional[Path] = None, quick: bool = False) -> Path:
    if not torch.cuda.is_available():
        raise RuntimeError("autotune needs a CUDA GPU (none visible)")
    t0 = time.time()
    gpu = torch.cuda.get_device_name()
    shapes = {"8B-o": SHAPES["8B-o"]} if quick else SHAPES
    wide_shapes = {s: WIDE_SHAPES[s] for s in ("8B-o", "8B-gate_up")} if quick else WIDE_SHAPES
    times, wide_times = measure(shapes, wide_shapes)
    path = write_config(config_for(gpu, times, wide_times), out)
    from . import cuda_op

    cuda_op._all_configs.cache_clear()  # this process picks the new config up too
    cuda_op.device_config.cache_clear()
    cfg = json.loads(path.read_text())
    print(f"{gpu}: dequant_min_m={cfg['dequant_min_m']} tc_min_m={cfg['tc_min_m']} tc_max_m={cfg['tc_max_m']} "
          f"lut_wide_cta_min_nk={cfg['lut_wide_cta_min_nk']} ({time.time() - t0:.0f}s) -> {path}")
    return path
