"""Dense weight -> (indices, group scales) and the canonical packed layout (format v1).

Packing, for every bits value: a row's indices form one little-endian bit stream (index k at bits
``[b*k, b*k + b)``) cut into 32-bit words, stored as int32 ``[N, K*b/32]``. A group of G >= 32
indices covers whole words, so TP shards are plain slices (see format.py).
"""
from __future__ import annotations

import torch

from .tables import check_bits, validate_table

WORD_BITS = 32


def _check_indices(q: torch.Tensor, bits: int) -> None:
    if q.dim() != 2:
        raise ValueError(f"indices must be 2-D [N, K], got shape {tuple(q.shape)}")
    if q.shape[1] % WORD_BITS:
        raise ValueError(f"K={q.shape[1]} must be a multiple of {WORD_BITS} to pack {bits}-bit indices")


def _to_int32_words(words: torch.Tensor) -> torch.Tensor:
    """int64 holding unsigned 32-bit values -> int32 with the same bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack(q: torch.Tensor, bits: int, chunk_elems: int = 1 << 24) -> torch.Tensor:
    """Indices ``[N, K]`` (any integer dtype, values in [0, 2^bits)) -> int32 ``[N, K*bits/32]``.

    Works on row chunks of about ``chunk_elems`` indices, so an 8B/70B layer packs in bounded memory.
    """
    check_bits(bits)
    _check_indices(q, bits)
    n, k = q.shape
    if q.numel() and (q.min() < 0 or q.max() >= 2**bits):
        raise ValueError(f"indices out of range for {bits} bits: [{int(q.min())}, {int(q.max())}]")
    out = torch.empty(n, k * bits // WORD_BITS, dtype=torch.int32, device=q.device)
    rows = max(1, chunk_elems // max(k, 1))
    for r in range(0, n, rows):
        out[r : r + rows] = _pack_rows(q[r : r + rows].to(torch.int64), bits)
    return out


def _pack_rows(q: torch.Tensor, bits: int) -> torch.Tensor:
    n, k = q.shape
    if WORD_BITS % bits == 0:  # b = 2, 4: whole indices per word, OR the shifted fields together
        shifts = torch.arange(0, WORD_BITS, bits, dtype=torch.int64, device=q.device)
        words = (q.view(n, -1, WORD_BITS // bits) << shifts).sum(-1)
        return _to_int32_words(words)
    # b = 3: expand every index into its bits, lay them out as one stream per row, regroup by 32.
    bit_pos = torch.arange(bits, dtype=torch.int64, device=q.device)
    stream = ((q.unsqueeze(-1) >> bit_pos) & 1).reshape(n, k * bits // WORD_BITS, WORD_BITS)
    weights = torch.ones(WORD_BITS, dtype=torch.int64, device=q.device) << torch.arange(WORD_BITS, device=q.device)
    return _to_int32_words((stream * weights).sum(-1))


def _unpack_gather_plan(k: int, bits: int, device: torch.device):
    pos = torch.arange(k, device=device, dtype=torch.int64) * bits
    lo = pos // WORD_BITS
    off = pos % WORD_BITS
    # The word after `lo` supplies the high bits of a 3-bit index that straddles two words.
    hi = torch.clamp(lo + 1, max=k * bits // WORD_BITS - 1)
    return lo, hi, off


def unpack(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 ``[N, K*bits/32]`` -> int64 indices ``[N, K]`` (inverse of :func:`pack`)."""
    check_bits(bits)
    if qweight.dtype != torch.int32 or qweight.dim() != 2:
        raise ValueError(f"qweight must be int32 [N, K*bits/32], got {qweight.dtype} {tuple(qweight.shape)}")
    n, words = qweight.shape
    if (words * WORD_BITS) % bits:
        raise ValueError(f"qweight has {words} words per row, not a whole number of {bits}-bit indices")
    k = words * WORD_BITS // bits
    if WORD_BITS % bits == 0:
        # b = 2, 4: whole indices per word; shift-and-mask in int32 (fast; the CPU op's hot path).
        shifts = torch.arange(0, WORD_BITS, bits, dtype=torch.int32, device=qweight.device)
        fields = (qweight.unsqueeze(-1) >> shifts) & (2**bits - 1)  # arithmetic shift; masked
        return fields.reshape(n, k).to(torch.int64)
    lo, hi, off = _unpack_gather_plan(k, bits, qweight.device)
    w = qweight.to(torch.int64) & 0xFFFFFFFF
    low = w.index_select(1, lo)
    high = w.index_select(1, hi) & 0xFF  # at most 2 bits are needed from the next word
    return ((low | (high << WORD_BITS)) >> off) & (2**bits - 1)


def resolve_group_size(group_size: int, k: int) -> int:
    """-1 (channel-wise) -> K; otherwise check that G divides K."""
    g = k if group_size == -1 else int(group_size)
    if g <= 0 or k % g:
        raise ValueError(f"group_size={group_size} does not divide the input size K={k}")
    return g


def quantize_weight(
    weight: torch.Tensor, bits: int, group_size: int, table: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest LUT quantization of ``W[N, K]``.

    Returns ``(q, scales)``: int64 indices ``[N, K]`` and float32 scales ``[N, K/G]`` with
    ``scale = absmax(group) / max|table|`` and ``q = argmin_j |w/scale - table[j]|``
    (ties go to the smaller table value).
    """
    check_bits(bits)
    table = validate_table(table, bits).to(weight.device)
    n, k = weight.shape
    g = resolve_group_size(group_size, k)
    w = weight.detach().to(torch.float32).reshape(n, k // g, g)
    scales = w.abs().amax(-1) / table.abs().max()
    safe = torch.where(scales == 0, torch.ones_like(scales), scales)
    normed = (w / safe.unsqueeze(-1)).reshape(n, k)
    q = codes_for(normed, table)
    return q, scales


def codes_for(normed: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index of the nearest table value for each (already scaled) value; ties go to the smaller value.

    Binary search against the midpoints of the sorted table (tables need not be sorted).
    """
    values, perm = table.to(normed.device, torch.float32).sort()
    midpoints = (values[1:] + values[:-1]) / 2
    return perm[torch.bucketize(normed.contiguous(), midpoints)]


def dequantize(
    qweight: torch.Tensor, scales: torch.Tensor, table: torch.Tensor, bits: int, group_size: int
) -> torch.Tensor:
    """Canonical packed layer -> float32 ``W_hat[N, K] = table[q] * scales[n, k // G]``."""
    q = unpack(qweight, bits)
    k = q.shape[1]
    g = resolve_group_size(group_size, k)
    values = table.to(torch.float32).to(q.device)[q]
    return values * scales.to(torch.float32).repeat_interleave(g, dim=1)


__all__ = ["pack", "unpack", "quantize_weight", "codes_for", "dequantize", "resolve_group_size"]
