"""FLUTE's own (legacy, <= v0.3) checkpoints -> flute format v1.

A FLUTE checkpoint (e.g. radi-cho/Meta-Llama-3.1-8B-FLUTE) is an HF directory plus
``flute_config.json`` ``{num_sms, num_bits, group_size[, version]}``; each quantized linear
``W[N, K]`` (every nn.Linear inside ``model.layers``) stores

- ``weight``  int16 ``[N*b/16, K]``: indices in FLUTE's interleaved GEMM layout (below),
- ``scales``  ``[N, K/G]`` model dtype (group absmax; FLUTE's tables have max |v| = 1),
- ``tables``  ``[2^b]`` model dtype (learned NFL tables differ per layer),
- ``tables2`` float32 ``[2^b, 2^b, 1]``: pairs of ``tables`` entries for the kernel; derived, dropped.

The layout (FLUTE ``utils.pack``; see shared/flute-format.md §3) depends only on the template's
TileP, which is 32 for every template legacy FLUTE packs with, so it does not depend on
``num_sms``. With ``n = 32V*c + 32*j + t`` (t < 32) and ``k = 2*k2 + r``:

- b = 4, 2 (V = 16/b fields per int16, LSB first): field s of ``weight[32c + t, 2k2 + r]`` is
  ``Q[32V*c + 32*(r*V/2 + s//2) + t, 2k2 + 1 - s%2]`` — each pair of fields is the 2b-bit chunk
  ``Q[n, 2k2] << b | Q[n, 2k2 + 1]`` the kernel looks up in ``tables2``.
- b = 3 (512-row blocks c, 16 sub-rows m = J[idx//2]): 32 codes
  ``code[idx] = Q[512c + 32*J[idx//2] + t, 2k2 + 1 - idx%2]`` form a 96-bit stream S (code idx at
  bits 3*idx..3*idx+2), cut into 6 int16 words: ``word(0,q) = S[30q : 30q+16]``,
  ``word(1,q) = S[30q+16 : 30q+30] | S[90+2q : 92+2q] << 14``; word (r, q) sits in column 2k2 + r,
  row 32c + t (q = 0, "plane 0") or N/16 + 64c + 32(q-1) + t (q = 1, 2).

FLUTE needs N to be a multiple of 32V (128 for b=4, 256 for b=2) or of 512 for b=3, and K even;
flute format v1 also needs K % 32 == 0.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Optional, Union

import torch

from ..format import FluteQuantConfig
from ..quantize import pack, quantize_weight
from ..tables import check_bits, nf_table, validate_table
from . import (
    SafetensorsDir, check_src_dir, dense_linear_names, drop_tied_lm_head, read_config_json, write_checkpoint,
)

logger = logging.getLogger(__name__)

FLUTE_CONFIG = "flute_config.json"
TILE_P = 32
# b=3: order in which a (c, t) column's 16 row sub-blocks fill the 96-bit stream, two codes each.
_J3 = (0, 3, 6, 9, 12, 1, 4, 7, 10, 13, 2, 5, 8, 11, 14, 15)
# Rows per packing block: 32*V for b = 2, 4 (V = 16/b indices per int16), 512 for b = 3.
ROW_MULTIPLE = {2: 256, 3: 512, 4: 128}
# Limits the int64 temporaries of unpack_flute to ~this many indices at a time.
_CHUNK_ELEMS = 1 << 20


def _check_flute_shape(n: int, k: int, bits: int, what: str = "weight") -> None:
    check_bits(bits)
    if n % ROW_MULTIPLE[bits]:
        raise ValueError(
            f"{what}: FLUTE packs {bits}-bit weights in blocks of {ROW_MULTIPLE[bits]} output rows; "
            f"N={n} is not a multiple of {ROW_MULTIPLE[bits]}"
        )
    if k % 2:
        raise ValueError(f"{what}: FLUTE needs an even in_features K, got K={k}")


def _to_int16(words: torch.Tensor) -> torch.Tensor:
    """Integers holding unsigned 16-bit values -> int16 with the same bits."""
    words = words.to(torch.int32)
    return torch.where(words >= 2**15, words - 2**16, words).to(torch.int16)


def _pair_perm(v: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For b = 2/4: field (r, s) of a word pair holds sub-row j = r*V/2 + s//2, column kk = 1 - s%2."""
    r = torch.arange(2).view(2, 1)
    s = torch.arange(v).view(1, v)
    return r * (v // 2) + s // 2, (1 - s % 2).expand(2, v)


def pack_flute(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Indices ``Q[N, K]`` -> FLUTE's int16 ``weight[N*bits/16, K]`` (TileP = 32).

    Written from FLUTE's per-bit formulas (module docstring); used to build FLUTE-format
    checkpoints for tests, not on any hot path.
    """
    if q.dim() != 2:
        raise ValueError(f"Q must be 2-D [N, K], got shape {tuple(q.shape)}")
    n, k = q.shape
    _check_flute_shape(n, k, bits, "Q")
    q = q.to(torch.int64)
    if q.numel() and (q.min() < 0 or q.max() >= 2**bits):
        raise ValueError(f"Q has values outside [0, {2**bits}) for {bits} bits")
    k2 = k // 2
    if bits in (2, 4):
        v = 16 // bits
        j, kk = _pair_perm(v)
        q5 = q.view(n // (TILE_P * v), v, TILE_P, k2, 2).permute(0, 2, 3, 1, 4)  # [C, t, k2, j, kk]
        fields = q5[..., j, kk]  # [C, t, k2, r, s]
        shifts = torch.arange(v) * bits
        words = (fields << shifts).sum(-1)  # fields are disjoint: sum == or
        return _to_int16(words).reshape(n * bits // 16, k)
    # b = 3: build the 96-bit stream bit by bit, then cut it into the six words.
    c = n // 512
    q5 = q.view(c, 16, TILE_P, k2, 2).permute(0, 2, 3, 1, 4)  # [C, t, k2, m, kk]
    idx = torch.arange(32)
    codes = q5[..., torch.tensor(_J3)[idx // 2], 1 - idx % 2]  # [C, t, k2, 32]
    stream = ((codes.unsqueeze(-1) >> torch.arange(3)) & 1).flatten(-2)  # [C, t, k2, 96]: bit 3*idx+i
    src = torch.empty(2, 3, 16, dtype=torch.int64)  # stream bit feeding each bit of word (r, q)
    for qq in range(3):
        src[0, qq] = torch.arange(30 * qq, 30 * qq + 16)
        src[1, qq, :14] = torch.arange(30 * qq + 16, 30 * qq + 30)
        src[1, qq, 14:] = torch.tensor([90 + 2 * qq, 91 + 2 * qq])
    words = (stream[..., src] << torch.arange(16)).sum(-1)  # [C, t, k2, r, q]
    words = _to_int16(words)
    plane0 = words[..., 0].reshape(c * TILE_P, k)  # row 32c + t, column 2k2 + r
    planes12 = words[..., 1:].permute(0, 4, 1, 2, 3).reshape(c * 2 * TILE_P, k)  # row 64c + 32(q-1) + t
    return torch.cat([plane0, planes12], 0)


def unpack_flute(weight: torch.Tensor, bits: int, n: Optional[int] = None, k: Optional[int] = None) -> torch.Tensor:
    """FLUTE's int16 ``weight[N*bits/16, K]`` -> uint8 indices ``Q[N, K]`` (inverse of :func:`pack_flute`).

    Pure tensor ops (runs at load time on 8B-size weights): b = 2/4 split each int16 into its
    fields and undo the row interleave with one permutation; b = 3 reassembles each 96-bit stream
    as two int64s, codes 0-19 in bits 0-59 of the first and codes 20-31 in the second, so no code
    straddles them. Processed in row blocks to bound the temporaries.
    """
    check_bits(bits)
    if weight.dtype != torch.int16 or weight.dim() != 2:
        raise ValueError(f"FLUTE weight must be int16 [N*{bits}/16, K], got {weight.dtype} {tuple(weight.shape)}")
    rows, kw = weight.shape
    if (rows * 16) % bits:
        raise ValueError(f"FLUTE weight has {rows} rows, not N*{bits}/16 for any N")
    n_w = rows * 16 // bits
    if n is not None and n != n_w:
        raise ValueError(f"FLUTE weight with {rows} rows holds N={n_w} {bits}-bit rows, expected N={n}")
    if k is not None and k != kw:
        raise ValueError(f"FLUTE weight has K={kw} columns, expected K={k}")
    n, k = n_w, kw
    _check_flute_shape(n, k, bits)
    block = ROW_MULTIPLE[bits]  # output rows per packing block
    c_total = n // block
    c_step = max(1, _CHUNK_ELEMS // (block * k))
    out = torch.empty(n, k, dtype=torch.uint8, device=weight.device)
    for c0 in range(0, c_total, c_step):
        c1 = min(c_total, c0 + c_step)
        if bits in (2, 4):
            w = weight[c0 * TILE_P : c1 * TILE_P]
            _unpack_24(w, bits, c1 - c0, k, out[c0 * block : c1 * block])
        else:
            p0 = weight[c0 * TILE_P : c1 * TILE_P]
            p12 = weight[n // 16 + c0 * 2 * TILE_P : n // 16 + c1 * 2 * TILE_P]
            _unpack_3(p0, p12, c1 - c0, k, out[c0 * block : c1 * block])
    return out


def _unpack_24(w: torch.Tensor, bits: int, c: int, k: int, dst: torch.Tensor) -> None:
    # Output row n = 32V*c + 32*j + t with j = r*V/2 + s//2, column 2k2 + kk with kk = 1 - s%2:
    # broadcasting word (c, t, k2, r) against the shifts of fields (s//2, kk) writes Q in its
    # final order [C, r, s//2, t, k2, kk] in one pass (arithmetic int16 shifts; the mask trims).
    v = 16 // bits
    sub = torch.arange(v // 2, device=w.device).view(v // 2, 1)
    kk = torch.arange(2, device=w.device).view(1, 2)
    shifts = (bits * (2 * sub + 1 - kk)).to(torch.int16).view(1, 1, v // 2, 1, 1, 2)
    words = w.view(c, TILE_P, k // 2, 2).permute(0, 3, 1, 2)[:, :, None, :, :, None]  # [C, r, 1, t, k2, 1]
    dst.view(c, 2, v // 2, TILE_P, k // 2, 2)[:] = (words >> shifts) & (2**bits - 1)  # [C, r, V/2, t, k2, kk]


def _unpack_3(p0: torch.Tensor, p12: torch.Tensor, c: int, k: int, dst: torch.Tensor) -> None:
    # Word pair (q, r=0/1) holds stream bits S[30q : 30q+30] in its low 16 + 14 bits, i.e. exactly
    # codes 10q .. 10q+9; the three 2-bit tails hold S[90:96], codes 30 and 31. With
    # J = [0,3,6,9,12, 1,4,7,10,13, 2,5,8,11,14, 15], code 10q + 2i + (1 - kk) belongs to row
    # block m = 3i + q, so broadcasting the three 30-bit runs against the shifts of (i, kk) writes
    # Q in its final order [C, m, t, k2, kk]; m = 15 comes from the tails. int32 throughout.
    k2 = k // 2
    u = lambda x: x.to(torch.int32) & 0xFFFF  # noqa: E731  (unsigned 16-bit value)
    w0 = u(p0).view(c, 1, TILE_P, k2, 2)  # q = 0: [C, 1, t, k2, r]
    w12 = u(p12).view(c, 2, TILE_P, k2, 2)  # q = 1, 2
    w = torch.cat([w0, w12], 1)  # [C, q, t, k2, r]
    runs = w[..., 0] | (w[..., 1] & 0x3FFF) << 16  # [C, q, t, k2]: S[30q : 30q+30]
    tails = w[..., 1] >> 14  # [C, q, t, k2]: S[90+2q : 92+2q]
    tail = tails[:, 0] | tails[:, 1] << 2 | tails[:, 2] << 4  # S[90:96]
    i = torch.arange(5, device=p0.device, dtype=torch.int32).view(5, 1)
    kk = torch.arange(2, device=p0.device, dtype=torch.int32).view(1, 2)
    shifts = (3 * (2 * i + 1 - kk)).view(1, 5, 1, 1, 1, 2)
    out = dst.view(c, 16, TILE_P, k2, 2)
    out[:, :15] = ((runs[:, None, :, :, :, None] >> shifts) & 7).view(c, 15, TILE_P, k2, 2)
    out[:, 15] = (tail[..., None] >> (3 * (1 - kk.view(2)))) & 7


def flute_weight_to_qweight(weight: torch.Tensor, bits: int, k: Optional[int] = None) -> torch.Tensor:
    """FLUTE int16 ``weight`` -> our int32 ``qweight[N, K*bits/32]``."""
    q = unpack_flute(weight, bits, k=k)
    return pack(q, bits)


def tables2_from_tables(tables: torch.Tensor) -> torch.Tensor:
    """FLUTE's pair table: ``tables2[i, j]`` = (tables[i], tables[j]) in the table dtype, the pair
    viewed as one float32 (tables[i] in the low half), shape ``[2^b, 2^b, 1]``."""
    if tables.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"tables must be float16 or bfloat16 to build tables2, got {tables.dtype}")
    m = tables.numel()
    pairs = torch.stack([tables.view(m, 1).expand(m, m), tables.view(1, m).expand(m, m)], -1).contiguous()
    return pairs.view(torch.float32)  # [m, m, 1]


# ----------------------------------------------------------------------------- config / dirs


def is_flute_zoo_config(d: dict) -> bool:
    """Does this dict look like FLUTE's ``flute_config.json``?"""
    # Ours says "bits" inside config.json's quantization_config; FLUTE's file says "num_bits".
    return isinstance(d, dict) and isinstance(d.get("num_bits"), int) and isinstance(d.get("group_size"), int)


def read_flute_config(path: str) -> dict:
    """``flute_config.json`` of a FLUTE directory (or the file itself), checked."""
    fname = path if os.path.isfile(path) else os.path.join(path, FLUTE_CONFIG)
    if not os.path.exists(fname):
        raise FileNotFoundError(f"{fname!r} does not exist: not a FLUTE model-zoo checkpoint")
    with open(fname) as f:
        d = json.load(f)
    if not is_flute_zoo_config(d):
        raise ValueError(f"{fname}: expected FLUTE's {{num_sms, num_bits, group_size}}, got keys {sorted(d)}")
    check_bits(d["num_bits"], f"{fname}: num_bits")
    return d


def _zoo_prefixes(tensors) -> list[str]:
    keys = set(tensors.keys())
    return sorted(k[: -len(".tables")] for k in keys if k.endswith(".tables") and k[: -len(".tables")] + ".weight" in keys)


def convert_dir(src: str, dst: str) -> str:
    """A FLUTE model-zoo directory -> a flute format-v1 directory. Returns ``dst``."""
    check_src_dir(src)
    fcfg = read_flute_config(src)
    bits, g = int(fcfg["num_bits"]), int(fcfg["group_size"])
    tensors = SafetensorsDir(src)
    if "num_sms" not in fcfg and any(k.endswith("._extra_state") for k in tensors.keys()):
        # FLUTE >= 0.4 records a per-layer template (TileP may be 64: another layout) only there.
        raise ValueError(f"{src}: a FLUTE >= 0.4 checkpoint (no num_sms, per-layer template_id); "
                         "only legacy (TileP = 32) checkpoints are supported")
    prefixes = _zoo_prefixes(tensors)
    if not prefixes:
        raise ValueError(f"{src}: no FLUTE-quantized layers (no '*.tables' next to an int16 '*.weight')")
    state: dict[str, torch.Tensor] = {}
    owned = set()
    for p in prefixes:
        w = tensors[f"{p}.weight"]
        if w.dtype != torch.int16:
            raise ValueError(f"{p}.weight: FLUTE packed weights are int16, got {w.dtype}")
        n, k = w.shape[0] * 16 // bits, w.shape[1]
        if k % 32:
            raise ValueError(f"{p}.weight: K={k} is not a multiple of 32, which flute format v1 needs to pack")
        scales = tensors[f"{p}.scales"]
        if tuple(scales.shape) != (n, k // g):
            raise ValueError(f"{p}.scales has shape {tuple(scales.shape)}, expected [N, K/G] = [{n}, {k // g}]")
        state[f"{p}.qweight"] = flute_weight_to_qweight(w, bits, k)
        state[f"{p}.scales"] = scales
        state[f"{p}.table"] = validate_table(tensors[f"{p}.tables"], bits, f"{p}.tables")
        owned.update({f"{p}.weight", f"{p}.scales", f"{p}.tables", f"{p}.tables2"})
    for key in tensors.keys():
        if key not in owned:
            state[key] = tensors[key]
    config = read_config_json(src)
    dense = dense_linear_names(config, prefixes)
    cfg = FluteQuantConfig(
        bits=bits, group_size=g, table="custom",  # learned NFL tables, one per layer
        modules_to_not_convert=["lm_head"] if dense is None else dense,
    )
    drop_tied_lm_head(state, config)
    logger.info("converted %d FLUTE layers (bits=%d, group_size=%d)", len(prefixes), bits, g)
    return write_checkpoint(dst, state, config, cfg, aux_from=src)


def make_zoo_checkpoint(
    model_or_dir: Union[str, torch.nn.Module], dst: str, bits: int, group_size: int, num_sms: int = 108
) -> str:
    """Write a FLUTE-format (legacy) checkpoint of a dense HF model, as FLUTE's quantizer would:
    NF tables, group absmax scales, ``pack_flute`` weights, ``tables2``, ``flute_config.json``,
    config.json without quantization_config. For tests; every nn.Linear inside ``model.layers``
    is quantized, as FLUTE does, and must meet FLUTE's shape rules."""
    from ..checkpoint import load_dense

    src_dir = model_or_dir if isinstance(model_or_dir, str) else None
    model = load_dense(model_or_dir) if src_dir else model_or_dir
    check_bits(bits)
    table = nf_table(bits)
    state = dict(model.state_dict())
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in f".{n}"]
    if not layers:
        raise ValueError("no nn.Linear layers inside model.layers to quantize")
    for name, m in layers:
        _check_flute_shape(m.out_features, m.in_features, bits, f"{name}.weight")
        dtype = m.weight.dtype
        if dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"{name}.weight: FLUTE checkpoints are float16 or bfloat16, got {dtype}")
        q, scales = quantize_weight(m.weight.detach(), bits, group_size, table)
        tables = table.to(dtype)
        state[f"{name}.weight"] = pack_flute(q, bits)
        state[f"{name}.scales"] = scales.to(dtype)
        state[f"{name}.tables"] = tables
        state[f"{name}.tables2"] = tables2_from_tables(tables)
    flute_config = {"num_sms": num_sms, "num_bits": bits, "group_size": group_size}
    return write_checkpoint(dst, state, model.config.to_dict(), None, aux_from=src_dir,
                            extra_json={FLUTE_CONFIG: flute_config})


__all__ = [
    "pack_flute", "unpack_flute", "flute_weight_to_qweight", "tables2_from_tables", "is_flute_zoo_config",
    "read_flute_config", "convert_dir", "make_zoo_checkpoint", "ROW_MULTIPLE",
]
