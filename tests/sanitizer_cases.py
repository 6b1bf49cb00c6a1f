"""A few kernel launches for ``compute-sanitizer`` (not collected by pytest: no test functions).

    compute-sanitizer --tool memcheck python3 tests/sanitizer_cases.py

Every path (mma.sync LUT kernel with and without split-K, in 4- and (M <= 16) 8-warp CTAs, with K
slices where the kernel has them; sm_90a
wgmma kernel with split-K and each block_m where available, and stream-K; dequantize, whole and by row slabs) on
small ragged shapes (K % 64 == 32, N not a multiple of
the CTA's rows, odd M), each checked against the float32 reference.
"""
import torch

from flute_vllm import cuda_op, ops
from flute_vllm.quantize import pack

torch.manual_seed(0)
dev = torch.device("cuda")
cases = 0
for bits in (2, 3, 4):
    n, k, g = 208, 480, 32
    q = torch.randint(0, 2**bits, (n, k))
    scales = (torch.rand(n, k // g) * 0.05 + 0.01).half().to(dev)
    table = torch.randn(1, 2**bits).to(dev)
    qweight = pack(q, bits).to(dev)
    qk, sk, tk = ops.prepare_weights(qweight, scales, table, [n], bits, g)
    w = ops.dequantize_sharded(qweight, scales, table, [n], bits, g)
    for m in (1, 37, 130):
        x = torch.randn(m, k, device=dev).half()
        ref = x.float() @ w.T
        runs = [dict(force_path="lut"), dict(force_path="lut", splits=3), dict(force_path="dense"),
                dict(force_path="dense", slab_bytes=64 * k * 2)]
        if cuda_op.wide_ok(cuda_op.m_tiles_for(m)):
            runs += [dict(force_path="lut", warps=8), dict(force_path="lut", warps=8, splits=3)]
        if cuda_op.x_ahead_variant(bits, cuda_op.m_tiles_for(m), 8):
            runs += [dict(force_path="lut", warps=8, x_ahead=1), dict(force_path="lut", warps=8, splits=3, x_ahead=1)]
        mt = cuda_op.m_tiles_for(m)
        for warps, xa in ((4, None), (8, 1)):
            if warps == 8 and not cuda_op.wide_ok(mt):
                continue
            xa = xa if cuda_op.x_ahead_variant(bits, mt, warps) else None
            runs += [dict(force_path="lut", warps=warps, x_ahead=xa, k_slices=ks, splits=s)
                     for ks in cuda_op.K_SLICES[1:] if cuda_op.k_slices_ok(bits, mt, warps, xa or 0, ks) for s in (1, 2)]
        if cuda_op.tc_available(0):
            runs += [dict(force_path="tc", block_m=b, splits=s) for b in cuda_op.TC_BLOCK_MS for s in (1, 4)]
            # stream-K: the device's CTA count (tiles cut into pieces) and 2 CTAs (whole-tile waves too)
            runs += [dict(force_path="tc", block_m=b, stream_k=True, sk_ctas=c) for b in cuda_op.SK_BLOCK_MS for c in (None, 2)]
        for kw in runs:
            out = cuda_op.gemm(x, qk, sk, tk, bits, g, **kw)
            err = ((out.float() - ref).norm() / ref.norm()).item()
            assert err < 3e-3, (bits, m, kw, err)
            cases += 1
torch.cuda.synchronize()
print(f"sanitizer cases: {cases} launches checked")
