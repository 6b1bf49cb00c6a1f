"""The flute custom op: ``Y = X @ W_hat.T`` with ``W_hat = tables[s][q] * scales``.

``torch.ops.flute_vllm.lut_gemm(x, qweight, scales, tables, shard_ends, bits, group_size)``

- x:          ``[M, K]`` fp16 / bf16 / fp32 activations.
- qweight:    packed indices. On CPU: the canonical int32 ``[N, K*b/32]`` layout (format.py).
              On CUDA: the kernel layout made once by :func:`prepare_weights` after loading.
- scales:     ``[N, K/G]``, activation dtype (G = K for channel-wise).
- tables:     float32 ``[S, 2^b]``: one table per fused sub-layer (q/k/v: S = 3).
- shard_ends: S increasing ints, the last == N; output rows ``[shard_ends[i-1], shard_ends[i])``
              use ``tables[i]``.
- returns     ``[M, N]`` in x's dtype.

The CPU implementation is the reference: it dequantizes in float32 and multiplies in float32.
The CUDA implementation lives in :mod:`flute_vllm.cuda_op` and registers itself on import.
The fake (meta) implementation makes the op traceable by torch.compile / vLLM's CUDA graphs.
"""
from __future__ import annotations

from typing import Optional

import torch

from .quantize import unpack
from .tables import check_bits

ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_op_args(x, qweight, scales, tables, shard_ends, bits, group_size, packed_k: Optional[int] = None):
    """Shape/dtype checks shared by every implementation; raise before any kernel launch."""
    check_bits(bits)
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [M, K], got {tuple(x.shape)}")
    if x.dtype not in ACT_DTYPES:
        raise ValueError(f"x has dtype {x.dtype}; flute supports {ACT_DTYPES}")
    m, k = x.shape
    n = scales.shape[0]
    if group_size <= 0 or k % group_size:
        raise ValueError(f"group_size={group_size} does not divide K={k}")
    if tuple(scales.shape) != (n, k // group_size):
        raise ValueError(f"scales has shape {tuple(scales.shape)}, expected [N, K/G] = [{n}, {k // group_size}]")
    if tables.dim() != 2 or tables.shape[1] != 2**bits:
        raise ValueError(f"tables must be [S, 2^{bits}], got {tuple(tables.shape)}")
    if len(shard_ends) != tables.shape[0]:
        raise ValueError(f"{len(shard_ends)} shard_ends for {tables.shape[0]} tables")
    if list(shard_ends) != sorted(shard_ends) or shard_ends[-1] != n or shard_ends[0] <= 0:
        raise ValueError(f"shard_ends={list(shard_ends)} must increase and end at N={n}")
    if packed_k is not None and packed_k != k:
        raise ValueError(f"qweight holds K={packed_k} input features but x has K={k}")


@torch.library.custom_op("flute_vllm::lut_gemm", mutates_args=())
def lut_gemm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    tables: torch.Tensor,
    shard_ends: list[int],
    bits: int,
    group_size: int,
) -> torch.Tensor:
    raise NotImplementedError(f"flute_vllm::lut_gemm has no implementation for device {x.device.type}")


@lut_gemm.register_kernel("cpu")
def _lut_gemm_cpu(x, qweight, scales, tables, shard_ends, bits, group_size):
    k_packed = qweight.shape[1] * 32 // bits
    check_op_args(x, qweight, scales, tables, shard_ends, bits, group_size, packed_k=k_packed)
    w = dequantize_sharded(qweight, scales, tables, shard_ends, bits, group_size)
    return (x.to(torch.float32) @ w.T).to(x.dtype)


@lut_gemm.register_fake
def _lut_gemm_fake(x, qweight, scales, tables, shard_ends, bits, group_size):
    return x.new_empty((x.shape[0], scales.shape[0]))


def dequantize_sharded(qweight, scales, tables, shard_ends, bits, group_size) -> torch.Tensor:
    """Canonical layout -> float32 ``W_hat[N, K]``, each row block with its own table."""
    q = unpack(qweight, bits)
    n, k = q.shape
    tables = tables.to(torch.float32)
    if len(shard_ends) == 1:
        values = tables[0][q]
    else:
        starts = torch.zeros(n, dtype=torch.int64, device=q.device)
        for end in shard_ends[:-1]:
            starts[end:] += tables.shape[1]
        values = tables.flatten()[q + starts.unsqueeze(1)]
    scaled = values.view(n, k // group_size, group_size) * scales.to(torch.float32).unsqueeze(-1)
    return scaled.view(n, k)


def _cuda_impl():
    from . import cuda_op  # noqa: F401  (registers the CUDA kernel of lut_gemm)

    return cuda_op


def prepare_weights(qweight, scales, tables, shard_ends, bits, group_size):
    """Turn canonical tensors into what the op wants on their device (once, after loading).

    CPU: unchanged. CUDA: the kernel's repacked layout (see :mod:`flute_vllm.cuda_op`).
    Returns ``(qweight, scales, tables)``.
    """
    if qweight.device.type == "cuda":
        return _cuda_impl().prepare(qweight, scales, tables, list(shard_ends), bits, group_size)
    return qweight, scales, tables.to(torch.float32).contiguous()


def lut_linear(x, qweight, scales, tables, shard_ends, bits, group_size, bias=None):
    """``x[..., K] -> [..., N]`` through the op (flattens leading dims, adds bias)."""
    if x.device.type == "cuda":
        _cuda_impl()
    out = torch.ops.flute_vllm.lut_gemm(
        x.reshape(-1, x.shape[-1]), qweight, scales, tables, list(shard_ends), bits, group_size
    )
    out = out.reshape(*x.shape[:-1], out.shape[-1])
    return out if bias is None else out + bias


__all__ = ["lut_gemm", "check_op_args", "dequantize_sharded", "prepare_weights", "lut_linear"]
