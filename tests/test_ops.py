import pytest
import torch

from flute_vllm import ops
from flute_vllm.quantize import pack, quantize_weight
from flute_vllm.tables import make_table


def _layer(n_parts, k, bits, group_size, dtype, kinds=("nf", "int", "fp")):
    """A fused layer: one (q, scales, table) per sub-layer, concatenated along N."""
    qs, ss, ts = [], [], []
    for i, n in enumerate(n_parts):
        table = make_table(kinds[i % len(kinds)], bits) if i < 3 else torch.randn(2**bits)
        q, s = quantize_weight(torch.randn(n, k), bits, group_size, table)
        qs.append(q), ss.append(s), ts.append(table)
    q = torch.cat(qs)
    return q, pack(q, bits), torch.cat(ss).to(dtype), torch.stack(ts), torch.tensor(n_parts).cumsum(0).tolist()


def _reference(x, q, scales, tables, shard_ends, group_size):
    """Independent float32 reference: loop over sub-layers, dequantize with plain indexing."""
    rows, start = [], 0
    for i, end in enumerate(shard_ends):
        w = tables[i][q[start:end]] * scales[start:end].float().repeat_interleave(group_size, dim=1)
        rows.append(w)
        start = end
    return x.float() @ torch.cat(rows).T


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [32, 64, 128, 256, -1])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_op_matches_float32_reference(bits, group_size, dtype):
    k = 512 if group_size in (128, 256) else 576
    g = k if group_size == -1 else group_size
    q, qweight, scales, tables, ends = _layer([64, 32, 32], k, bits, g, dtype)
    for m in (1, 7, 33):
        x = torch.randn(m, k).to(dtype)
        y = torch.ops.flute_vllm.lut_gemm(x, qweight, scales, tables, ends, bits, g)
        ref = _reference(x, q, scales, tables, ends, g)
        assert y.dtype == dtype and y.shape == (m, 128)
        tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
        assert ((y.float() - ref).norm() / ref.norm()).item() < tol


def test_lut_linear_batches_leading_dims_and_bias():
    q, qweight, scales, tables, ends = _layer([96], 128, 4, 64, torch.float32)
    x = torch.randn(2, 3, 128)
    bias = torch.randn(96)
    y = ops.lut_linear(x, qweight, scales, tables, ends, 4, 64, bias)
    ref = _reference(x.reshape(6, 128), q, scales, tables, ends, 64).reshape(2, 3, 96) + bias
    assert torch.allclose(y, ref, atol=1e-4)


def test_fake_impl_shapes_and_dtype():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(5, 256, dtype=torch.bfloat16)
        qweight = torch.empty(64, 256 * 3 // 32, dtype=torch.int32)
        scales = torch.empty(64, 4, dtype=torch.bfloat16)
        tables = torch.empty(1, 8)
        y = torch.ops.flute_vllm.lut_gemm(x, qweight, scales, tables, [64], 3, 64)
        assert y.shape == (5, 64) and y.dtype == torch.bfloat16


def test_op_under_torch_compile():
    q, qweight, scales, tables, ends = _layer([64], 128, 4, 32, torch.float32)

    @torch.compile(fullgraph=True, backend="eager")
    def f(x):
        return ops.lut_linear(x, qweight, scales, tables, ends, 4, 32) * 2

    x = torch.randn(3, 128)
    assert torch.allclose(f(x), 2 * _reference(x, q, scales, tables, ends, 32), atol=1e-4)


def test_op_rejects_bad_arguments():
    q, qweight, scales, tables, ends = _layer([64], 128, 4, 32, torch.float32)
    x = torch.randn(2, 128)
    with pytest.raises(ValueError, match="group_size=48 does not divide K=128"):
        torch.ops.flute_vllm.lut_gemm(x, qweight, scales, tables, ends, 4, 48)
    with pytest.raises(ValueError, match="bits=5"):
        torch.ops.flute_vllm.lut_gemm(x, qweight, scales, tables, ends, 5, 32)
    with pytest.raises(ValueError, match="qweight holds K=128 input features but x has K=256"):
        torch.ops.flute_vllm.lut_gemm(torch.randn(2, 256), qweight, scales.repeat(1, 2), tables, ends, 4, 32)
    with pytest.raises(ValueError, match="tables must be"):
        torch.ops.flute_vllm.lut_gemm(x, qweight, scales, tables, ends, 2, 32)
    with pytest.raises(ValueError, match="shard_ends"):
        torch.ops.flute_vllm.lut_gemm(x, qweight, scales, tables, [32], 4, 32)
