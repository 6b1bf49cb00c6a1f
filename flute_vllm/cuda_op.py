"""CUDA implementation of ``flute_vllm::lut_gemm``: weight repacking, config choice, registration.

Importing this module registers the CUDA kernel of the op; it does not touch CUDA or compile
anything (safe on CPU-only machines). The extension is compiled on first use (see ``_build``).

Kernel layout (made once by :func:`prepare`; see kernels/NOTES.md):

- ``qweight_k`` int32 ``[N, Kp*b/32]`` (Kp = K rounded up to 64; the pad holds index 0 and meets
  zero activations): per 16-row tile and 64-wide K chunk, 32 lanes x b words in the order the
  ``mma.m16n8k16`` A fragment wants them, K permuted inside the chunk so each lane's activation
  fragment is contiguous.
- ``scales_k`` ``[N, K/G]`` same dtype, memory order ``[N/16][K/G][16]`` (shape[0] stays N).
- ``tables_k`` int32 ``[N/16, 24]``: each tile's table (the one of its shard) as low/high byte
  tables in the activation dtype (for ``prmt`` lookups) plus the float32 values.

Requirements (ValueError otherwise): N % 16 == 0, K % 32 == 0, every shard end % 16 == 0,
G in {32, 64, 128, 256} or G == K, scales dtype fp16/bf16/fp32 == activation dtype at call time.

Paths (:func:`choose_path`, thresholds per GPU in ``configs/`` or from ``python -m flute_vllm
autotune``): ``lut`` the mma.sync LUT kernel (small M, sm_80+), ``tc`` the sm_90a wgmma kernel
(Hopper, mid M; activations permuted to the layout's K order by :func:`permute_activations`),
``dense`` dequantize-to-dense + cuBLAS (``torch.nn.functional.linear``; large M and fp32).
"""
from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch

from .ops import check_op_args, lut_gemm
from .quantize import unpack
from .tables import check_bits

TILE_N = 16
CHUNK_K = 64
TABLE_WORDS = 24
WARPS_PER_CTA = 4
WIDE_WARPS_PER_CTA = 8  # m_tiles <= WIDE_MAX_M_TILES only (warps_for)
WIDE_MAX_M_TILES = 4  # flute_kernel.h FLUTE_LUT_WIDE_MAX_MT (default; wide_ok asks the build)
N_TILES_PER_WARP = {1: 2, 2: 2, 4: 2, 8: 1}  # m_tiles -> weight tiles per warp (flute_kernel.h defaults)
WIDE_MT4_TILES = 1  # ... of wide CTAs at m_tiles = 4 (FLUTE_LUT_WIDE_MT4_TILES)
COUNTER_SLOTS = 1 << 16
GROUP_SIZES = (32, 64, 128, 256)
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
# 3-bit msb plane: shift that brings the msbs of (step, half) q to bit 2 of each selector nibble.
_MSB_SHIFT = (-2, -1, 0, 1, 14, 15, 16, 17)

_counters: dict[int, torch.Tensor] = {}


# ----------------------------------------------------------------------------------------------
# validation


def _fail(msg: str):
    raise ValueError(f"flute_vllm (CUDA): {msg}")


def _check_layout_args(n: int, k: int, bits: int, group_size: int, shard_ends) -> None:
    check_bits(bits)
    if n % TILE_N:
        _fail(f"N={n} output features must be a multiple of {TILE_N}")
    if k % 32:
        _fail(f"K={k} input features must be a multiple of 32")
    if group_size != k and group_size not in GROUP_SIZES:
        _fail(f"group_size={group_size} must be one of {GROUP_SIZES} or K={k} (channel-wise)")
    if k % group_size:
        _fail(f"group_size={group_size} does not divide K={k}")
    ends = list(shard_ends)
    if not ends or ends[-1] != n or any(b <= a for a, b in zip([0] + ends[:-1], ends)):
        _fail(f"shard_ends={ends} must increase and end at N={n}")
    if any(e % TILE_N for e in ends):
        _fail(f"shard_ends={ends}: every shard boundary must be a multiple of {TILE_N}")


def _padded_k(k: int) -> int:
    return (k + CHUNK_K - 1) // CHUNK_K * CHUNK_K


# ----------------------------------------------------------------------------------------------
# prepare: canonical -> kernel layout


def _pack_kernel_layout(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Indices ``[R, Kp]`` (R % 16 == 0, Kp % 64 == 0) -> int32 words ``[R/16, Kp/64, 32*bits]``."""
    r, kp = q.shape
    t, nch = r // TILE_N, kp // CHUNK_K
    # row = 16T + 8*h8 + g ; k = 64c + 32*sh + 8*tt + 4*sl + 2*kh + kl
    e = q.reshape(t, 2, 8, nch, 2, 4, 2, 2, 2)
    # -> [T, c, g, tt, sh, sl, kh, h8, kl]: lane = 4g + tt, step s = 2sh + sl, element i = 4kh + 2h8 + kl
    e = e.permute(0, 3, 2, 5, 4, 6, 7, 1, 8).reshape(t, nch, 32, 4, 8).to(torch.int64)
    dev = q.device
    i = torch.arange(8, device=dev)
    if bits == 4:
        words = (e << (4 * i)).sum(-1)  # [T, c, 32, 4]
    else:
        lo = e & 3
        pos2 = torch.where(i < 4, 4 * i, 4 * (i - 4) + 2)
        half = (lo << pos2).sum(-1)  # [T, c, 32, 4 steps] 16-bit values
        words = half[..., 0::2] | (half[..., 1::2] << 16)  # [T, c, 32, 2]
        if bits == 3:
            msb = e >> 2
            s = torch.arange(4, device=dev).view(4, 1)
            qidx = 2 * s + (i >= 4).view(1, 8).to(torch.int64)
            shift = torch.tensor(_MSB_SHIFT, device=dev)[qidx]
            pos = 4 * (i & 3).view(1, 8) + 2 + shift  # [4, 8], all distinct in 0..31
            mword = (msb << pos).sum((-1, -2))  # [T, c, 32]
            words = torch.cat([words.reshape(t, nch, 64), mword], dim=-1)
    words = words.reshape(t, nch, 32 * bits)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _table_words(tables: torch.Tensor, dtype: torch.dtype, bits: int) -> torch.Tensor:
    """float32 ``[S, 2^b]`` -> int32 ``[S, 24]`` (byte tables in ``dtype`` + float32 values)."""
    s = tables.shape[0]
    vals = torch.zeros(s, 16, dtype=torch.float32, device=tables.device)
    vals[:, : 2**bits] = tables.to(torch.float32)
    byte_dtype = dtype if dtype in (torch.float16, torch.bfloat16) else torch.float16
    u16 = vals.to(byte_dtype).view(torch.int16).to(torch.int64) & 0xFFFF
    lo, hi = u16 & 0xFF, u16 >> 8
    shifts = 8 * torch.arange(4, device=tables.device)
    lo_w = (lo.view(s, 4, 4) << shifts).sum(-1)
    hi_w = (hi.view(s, 4, 4) << shifts).sum(-1)
    f_w = vals.view(torch.int32).to(torch.int64)
    words = torch.cat([lo_w, hi_w, f_w], dim=1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _counters_for(device: torch.device) -> torch.Tensor:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    buf = _counters.get(idx)
    if buf is None:
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "flute_vllm: call flute_vllm.ops.prepare_weights() (or run the op once) before CUDA-graph capture"
            )
        buf = torch.zeros(COUNTER_SLOTS, dtype=torch.int32, device=torch.device("cuda", idx))
        _counters[idx] = buf
    return buf


def prepare(qweight, scales, tables, shard_ends, bits, group_size, row_block: int = 4096):
    """Canonical (format v1) tensors on a CUDA device -> ``(qweight_k, scales_k, tables_k)``."""
    check_bits(bits)
    if not (isinstance(qweight, torch.Tensor) and qweight.dtype == torch.int32 and qweight.dim() == 2):
        _fail(f"qweight must be int32 [N, K*bits/32], got {getattr(qweight, 'dtype', type(qweight))} "
              f"{tuple(getattr(qweight, 'shape', ()))}")
    n, words = qweight.shape
    if (words * 32) % bits:
        _fail(f"qweight has {words} words per row: not a whole number of {bits}-bit indices")
    k = words * 32 // bits
    if scales.dim() != 2 or scales.shape[0] != n:
        _fail(f"scales has shape {tuple(scales.shape)}, expected [N={n}, K/G]")
    if scales.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        _fail(f"scales has dtype {scales.dtype}; expected float16 / bfloat16 / float32")
    tables = torch.as_tensor(tables)
    if tables.dim() == 1:
        tables = tables.unsqueeze(0)
    if tables.dim() != 2 or tables.shape[1] != 2**bits:
        _fail(f"tables must be [S, 2^{bits}], got {tuple(tables.shape)}")
    shard_ends = [int(e) for e in shard_ends]
    if len(shard_ends) != tables.shape[0]:
        _fail(f"{len(shard_ends)} shard_ends for {tables.shape[0]} tables")
    _check_layout_args(n, k, bits, group_size, shard_ends)
    if scales.shape[1] != k // group_size:
        _fail(f"scales has shape {tuple(scales.shape)}, expected [N, K/G] = [{n}, {k // group_size}]")
    dev = qweight.device
    if dev.type != "cuda":
        _fail(f"prepare needs CUDA tensors, got qweight on {dev}")
    if not torch.isfinite(tables).all():
        _fail("tables has non-finite entries")
    _counters_for(dev)

    kp = _padded_k(k)
    nch = kp // CHUNK_K
    out = torch.empty(n // TILE_N, nch, 32 * bits, dtype=torch.int32, device=dev)
    row_block = max(TILE_N, row_block // TILE_N * TILE_N)
    for r0 in range(0, n, row_block):
        r1 = min(n, r0 + row_block)
        q = unpack(qweight[r0:r1].contiguous(), bits)
        if kp != k:
            q = torch.nn.functional.pad(q, (0, kp - k))
        out[r0 // TILE_N : r1 // TILE_N] = _pack_kernel_layout(q, bits)
    qweight_k = out.view(n, kp * bits // 32)

    ng = k // group_size
    scales_k = scales.contiguous().view(n // TILE_N, TILE_N, ng).transpose(1, 2).contiguous().view(n, ng)

    tw = _table_words(tables.to(dev), scales.dtype, bits)  # [S, 24]
    ends = torch.tensor(shard_ends, device=dev)
    tile_rows = torch.arange(n // TILE_N, device=dev) * TILE_N
    shard_of_tile = torch.searchsorted(ends, tile_rows, right=True)
    tables_k = tw[shard_of_tile].contiguous()
    # Build/load the extension and cache the occupancy of every kernel this layer can use now,
    # so that nothing is compiled or queried for the first time inside a CUDA-graph capture.
    if scales.dtype in (torch.float16, torch.bfloat16) and not torch.cuda.is_current_stream_capturing():
        dev_index = dev.index if dev.index is not None else torch.cuda.current_device()
        for mt in (1, 2, 4, 8):
            for w in (WARPS_PER_CTA, WIDE_WARPS_PER_CTA) if wide_ok(mt) else (WARPS_PER_CTA,):
                for xa in (0, 1) if x_ahead_variant(bits, mt, w) else (0,):
                    _ctas_per_sm(bits, mt, str(scales.dtype).split(".")[-1], dev_index, w, xa)
        tc_available(dev_index)
    return qweight_k, scales_k, tables_k


# ----------------------------------------------------------------------------------------------
# configs


def user_config_dir() -> Path:
    """Where ``python -m flute_vllm autotune`` writes configs (read before ``configs/``)."""
    from ._build import cache_root

    return cache_root() / "configs"


@lru_cache(maxsize=None)
def _all_configs() -> list[dict]:
    """Configs written by ``python -m flute_vllm autotune`` (user cache) first, then ``configs/``."""
    cfgs = []
    for folder in (user_config_dir(), CONFIG_DIR):
        for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            with open(path) as f:
                cfg = json.load(f)
            cfg["_file"] = str(path) if folder != CONFIG_DIR else path.name
            cfgs.append(cfg)
    return cfgs


def _matches(cfg: dict, name: str) -> bool:
    return any(s.lower() in name.lower() for s in cfg.get("match", []))


def _default_config(configs: list[dict]) -> dict:
    return next((c for c in configs if c.get("_file") == "default.json"), {})


def match_config(name: str, configs: list[dict]) -> dict:
    """The first config whose ``match`` strings occur in the device ``name``, else ``default.json``'s."""
    return next((c for c in configs if _matches(c, name)), _default_config(configs))


def resolve_config(name: str, configs: list[dict]) -> dict:
    """The knobs for device ``name``: ``default.json``, overlaid by the shipped file matching the
    device, overlaid by an autotuned file from the user config dir (which measures the path
    thresholds and the LUT kernel's CTA width, so the shipped per-GPU knobs it does not measure
    stay). User files are the ones :func:`_all_configs` names by absolute path."""
    shipped = [c for c in configs if not os.path.isabs(c.get("_file", ""))]
    user = [c for c in configs if os.path.isabs(c.get("_file", ""))]
    layers = [_default_config(shipped)]
    layers += [c for c in shipped if _matches(c, name)][:1] + [c for c in user if _matches(c, name)][:1]
    out: dict = {}
    for layer in layers:
        out.update({k: v for k, v in layer.items() if not k.startswith("_") and k not in ("name", "match", "notes")})
    out["config_file"] = "+".join(str(layer.get("_file", "<none>")) for layer in layers)
    return out


@lru_cache(maxsize=None)
def device_config(device_index: int) -> dict:
    """The config of this device (:func:`resolve_config`) with its SM count and name."""
    props = torch.cuda.get_device_properties(device_index)
    out = resolve_config(props.name, _all_configs())
    missing = {"cta_overhead_chunks", "min_chunks_per_split", "max_splits", "dequant_min_m", "tc_min_m", "tc_max_m",
               "tc_block_m", "tc_overhead_chunks", "tc_dense_max_nk"} - out.keys()
    if missing:
        raise RuntimeError(f"flute_vllm configs ({out['config_file']}) lack keys {sorted(missing)}")
    out["sm_count"] = props.multi_processor_count
    out["device_name"] = props.name
    return out


def m_tiles_for(m: int) -> int:
    return 1 if m <= 8 else 2 if m <= 16 else 4 if m <= 32 else 8


@lru_cache(maxsize=None)
def _ctas_per_sm(bits: int, m_tiles: int, dtype_name: str, device_index: int, warps: int = WARPS_PER_CTA,
                 x_ahead: int = 0) -> int:
    with torch.cuda.device(device_index):
        return max(1, int(_ext().ctas_per_sm(bits, m_tiles, dtype_name, warps, x_ahead)))


def _wave_cost(ctas: int, nch: int, splits: int, slots: int, overhead: float, k_slices: int = 1,
               reduce: tuple[float, float] = (0.0, 0.0)) -> float:
    """The wave model, in chunk times: ceil(CTAs * splits / resident slots) waves, each as long as one
    warp's chunks (a CTA's ``nch / splits`` chunks, shared by ``k_slices`` warps) plus ``overhead`` (the
    prologue), plus, when split, the reduction's tail once: ``reduce[0] + reduce[1] * splits`` (the
    last CTA's dependent L2 round trips, and the partials it reads)."""
    cps = -(-nch // splits)
    tail = reduce[0] + reduce[1] * splits if splits > 1 else 0.0
    return -(-(ctas * splits) // max(1, slots)) * (-(-cps // k_slices) + overhead) + tail


def _reduce_tail(cfg: dict, key: str) -> tuple[float, float]:
    """The split-K reduction tail ``[base, per split]`` of :func:`_wave_cost` from ``cfg[key]`` (none: 0, 0)."""
    return tuple(float(v) for v in (cfg.get(key) or (0.0, 0.0)))


def _split_k(ctas: int, nch: int, cfg: dict, slots: int, overhead: float, splits: Optional[int],
             k_slices: int = 1, reduce: tuple[float, float] = (0.0, 0.0), min_splits: int = 1) -> tuple[int, int]:
    """(splits, chunks per split) for ``ctas`` CTAs of ``nch`` 64-wide K chunks each.

    Unless given, split-K minimises :func:`_wave_cost` over splits >= ``min_splits``, with at least
    ``min_chunks_per_split`` chunks per split (per K slice of a CTA). No split when the counters
    (one per output tile) would not fit.
    """
    if splits is None:
        max_s = max(1, min(nch // max(1, cfg["min_chunks_per_split"] * k_slices), cfg["max_splits"]))
        best = None
        for s in range(min(min_splits, max_s), max_s + 1):
            s_eff = -(-nch // -(-nch // s))
            cost = _wave_cost(ctas, nch, s_eff, slots, overhead, k_slices, reduce)
            if best is None or cost < best[0] - 1e-9:
                best = (cost, s_eff)
        splits = best[1]
    splits = max(1, min(int(splits), nch))
    if ctas > COUNTER_SLOTS:
        splits = 1
    cps = -(-nch // splits)
    return -(-nch // cps), cps


@lru_cache(maxsize=None)  # a property of the loaded build: asked once, not on every gemm call
def rows_per_cta(m_tiles: int, warps: int = WARPS_PER_CTA) -> int:
    """Output rows per CTA of the mma.sync kernel (16 x weight tiles per warp x warps): the built
    extension's gemm_rows_per_cta on CUDA (a kernel experiment's build may change it), else the
    defaults of kernels/flute_kernel.h mirrored here (a CPU test compares them)."""
    if torch.cuda.is_available():
        return int(_ext().rows_per_cta(m_tiles, warps))
    tiles = WIDE_MT4_TILES if (warps == WIDE_WARPS_PER_CTA and m_tiles == 4) else N_TILES_PER_WARP[m_tiles]
    return TILE_N * tiles * warps


@lru_cache(maxsize=None)
def wide_ok(m_tiles: int) -> bool:
    """Whether 8-warp CTAs exist for ``m_tiles``: the built extension's gemm_wide_ok on CUDA (an
    experiment build may change it), else kernels/flute_kernel.h's default (m_tiles <= 4)."""
    if torch.cuda.is_available():
        return bool(_ext().wide_ok(m_tiles))
    return m_tiles <= WIDE_MAX_M_TILES


def x_ahead_variant(bits: int, m_tiles: int, warps: int) -> bool:
    """Whether the kernel for (bits, m_tiles, warps) is built with and without x-ahead (activations
    loaded one chunk ahead), chosen per launch; kernels/flute_kernel.h gemm_x_ahead_variant."""
    return bits == 4 and m_tiles == 1 and warps == WIDE_WARPS_PER_CTA


K_SLICES = (1, 2, 4, 8)  # kernels/flute_kernel.h gemm_k_slices_ok


def k_slices_ok(bits: int, m_tiles: int, warps: int, x_ahead: int, k_slices: int) -> bool:
    """Whether the mma.sync kernel for (bits, m_tiles, warps, x_ahead) runs with ``k_slices`` (its warps in
    groups of that many sharing their weight tiles and splitting the CTA's K range, summed in shared
    memory): kernels/flute_kernel.h gemm_k_slices_ok, mirrored here (a CPU test compares them)."""
    return k_slices == 1 or (k_slices in K_SLICES[1:] and k_slices <= warps and m_tiles <= bits
                             and not (x_ahead_variant(bits, m_tiles, warps) and not x_ahead))


def _x_ahead_layer(n: int, k: int, cfg: dict) -> bool:
    """Whether the config puts a layer in the x-ahead range: ``lut_x_ahead_min_nk`` (default 0) <=
    N*K <= ``lut_x_ahead_max_nk`` (null: never)."""
    max_nk = cfg.get("lut_x_ahead_max_nk")
    return max_nk is not None and int(cfg.get("lut_x_ahead_min_nk") or 0) <= n * k <= max_nk


def x_ahead_for(bits: int, m_tiles: int, warps: int, n: int, k: int, cfg: dict) -> int:
    """1: run the x-ahead variant (:func:`x_ahead_variant`: 4-bit, m_tiles 1, 8 warps) for layers in
    the config's x-ahead range (:func:`_x_ahead_layer`). It holds 8 more registers per lane, so it
    runs 2 CTAs per SM instead of 3: it wins where the activation loads' latency is what the warps
    wait on and loses on the largest layers (H200 v13 A/B at M = 1: 8B down 16.5 -> 14.5 us, 70B down
    43.5 -> 41.4, 8B o (as 8 warps) 8.9 -> 7.9, but 70B gate_up 85.3 -> 90.6)."""
    return int(x_ahead_variant(bits, m_tiles, warps) and _x_ahead_layer(n, k, cfg))


def _x_ahead_of(bits: int, m_tiles: int, warps: int, n: int, k: int, cfg: dict, x_ahead: Optional[int]) -> int:
    """The x-ahead variant to launch: the caller's (0 / 1) or :func:`x_ahead_for`'s choice; a forced 1
    where the kernel has no such variant is an error."""
    xa = x_ahead_for(bits, m_tiles, warps, n, k, cfg) if x_ahead is None else int(bool(x_ahead))
    if xa and not x_ahead_variant(bits, m_tiles, warps):
        _fail(f"x_ahead=1 needs the 4-bit {WIDE_WARPS_PER_CTA}-warp kernel at m_tiles=1 "
              f"(bits={bits}, m_tiles={m_tiles}, warps={warps})")
    return xa


def warps_for(bits: int, m_tiles: int, n: int, k: int, cfg: dict) -> int:
    """Warps per CTA of the mma.sync kernel, per layer from the config: 8 (kernels/flute_kernel.h
    gemm_wide_ok; the 8 warps share one conflict-free table in shared memory) or 4.

    - 4-bit, m_tiles <= 2: 8 for N*K >= ``lut_wide_cta_min_nk`` (null: never): 8-warp CTAs share one
      conflict-free, byte-addressed pair table (kernel v21; v10-v20 lost on small layers: fewer,
      longer CTAs, hence H200's 32 Mi until v21's 8 Mi); at m_tiles = 1 also for layers in the x-ahead range (:func:`x_ahead_for`), whose
      variant exists for 8-warp CTAs only and wins on small layers too (H200 v13: 8B qkv M=1
      11.6 -> 9.9 us, 8B o 8.9 -> 7.9).
    - 4-bit, m_tiles = 4 (M = 17-32), the other way round: 8 (one folded tile per warp) for N*K <=
      ``lut_wide_mt4_max_nk`` (null: never), where 4-warp CTAs are too few (H200 v13 A/B: 8B o at
      M = 17/32 17.3 -> 13.9 / 21.7 -> 15.9 us; with every layer wide, v12: 70B gate_up 226 -> 255 us).
    - 2-bit, m_tiles = 1: 8 for N*K >= ``lut_w2_wide_min_nk`` (null: never): the 2-bit 8-warp kernels
      decode through one shared quad table (FLUTE_LUT_W2_WIDE_QUAD_STEPS; H200 v14 A/B at M = 1:
      70B down 49.7 -> 38.2 us, 8B o slower).
    - Otherwise 4 (3-bit in 8-warp CTAs measured no faster, v11)."""
    if bits == 2:
        min_nk = cfg.get("lut_w2_wide_min_nk")
        wide = m_tiles == 1 and min_nk is not None and n * k >= min_nk
        return WIDE_WARPS_PER_CTA if wide else WARPS_PER_CTA
    if bits != 4:
        return WARPS_PER_CTA
    if m_tiles <= 2:
        min_nk = cfg.get("lut_wide_cta_min_nk")
        wide = (min_nk is not None and n * k >= min_nk) or (m_tiles == 1 and _x_ahead_layer(n, k, cfg))
    else:
        max_nk = cfg.get("lut_wide_mt4_max_nk")
        wide = m_tiles == 4 and max_nk is not None and n * k <= max_nk and wide_ok(4)
    return WIDE_WARPS_PER_CTA if wide else WARPS_PER_CTA


def plan(m: int, n: int, k: int, cfg: dict, m_tiles: Optional[int] = None, splits: Optional[int] = None,
         resident: Optional[int] = None, warps: Optional[int] = None, bits: int = 4,
         x_ahead: Optional[int] = None, k_slices: Optional[int] = None) -> dict:
    """Launch plan of the mma.sync kernel: m_tiles, warps per CTA (:func:`warps_for`), the x-ahead
    variant (:func:`x_ahead_for`), K slices per CTA, split-K (CTAs along K) and chunks per split:
    the (k_slices, splits) of least :func:`_wave_cost` with ``resident`` CTAs per SM,
    ``cta_overhead_chunks`` and ``lut_split_reduce_chunks`` ([base, per split]), k_slices from the
    config's ``lut_k_slices`` (default: [1]) that the kernel has (:func:`k_slices_ok`). A plan with
    K slices must also keep the activations a CTA reads within ``lut_k_slices_max_x_bytes`` (they
    are read by every slice's CTA: L1-resident or not) and run at least
    ``lut_k_slices_min_warps_per_sm`` warps per SM on average (fewer cannot hide the latency)."""
    mt = m_tiles or m_tiles_for(m)
    w = warps or warps_for(bits, mt, n, k, cfg)
    xa = _x_ahead_of(bits, mt, w, n, k, cfg, x_ahead)
    if w not in (WARPS_PER_CTA, WIDE_WARPS_PER_CTA) or (w == WIDE_WARPS_PER_CTA and not wide_ok(mt)):
        _fail(f"warps={w} must be {WARPS_PER_CTA}, or {WIDE_WARPS_PER_CTA} where the build has wide CTAs "
              f"(m_tiles <= {WIDE_MAX_M_TILES} by default; m_tiles={mt})")
    if k_slices is not None and not k_slices_ok(bits, mt, w, xa, k_slices):
        _fail(f"k_slices={k_slices} is not built for bits={bits}, m_tiles={mt}, warps={w}, x_ahead={xa} "
              f"(1, or 2 / 4 / 8 <= warps with m_tiles <= bits, not the 4-bit 8-warp m_tiles=1 kernel without x-ahead)")
    # the K slices to weigh: the caller's, or 1 and those of the config that the kernel has
    options = [k_slices] if k_slices is not None else sorted(
        {1} | {s for s in cfg.get("lut_k_slices") or () if k_slices_ok(bits, mt, w, xa, s)})
    m_chunks = -(-m // (8 * mt))
    nch = _padded_k(k) // CHUNK_K
    slots, overhead = cfg["sm_count"] * (resident or 4), float(cfg.get("cta_overhead_chunks", 2.0))
    reduce = _reduce_tail(cfg, "lut_split_reduce_chunks")
    x_row_bytes = min(m, 8 * mt) * CHUNK_K * 2  # activation bytes of one chunk that a CTA reads
    max_x_bytes = int(cfg.get("lut_k_slices_max_x_bytes", 1 << 30))
    min_warps = float(cfg.get("lut_k_slices_min_warps_per_sm", 0)) * cfg["sm_count"]
    best = None
    for ks in options:
        grid_x = -(-n // (rows_per_cta(mt, w) // ks))
        chosen = k_slices is not None or ks == 1  # no limits on the plain plan or on the caller's choice
        # at least the split count that keeps a CTA's activations within the limit
        min_splits = 1 if chosen or splits is not None else -(-nch // max(1, max_x_bytes // x_row_bytes))
        # (without K slices the split count is the plain wave model's, as calibrated before K slices
        # existed; the reduction's tail enters only the comparison with the K-slice plans)
        sp, cps = _split_k(grid_x * m_chunks, nch, cfg, slots, overhead, splits, ks,
                           reduce if ks > 1 else (0.0, 0.0), min_splits)
        if not chosen and (cps * x_row_bytes > max_x_bytes or grid_x * m_chunks * sp * w < min_warps):
            continue
        cost = _wave_cost(grid_x * m_chunks, nch, sp, slots, overhead, ks, reduce)
        if best is None or cost < best[0] - 1e-9:
            best = (cost, {"m_tiles": mt, "warps": w, "x_ahead": xa, "k_slices": ks, "splits": sp,
                           "chunks_per_split": cps, "grid_x": grid_x, "m_chunks": m_chunks})
    return best[1]


def device_plan(m: int, n: int, k: int, bits: int, dtype: torch.dtype, device_index: int, cfg: dict,
                m_tiles: Optional[int] = None, splits: Optional[int] = None, warps: Optional[int] = None,
                x_ahead: Optional[int] = None, k_slices: Optional[int] = None) -> dict:
    """:func:`plan` on this device: m_tiles, warps and the x-ahead variant chosen (unless given),
    with the resident CTAs per SM of the kernel they select."""
    mt = m_tiles or m_tiles_for(m)
    w = warps or warps_for(bits, mt, n, k, cfg)
    xa = _x_ahead_of(bits, mt, w, n, k, cfg, x_ahead)
    resident = _ctas_per_sm(bits, mt, str(dtype).split(".")[-1], device_index, w, xa)
    return plan(m, n, k, cfg, mt, splits, resident, w, bits, xa, k_slices)


@lru_cache(maxsize=None)
def tc_available(device_index: int) -> bool:
    """Whether the tensor-core (sm_90a wgmma) path runs on this device. Probed once, synchronously."""
    if torch.cuda.get_device_capability(device_index)[0] != 9:
        return False
    return bool(_ext().wgmma_supported(device_index))


TC_ROWS_PER_CTA = 128  # kernels/flute_kernel.h kWgmmaRowsPerCta
TC_BLOCK_MS = (8, 16, 32, 64, 128, 256)  # the wgmma N of the kernels built (kernels/flute_wgmma.cu)
TC_SMALL_MAX_M = 32  # the per-layer tensor-core rule below tc_min_m (tc_small_*) covers M up to here


def permute_activations(x: torch.Tensor) -> torch.Tensor:
    """``[M, K]`` -> ``[M, Kp]`` in the kernel layout's K order (zero pad), for the tensor-core path.

    Inside a 64-wide chunk, real k pair r = b0 + 2 b1 + 4 (b2 + 2 b3) + 16 b4 sits at pair slot
    16 b4 + 8 b1 + 4 b0 + (b2 + 2 b3): the order in which the kernel layout's A fragments meet
    k (see _pack_kernel_layout), so that wgmma's B operand is plain 16-byte pieces.
    """
    m, k = x.shape
    kp = _padded_k(k)
    if kp != k:
        x = torch.nn.functional.pad(x, (0, kp - k))
    # [M, chunk, b4, b23, b1, b0, 2] -> [M, chunk, b4, b1, b0, b23, 2]
    return x.reshape(m, kp // CHUNK_K, 2, 4, 2, 2, 2).permute(0, 1, 2, 4, 5, 3, 6).reshape(m, kp)


def tc_overhead_chunks(cfg: dict, block_m: int) -> float:
    """The split-K wave model's per-CTA overhead (prologue, partials, reduction) of the tensor-core
    path, in K chunks: ``cfg["tc_overhead_chunks"]``, a number or ``[max_block_m, chunks]`` entries
    (the first with block_m <= max_block_m). A CTA's fp32 partials grow with block_m, so splitting
    pays less at large block_m (H200 v16, M = 256, block_m 256, 8B gate_up: 1 split 127 us, 4 splits
    210; the old overhead of 2 chunks chose 4)."""
    v = cfg.get("tc_overhead_chunks", 2.0)
    if isinstance(v, (int, float)):
        return float(v)
    return float(next(c for lim, c in v if block_m <= lim))


SK_BLOCK_MS = (64, 256)  # the block_m with a stream-K kernel (kernels/flute_wgmma.cu wgmma_stream_k)
SK_MAX_ITEMS = 128  # kernels/flute_kernel.h kSkMaxItems: (tile, chunk range) items per stream-K CTA
SK_MIN_UNITS = 4  # K chunks per stream-K CTA at least (a cut tile's partial and sum cost more than that)


def plan_stream_k(tiles: int, nch: int, ctas: int, min_units: int = SK_MIN_UNITS) -> Optional[dict]:
    """Stream-K schedule of ``tiles`` output tiles of ``nch`` K chunks on ``ctas`` persistent CTAs
    (one per resident slot), or None when there is nothing to balance (whole waves) or a CTA would
    get more than ``SK_MAX_ITEMS`` items. CUTLASS's data-parallel + stream-K hybrid: the tiles of all
    full waves but the last are taken whole (``dp_tiles``: CTA c takes c, c + ctas, ...); the rest
    (the last full wave and the partial one, or all tiles when there is no full wave) are cut into
    equal contiguous ranges of ``units`` chunks in (tile, chunk) order, one per CTA, so every CTA
    does the same work (to a chunk) and the grid has no partial wave. A tile cut between CTAs is
    summed by its last contributor (kernels/flute_wgmma.cu, lut_wgmma_sk_kernel)."""
    if tiles <= 0 or tiles % ctas == 0:
        return None
    full = tiles // ctas
    dp_tiles = (full - 1) * ctas if full else 0
    units = max(-(-(tiles - dp_tiles) * nch // ctas), min_units)
    items = -(-dp_tiles // ctas) + units // nch + 2  # whole tiles, then at most units / nch + 2 pieces (sk_max_items)
    if items > SK_MAX_ITEMS:
        return None
    return {"ctas": ctas, "dp_tiles": dp_tiles, "units": units}


def plan_tc(m: int, n: int, k: int, cfg: dict, block_m: Optional[int] = None, splits: Optional[int] = None,
            stream_k: Optional[bool] = None, sk_ctas: Optional[int] = None) -> dict:
    """Launch plan of the tensor-core path: activation rows per CTA (8-256), and split-K or stream-K.

    block_m: the first ``[max_m, block_m]`` entry of ``cfg["tc_block_m"]`` with M <= max_m. Split-K
    minimises the same wave model as :func:`plan` (2 resident CTAs per SM for block_m 8-128, 1 for 256),
    with the per-CTA overhead of :func:`tc_overhead_chunks` and, when split, the reduction's tail
    ``cfg["tc_split_reduce_chunks"]`` = [a, b]: a + b * splits chunk times (H200 v18: without it the
    model split layers that fill the GPU already, 70B gate_up/tp2 M=64 7 splits 119.5 us vs 97.8
    unsplit).

    stream_k: the stream-K schedule of :func:`plan_stream_k` instead of split-K (block_m 64 or 256,
    where it has something to balance; ``"stream_k"`` in the result, else None). By default (None, and
    no ``splits`` given) for one block of activation rows on long-K layers with many tiles: K / 64 >=
    ``cfg["tc_stream_k_min_chunks"]`` and tiles >= ``cfg["tc_stream_k_min_waves"]`` resident waves
    (absent: never). H200 v19 A/B against split-K: 70B gate_up M=64 187 vs 202 us, M=256 447 vs 481,
    70B qkv M=256 93 vs 103; a cut tile's fp32 partial costs more than the balance buys on short-K or
    few-tile layers (8B gate_up M=256 126 vs 119, 70B o M=256 81 vs 76, 8B o M=64 24 vs 18).
    ``sk_ctas`` overrides the CTA count (one per resident slot; tests use small counts to reach the
    whole-tile waves on small layers).
    """
    if block_m is None:
        block_m = next(b for lim, b in cfg["tc_block_m"] if m <= lim)
    if block_m not in TC_BLOCK_MS:
        _fail(f"block_m={block_m} must be one of {', '.join(map(str, TC_BLOCK_MS))}")
    grid_x = -(-n // TC_ROWS_PER_CTA)
    grid_y = -(-m // block_m)
    nch = _padded_k(k) // CHUNK_K
    resident = 1 if block_m == 256 else 2  # kernels/flute_wgmma.cu: __launch_bounds__ and ring size
    if stream_k is None:
        # (by default only with one block of activation rows: a stream-K CTA starts its pieces at other K
        # offsets than its neighbours, so CTAs of different row blocks no longer read a weight chunk at
        # about the same time, and at grid_y > 1 every row block re-reads the weights from HBM: 70B down
        # at M = 1024 1036 us against 860 split-K, H200 v19)
        inf = float("inf")
        stream_k = (splits is None and grid_y == 1 and block_m in SK_BLOCK_MS
                    and nch >= cfg.get("tc_stream_k_min_chunks", inf)
                    and grid_x >= cfg.get("tc_stream_k_min_waves", inf) * cfg["sm_count"] * resident)
    elif stream_k and block_m not in SK_BLOCK_MS:
        _fail(f"stream_k: block_m={block_m} has no stream-K kernel (block_m {' or '.join(map(str, SK_BLOCK_MS))})")
    sk = None
    if stream_k:
        sk = plan_stream_k(grid_x * grid_y, nch, sk_ctas or cfg["sm_count"] * resident)
    if sk is not None:
        return {"block_m": block_m, "splits": 1, "chunks_per_split": nch, "grid_x": grid_x, "grid_y": grid_y,
                "stream_k": sk}
    splits, cps = _split_k(grid_x * grid_y, nch, cfg, cfg["sm_count"] * resident,
                           tc_overhead_chunks(cfg, block_m), splits,
                           reduce=_reduce_tail(cfg, "tc_split_reduce_chunks"))
    return {"block_m": block_m, "splits": splits, "chunks_per_split": cps, "grid_x": grid_x, "grid_y": grid_y,
            "stream_k": None}


# ----------------------------------------------------------------------------------------------
# the op


@lru_cache(maxsize=None)
def _tc_gather_max_block_m() -> int:
    """Largest block_m at which the built tensor-core kernel reads X unpermuted (kWgmmaGatherMaxRows)."""
    return int(_ext().wgmma_gather_max_rows())


def _ext():
    from . import _build

    return _build.load()


def check_cuda_args(x, qweight, scales, tables, shard_ends, bits, group_size) -> tuple[int, int, int]:
    """Validate the CUDA op's inputs (kernel layout); returns (M, N, K)."""
    check_bits(bits)
    if not isinstance(tables, torch.Tensor) or tables.dtype != torch.int32 or tables.dim() != 2 \
            or tables.shape[1] != TABLE_WORDS:
        _fail(f"tables must be the int32 [N/16, {TABLE_WORDS}] tensor made by prepare(), got "
              f"{getattr(tables, 'dtype', None)} {tuple(getattr(tables, 'shape', ()))}; "
              "call flute_vllm.ops.prepare_weights() after loading")
    # Shared checks (x, scales, shard_ends) against a stand-in of the canonical tables' shape.
    check_op_args(x, qweight, scales, torch.empty(len(shard_ends), 2**bits, device="meta"),
                  shard_ends, bits, group_size)
    m, k = x.shape
    n = scales.shape[0]
    _check_layout_args(n, k, bits, group_size, shard_ends)
    if x.device.type != "cuda":
        _fail(f"x is on {x.device}")
    for name, t in (("qweight", qweight), ("scales", scales), ("tables", tables)):
        if t.device != x.device:
            _fail(f"{name} is on {t.device} but x is on {x.device}")
    if scales.dtype != x.dtype:
        _fail(f"scales dtype {scales.dtype} != x dtype {x.dtype} (prepare() built the tables for the scales dtype)")
    kp = _padded_k(k)
    if qweight.dtype != torch.int32 or tuple(qweight.shape) != (n, kp * bits // 32):
        _fail(f"qweight must be the int32 [N, Kp*bits/32] = [{n}, {kp * bits // 32}] tensor made by prepare() "
              f"for K={k}, got {qweight.dtype} {tuple(qweight.shape)}")
    if tables.shape[0] != n // TILE_N:
        _fail(f"tables has {tables.shape[0]} rows, expected N/16 = {n // TILE_N}")
    return m, n, k


def dequantize_kernel_layout(qweight, scales, tables, bits, group_size, k, dtype=None) -> torch.Tensor:
    """Kernel layout -> dense ``[N, K]`` in ``dtype`` (default: the scales dtype)."""
    n = scales.shape[0]
    dtype = dtype or scales.dtype
    if dtype != scales.dtype:
        _fail("dequantize: dtype must equal the scales dtype")
    w = torch.empty(n, k, dtype=dtype, device=qweight.device)
    _ext().dequant(qweight, scales.contiguous(), tables, w, bits, group_size)
    return w


def row_slabs(n: int, k: int, slab_bytes: Optional[int], elem_bytes: int = 2) -> list[tuple[int, int]]:
    """Row ranges ``[n0, n1)`` (multiples of 16) of the dense path: each slab's dequantized weights
    take at most ``slab_bytes`` (at least one 16-row tile); one range when ``slab_bytes`` is 0/None
    or the whole matrix fits. Slabs bound the dense path's scratch (N*K*2 bytes otherwise: 940 MB
    for a 70B gate_up), at a cost in speed: on H200, 16 / 32 MB slabs ran at 0.53x / 0.62x of cuBLAS
    (geo-mean, M = 256 and 1024) against 0.73x for the whole matrix (kernels/NOTES.md, v11), so the
    shipped configs leave ``dense_slab_bytes`` at 0."""
    if not slab_bytes or n * k * elem_bytes <= slab_bytes:
        return [(0, n)]
    rows = max(TILE_N, slab_bytes // (elem_bytes * k) // TILE_N * TILE_N)
    return [(r, min(n, r + rows)) for r in range(0, n, rows)]


def dense_gemm(x, qweight, scales, tables, bits, group_size, k, slab_bytes: Optional[int] = None) -> torch.Tensor:
    """Dequantize + cuBLAS, by row slabs (:func:`row_slabs`) into one reused scratch buffer: each
    slab is dequantized, then multiplied into its columns of the output (stream-ordered, so the
    next slab's dequantize waits for the previous matmul; graph-safe)."""
    m, n = x.shape[0], scales.shape[0]
    slabs = row_slabs(n, k, slab_bytes, scales.element_size())
    if len(slabs) == 1:
        return torch.nn.functional.linear(x, dequantize_kernel_layout(qweight, scales, tables, bits, group_size, k))
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    buf = torch.empty(slabs[0][1] - slabs[0][0], k, dtype=scales.dtype, device=x.device)
    scales = scales.contiguous()
    for n0, n1 in slabs:
        w = buf[: n1 - n0]
        _ext().dequant(qweight[n0:n1], scales[n0:n1], tables[n0 // TILE_N : n1 // TILE_N], w, bits, group_size)
        torch.mm(x, w.t(), out=out[:, n0:n1])  # a strided output column block: cuBLAS writes it in place
    return out


def choose_path(m: int, dtype: torch.dtype, cfg: dict, device_index: int, n: Optional[int] = None,
                k: Optional[int] = None) -> str:
    """``lut`` (mma.sync decode kernel), ``tc`` (sm_90a wgmma kernel) or ``dense`` (dequantize + cuBLAS).

    In the tensor-core M range, small layers (N * K <= ``tc_dense_max_nk``) go dense instead: their
    weights dequantize in a few microseconds and cuBLAS beats both LUT kernels on them (H200, M=64:
    8B o 4096 x 4096 dense 21.3 us, wgmma 22.8 us, mma.sync 26.2 us). ``tc_large`` (optional):
    ``[min_nk, max_m]`` entries; a layer with N * K >= min_nk keeps the tensor-core path up to M =
    max_m (the largest such entry): the wgmma kernel needs no dequantized copy, and on large layers
    that beats dequantize + cuBLAS at larger M (H200 v16 full plan, M = 256: every layer from 8B
    down's N * K = 56 Mi on, e.g. 8B gate_up 113 vs 173 us, 70B down 223 vs 335, but 8B qkv 46 vs
    40; M = 1024: from 112 Mi on, 8B gate_up 429 vs 434, 70B down 844 vs 952, 70B gate_up 1715 vs
    1837, but 70B qkv 368 vs 308; M = 4096: no layer).

    Below ``tc_min_m``, up to M = ``TC_SMALL_MAX_M``, layers with N * K >= ``tc_small_min_nk`` run the
    tensor-core path from ``tc_small_min_m`` (optional keys; block_m 32 from ``tc_block_m``): its decode-size kernels
    (BN = 32, activations gathered in-kernel by a producer warp) beat the mma.sync kernel there (H200
    v15, M = 17 / 32, 8 shapes: 0.872x the time, every shape faster; 8B gate_up 59.6 / 67.3 -> 49.2 /
    50.5 us, 70B down 92.0 / 98.8 -> 85.2 / 87.3). Smaller layers were not measured and keep the
    mma.sync kernel.
    """
    if dtype == torch.float32:
        return "dense"
    known = n is not None and k is not None  # the layer's shape (without it: the M thresholds alone)
    small_m, small_nk = cfg.get("tc_small_min_m"), cfg.get("tc_small_min_nk")  # absent or null: no such rule
    if (known and small_m is not None and small_nk is not None
            and small_m <= m <= min(TC_SMALL_MAX_M, cfg["tc_min_m"] - 1) and n * k >= small_nk
            and tc_available(device_index)):
        return "tc"
    tc_max_m = cfg["tc_max_m"]
    if known:
        tc_max_m = max([tc_max_m] + [max_m for min_nk, max_m in cfg.get("tc_large") or () if n * k >= min_nk])
    if cfg["tc_min_m"] <= m <= tc_max_m and tc_available(device_index):
        return "dense" if known and n * k <= cfg.get("tc_dense_max_nk", 0) else "tc"
    return "dense" if m >= cfg["dequant_min_m"] else "lut"


def _split_buffers(splits: int, partial_floats: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Split-K fp32 partials (from the caching allocator: no cudaMalloc in a graph replay) and the
    device's persistent arrival counters; empty tensors when the GEMM is not split."""
    if splits > 1:
        return torch.empty(partial_floats, dtype=torch.float32, device=device), _counters_for(device)
    return torch.empty(0, dtype=torch.float32, device=device), torch.empty(0, dtype=torch.int32, device=device)


def _rows_for_kernel(x: torch.Tensor) -> torch.Tensor:
    """x as the kernels read it: contiguous rows from a 16-byte aligned start (a copy only if not)."""
    x = x.contiguous()
    return x.clone() if x.data_ptr() % 16 else x


def gemm(x, qweight, scales, tables, bits, group_size, m_tiles=None, splits=None, force_path=None, block_m=None,
         warps=None, slab_bytes=None, x_ahead=None, k_slices=None, stream_k=None, sk_ctas=None):
    """Kernel-layout GEMM without the checks of the op (benchmarks use this to pick a path)."""
    m, k = x.shape
    n = scales.shape[0]
    if m == 0:
        return x.new_empty((0, n))
    dev_index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    cfg = device_config(dev_index)
    path = force_path or choose_path(m, x.dtype, cfg, dev_index, n, k)
    if path == "tc":
        if not tc_available(dev_index):
            _fail("the tensor-core path needs an sm_90 (Hopper) GPU and a build for sm_90a")
        if x.dtype not in (torch.float16, torch.bfloat16):
            _fail(f"the tensor-core path needs fp16/bf16 activations, got {x.dtype}")
        pl = plan_tc(m, n, k, cfg, block_m, splits, stream_k, sk_ctas)
        # up to wgmma_gather_max_rows() rows per CTA the kernel gathers the K order itself
        xp = permute_activations(x) if pl["block_m"] > _tc_gather_max_block_m() else _rows_for_kernel(x)
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
        sk = pl["stream_k"]
        if sk is not None:
            ws = torch.empty(2 * sk["ctas"] * pl["block_m"] * TC_ROWS_PER_CTA, dtype=torch.float32, device=x.device)
            _ext().gemm_wgmma_sk(xp, k, qweight, scales, tables, out, ws, _counters_for(x.device), bits, group_size,
                                 pl["block_m"], sk["ctas"], sk["dp_tiles"], sk["units"])
            return out
        ws, counters = _split_buffers(pl["splits"], pl["splits"] * m * n, x.device)
        _ext().gemm_wgmma(xp, k, qweight, scales, tables, out, ws, counters, bits, group_size,
                          pl["splits"], pl["chunks_per_split"], pl["block_m"])
        return out
    if path == "dense":
        return dense_gemm(x, qweight, scales, tables, bits, group_size, k,
                          cfg.get("dense_slab_bytes") if slab_bytes is None else slab_bytes)
    x = _rows_for_kernel(x)
    pl = device_plan(m, n, k, bits, x.dtype, dev_index, cfg, m_tiles, splits, warps, x_ahead, k_slices)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    ws, counters = _split_buffers(pl["splits"], pl["m_chunks"] * pl["splits"] * 8 * pl["m_tiles"] * n, x.device)
    _ext().gemm(x, qweight, scales, tables, out, ws, counters, bits, group_size,
                pl["splits"], pl["chunks_per_split"], pl["m_tiles"], pl["warps"], pl["x_ahead"], pl["k_slices"])
    return out


@lut_gemm.register_kernel("cuda")
def _lut_gemm_cuda(x, qweight, scales, tables, shard_ends, bits, group_size):
    check_cuda_args(x, qweight, scales, tables, shard_ends, bits, group_size)
    return gemm(x, qweight, scales, tables, bits, group_size)


__all__ = ["prepare", "gemm", "plan", "plan_tc", "choose_path", "tc_available", "device_config", "check_cuda_args",
           "dequantize_kernel_layout", "m_tiles_for"]
