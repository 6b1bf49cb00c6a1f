"""Tests of the CUDA LUT-GEMM (flute_vllm.cuda_op + kernels/).

GPU tests skip cleanly without CUDA. The CPU tests check the kernel layout itself: a Python
emulation of the kernel's byte-permute decode must reproduce ``table[q]`` from what ``prepare``
packs, so a layout bug shows on CI even without a GPU.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flute_vllm import cuda_op, ops
from flute_vllm.quantize import pack
from flute_vllm.tables import make_table

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (none visible)")


# ------------------------------------------------------------------------------------------
# CPU: layout emulation and pure-Python validation


def _prmt(a, b, sel):
    src = [(a >> (8 * i)) & 0xFF for i in range(4)] + [(b >> (8 * i)) & 0xFF for i in range(4)]
    out = 0
    for j in range(4):
        nib = (sel >> (4 * j)) & 0xF
        byte = src[nib & 7]
        if nib & 8:
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8 * j)
    return out


def _decode(bits, f, s, lo_t, hi_t):
    """Python copy of kernels/flute_gemm.cu decode<BITS, S>."""
    a = [0] * 4
    if bits == 4:
        w = f[s]
        c = w & 0x77777777
        sh = (w << 4) & 0xFFFFFFFF
        for half, (cc, msel) in enumerate(((c, 0xD9C8), (c >> 16, 0xFBEA))):
            m = _prmt(sh, w, msel)
            la, lb = _prmt(lo_t[0], lo_t[1], cc), _prmt(lo_t[2], lo_t[3], cc)
            ha, hb = _prmt(hi_t[0], hi_t[1], cc), _prmt(hi_t[2], hi_t[3], cc)
            lo = ((la & ~m) | (lb & m)) & 0xFFFFFFFF
            hi = ((ha & ~m) | (hb & m)) & 0xFFFFFFFF
            a[2 * half], a[2 * half + 1] = _prmt(lo, hi, 0x5140), _prmt(lo, hi, 0x7362)
    else:
        wl = f[s >> 1] >> (16 * (s & 1))
        for h in range(2):
            c = (wl >> (2 * h)) & 0x3333
            if bits == 3:
                shift = cuda_op._MSB_SHIFT[2 * s + h]
                c |= ((f[2] << -shift) if shift < 0 else (f[2] >> shift)) & 0x4444
                lo, hi = _prmt(lo_t[0], lo_t[1], c), _prmt(hi_t[0], hi_t[1], c)
            else:
                lo, hi = _prmt(lo_t[0], lo_t[0], c), _prmt(hi_t[0], hi_t[0], c)
            a[2 * h], a[2 * h + 1] = _prmt(lo, hi, 0x5140), _prmt(lo, hi, 0x7362)
    return a


def _table_entry(tw, i):
    """TableRegs::u16 (kernels/flute_device.cuh): byte i of the low and of the high byte table (words
    0-3 / 4-7), picked by byte permutes as the kernel does."""
    def byte_of(v, i):
        return (_prmt(v[0], v[1], i & 7) if i < 8 else _prmt(v[2], v[3], i & 7)) & 0xFF

    return byte_of(tw[0:4], i) | (byte_of(tw[4:8], i) << 8)


def _build_table(bits, tw, copies):
    """build_pair_table<copies> (4-bit) / build_quad_table (2-bit): the shared-memory words, written
    as the kernels write them, by 16-byte piece j (thread j of the build loop)."""
    smem = [None] * (256 * copies * (1 if bits == 4 else 2))
    for j in range(len(smem) // 4):
        if bits == 4:
            e = j // (copies // 4)
            pair = _table_entry(tw, e & 15) | (_table_entry(tw, e >> 4) << 16)
            smem[4 * j : 4 * j + 4] = [pair] * 4
        else:
            e = j // (copies // 2)
            lo = _table_entry(tw, e & 3) | (_table_entry(tw, (e >> 4) & 3) << 16)         # (e0, e1)
            hi = _table_entry(tw, (e >> 2) & 3) | (_table_entry(tw, (e >> 6) & 3) << 16)  # (e4, e5)
            smem[4 * j : 4 * j + 4] = [lo, hi, lo, hi]
    assert None not in smem
    return smem


def _decode_table(bits, f, s, smem, lane, copies):
    """Python copy of the shared-memory table decodes: decode_pair<S> (4-bit) and decode_quad<S>
    (2-bit) reading the words of _build_table at the kernel's addresses (entry * kEntryBytes +
    lane_offset)."""
    a = [0] * 4
    if bits == 4:
        for j in range(4):
            e = (f[s] >> (8 * j)) & 0xFF  # prmt(w, 0, 0x4440 | j)
            a[j] = smem[e * copies + lane % copies]
    else:
        w = f[s >> 1]
        for j in range(2):
            e = (w >> (8 * (2 * (s & 1) + j))) & 0xFF
            base = e * 2 * copies + 2 * (lane % copies)
            a[j], a[j + 2] = smem[base], smem[base + 1]
    return a


@pytest.mark.parametrize("bits,decoder", [(2, "permute"), (3, "permute"), (4, "permute"), (4, "table"), (2, "table")])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernel_layout_decodes_to_table_values(bits, decoder, dtype):
    """Every decode of the kernels, emulated in Python on the kernel layout, gives table[q]: the
    register byte-permute decode (all bits), the 4-bit pair table and the 2-bit quad table."""
    g = torch.Generator().manual_seed(bits)
    n, k = 32, 96  # K % 64 == 32 exercises the padded half chunk
    q = torch.randint(0, 2**bits, (n, k), generator=g)
    table = torch.randn(2**bits, generator=g)
    kp = cuda_op._padded_k(k)
    words = cuda_op._pack_kernel_layout(torch.nn.functional.pad(q, (0, kp - k)), bits)
    tw = [v & 0xFFFFFFFF for v in cuda_op._table_words(table.unsqueeze(0), dtype, bits)[0].tolist()]
    copies = 32 if bits == 4 else 16  # the 8-warp CTAs' pair table (4-bit); QuadTable::kCopies (2-bit)
    smem = _build_table(bits, tw, copies) if decoder == "table" else None
    w = torch.full((n, kp), -1, dtype=torch.int32)
    for tile in range(n // 16):
        for c in range(kp // 64):
            cw = [v & 0xFFFFFFFF for v in words[tile, c].tolist()]
            for lane in range(32):
                gg, t = lane >> 2, lane & 3
                if bits == 4:
                    f = cw[4 * lane : 4 * lane + 4]
                else:
                    f = cw[2 * lane : 2 * lane + 2] + ([cw[64 + lane]] if bits == 3 else [])
                for s in range(4):
                    a = _decode(bits, f, s, tw[0:4], tw[4:8]) if decoder == "permute" else _decode_table(bits, f, s, smem, lane, copies)
                    for i in range(8):
                        row = 16 * tile + gg + 8 * ((i >> 1) & 1)
                        kk = 2 * (i >> 2) + (i & 1)
                        col = 64 * c + 32 * (s >> 1) + 8 * t + 4 * (s & 1) + kk
                        w[row, col] = (a[i >> 1] >> (16 * (i & 1))) & 0xFFFF
    got = w[:, :k].to(torch.int16).view(dtype).float()
    assert torch.equal(got, table.to(dtype).float()[q])
    assert (w[:, k:] >= 0).all()  # the pad is written too (index 0)


def test_permuted_activations_match_the_a_fragment_k_order_cpu():
    """wgmma reads B position 16 s + kk for A-fragment column kk of k-step s; the kernel layout puts
    real k = 32 (s >> 1) + 8 t + 4 (s & 1) + 2 (i >> 2) + (i & 1) at kk = 2 t + (i & 1) + 8 (i >> 2)."""
    k = 96  # one full chunk + a half chunk (zero pad)
    x = torch.arange(1, k + 1, dtype=torch.float32).unsqueeze(0)
    xp = cuda_op.permute_activations(x)
    assert xp.shape == (1, 128)
    for c in range(2):
        for s in range(4):
            for t in range(4):
                for i in range(8):
                    real = 64 * c + 32 * (s >> 1) + 8 * t + 4 * (s & 1) + 2 * (i >> 2) + (i & 1)
                    kk = 2 * t + (i & 1) + 8 * (i >> 2)
                    want = float(real + 1) if real < k else 0.0
                    assert xp[0, 64 * c + 16 * s + kk].item() == want


def test_small_block_gather_matches_permuted_activations_cpu():
    """block_m <= TC_GATHER_MAX_BLOCK_M: flute_wgmma.cu builds 16-byte piece c of each chunk row from
    X itself, as pairs (c & 3) + 16 (c >> 2) + 4 j, j = 0..3, zero past K. Emulated here, it must
    equal permute_activations (what the larger blocks read)."""
    k = 96
    x = torch.randn(3, k)
    xp = cuda_op.permute_activations(x)
    pairs = x.reshape(3, k // 2, 2)
    got = torch.zeros_like(xp).reshape(3, -1, 2)
    for c0 in range(0, k, 64):
        for c in range(8):
            for j in range(4):
                real = c0 // 2 + (c & 3) + 16 * (c >> 2) + 4 * j
                if c0 + 32 * (c >> 2) < k:  # the kernel's zero-fill test, per piece
                    got[:, c0 // 2 + 4 * c + j] = pairs[:, real]
    assert torch.equal(got.reshape(3, -1), xp)


def test_layout_validation_messages_cpu():
    with pytest.raises(ValueError, match="multiple of 16"):
        cuda_op._check_layout_args(24, 64, 4, 32, [24])
    with pytest.raises(ValueError, match="multiple of 32"):
        cuda_op._check_layout_args(32, 48, 4, 48, [32])
    with pytest.raises(ValueError, match="group_size"):
        cuda_op._check_layout_args(32, 192, 4, 96, [32])
    with pytest.raises(ValueError, match="shard"):
        cuda_op._check_layout_args(64, 64, 4, 64, [24, 64])
    cuda_op._check_layout_args(64, 576, 3, 576, [32, 64])  # channel-wise, K % 64 == 32 is fine


def test_build_arch_parsing_cpu():
    from flute_vllm import _build

    assert _build.parse_archs("80, 86,8.9,90a") == ["80", "86", "89", "90a"]
    with pytest.raises(ValueError):
        _build.parse_archs("sm_xx")
    assert len(_build.source_digest()) == 12


# ------------------------------------------------------------------------------------------
# GPU


def _make_layer(n_parts, k, bits, g, dtype, kinds, device, gen):
    qs, ss, ts = [], [], []
    for i, n in enumerate(n_parts):
        kind = kinds[i % len(kinds)]
        table = torch.randn(2**bits, generator=gen) if kind == "random" else make_table(kind, bits)
        q = torch.randint(0, 2**bits, (n, k), generator=gen)
        s = (torch.rand(n, k // g, generator=gen) * 0.04 + 0.01) * torch.where(
            torch.rand(n, k // g, generator=gen) < 0.1, -1.0, 1.0)
        qs.append(q), ss.append(s), ts.append(table)
    q = torch.cat(qs)
    qweight = pack(q, bits).to(device)
    scales = torch.cat(ss).to(dtype).to(device)
    tables = torch.stack(ts).to(device)
    ends = torch.tensor(n_parts).cumsum(0).tolist()
    return qweight, scales, tables, ends


def _reference(x, qweight, scales, tables, ends, bits, g):
    w = ops.dequantize_sharded(qweight, scales, tables, ends, bits, g)
    return x.float() @ w.T


def _tol(dtype):
    return {torch.float16: 3e-3, torch.bfloat16: 2e-2, torch.float32: 1e-4}[dtype]


def _rel_err(out, ref):
    return ((out.float() - ref).norm() / ref.norm().clamp_min(1e-12)).item()


REAL_SHAPES = [  # (N parts, K): Llama-3 TP slices, SmolLM2 (K = 576), small fused layers
    ([3072, 512, 512], 4096), ([2048], 4096), ([1024, 1024], 4096), ([4096], 7168), ([2048], 3584),
    ([576, 192, 192], 576), ([1536, 1536], 576), ([576], 1536), ([5120, 1024, 1024], 1024),
]


def _random_case(rng: random.Random):
    if rng.random() < 0.15:
        parts, k = rng.choice(REAL_SHAPES)
        parts = list(parts)
    else:
        k = 32 * rng.randint(1, 96)
        parts = [16 * rng.randint(1, 40) for _ in range(rng.choice([1, 1, 2, 3]))]
    n, nk = sum(parts), sum(parts) * k
    gs = [g for g in (32, 64, 128, 256) if k % g == 0] + [k]
    g = rng.choice(gs)
    r = rng.random()
    if r < 0.55:
        m = rng.randint(1, 16)
    elif r < 0.8:
        m = rng.randint(17, 96)
    elif r < 0.95 or nk > 4_000_000:
        m = rng.randint(97, 600)
    else:
        m = rng.choice([1024, 2047, 4096])
    if nk > 8_000_000:
        m = min(m, 300)
    bits = rng.choice([2, 3, 4])
    dtype = rng.choice([torch.float16, torch.bfloat16])
    kinds = [rng.choice(["nf", "int", "fp", "random"]) for _ in parts]
    path = rng.choices(["op", "lut", "lut_split", "dense", "tc", "tc_split", "tc_sk"], weights=[6, 2, 2, 1, 2, 2, 2])[0]
    block_m = rng.choice(cuda_op.TC_BLOCK_MS)
    return dict(parts=parts, k=k, g=g, m=m, bits=bits, dtype=dtype, kinds=kinds, path=path, block_m=block_m)


@needs_cuda
def test_randomized_sweep():
    """>= 2000 random cases: shapes, M (odd too), bits, G, dtypes, tables, shards, paths, splits."""
    rng = random.Random(1234)
    gen = torch.Generator().manual_seed(1234)
    dev = torch.device("cuda")
    n_cases = int(os.environ.get("FLUTE_SWEEP_CASES", "2000"))
    failures = []
    worst = {}
    tc = cuda_op.tc_available(torch.cuda.current_device())
    for idx in range(n_cases):
        c = _random_case(rng)
        if c["path"].startswith("tc") and not tc:
            c["path"] = "op"  # no sm_90a tensor-core path on this GPU
        qweight, scales, tables, ends = _make_layer(c["parts"], c["k"], c["bits"], c["g"], c["dtype"],
                                                    c["kinds"], dev, gen)
        qk, sk, tk = ops.prepare_weights(qweight, scales, tables, ends, c["bits"], c["g"])
        x = torch.randn(c["m"], c["k"], device=dev).to(c["dtype"])
        n = sum(c["parts"])
        torch.full((c["m"] * n + 64,), float("nan"), dtype=c["dtype"], device=dev)  # poison the pool
        if c["path"] == "op":
            out = torch.ops.flute_vllm.lut_gemm(x, qk, sk, tk, ends, c["bits"], c["g"])
        elif c["path"] == "dense":
            slab_bytes = rng.choice([0, 16 * 2 * c["k"] * rng.randint(1, 8)])  # whole matrix, or row slabs
            out = cuda_op.gemm(x, qk, sk, tk, c["bits"], c["g"], force_path="dense", slab_bytes=slab_bytes)
        elif c["path"] == "tc_sk":  # stream-K: the device's CTA count, or a few (whole-tile waves on small layers)
            out = cuda_op.gemm(x, qk, sk, tk, c["bits"], c["g"], force_path="tc",
                               block_m=rng.choice(cuda_op.SK_BLOCK_MS), stream_k=True,
                               sk_ctas=rng.choice([None, rng.randint(1, 40)]))
        elif c["path"].startswith("tc"):
            splits = rng.randint(1, cuda_op._padded_k(c["k"]) // 64) if c["path"] == "tc_split" else None
            out = cuda_op.gemm(x, qk, sk, tk, c["bits"], c["g"], force_path="tc", splits=splits, block_m=c["block_m"])
        else:
            splits = rng.randint(1, cuda_op._padded_k(c["k"]) // 64) if c["path"] == "lut_split" else None
            # 8: wide CTAs, any bits, where the build has them (m_tiles <= 4); either x-ahead variant
            # where both exist (4-bit wide m_tiles 1)
            mt = cuda_op.m_tiles_for(c["m"])
            warps = rng.choice([4, 8]) if cuda_op.wide_ok(mt) else 4
            x_ahead = rng.choice([0, 1]) if cuda_op.x_ahead_variant(c["bits"], mt, warps) else None
            # K slices per CTA: any the kernel has
            k_slices = rng.choice([s for s in cuda_op.K_SLICES if cuda_op.k_slices_ok(c["bits"], mt, warps, x_ahead or 0, s)])
            out = cuda_op.gemm(x, qk, sk, tk, c["bits"], c["g"], force_path="lut", splits=splits, warps=warps,
                               x_ahead=x_ahead, k_slices=k_slices)
        ref = _reference(x, qweight, scales, tables, ends, c["bits"], c["g"])
        err = _rel_err(out, ref) if torch.isfinite(out).all() else float("inf")
        key = (c["dtype"], c["bits"])
        worst[key] = max(worst.get(key, 0.0), err)
        if not (out.shape == (c["m"], n) and out.dtype == c["dtype"] and err < _tol(c["dtype"])):
            failures.append((idx, {k: v for k, v in c.items() if k != "kinds"}, c["kinds"], err))
    print(f"\nsweep: {n_cases} cases, {len(failures)} failures; worst rel err per (dtype, bits): "
          + ", ".join(f"{str(k[0]).split('.')[-1]}/W{k[1]}={v:.2e}" for k, v in sorted(worst.items(), key=str)))
    assert not failures, f"{len(failures)} of {n_cases} failed, first: {failures[:5]}"


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("m, splits, k_slices", [(5, 13, 1), (12, 16, 1), (24, 16, 1), (5, 24, 1), (5, 3, 8),
                                                 (12, 5, 2), (5, 1, 4)])
def test_split_k_is_deterministic(dtype, bits, m, splits, k_slices):
    """Split-K sums (the last CTA to arrive adds the fp32 partials in split order) and K-slice sums
    (in shared memory, in slice order) are bit-exact across runs and match the reference, at m_tiles
    1, 2 and 4 (M = 5, 12, 24)."""
    warps = 8 if k_slices == 8 else 4
    mt = cuda_op.m_tiles_for(m)
    x_ahead = 1 if cuda_op.x_ahead_variant(bits, mt, warps) else None
    if not cuda_op.k_slices_ok(bits, mt, warps, x_ahead or 0, k_slices):
        pytest.skip(f"no {k_slices} K slices at bits={bits}, M={m} (m_tiles <= bits)")
    gen = torch.Generator().manual_seed(7)
    qweight, scales, tables, ends = _make_layer([256, 128], 4096, bits, 128, dtype, ["nf", "random"], "cuda", gen)
    qk, sk, tk = ops.prepare_weights(qweight, scales, tables, ends, bits, 128)
    x = torch.randn(m, 4096, device="cuda").to(dtype)
    outs = [cuda_op.gemm(x, qk, sk, tk, bits, 128, force_path="lut", splits=splits, warps=warps, x_ahead=x_ahead,
                         k_slices=k_slices) for _ in range(3)]
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    ref = _reference(x, qweight, scales, tables, ends, bits, 128)
    assert _rel_err(outs[0], ref) < _tol(dtype)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_tensor_core_path_split_k_and_tiles(dtype, bits):
    """sm_90a wgmma path: every block_m, split-K bit-exact across runs, K % 64 == 32, ragged M and N."""
    if not cuda_op.tc_available(torch.cuda.current_device()):
        pytest.skip("needs an sm_90 GPU (Hopper) for the wgmma tensor-core path")
    gen = torch.Generator().manual_seed(11)
    qweight, scales, tables, ends = _make_layer([256, 144], 1440, bits, 32, dtype, ["nf", "random"], "cuda", gen)
    qk, sk, tk = ops.prepare_weights(qweight, scales, tables, ends, bits, 32)
    for m in (1, 77, 300):
        x = torch.randn(m, 1440, device="cuda").to(dtype)
        ref = _reference(x, qweight, scales, tables, ends, bits, 32)
        for block_m in cuda_op.TC_BLOCK_MS:
            outs = [cuda_op.gemm(x, qk, sk, tk, bits, 32, force_path="tc", splits=7, block_m=block_m) for _ in range(2)]
            assert torch.equal(outs[0], outs[1])
            assert _rel_err(outs[0], ref) < _tol(dtype), (m, block_m)
            one = cuda_op.gemm(x, qk, sk, tk, bits, 32, force_path="tc", splits=1, block_m=block_m)
            assert _rel_err(one, ref) < _tol(dtype), (m, block_m)
    cfg = cuda_op.device_config(torch.cuda.current_device())
    assert cuda_op.choose_path(cfg["tc_min_m"], dtype, cfg, torch.cuda.current_device()) == "tc"


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_tensor_core_stream_k(dtype, bits):
    """Stream-K (persistent CTAs, tiles cut between CTAs summed by the last contributor): bit-exact
    across runs, equal to the reference, with whole-tile waves (few CTAs), tiles cut into many pieces
    (the device's CTA count on a small layer), K % 64 == 32, ragged M and N, fused shards with their
    own tables; and the kernel keeps the resident CTAs per SM that the plan assumes."""
    if not cuda_op.tc_available(torch.cuda.current_device()):
        pytest.skip("needs an sm_90 GPU (Hopper) for the wgmma tensor-core path")
    ext = cuda_op._ext()
    name = str(dtype).split(".")[-1]
    for block_m in cuda_op.SK_BLOCK_MS:
        resident = 1 if block_m == 256 else 2
        assert ext.wgmma_ctas_per_sm(bits, block_m, name, True) == resident
        assert ext.wgmma_ctas_per_sm(bits, block_m, name, False) == resident
    gen = torch.Generator().manual_seed(13)
    qweight, scales, tables, ends = _make_layer([512, 144, 128], 1440, bits, 32, dtype, ["nf", "random", "nf"], "cuda",
                                                gen)
    qk, sk, tk = ops.prepare_weights(qweight, scales, tables, ends, bits, 32)
    for m in (1, 77, 300):
        x = torch.randn(m, 1440, device="cuda").to(dtype)
        ref = _reference(x, qweight, scales, tables, ends, bits, 32)
        for block_m in cuda_op.SK_BLOCK_MS:
            for sk_ctas in (None, 1, 3, 7):
                pl = cuda_op.plan_tc(m, 784, 1440, cuda_op.device_config(torch.cuda.current_device()), block_m,
                                     stream_k=True, sk_ctas=sk_ctas)
                outs = [cuda_op.gemm(x, qk, sk, tk, bits, 32, force_path="tc", block_m=block_m, stream_k=True,
                                     sk_ctas=sk_ctas) for _ in range(2)]
                assert torch.equal(outs[0], outs[1]), (m, block_m, sk_ctas, pl["stream_k"])
                assert _rel_err(outs[0], ref) < _tol(dtype), (m, block_m, sk_ctas, pl["stream_k"])


def test_binding_builds_error_messages_without_ostreams_cpu():
    """kernels/torch_binding.cpp raises through FLUTE_CHECK / FLUTE_CHECK_CUDA (std::to_string messages):
    on the H200 image a number formatted through an std::ostream inside the JIT-built extension
    (TORCH_CHECK's c10::str, std::ostringstream) killed the process instead of raising (v20). That
    crash shows only on that machine, so this CPU test keeps the binding off those paths."""
    from flute_vllm import _build

    src = (_build.KERNEL_DIR / "torch_binding.cpp").read_text()
    code = "\n".join(line.split("//")[0] for line in src.splitlines())  # comments may name them
    for banned in ("TORCH_CHECK", "c10::str", "stringstream", "<sstream>", "std::cout", "std::cerr"):
        assert banned not in code, f"torch_binding.cpp uses {banned}: build messages with throw_error (std::to_string)"
    assert code.count("FLUTE_CHECK(") >= 20 and "FLUTE_CHECK_CUDA(" in code


@needs_cuda
def test_binding_rejects_bad_arguments_with_value_error():
    """The extension's own checks (behind cuda_op's) raise ValueError naming the argument, in the
    mma.sync, tensor-core and dequantize bindings alike, rather than crash the process (v20: a
    formatted TORCH_CHECK message killed it with SIGSEGV on the H200 image)."""
    ext = cuda_op._ext()
    gen = torch.Generator().manual_seed(19)
    qweight, scales, tables, ends = _make_layer([256], 256, 4, 128, torch.float16, ["nf"], "cuda", gen)
    qk, sk, tk = ops.prepare_weights(qweight, scales, tables, ends, 4, 128)
    x = torch.randn(1, 256, device="cuda", dtype=torch.float16)
    out = torch.empty(1, 256, dtype=x.dtype, device="cuda")
    ws, counters = torch.empty(0, device="cuda"), cuda_op._counters_for(x.device)
    with pytest.raises(ValueError, match="warps=5"):
        ext.gemm(x, qk, sk, tk, out, ws, counters, 4, 128, 1, 4, 1, 5, 0, 1)
    with pytest.raises(ValueError, match="qweight size"):
        ext.gemm(x, qk.reshape(-1)[: qk.numel() // 2], sk, tk, out, ws, counters, 4, 128, 1, 4, 1, 4, 0, 1)
    with pytest.raises(ValueError, match="workspace"):  # split-K with no workspace
        ext.gemm(x, qk, sk, tk, out, ws, counters, 4, 128, 2, 2, 1, 4, 0, 1)
    with pytest.raises(ValueError, match="scales dtype"):
        ext.dequant(qk, sk, tk, torch.empty(256, 256, dtype=torch.bfloat16, device="cuda"), 4, 128)
    if cuda_op.tc_available(torch.cuda.current_device()):
        with pytest.raises(ValueError, match="block_m"):
            ext.gemm_wgmma(x, 256, qk, sk, tk, out, ws, counters, 4, 128, 1, 4, 24)


@needs_cuda
def test_tensor_core_stream_k_rejects_bad_launches():
    """The stream-K binding refuses with a ValueError (not a crash), before any launch, a schedule that gives a CTA more items than the
    kernel lists (kSkMaxItems), one that does not cover the GEMM, and a workspace smaller than the
    schedule's partial slots."""
    if not cuda_op.tc_available(torch.cuda.current_device()):
        pytest.skip("needs an sm_90 GPU (Hopper) for the wgmma tensor-core path")
    ext = cuda_op._ext()
    gen = torch.Generator().manual_seed(17)
    n, k, m, block_m = 784, 1440, 1200, 64
    qweight, scales, tables, ends = _make_layer([n], k, 4, 32, torch.float16, ["nf"], "cuda", gen)
    qk, sk, tk = ops.prepare_weights(qweight, scales, tables, ends, 4, 32)
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    xp = cuda_op.permute_activations(x)
    out = torch.empty(m, n, dtype=x.dtype, device="cuda")
    counters = cuda_op._counters_for(x.device)
    nch, tiles = (k + 63) // 64, -(-n // cuda_op.TC_ROWS_PER_CTA) * -(-m // block_m)
    assert tiles > 128

    def launch(sk_ctas, sk_dp_tiles, sk_units, ws_floats=None):
        ws = torch.empty(2 * sk_ctas * block_m * cuda_op.TC_ROWS_PER_CTA if ws_floats is None else ws_floats,
                         dtype=torch.float32, device="cuda")
        ext.gemm_wgmma_sk(xp, k, qk, sk, tk, out, ws, counters, 4, 32, block_m, sk_ctas, sk_dp_tiles, sk_units)

    with pytest.raises(ValueError, match="more than 128 items"):
        launch(1, 0, tiles * nch)  # one CTA, every tile an item of it
    with pytest.raises(ValueError, match="does not cover"):
        launch(4, 0, 1)
    with pytest.raises(ValueError, match="workspace too small"):
        launch(132, tiles - 3, 17, ws_floats=16)
    launch(132, tiles - 3, 17)  # the same schedule (3 tiles cut between 5 CTAs) with its workspace: right
    ref = _reference(x, qweight, scales, tables, ends, 4, 32)
    assert _rel_err(out, ref) < _tol(torch.float16)


@needs_cuda
def test_fp32_activations_use_dense_path():
    gen = torch.Generator().manual_seed(3)
    qweight, scales, tables, ends = _make_layer([64, 64], 256, 4, 64, torch.float32, ["nf", "fp"], "cuda", gen)
    qk, sk, tk = ops.prepare_weights(qweight, scales, tables, ends, 4, 64)
    x = torch.randn(3, 256, device="cuda")
    out = torch.ops.flute_vllm.lut_gemm(x, qk, sk, tk, ends, 4, 64)
    ref = _reference(x, qweight, scales, tables, ends, 4, 64)
    assert out.dtype == torch.float32 and _rel_err(out, ref) < 1e-3  # TF32 may be on


@needs_cuda
@pytest.mark.parametrize("m", [1, 16, 200])
def test_torch_compile_fullgraph_and_cuda_graph(m):
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(11)
    dtype, bits, g = torch.float16, 4, 128
    qweight, scales, tables, ends = _make_layer([512, 256, 256], 1024, bits, g, dtype, ["nf", "int", "fp"], "cuda", gen)
    qk, sk, tk = ops.prepare_weights(qweight, scales, tables, ends, bits, g)
    bias = torch.randn(1024, device="cuda", dtype=dtype)

    def f(x):
        return torch.nn.functional.silu(ops.lut_linear(x, qk, sk, tk, ends, bits, g, bias=bias))

    cf = torch.compile(f, fullgraph=True)
    x = torch.randn(m, 1024, device="cuda", dtype=dtype)
    eager = f(x)
    torch.testing.assert_close(cf(x), eager, rtol=2e-3, atol=2e-3)
    static_x = x.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            cf(static_x)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = cf(static_x)
    for _ in range(3):
        x2 = torch.randn(m, 1024, device="cuda", dtype=dtype)
        static_x.copy_(x2)
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(static_out, f(x2), rtol=2e-3, atol=2e-3)
        ref = _reference(x2, qweight, scales, tables, ends, bits, g) + bias.float()
        assert _rel_err(static_out, torch.nn.functional.silu(ref)) < 5e-3


@needs_cuda
def test_bad_inputs_raise_value_errors():
    gen = torch.Generator().manual_seed(5)
    dtype = torch.float16
    qweight, scales, tables, ends = _make_layer([64, 64], 256, 4, 64, dtype, ["nf", "int"], "cuda", gen)
    qk, sk, tk = ops.prepare_weights(qweight, scales, tables, ends, 4, 64)
    x = torch.randn(2, 256, device="cuda", dtype=dtype)
    op = torch.ops.flute_vllm.lut_gemm
    with pytest.raises(ValueError, match="tables"):  # canonical tables passed to the CUDA op
        op(x, qk, sk, tables, ends, 4, 64)
    with pytest.raises(ValueError, match="dtype"):
        op(x.to(torch.bfloat16), qk, sk, tk, ends, 4, 64)
    with pytest.raises(ValueError, match="K"):
        op(torch.randn(2, 320, device="cuda", dtype=dtype), qk, sk, tk, ends, 4, 64)
    with pytest.raises(ValueError, match="qweight"):
        op(x, qk[:, :16], sk, tk, ends, 4, 64)
    with pytest.raises(ValueError, match="shard"):
        op(x, qk, sk, tk, [60, 128], 4, 64)
    with pytest.raises(ValueError):
        op(x, qk, sk, tk, ends, 3, 64)
    with pytest.raises(ValueError, match="multiple of 16"):
        cuda_op.prepare(qweight[:40], scales[:40], tables[:1], [40], 4, 64)
    with pytest.raises(ValueError, match="shard"):
        cuda_op.prepare(qweight, scales, tables, [72, 128], 4, 64)
    with pytest.raises(ValueError, match="group_size"):
        cuda_op.prepare(qweight, scales, tables, ends, 4, 48)
    with pytest.raises(ValueError, match="qweight"):
        cuda_op.prepare(qweight.float(), scales, tables, ends, 4, 64)


def test_python_launch_geometry_mirrors_the_kernel_header_cpu():
    """cuda_op's CPU-side copies of the launch geometry (warps per CTA, weight tiles per warp by
    m_tiles, hence rows per CTA) equal the defaults in kernels/flute_kernel.h, which the launcher uses."""
    from flute_vllm import _build

    header = (_build.KERNEL_DIR / "flute_kernel.h").read_text()
    assert int(re.search(r"kWarpsPerCta = (\d+);", header).group(1)) == cuda_op.WARPS_PER_CTA
    assert int(re.search(r"kWideWarpsPerCta = (\d+);", header).group(1)) == cuda_op.WIDE_WARPS_PER_CTA
    mt1 = int(re.search(r"#define FLUTE_LUT_MT1_TILES (\d+)", header).group(1))
    mt2 = int(re.search(r"#define FLUTE_LUT_MT2_TILES (\d+)", header).group(1))
    mt4 = int(re.search(r"#define FLUTE_LUT_MT4_TILES (\d+)", header).group(1))
    body = re.search(r"gemm_n_tiles_per_warp\(int m_tiles\) \{\s*return ([^;]*);", header).group(1)
    assert body == ("m_tiles == 1 ? FLUTE_LUT_MT1_TILES : m_tiles == 2 ? FLUTE_LUT_MT2_TILES : "
                    "m_tiles == 4 ? FLUTE_LUT_MT4_TILES : 1")
    assert cuda_op.N_TILES_PER_WARP == {1: mt1, 2: mt2, 4: mt4, 8: 1}
    assert "constexpr bool gemm_wide_ok(int m_tiles) { return m_tiles <= FLUTE_LUT_WIDE_MAX_MT; }" in header
    assert int(re.search(r"#define FLUTE_LUT_WIDE_MAX_MT (\d+)", header).group(1)) == cuda_op.WIDE_MAX_M_TILES
    if not torch.cuda.is_available():
        assert [cuda_op.wide_ok(m) for m in (1, 2, 4, 8)] == [True, True, True, False]
    wide_mt4 = int(re.search(r"#define FLUTE_LUT_WIDE_MT4_TILES (\d+)", header).group(1))
    assert wide_mt4 == cuda_op.WIDE_MT4_TILES
    assert ("return warps == kWideWarpsPerCta && m_tiles == 4 ? FLUTE_LUT_WIDE_MT4_TILES : "
            "gemm_n_tiles_per_warp(m_tiles);") in header
    assert "gemm_rows_per_cta(int m_tiles, int warps) { return 16 * gemm_n_tiles_per_warp(m_tiles, warps) * warps; }" in header
    if not torch.cuda.is_available():
        assert [cuda_op.rows_per_cta(m) for m in (1, 2, 4, 8)] == [16 * 4 * mt1, 16 * 4 * mt2, 16 * 4 * mt4, 64]
        assert cuda_op.rows_per_cta(1, 8) == 16 * 8 * mt1
        assert cuda_op.rows_per_cta(4, 8) == 16 * 8 * wide_mt4
    body = re.search(r"gemm_x_ahead_variant\(int bits, int m_tiles, int warps\) \{\s*return ([^;]*);", header).group(1)
    assert body == "bits == 4 && m_tiles == 1 && warps == kWideWarpsPerCta"
    assert [cuda_op.x_ahead_variant(b, mt, w) for b, mt, w in [(4, 1, 8), (4, 1, 4), (4, 2, 8), (3, 1, 8)]] == \
        [True, False, False, False]
    if torch.cuda.is_available():
        assert all(bool(cuda_op._ext().x_ahead_variant(b, mt, w)) == cuda_op.x_ahead_variant(b, mt, w)
                   for b in (2, 3, 4) for mt in (1, 2, 4, 8) for w in (4, 8))
    # stream-K: the items a CTA may list, where its flags start in the counter buffer, which block_m have it
    assert int(re.search(r"kSkMaxItems = (\d+);", header).group(1)) == cuda_op.SK_MAX_ITEMS
    assert "return (sk_dp_tiles + sk_ctas - 1) / sk_ctas + sk_units / nch + 2;" in header
    flag_base = int(re.search(r"kSkFlagBase = (\d+);", header).group(1))
    assert flag_base + 2 * 1024 <= cuda_op.COUNTER_SLOTS  # room for the flags of 1024 CTAs (the binding checks)
    wgmma = (_build.KERNEL_DIR / "flute_wgmma.cu").read_text()
    assert "constexpr bool wgmma_stream_k() { return wgmma_tma_x<BN>() && BN != 128; }" in wgmma
    assert cuda_op.SK_BLOCK_MS == (64, 256)


def test_wide_ctas_only_where_configured_cpu():
    """warps_for / plan: 8-warp CTAs only for 4-bit, at m_tiles <= 2 for N*K >= lut_wide_cta_min_nk
    and at m_tiles = 4 for N*K <= lut_wide_mt4_max_nk; the grid along N follows the CTA width; a wide
    plan for m_tiles 8 is refused; the x-ahead variant only for the wide 4-bit m_tiles = 1 kernel
    and N*K <= lut_x_ahead_max_nk."""
    cfg = {"sm_count": 132, "cta_overhead_chunks": 2.0, "min_chunks_per_split": 4, "max_splits": 32,
           "lut_wide_cta_min_nk": 1 << 25}
    assert cuda_op.warps_for(4, 1, 57344, 8192, cfg) == 8
    assert cuda_op.warps_for(4, 2, 57344, 8192, cfg) == 8
    assert cuda_op.warps_for(4, 4, 57344, 8192, cfg) == 4   # m_tiles 4: no lut_wide_mt4_max_nk
    assert cuda_op.warps_for(3, 1, 57344, 8192, cfg) == 4   # 2/3-bit: by their own rule
    assert cuda_op.warps_for(2, 1, 57344, 8192, cfg) == 4   # no lut_w2_wide_min_nk
    w2 = {**cfg, "lut_w2_wide_min_nk": 1 << 27}
    assert [cuda_op.warps_for(2, mt, 57344, 8192, w2) for mt in (1, 2, 4)] == [8, 4, 4]
    assert cuda_op.warps_for(2, 1, 4096, 4096, w2) == 4 and cuda_op.warps_for(3, 1, 57344, 8192, w2) == 4
    assert cuda_op.warps_for(4, 1, 4096, 4096, cfg) == 4    # small layer
    assert cuda_op.warps_for(4, 1, 57344, 8192, {**cfg, "lut_wide_cta_min_nk": None}) == 4
    assert cuda_op.warps_for(4, 1, 57344, 8192, {}) == 4
    wide = cuda_op.plan(1, 57344, 8192, cfg, resident=3)
    narrow = cuda_op.plan(1, 57344, 8192, {**cfg, "lut_wide_cta_min_nk": None}, resident=5)
    assert (wide["warps"], narrow["warps"]) == (8, 4) and wide["grid_x"] * 2 == narrow["grid_x"]
    with pytest.raises(ValueError, match="warps=8"):
        cuda_op.plan(64, 4096, 4096, cfg, m_tiles=8, warps=8)
    # m_tiles 4: wide CTAs for SMALL layers (in a build that has them: wide_ok(4), the default)
    mt4 = {**cfg, "lut_wide_mt4_max_nk": 1 << 26}
    assert cuda_op.warps_for(4, 4, 4096, 4096, mt4) == (8 if cuda_op.wide_ok(4) else 4)
    assert cuda_op.warps_for(4, 4, 57344, 8192, mt4) == 4
    assert cuda_op.warps_for(3, 4, 4096, 4096, mt4) == 4
    assert cuda_op.warps_for(4, 8, 4096, 4096, mt4) == 4
    # x-ahead: per layer at m_tiles 1 with 8 warps, never elsewhere; a forced one where none exists fails
    xa = {**cfg, "lut_x_ahead_max_nk": 1 << 28}
    assert cuda_op.plan(1, 28672, 8192, xa, resident=2)["x_ahead"] == 1    # 70B down-like
    assert cuda_op.plan(1, 57344, 8192, xa, resident=3)["x_ahead"] == 0    # 70B gate_up: too large
    assert cuda_op.plan(1, 57344, 8192, cfg, resident=3)["x_ahead"] == 0   # not configured
    assert cuda_op.plan(16, 28672, 8192, xa, resident=2)["x_ahead"] == 0   # m_tiles 2
    assert cuda_op.plan(1, 4096, 4096, xa, resident=5, warps=4)["x_ahead"] == 0  # 4-warp CTAs
    assert cuda_op.plan(1, 28672, 8192, xa, resident=2, bits=3)["x_ahead"] == 0
    with pytest.raises(ValueError, match="x_ahead=1"):
        cuda_op.plan(1, 4096, 4096, xa, warps=4, x_ahead=1)
    # a small layer in the x-ahead range runs wide at m_tiles 1 (the variant is 8-warp only), not at 2
    xa_min = {**xa, "lut_x_ahead_min_nk": 1 << 24}
    assert cuda_op.plan(1, 4096, 4096, xa_min, resident=2)["warps"] == 8
    assert cuda_op.plan(1, 4096, 4096, xa_min, resident=2)["x_ahead"] == 1
    assert cuda_op.plan(16, 4096, 4096, xa_min, resident=5)["warps"] == 4
    assert cuda_op.plan(1, 4096, 2048, xa_min, resident=5)["warps"] == 4      # below lut_x_ahead_min_nk
    assert cuda_op.plan(1, 4096, 4096, xa_min, resident=2, bits=2)["warps"] == 4


def test_launch_plans_cover_k_and_fill_the_gpu_cpu():
    """plan / plan_tc (no GPU needed): every K chunk is covered exactly by the splits, small grids
    are split along K to fill the GPU, huge grids are not, block_m follows the config table."""
    cfg = {"sm_count": 132, "cta_overhead_chunks": 2.0, "tc_overhead_chunks": 2.0, "min_chunks_per_split": 4,
           "max_splits": 32, "tc_block_m": [[64, 64], [128, 128], [1 << 30, 256]]}
    for m, n, k in [(1, 4096, 4096), (16, 6144, 4096), (64, 57344, 8192), (300, 4096, 14336), (4096, 28672, 4096),
                    (7, 2048, 576)]:
        for p in (cuda_op.plan(m, n, k, cfg, resident=8), cuda_op.plan_tc(m, n, k, cfg)):
            nch = cuda_op._padded_k(k) // 64
            assert p["splits"] * p["chunks_per_split"] >= nch > (p["splits"] - 1) * p["chunks_per_split"]
    small = cuda_op.plan_tc(64, 4096, 4096, cfg)  # 32 CTAs on 132 SMs: split along K
    assert small["block_m"] == 64 and small["splits"] > 1
    big = cuda_op.plan_tc(8192, 28672, 4096, cfg)  # 224 x 32 CTAs: many waves already
    assert big["block_m"] == 256 and big["splits"] == 1
    assert cuda_op.plan_tc(100, 4096, 4096, cfg)["block_m"] == 128
    # the overhead per block_m (H200 v16): M = 256 on 8B gate_up (224 CTAs, 1 per SM at block_m 256)
    # is not split any more; 8B down (32 CTAs) still is, into one wave
    assert cuda_op.plan_tc(256, 28672, 4096, cfg)["splits"] > 1  # a flat 2 chunks: 4 splits (slower)
    per_bm = {**cfg, "tc_overhead_chunks": [[128, 2.0], [256, 16.0]]}
    assert cuda_op.tc_overhead_chunks(per_bm, 64) == 2.0 and cuda_op.tc_overhead_chunks(per_bm, 256) == 16.0
    assert cuda_op.plan_tc(256, 28672, 4096, per_bm)["splits"] == 1
    assert cuda_op.plan_tc(256, 4096, 14336, per_bm)["splits"] == 4
    assert cuda_op.plan_tc(64, 4096, 4096, per_bm) == small
    with pytest.raises(ValueError, match="block_m=96"):
        cuda_op.plan_tc(100, 4096, 4096, cfg, block_m=96)


def _sk_items(sk: dict, nch: int, tiles: int, c: int) -> list[tuple[int, int, int]]:
    """Python copy of kernels/flute_wgmma.cu sk_items / sk_item: CTA c's (tile, kb, ke) items."""
    ndp = (sk["dp_tiles"] - 1 - c) // sk["ctas"] + 1 if c < sk["dp_tiles"] else 0
    sk_total = (tiles - sk["dp_tiles"]) * nch
    it = min(sk_total, c * sk["units"])
    end = min(sk_total, it + sk["units"])
    n = ndp + ((end - 1) // nch - it // nch + 1 if end > it else 0)
    items = []
    for i in range(n):
        if i < ndp:
            items.append((c + i * sk["ctas"], 0, nch))
        else:
            j = it // nch + (i - ndp)
            items.append((sk["dp_tiles"] + j, max(it - j * nch, 0), min(nch, end - j * nch)))
    return items


def test_stream_k_schedule_cpu():
    """plan_stream_k + the kernel's item and slot arithmetic (emulated): every (tile, chunk) is
    computed exactly once; CTAs get equal work (to a chunk) and at most SK_MAX_ITEMS items; a cut
    tile's contributors are the CTAs the kernel's c_first..c_last formula names, their pieces lie in
    K order, and no two pieces share a partial slot."""
    rng = random.Random(5)
    cases = [(224, 64, 264), (448, 128, 264), (32, 64, 264), (1792, 128, 132), (80, 128, 132), (224, 64, 132),
             (5, 3, 7), (13, 1, 4), (100, 9, 7)] + [(rng.randint(1, 600), rng.randint(1, 200), rng.randint(1, 300))
                                                   for _ in range(200)]
    planned = cut = 0
    for tiles, nch, ctas in cases:
        sk = cuda_op.plan_stream_k(tiles, nch, ctas)
        if sk is None:
            assert tiles % ctas == 0 or tiles // ctas > cuda_op.SK_MAX_ITEMS - 3
            continue
        planned += 1
        seen = {}
        slots = set()
        items_of = [_sk_items(sk, nch, tiles, c) for c in range(ctas)]
        for c, items in enumerate(items_of):
            assert len(items) <= cuda_op.SK_MAX_ITEMS
            for tile, kb, ke in items:
                assert 0 <= kb < ke <= nch and 0 <= tile < tiles
                seen.setdefault(tile, []).append((kb, ke, c))
        assert sorted(seen) == list(range(tiles))
        for tile, pieces in seen.items():
            pieces.sort()
            assert pieces[0][0] == 0 and pieces[-1][1] == nch
            assert all(a[1] == b[0] for a, b in zip(pieces, pieces[1:]))  # contiguous, no overlap
            j = tile - sk["dp_tiles"]
            if j < 0:
                assert len(pieces) == 1
                continue
            c_first, c_last = j * nch // sk["units"], ((j + 1) * nch - 1) // sk["units"]
            assert [c for _, _, c in pieces] == list(range(c_first, c_last + 1))
            if c_first == c_last:
                continue
            cut += 1
            for _, _, c in pieces:  # sk_slot
                slot = c if j == c * sk["units"] // nch else sk["ctas"] + c
                assert slot < 2 * sk["ctas"] and slot not in slots
                slots.add(slot)
        # the stream-K region is shared to a chunk: a CTA's work is its whole tiles plus units (or less at the end)
        sk_work = [sum(ke - kb for t, kb, ke in items if t >= sk["dp_tiles"]) for items in items_of]
        assert max(sk_work) <= sk["units"]
        assert sum(sk_work) == (tiles - sk["dp_tiles"]) * nch
    assert planned > 150 and cut > 1000
    # the H200 config's rule: long-K layers with many tiles, one block of activation rows, block_m 64 / 256
    h200 = _h200_config()
    assert cuda_op.plan_tc(64, 57344, 8192, h200)["stream_k"] == {"ctas": 264, "dp_tiles": 0, "units": 218}
    assert cuda_op.plan_tc(256, 10240, 8192, h200)["stream_k"] is not None  # 70B qkv: 80 tiles, 0.6 waves
    assert cuda_op.plan_tc(64, 10240, 8192, h200)["stream_k"] is None  # ... 0.3 waves at block_m 64
    assert cuda_op.plan_tc(64, 28672, 4096, h200)["stream_k"] is None  # 8B gate_up: K / 64 = 64
    assert cuda_op.plan_tc(256, 8192, 28672, h200)["stream_k"] is None  # 70B down: 64 tiles, 0.48 waves
    assert cuda_op.plan_tc(128, 57344, 8192, h200)["stream_k"] is None  # block_m 128: no stream-K kernel
    assert cuda_op.plan_tc(1024, 57344, 8192, h200)["stream_k"] is None  # 4 row blocks
    assert cuda_op.plan_tc(64, 57344, 8192, h200, splits=2)["stream_k"] is None
    with pytest.raises(ValueError, match="block_m=128 has no stream-K kernel"):
        cuda_op.plan_tc(100, 4096, 4096, h200, stream_k=True)
    # a plan with whole waves needs no balancing; the whole-tile region leaves one full wave to stream-K
    assert cuda_op.plan_stream_k(264, 64, 132) is None
    assert cuda_op.plan_stream_k(224, 64, 132) == {"ctas": 132, "dp_tiles": 0, "units": 109}
    assert cuda_op.plan_stream_k(1792, 128, 132)["dp_tiles"] == 12 * 132


def _h200_config() -> dict:
    return {**cuda_op.resolve_config("NVIDIA H200", cuda_op._all_configs()), "sm_count": 132}


def _h200_plan(cfg: dict, m: int, n: int, k: int, **kw) -> dict:
    """cuda_op.plan of a 4-bit layer as on H200 (no GPU needed): the kernel's resident CTAs per SM
    there (ctas_per_sm) for the warps and x-ahead variant the config picks."""
    mt = cuda_op.m_tiles_for(m)
    w = cuda_op.warps_for(4, mt, n, k, cfg)
    xa = cuda_op.x_ahead_for(4, mt, w, n, k, cfg)
    resident = ({(8, 1): 2, (8, 0): 3}.get((w, xa), 5) if mt == 1 else (2 if w == 8 else 4))
    return cuda_op.plan(m, n, k, cfg, resident=resident, **kw)


def _h200_sweep(name: str) -> tuple[dict, dict]:
    """benchmarks/kernel.py's SHAPES and a sweep measured on H200 (benchmarks/results/<name>)."""
    root = Path(__file__).resolve().parent.parent / "benchmarks"
    sys.path.insert(0, str(root))
    from kernel import SHAPES

    return SHAPES, json.loads((root / "results" / name).read_text())


def test_k_slices_plans_cpu():
    """K slices (the warps of a CTA split its K range; no GPU needed): the H200 config's plans at M = 1
    / 16 on the layers the K-slice sweep measured, the constraints a K-slice plan keeps, and the
    refusal of slices a kernel does not have."""
    cfg = _h200_config()
    assert cfg["lut_k_slices"] == [1, 2, 4, 8]

    def plan(m, n, k, **kw):
        return _h200_plan(cfg, m, n, k, **kw)

    # measured on H200 (configs/h200.json notes): 8B o / qkv at M = 1 run 8 slices, no split-K
    for n, k in [(4096, 4096), (6144, 4096), (8192, 8192)]:
        p = plan(1, n, k)
        assert (p["k_slices"], p["splits"]) == (8, 1), (n, k, p)
        assert p["grid_x"] == n // 32
    assert plan(1, 28672, 4096)["k_slices"] == 2                      # 8B gate_up: 224 CTAs of 128 rows
    assert plan(1, 57344, 8192)["k_slices"] == 1                      # 70B gate_up: its kernel has no slices
    assert plan(16, 8192, 28672)["k_slices"] == 1                     # 70B down at M = 16: activations too large
    for m, n, k in [(1, 4096, 4096), (16, 4096, 4096), (16, 8192, 8192), (8, 4096, 14336), (16, 28672, 4096)]:
        p = plan(m, n, k)
        nch = cuda_op._padded_k(k) // 64
        assert p["splits"] * p["chunks_per_split"] >= nch > (p["splits"] - 1) * p["chunks_per_split"]
        if p["k_slices"] > 1:
            assert min(m, 8 * p["m_tiles"]) * 128 * p["chunks_per_split"] <= cfg["lut_k_slices_max_x_bytes"]
            assert p["grid_x"] * p["splits"] * p["warps"] >= cfg["lut_k_slices_min_warps_per_sm"] * 132
            assert p["grid_x"] == -(-n // (cuda_op.rows_per_cta(p["m_tiles"], p["warps"]) // p["k_slices"]))
    # without lut_k_slices (other GPUs' configs) nothing changes
    plain = {k: v for k, v in cfg.items() if k != "lut_k_slices"}
    assert cuda_op.plan(1, 4096, 4096, plain, resident=2)["k_slices"] == 1
    with pytest.raises(ValueError, match="k_slices=8"):
        cuda_op.plan(16, 4096, 4096, cfg, bits=2, m_tiles=4, k_slices=8)       # m_tiles > bits
    with pytest.raises(ValueError, match="k_slices=2"):
        cuda_op.plan(1, 57344, 8192, cfg, warps=8, x_ahead=0, k_slices=2)      # the 80-register kernel
    assert cuda_op.plan(1, 4096, 4096, cfg, warps=4, k_slices=4)["grid_x"] == 4096 // 32


def test_k_slices_plans_against_h200_measurements_cpu():
    """The H200 config's (k_slices, splits) plans replayed on the K-slice sweep measured on H200
    (benchmarks/results/tune_ks_NVIDIA_H200.json: us per call for k_slices 1/2/4/8 x splits
    1/2/4/8/16, 10 layers, M = 1 and 16): where the plan picks a measured cell it is within 20% of
    the best cell, and within 5% over all of them (geo-mean); the plans before K slices were 1.13x.
    (Replayed with the CTA widths the sweep ran, v17's 8-warp threshold of 32 Mi: since v21 the small
    layers run 8-warp CTAs, a plan the sweep has no cells for.)"""
    cfg = {**_h200_config(), "lut_wide_cta_min_nk": 1 << 25}
    shapes, data = _h200_sweep("tune_ks_NVIDIA_H200.json")
    ratios, before = [], []
    for r in data["records"]:
        n, k = shapes[r["shape"]]
        p = _h200_plan(cfg, r["M"], n, k)
        best = min(r["us"].values())
        got = r["us"].get(f"{p['k_slices']}/{p['splits']}")
        if got is not None:
            assert got <= 1.2 * best, (r["shape"], r["M"], p, got, best)
            ratios.append(got / best)
        old = r["us"].get(r["plan_v16"].replace("ks", "").replace("s", ""))
        if old is not None:
            before.append(old / best)
    assert len(ratios) >= 15
    assert statistics.geometric_mean(ratios) <= 1.05 < statistics.geometric_mean(before)


def test_tc_split_plans_against_h200_measurements_cpu():
    """The H200 config's tensor-core plans replayed on the block_m x split-K sweep measured on H200
    (benchmarks/results/tune_tc_NVIDIA_H200.json, kernel v18, 14 layers at M = 64 / 128 / 256): the
    picked cell is within 6% of the best measured split at the picked block_m, within 2% over all of
    them (geo-mean); the v17 model (no reduction tail) split layers that fill the GPU already."""
    cfg = _h200_config()
    v17 = {**cfg, "tc_overhead_chunks": [[128, 2.0], [256, 16.0]], "tc_split_reduce_chunks": None}
    shapes, data = _h200_sweep("tune_tc_NVIDIA_H200.json")

    def replay(c):
        ratios = []
        for r in data["records"]:
            n, k = shapes[r["shape"]]
            p = cuda_op.plan_tc(r["M"], n, k, c, stream_k=False)  # (the split-K model; stream-K: its own A/B)
            best = min(v for key, v in r["us"].items() if key.startswith(f"{p['block_m']}/"))
            got = r["us"].get(f"{p['block_m']}/{p['splits']}")
            if got is not None:
                ratios.append(got / best)
        return ratios

    ratios, before = replay(cfg), replay(v17)
    assert len(ratios) >= 20 and max(ratios) <= 1.06, ratios
    assert statistics.geometric_mean(ratios) <= 1.02 < statistics.geometric_mean(before)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (the CUDA toolkit) to compile-check kernels/")
def test_kernels_compile_with_nvcc_cpu(tmp_path):
    """kernels/*.cu build for sm_90a and sm_80 with the flags of the JIT build (and flute_gemm.cu with
    its experiment knobs changed); the wgmma kernels (one-pass and stream-K) neither spill nor get their
    MMAs serialised by ptxas (warnings C7513, C7512)."""
    from concurrent.futures import ThreadPoolExecutor

    from flute_vllm import _build

    # the shipped build of every .cu for sm_90a + sm_80, and flute_gemm.cu with the experiment knobs
    # (benchmarks/ab_kernel.py) away from their defaults for sm_90a, so a knob cannot rot unbuilt
    knobs = ["-DFLUTE_LUT_STAGES=8", "-DFLUTE_LUT_MIXED_MIN_MT=1", "-DFLUTE_LUT_HOLD_ADDR=0", "-DFLUTE_LUT_MT1_MIN_BLOCKS=8",
             "-DFLUTE_LUT_MT1_TILES=1", "-DFLUTE_LUT_MT2_TILES=1", "-DFLUTE_LUT_MT2_MIN_BLOCKS=7",
             "-DFLUTE_LUT_W2_QUAD_STEPS=5", "-DFLUTE_LUT_X_AHEAD_MT=1",
             "-DFLUTE_LUT_WIDE_MT1_MIN_BLOCKS=2", "-DFLUTE_LUT_WIDE_MT2_MIN_BLOCKS=3",
             "-DFLUTE_LUT_FOLD_MIN_MT=1", "-DFLUTE_LUT_MT4_TILES=1",
             "-DFLUTE_LUT_WIDE_MAX_MT=2", "-DFLUTE_LUT_WIDE_MT1_XA_MIN_BLOCKS=3", "-DFLUTE_LUT_X_AHEAD_W23_MT=0",
             "-DFLUTE_LUT_MT1_XA_MIN_BLOCKS=5", "-DFLUTE_LUT_W2_WIDE_QUAD_STEPS=0", "-DFLUTE_LUT_FLOOR=1"]
    jobs = {src: (src, [], ["-gencode=arch=compute_90a,code=sm_90a", "-gencode=arch=compute_80,code=sm_80"])
            for src in _build.SOURCES if src.endswith(".cu")}
    jobs["flute_gemm.cu+knobs"] = ("flute_gemm.cu", knobs, ["-gencode=arch=compute_90a,code=sm_90a"])
    jobs["flute_gemm.cu+no-byte-pair"] = ("flute_gemm.cu", ["-DFLUTE_LUT_BYTE_PAIR=0"], ["-gencode=arch=compute_90a,code=sm_90a"])
    jobs["flute_wgmma.cu+no-producer"] = ("flute_wgmma.cu",
                                          ["-DFLUTE_WG_PRODUCER_BNS=0", "-DFLUTE_WG_SCALE_REUSE=0", "-DFLUTE_WG_FLOOR=1"],
                                          ["-gencode=arch=compute_90a,code=sm_90a"])

    def compile_one(item):
        name, (src, extra, archs) = item
        cmd = ["nvcc", *_build.NVCC_FLAGS, *extra, *archs, "-Xptxas", "-v", "-I", str(_build.KERNEL_DIR),
               "-c", str(_build.KERNEL_DIR / src), "-o", str(tmp_path / (name + ".o"))]
        return name, subprocess.run(cmd, capture_output=True, text=True)

    with ThreadPoolExecutor(len(jobs)) as pool:
        results = dict(pool.map(compile_one, jobs.items()))
    for src, res in results.items():
        assert res.returncode == 0, f"{src}:\n{res.stderr[-3000:]}"
    log = results["flute_wgmma.cu"].stderr
    assert "C7513" not in log, log[-3000:]
    # ptxas -v: "Compiling entry function '<name>' for 'sm_90a'" ... "<n> bytes spill stores"
    entries = re.findall(r"Compiling entry function '([^']*lut_wgmma_kernel[^']*)' for 'sm_90a'\n.*\n\s*(\d+) bytes stack frame, "
                         r"(\d+) bytes spill stores", log)
    assert len(entries) == 36, log[-2000:]  # bits 2/3/4 x BN 8/16/32/64/128/256 x fp16/bf16
    # (4-bit BN=128, at the 128-register cap for 2 CTAs/SM, kept 4 bytes on the stack until v15's
    # descriptor add freed the registers: none may spill now)
    assert all(int(stores) == 0 for _, _, stores in entries), entries
    # the stream-K kernels (bits 2/3/4 x BN 64/256 x fp16/bf16): no spill, no serialised wgmma (C7512)
    sk_entries = re.findall(r"Compiling entry function '([^']*lut_wgmma_sk_kernel[^']*)' for 'sm_90a'\n.*\n"
                            r"\s*(\d+) bytes stack frame, (\d+) bytes spill stores", log)
    assert len(sk_entries) == 12 and all(int(stores) == 0 for _, _, stores in sk_entries), sk_entries
    assert "C7512" not in log, log[-3000:]
    # the build without the producer warp (FLUTE_WG_PRODUCER_BNS=0, the A/B baseline of v15), with
    # scale reuse off (v19's build) and the timing-only floor experiment (FLUTE_WG_FLOOR) on
    for job in ("flute_wgmma.cu+no-producer",):
        log = results[job].stderr
        assert "C7513" not in log, log[-3000:]
        entries = re.findall(r"Compiling entry function '([^']*lut_wgmma_kernel[^']*)' for 'sm_90a'\n.*\n\s*(\d+) bytes stack frame, "
                             r"(\d+) bytes spill stores", log)
        assert len(entries) == 36 and all(int(stores) == 0 for _, _, stores in entries), (job, entries)


def test_dense_path_row_slabs_cpu(monkeypatch):
    """row_slabs covers N exactly in 16-row multiples within the byte budget; dense_gemm dequantizes
    each slab from the right rows of qweight / scales / tables into one reused buffer and writes its
    output columns (checked with a stand-in dequantize that encodes each weight's row and column)."""
    assert cuda_op.row_slabs(4096, 4096, 0) == [(0, 4096)]
    assert cuda_op.row_slabs(4096, 4096, None) == [(0, 4096)]
    assert cuda_op.row_slabs(4096, 4096, 4096 * 4096 * 2) == [(0, 4096)]
    slabs = cuda_op.row_slabs(1008, 512, 300 * 512 * 2)
    assert slabs == [(0, 288), (288, 576), (576, 864), (864, 1008)]
    assert cuda_op.row_slabs(64, 1 << 20, 1) == [(0, 16), (16, 32), (32, 48), (48, 64)]  # at least one tile

    n, k, bits, g = 80, 128, 4, 64
    qweight = torch.zeros(n, k * bits // 32, dtype=torch.int32)
    scales = torch.zeros(n, k // g, dtype=torch.float32)
    tables = torch.zeros(n // 16, 24, dtype=torch.int32)
    calls = []

    def weight(rows):  # the stand-in dense weight: a function of (row, column)
        return rows.unsqueeze(1).float() * 1000 + torch.arange(k).float()

    class FakeExt:
        def dequant(self, q, s, t, w, b, gs):
            r0 = (q.data_ptr() - qweight.data_ptr()) // (qweight.stride(0) * 4)
            assert (s.data_ptr() - scales.data_ptr()) // (scales.stride(0) * 4) == r0
            assert (t.data_ptr() - tables.data_ptr()) // (tables.stride(0) * 4) == r0 // 16
            assert q.shape[0] == s.shape[0] == 16 * t.shape[0] == w.shape[0] and (b, gs) == (bits, g)
            calls.append((r0, w.shape[0], w.data_ptr()))
            w.copy_(weight(torch.arange(r0, r0 + w.shape[0])))

    monkeypatch.setattr(cuda_op, "_ext", lambda: FakeExt())
    x = torch.randn(5, k)
    out = cuda_op.dense_gemm(x, qweight, scales, tables, bits, g, k, slab_bytes=32 * k * 4)
    assert [(r0, rows) for r0, rows, _ in calls] == [(0, 32), (32, 32), (64, 16)]
    assert len({ptr for *_, ptr in calls}) == 1  # one scratch buffer, reused
    torch.testing.assert_close(out, x @ weight(torch.arange(n)).T)
