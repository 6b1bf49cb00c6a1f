"""bitsandbytes 4-bit (nf4 / fp4, with or without double quantization) -> flute format v1.

No re-quantization: bnb's 4-bit indices become our indices, bnb's code becomes the layer's table
and bnb's per-block absmax becomes the scales, with ``group_size = blocksize``.

How bnb stores a ``Linear4bit`` weight ``W[N, K]`` (bitsandbytes 0.4x-0.50, checked against its
code: ``functional.quantize_4bit`` / ``_dequantize_4bit_compute`` / ``QuantState.as_dict``):

- ``weight``: ``W`` flattened row-major, two 4-bit codes per byte, **element 2i in the high
  nibble**, element 2i+1 in the low nibble; stored as uint8 ``[N*K/2, 1]`` (or, with
  ``bnb_4bit_quant_storage``, the same bytes viewed as another dtype).
- blocks are ``blocksize`` consecutive elements of the flattened ``W``; ``absmax`` [N*K/blocksize]
  float32, or, double-quantized ("nested"), uint8 codes into ``nested_quant_map`` (bnb's 8-bit
  dynamic map) times ``nested_absmax`` per block of ``nested_blocksize`` (256), plus
  ``nested_offset``.
- ``quant_map``: the 16-entry code. NF4 is sorted; FP4 is in bit-pattern order (unsorted, with +0
  and -0), which we keep (our tables need not be sorted).
- the rest (quant_type, blocksize, dtype, shape, nested_*) is a JSON blob stored as a uint8 tensor
  ``weight.quant_state.bitsandbytes__{nf4,fp4}``.

bnb dequantizes ``out = dtype(code[q] * absmax_fp32)``: one float32 product, rounded once to the
layer's dtype. Our ``W_hat = table[q] * scales`` is the same product, so with float32 scales it is
bit-identical to bnb, for every dtype, after the same final rounding. Format v1 stores the scales
in the model dtype; that cast is exact when absmax is plain (it is the absmax of dtype values, so
representable), but a double-quantized absmax (8-bit code * absmax2 + offset, in float32) is not:
then each weight may differ from bnb's by one ulp of the dtype. ``scales_dtype=torch.float32``
avoids that at 2 extra bytes per group.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import sys
from typing import Any, Mapping, Optional

import torch

from ..format import FluteQuantConfig, check_group_size
from ..quantize import pack
from ..tables import nf_table, validate_table
from . import (
    SafetensorsDir, check_src_dir, dense_linear_names, drop_tied_lm_head, read_config_json, write_checkpoint,
)

logger = logging.getLogger(__name__)

QS_PREFIX = "quant_state.bitsandbytes__"
QUANT_TYPES = ("nf4", "fp4")
# bnb's built-in codes (functional.get_4bit_type): its 4-bit kernels hard-code these and ignore
# the stored quant_map, so a stored quant_map that differs cannot be what bnb computed with.
_FP4_RAW = (0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)


def bnb_code(quant_type: str) -> torch.Tensor:
    if quant_type == "nf4":
        return nf_table(4)
    if quant_type == "fp4":
        t = torch.tensor(_FP4_RAW, dtype=torch.float32)
        return t / t.abs().max()  # float32 division, as bnb's data.div_(data.abs().max())
    raise ValueError(f"quant_type={quant_type!r}: bitsandbytes 4-bit is 'nf4' or 'fp4'")


@dataclasses.dataclass
class Bnb4bitState:
    """The fields of a bnb ``QuantState`` that define a 4-bit weight (no bnb import needed)."""

    absmax: torch.Tensor  # float32 [blocks], or uint8 codes if nested
    code: torch.Tensor  # [16]
    blocksize: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    quant_type: Optional[str] = None
    nested_absmax: Optional[torch.Tensor] = None  # state2.absmax, float32
    nested_code: Optional[torch.Tensor] = None  # state2.code, [256]
    nested_blocksize: Optional[int] = None
    nested_dtype: torch.dtype = torch.float32
    offset: Optional[float | torch.Tensor] = None

    @property
    def nested(self) -> bool:
        return self.nested_absmax is not None

    @classmethod
    def from_quant_state(cls, qs: Any) -> "Bnb4bitState":
        """From a ``bitsandbytes.functional.QuantState`` (duck-typed)."""
        s2 = qs.state2
        return cls(
            absmax=qs.absmax, code=qs.code, blocksize=int(qs.blocksize), dtype=qs.dtype,
            shape=tuple(qs.shape), quant_type=qs.quant_type,
            nested_absmax=None if s2 is None else s2.absmax,
            nested_code=None if s2 is None else s2.code,
            nested_blocksize=None if s2 is None else int(s2.blocksize),
            nested_dtype=torch.float32 if s2 is None else s2.dtype,
            offset=qs.offset,
        )

    @classmethod
    def from_serialized(cls, prefix: str, tensors: Mapping[str, torch.Tensor]) -> "Bnb4bitState":
        """From the state-dict entries ``{prefix}.weight.*`` that ``QuantState.as_dict(packed=True)``
        writes (what transformers' save_pretrained stores)."""
        base = f"{prefix}.weight."
        blobs = [k for k in QUANT_TYPES if f"{base}{QS_PREFIX}{k}" in tensors]
        if len(blobs) != 1:
            raise ValueError(f"{prefix}: expected one tensor {base}{QS_PREFIX}{{nf4,fp4}}, found {len(blobs)}")
        blob_name = f"{base}{QS_PREFIX}{blobs[0]}"
        try:
            meta = json.loads(bytes(tensors[blob_name].to(torch.uint8).cpu().numpy()).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{blob_name}: not bnb's JSON quant-state blob ({e})") from e

        def need(key: str) -> Any:
            if key not in meta:
                raise ValueError(f"{blob_name}: the quant state has no field {key!r}")
            return meta[key]

        def tensor(suffix: str) -> torch.Tensor:
            if base + suffix not in tensors:
                raise ValueError(f"{prefix}: tensor {base + suffix} is missing")
            return tensors[base + suffix]

        nested = "nested_blocksize" in meta
        return cls(
            absmax=tensor("absmax"),
            code=tensor("quant_map"),
            blocksize=int(need("blocksize")),
            dtype=_dtype(need("dtype"), f"{blob_name}: dtype"),
            shape=tuple(need("shape")),
            quant_type=meta.get("quant_type", blobs[0]),
            nested_absmax=tensor("nested_absmax") if nested else None,
            nested_code=tensor("nested_quant_map") if nested else None,
            nested_blocksize=int(meta["nested_blocksize"]) if nested else None,
            nested_dtype=_dtype(meta.get("nested_dtype", "float32"), f"{blob_name}: nested_dtype"),
            offset=float(need("nested_offset")) if nested else None,
        )


def _dtype(name: str, what: str) -> torch.dtype:
    dt = getattr(torch, str(name).replace("torch.", ""), None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"{what}={name!r} is not a torch dtype")
    return dt


def materialize_absmax(state: Bnb4bitState, name: str = "weight") -> torch.Tensor:
    """Per-block scales as float32, computed exactly as bnb does before dequantizing.

    Nested: ``dequantize_blockwise(absmax, state2) + offset`` = ``code2[q] * absmax2[block]``
    (float32, rounded once) then ``+ offset`` (float32, rounded once) — the same two roundings.
    """
    if not state.nested:
        if state.absmax.dtype != torch.float32:
            # bnb's CPU/CUDA kernels upcast a non-fp32 absmax first; do the same.
            return state.absmax.to(torch.float32)
        return state.absmax
    if state.nested_dtype != torch.float32:
        raise ValueError(f"{name}: nested_dtype={state.nested_dtype} is not supported (bnb writes float32)")
    if state.absmax.dtype != torch.uint8:
        raise ValueError(f"{name}.absmax: double-quantized absmax must be uint8 codes, got {state.absmax.dtype}")
    code2 = state.nested_code.to(torch.float32).flatten()
    if code2.numel() != 256:
        raise ValueError(f"{name}.nested_quant_map has {code2.numel()} entries, expected 256")
    bs2 = int(state.nested_blocksize)
    n = state.absmax.numel()
    blocks2 = -(-n // bs2)
    absmax2 = state.nested_absmax.to(torch.float32).flatten()
    if absmax2.numel() != blocks2:
        raise ValueError(f"{name}.nested_absmax has {absmax2.numel()} entries, expected ceil({n}/{bs2}) = {blocks2}")
    vals = code2[state.absmax.flatten().long()]
    vals = torch.nn.functional.pad(vals, (0, blocks2 * bs2 - n)).view(blocks2, bs2)
    out = (vals * absmax2.unsqueeze(1)).flatten()[:n]
    offset = torch.as_tensor(state.offset, dtype=torch.float32)  # bnb keeps the offset as a float32 tensor
    return out + offset


def unpack_bnb_4bit(packed: torch.Tensor, shape: tuple[int, int], name: str = "weight") -> torch.Tensor:
    """bnb's packed bytes -> uint8 indices ``[N, K]`` (high nibble first)."""
    n, k = shape
    b = _as_bytes(packed, n * k, name)
    return torch.stack([b >> 4, b & 0xF], dim=-1).view(n, k)


def _as_bytes(packed: torch.Tensor, numel: int, name: str) -> torch.Tensor:
    b = packed.contiguous()
    if b.dtype != torch.uint8:  # bnb_4bit_quant_storage: same bytes viewed as e.g. bf16
        b = b.view(-1).view(torch.uint8)
    b = b.flatten()
    if b.numel() * 2 != numel:
        raise ValueError(f"{name}: {b.numel()} packed bytes cannot hold shape with {numel} 4-bit values")
    return b


def _bnb_bytes_to_qweight(packed: torch.Tensor, n: int, k: int, name: str) -> torch.Tensor:
    """Repack bnb bytes into our int32 layout without expanding to indices.

    Ours puts index k at bits [4k, 4k+4) of the row's little-endian stream, i.e. element 2i in
    the *low* nibble of byte i; bnb puts it in the high nibble. So: swap nibbles, then read each
    row's bytes as little-endian int32 words. The byte view needs a little-endian host; elsewhere
    fall back to the generic packer.
    """
    b = _as_bytes(packed, n * k, name)
    if sys.byteorder != "little":
        return pack(torch.stack([b >> 4, b & 0xF], -1).view(n, k), 4)
    swapped = ((b << 4) | (b >> 4)).view(n, k // 2)  # uint8 shifts drop the bits pushed out
    return swapped.view(torch.int32)


def convert_4bit_weight(
    packed: torch.Tensor,
    state: Bnb4bitState | Any,
    scales_dtype: Optional[torch.dtype] = None,
    name: str = "weight",
) -> dict[str, torch.Tensor]:
    """One bnb 4-bit weight -> ``{"qweight", "scales", "table"}`` in format v1.

    ``state``: a :class:`Bnb4bitState` or a bnb ``QuantState``. ``scales_dtype`` defaults to the
    dtype bnb dequantizes to (``quant_state.dtype``, the model dtype). ``name`` only labels errors.
    """
    if not isinstance(state, Bnb4bitState):
        state = Bnb4bitState.from_quant_state(state)
    if len(state.shape) != 2:
        raise ValueError(f"{name}: bnb shape {state.shape} is not a 2-D linear weight")
    n, k = (int(s) for s in state.shape)
    g = int(state.blocksize)
    if g not in (32, 64, 128, 256):
        raise ValueError(
            f"{name}: bnb blocksize={g} has no flute group size; flute supports 32, 64, 128, 256"
        )
    check_group_size(g, f"{name}: group_size (bnb blocksize)")
    if k % g:
        # bnb blocks run over the flattened weight, so they would straddle rows: not per-row groups.
        raise ValueError(f"{name}: in_features K={k} is not a multiple of bnb blocksize={g}")

    code = state.code.detach().to(torch.float32).flatten().cpu()
    table = validate_table(code, 4, f"{name}.quant_map")
    if state.quant_type is not None and not torch.equal(table, bnb_code(state.quant_type)):
        raise ValueError(
            f"{name}.quant_map differs from bitsandbytes' built-in {state.quant_type} code, which bnb's "
            f"4-bit kernels use regardless of quant_map: this checkpoint does not describe what bnb computes"
        )

    absmax = materialize_absmax(state, name)
    if absmax.numel() != n * k // g:
        raise ValueError(f"{name}.absmax has {absmax.numel()} blocks, expected N*K/blocksize = {n * k // g}")
    scales = absmax.reshape(n, k // g).to(scales_dtype or state.dtype)
    return {"qweight": _bnb_bytes_to_qweight(packed, n, k, name), "scales": scales, "table": table.clone()}


def quantized_prefixes(keys) -> list[str]:
    """Layer prefixes that carry a bnb 4-bit quant state in a state dict."""
    out = []
    for key in keys:
        for qt in QUANT_TYPES:
            suffix = f".weight.{QS_PREFIX}{qt}"
            if key.endswith(suffix):
                out.append(key[: -len(suffix)])
    return sorted(out)


def convert_state_dict(
    tensors: Mapping[str, torch.Tensor], scales_dtype: Optional[torch.dtype] = None
) -> tuple[dict[str, torch.Tensor], FluteQuantConfig, list[str]]:
    """A bnb 4-bit state dict (or a lazy :class:`SafetensorsDir`) -> (flute state dict, config
    without modules_to_not_convert filled in, quantized layer prefixes)."""
    prefixes = quantized_prefixes(tensors.keys())
    if not prefixes:
        raise ValueError("no bitsandbytes 4-bit layers found (no '*.weight.quant_state.bitsandbytes__nf4/fp4' tensors)")
    owned = set()
    out: dict[str, torch.Tensor] = {}
    blocksizes, tables = set(), []
    for prefix in prefixes:
        state = Bnb4bitState.from_serialized(prefix, tensors)
        out.update({f"{prefix}.{s}": t for s, t in convert_4bit_weight(tensors[f"{prefix}.weight"], state,
                                                                         scales_dtype, f"{prefix}.weight").items()})
        blocksizes.add(state.blocksize)
        tables.append(out[f"{prefix}.table"])
        owned.update(k for k in tensors.keys() if k == f"{prefix}.weight" or k.startswith(f"{prefix}.weight."))
    if len(blocksizes) != 1:
        raise ValueError(f"layers use different bnb blocksizes {sorted(blocksizes)}; flute has one group_size per model")
    for key in tensors.keys():
        if key not in owned:
            out[key] = tensors[key]  # dense tensors (embeddings, norms, biases, skipped layers)
    nf = nf_table(4)
    kind = "nf" if all(torch.equal(t, nf) for t in tables) else "custom"
    cfg = FluteQuantConfig(bits=4, group_size=blocksizes.pop(), table=kind)
    return out, cfg, prefixes


def _modules_to_not_convert(dense: Optional[list[str]], bnb_cfg: dict) -> list[str]:
    if dense is not None:
        return dense
    # Fallback when the architecture cannot be built: what transformers' bnb quantizer skipped.
    skip = bnb_cfg.get("llm_int8_skip_modules") or []
    return sorted(set(["lm_head", *skip]))


def convert_dir(src: str, dst: str, scales_dtype: Optional[torch.dtype] = None) -> str:
    """A bnb 4-bit HF directory (save_pretrained) -> a flute checkpoint directory. Returns ``dst``."""
    check_src_dir(src)
    config = read_config_json(src)
    qc = config.get("quantization_config") or {}
    if qc.get("quant_method") not in (None, "bitsandbytes"):
        raise ValueError(f"{src}/config.json: quantization_config.quant_method={qc.get('quant_method')!r}, "
                         "expected 'bitsandbytes'")
    if qc.get("load_in_8bit") or qc.get("_load_in_8bit"):
        raise ValueError(f"{src}: a bitsandbytes 8-bit (LLM.int8) checkpoint; only 4-bit converts to flute")
    state, cfg, prefixes = convert_state_dict(SafetensorsDir(src), scales_dtype)
    cfg.modules_to_not_convert = _modules_to_not_convert(dense_linear_names(config, prefixes), qc)
    drop_tied_lm_head(state, config)
    logger.info("converted %d bnb 4-bit layers (group_size=%d, table=%s)", len(prefixes), cfg.group_size, cfg.table)
    return write_checkpoint(dst, state, config, cfg, aux_from=src)


def convert_model(model: torch.nn.Module, dst: str, scales_dtype: Optional[torch.dtype] = None,
                  tokenizer=None) -> str:
    """A loaded transformers model quantized by bnb 4-bit -> a flute checkpoint directory.

    Goes through ``model.state_dict()``: bnb's ``Linear4bit._save_to_state_dict`` undoes the
    CPU-only weight repacking its forward may have applied, and yields the serialized fields.
    """
    raw = model.state_dict()
    state, cfg, prefixes = convert_state_dict(raw, scales_dtype)
    quantized = set(prefixes)
    cfg.modules_to_not_convert = [
        n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in quantized
    ]
    config = model.config.to_dict()
    drop_tied_lm_head(state, config)
    write_checkpoint(dst, state, config, cfg)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(dst)
    if tokenizer is not None:
        tokenizer.save_pretrained(dst)
    return dst


__all__ = [
    "Bnb4bitState", "bnb_code", "materialize_absmax", "unpack_bnb_4bit", "convert_4bit_weight",
    "convert_state_dict", "convert_dir", "convert_model", "quantized_prefixes",
]
