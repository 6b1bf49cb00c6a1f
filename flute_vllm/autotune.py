"""``python -m flute_vllm autotune``: measure where this GPU's kernel paths cross over and write its
config, so that an untuned GPU gets tuned dispatch in about a minute.

The op has three CUDA paths (see ``cuda_op.choose_path``): the mma.sync LUT kernel (small M), the
sm_90a wgmma kernel (Hopper, mid M) and dequantize + cuBLAS (large M). Which is fastest at a given
M depends on the GPU. This times all of them (fp16, W4 g128, three Llama-3 shapes, L2 defeated,
CUDA graphs), takes the geo-mean over the shapes per M, and writes the thresholds to
``~/.cache/flute_vllm/configs/<gpu>.json`` (``$FLUTE_VLLM_CACHE``), which ``cuda_op.device_config``
prefers over the configs shipped in ``configs/``. Split-K keeps its wave model (no tuning needed).

It also times the LUT kernel's per-layer choices over layers of growing N*K (``WIDE_SHAPES``) and
writes where they win:
- ``lut_wide_cta_min_nk``: at M = 1 and 16, 4 warps or 8 sharing one conflict-free pair table
  (``cuda_op.warps_for``), both without x-ahead: the N*K from which the wide CTAs win (null: never);
- ``lut_x_ahead_min_nk`` / ``lut_x_ahead_max_nk``: at M = 1, the 8-warp x-ahead kernel variant
  against the better of the two widths without it (``cuda_op.x_ahead_for``): the longest run of
  consecutive measured N*K where it wins (null max: never);
- ``lut_wide_mt4_max_nk``: at M = 32 (m_tiles 4), 4 or 8 warps: the N*K up to which the wide CTAs
  win from the smallest layer on (null: never);
- ``lut_w2_wide_min_nk``: 2-bit at M = 1, 4 or 8 warps (8: the shared quad table in builds with
  FLUTE_LUT_W2_WIDE_QUAD_STEPS): the N*K from which the wide CTAs win (null: never);
- ``tc_small_min_nk`` / ``tc_small_min_m`` (Hopper): at M = 17, 24, 32, the wgmma kernel with
  block_m 32 against the LUT kernel: the N*K from which it wins (geo-mean over those Ms, on that
  layer and over all larger ones), and the M from which it wins on those layers at every larger
  measured M (null: never);
- ``tc_large`` (Hopper): at M = 256 and 1024, the wgmma kernel against dequantize + cuBLAS: per M,
  the N*K from which it wins at every larger measured N*K, as ``[[min_nk, M], ...]`` (the layers
  that keep the tensor-core path up to that M; empty: never).
The path crossovers (``tc_min_m``) are taken from M > 32 only: below, the per-layer rule decides.
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
MS = (8, 16, 24, 32, 33, 48, 64, 96, 128, 192, 256, 384, 512)  # 33: where the mid-M path range may start
NEVER = 1 << 30
# layers of growing N*K for the per-layer LUT-kernel choices (8B o / qkv / down / gate_up, 70B down / gate_up)
WIDE_SHAPES = {"8B-o": (4096, 4096), "8B-qkv": (6144, 4096), "8B-down": (4096, 14336), "8B-gate_up": (28672, 4096),
               "70B-down": (8192, 28672), "70B-gate_up": (57344, 8192)}
WIDE_MS = (1, 16)  # the CTA-width crossover sums these
X_AHEAD_M = 1      # the x-ahead variant exists at m_tiles 1 (M <= 8)
MT4_M = 32         # m_tiles 4
TC_SMALL_MS = (17, 24, 32)  # decode sizes where the wgmma kernel may beat the LUT kernel per layer
TC_SMALL_BLOCK_M = 32
TC_MID_MIN_M = 33  # the path crossovers (tc_min_m / tc_max_m) start here; below, tc_small_* decides
TC_LARGE_MS = (256, 1024)  # prefill sizes where large layers may keep the wgmma kernel (tc_large)


def choose_thresholds(times: dict[str, dict[int, float]]) -> dict:
    """Thresholds from ``times[path][m]`` (µs, paths ``lut``, ``dense`` and optionally ``tc``).

    ``dequant_min_m``: the smallest measured M from which dense + cuBLAS beats the LUT kernel at
    every larger measured M. ``tc_min_m`` / ``tc_max_m``: the first run of measured Ms from
    ``TC_MID_MIN_M`` on in which the tensor-core path beats both others (an empty range when it
    never does or is absent).
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
        wins = [m for m in ms if m >= TC_MID_MIN_M and tc[m] < min(lut[m], dense[m])]
        if wins:
            tc_min_m = wins[0]
            tc_max_m = tc_min_m
            for m in ms[ms.index(tc_min_m) + 1:]:
                if m not in wins:
                    break
                tc_max_m = m
    return {"dequant_min_m": dequant_min_m, "tc_min_m": tc_min_m, "tc_max_m": tc_max_m}


def _winning_edge(times: dict[int, tuple[float, float]], from_largest: bool) -> Optional[int]:
    """Walking the measured N*K from the largest (or the smallest) on, the last one where the second
    time beats the first before the first where it does not; None if it loses at the start."""
    edge = None
    for nk in sorted(times, reverse=from_largest):
        base, variant = times[nk]
        if variant >= base:
            break
        edge = nk
    return edge


def choose_wide_min_nk(times: dict[int, tuple[float, float]]) -> Optional[int]:
    """``lut_wide_cta_min_nk`` from ``times[n * k] = (µs with 4 warps, µs with 8 warps)``: the smallest
    measured N*K from which the wide CTAs are faster at every larger measured N*K; None if never."""
    return _winning_edge(times, from_largest=True)


def _longest_winning_run(times: dict[int, tuple[float, float]]) -> Optional[tuple[int, int]]:
    """(first, last) N*K of the longest run of consecutive measured N*K (ascending) where the second
    time beats the first (of equally long runs, the one reaching the larger N*K); None if none."""
    runs, run = [], []
    for nk in sorted(times):
        base, variant = times[nk]
        if variant < base:
            run.append(nk)
        elif run:
            runs.append(run)
            run = []
    if run:
        runs.append(run)
    if not runs:
        return None
    best = max(runs, key=lambda r: (len(r), r[-1]))
    return best[0], best[-1]


def choose_x_ahead_range(times: dict[int, tuple[float, float]]) -> tuple[Optional[int], Optional[int]]:
    """(``lut_x_ahead_min_nk``, ``lut_x_ahead_max_nk``) from ``times[n * k] = (µs without x-ahead
    (the better CTA width), µs with it)``: the ends of the longest run of consecutive measured N*K
    where x-ahead wins; (None, None) if it never does."""
    run = _longest_winning_run(times)
    return (None, None) if run is None else run


def choose_wide_mt4_max_nk(times: dict[int, tuple[float, float]]) -> Optional[int]:
    """``lut_wide_mt4_max_nk`` from ``times[n * k] = (µs 4 warps, µs 8 warps)`` at m_tiles 4: the
    largest measured N*K up to which the wide CTAs win at every smaller measured N*K; None if they
    lose on the smallest."""
    return _winning_edge(times, from_largest=False)


def choose_tc_small(times: dict[int, dict[int, tuple[float, float]]]) -> tuple[Optional[int], Optional[int]]:
    """(``tc_small_min_m``, ``tc_small_min_nk``) from ``times[n * k][m] = (µs LUT kernel, µs wgmma
    block_m 32)``: min_nk the smallest measured N*K where the wgmma kernel wins (geo-mean over the
    Ms) and wins on the geo-mean of all layers from there up (a net gain: on H200 it loses only on
    the long-K 70B down, v14); min_m the smallest measured M from which it wins (geo-mean over those
    layers) at every larger measured M; (None, None) if it never wins."""
    ratio = {nk: statistics.geometric_mean(tc / lut for lut, tc in by_m.values()) for nk, by_m in times.items()}
    nks = sorted(ratio)
    min_nk = next((nk for i, nk in enumerate(nks)
                   if ratio[nk] < 1.0 and statistics.geometric_mean(ratio[x] for x in nks[i:]) < 1.0), None)
    if min_nk is None:
        return None, None
    layers = [by_m for nk, by_m in times.items() if nk >= min_nk]
    min_m = None
    for m in sorted(layers[0], reverse=True):
        if statistics.geometric_mean(by_m[m][1] / by_m[m][0] for by_m in layers) >= 1.0:
            break
        min_m = m
    return (None, None) if min_m is None else (min_m, min_nk)


def choose_tc_large(times: dict[int, dict[int, tuple[float, float]]]) -> list[list[int]]:
    """``tc_large`` from ``times[n * k][m] = (µs dequantize + cuBLAS, µs wgmma)``: for each measured M
    (ascending) where the wgmma kernel wins on the largest layers, ``[min_nk, M]`` with min_nk the
    smallest measured N*K from which it wins at every larger one."""
    ms = sorted({m for by_m in times.values() for m in by_m})
    out = []
    for m in ms:
        edge = _winning_edge({nk: by_m[m] for nk, by_m in times.items() if m in by_m}, from_largest=True)
        if edge is not None:
            out.append([edge, m])
    return out


def measure(shapes: dict = SHAPES, wide_shapes: dict = WIDE_SHAPES, ms=MS, wide_ms=WIDE_MS, group_size: int = 128,
            dtype: torch.dtype = torch.float16) -> tuple[dict[str, dict[int, float]], dict[str, dict]]:
    """On the current GPU, 4-bit: geo-mean µs per path and M over ``shapes``, and for each of
    ``wide_shapes`` the LUT kernel's per-layer choices: ``{"wide": {n * k: (µs 4 warps, µs 8 warps)}
    summed over wide_ms without x-ahead, "x_ahead": {n * k: (µs best width without, µs 8 warps with
    x-ahead)} at X_AHEAD_M, "mt4": {n * k: (µs 4 warps, µs 8 warps)} at MT4_M, "w2_wide": the same
    for 2-bit at X_AHEAD_M, "tc_small": {n * k: {m: (µs LUT kernel, µs wgmma block_m 32)}} over
    TC_SMALL_MS, "tc_large": {n * k: {m: (µs dequantize + cuBLAS, µs wgmma)}} over TC_LARGE_MS}``
    ("mt4" only when the build has 8-warp CTAs there, "tc_small" and "tc_large" only on Hopper).
    Each layer is built once (4-bit; and 2-bit for the w2_wide measurement)."""
    from . import cuda_op
    from .timing import Layer, time_graph

    dev = torch.cuda.current_device()
    paths = ["lut", "dense"] + (["tc"] if cuda_op.tc_available(dev) else [])
    per: dict[str, dict[int, list[float]]] = {p: {m: [] for m in ms} for p in paths}
    choices: dict[str, dict] = {"wide": {}, "x_ahead": {}, "w2_wide": {}}
    if cuda_op.wide_ok(cuda_op.m_tiles_for(MT4_M)):
        choices["mt4"] = {}
    if "tc" in paths:
        choices["tc_small"] = {}
        choices["tc_large"] = {}
    narrow_w, wide_w = cuda_op.WARPS_PER_CTA, cuda_op.WIDE_WARPS_PER_CTA
    for name, (n, k) in {**shapes, **wide_shapes}.items():
        layer = Layer(n, k, 4, group_size, dtype)

        def timed(m, lay=layer, **kw):
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            return time_graph([lambda c=c: cuda_op.gemm(x, c[0], c[1], c[2], lay.bits, group_size, **kw)
                               for c in lay.copies], 50, replays=3)

        if name in shapes:
            for m in ms:
                for p in paths:
                    per[p][m].append(timed(m, force_path=p))
        if name in wide_shapes:
            # x_ahead=0: the width crossover without the variant (else the current config would pick it)
            t = {(m, w): timed(m, force_path="lut", warps=w, x_ahead=0) for m in wide_ms for w in (narrow_w, wide_w)}
            choices["wide"][n * k] = tuple(sum(t[(m, w)] for m in wide_ms) for w in (narrow_w, wide_w))
            plain = [t[(X_AHEAD_M, w)] if (X_AHEAD_M, w) in t else timed(X_AHEAD_M, force_path="lut", warps=w, x_ahead=0)
                     for w in (narrow_w, wide_w)]
            choices["x_ahead"][n * k] = (min(plain), timed(X_AHEAD_M, force_path="lut", warps=wide_w, x_ahead=1))
            if "mt4" in choices:
                choices["mt4"][n * k] = tuple(timed(MT4_M, force_path="lut", warps=w) for w in (narrow_w, wide_w))
            if "tc_small" in choices:
                choices["tc_small"][n * k] = {m: (timed(m, force_path="lut"),
                                                  timed(m, force_path="tc", block_m=TC_SMALL_BLOCK_M))
                                              for m in TC_SMALL_MS}
                choices["tc_large"][n * k] = {m: (timed(m, force_path="dense"), timed(m, force_path="tc"))
                                              for m in TC_LARGE_MS}
            w2 = Layer(n, k, 2, group_size, dtype)
            choices["w2_wide"][n * k] = tuple(timed(X_AHEAD_M, w2, force_path="lut", warps=w) for w in (narrow_w, wide_w))
            del w2
        del layer
        torch.cuda.empty_cache()
    return {p: {m: statistics.geometric_mean(v) for m, v in d.items()} for p, d in per.items()}, choices


def config_for(gpu: str, times: dict[str, dict[int, float]], choices: Optional[dict[str, dict]] = None) -> dict:
    """The config file content for ``gpu`` (exact device name) from measured times (path
    crossovers; with ``choices`` (see :func:`measure`) also the LUT kernel's per-layer choices that
    were measured)."""
    cfg = {
        "name": f"{gpu} (autotuned {time.strftime('%Y-%m-%d')})",
        "match": [gpu],
        **choose_thresholds(times),
        "measured_us": {p: {str(m): round(v, 2) for m, v in d.items()} for p, d in times.items()},
        "notes": "Written by `python -m flute_vllm autotune` (fp16 W4 g128, geo-mean over "
                 + ", ".join(SHAPES) + "); other keys come from the shipped configs/ file for this GPU.",
    }
    choices = choices or {}

    def measured(d):
        return {str(nk): [round(a, 2), round(b, 2)] for nk, (a, b) in sorted(d.items())}

    def measured_by_m(d):  # {n * k: {m: (a, b)}}, the per-layer-and-M measurements
        return {str(nk): {str(m): pair for m, pair in measured(by_m).items()} for nk, by_m in sorted(d.items())}

    if "wide" in choices:
        cfg["lut_wide_cta_min_nk"] = choose_wide_min_nk(choices["wide"])
        cfg["measured_wide_us"] = measured(choices["wide"])
    if "x_ahead" in choices:
        cfg["lut_x_ahead_min_nk"], cfg["lut_x_ahead_max_nk"] = choose_x_ahead_range(choices["x_ahead"])
        cfg["measured_x_ahead_us"] = measured(choices["x_ahead"])
    if "mt4" in choices:
        cfg["lut_wide_mt4_max_nk"] = choose_wide_mt4_max_nk(choices["mt4"])
        cfg["measured_wide_mt4_us"] = measured(choices["mt4"])
    if "w2_wide" in choices:
        cfg["lut_w2_wide_min_nk"] = choose_wide_min_nk(choices["w2_wide"])
        cfg["measured_w2_wide_us"] = measured(choices["w2_wide"])
    if "tc_small" in choices:
        cfg["tc_small_min_m"], cfg["tc_small_min_nk"] = choose_tc_small(choices["tc_small"])
        cfg["measured_tc_small_us"] = measured_by_m(choices["tc_small"])
    if "tc_large" in choices:
        cfg["tc_large"] = choose_tc_large(choices["tc_large"])
        cfg["measured_tc_large_us"] = measured_by_m(choices["tc_large"])
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
    times, choices = measure(shapes, wide_shapes)
    path = write_config(config_for(gpu, times, choices), out)
    from . import cuda_op

    cuda_op._all_configs.cache_clear()  # this process picks the new config up too
    cuda_op.device_config.cache_clear()
    cfg = json.loads(path.read_text())
    print(f"{gpu}: dequant_min_m={cfg['dequant_min_m']} tc_min_m={cfg['tc_min_m']} tc_max_m={cfg['tc_max_m']} "
          f"lut_wide_cta_min_nk={cfg['lut_wide_cta_min_nk']} lut_x_ahead_min_nk={cfg['lut_x_ahead_min_nk']} "
          f"lut_x_ahead_max_nk={cfg['lut_x_ahead_max_nk']} lut_wide_mt4_max_nk={cfg.get('lut_wide_mt4_max_nk')} "
          f"lut_w2_wide_min_nk={cfg['lut_w2_wide_min_nk']} tc_small_min_m={cfg.get('tc_small_min_m')} "
          f"tc_small_min_nk={cfg.get('tc_small_min_nk')} tc_large={cfg.get('tc_large')} "
          f"({time.time() - t0:.0f}s) -> {path}")
    return path
