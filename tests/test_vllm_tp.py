"""Tensor parallelism of the flute linear method: TP=2 over gloo equals TP=1 and the reference."""
import pytest
import torch

pytest.importorskip("vllm")

from spawn import run_ranks  # noqa: E402
from tp_worker import CONFIGS, HEAD, HEADS, KV_HEADS, HIDDEN, make_checkpoint, run_rank  # noqa: E402

from flute_vllm.quantize import dequantize  # noqa: E402


def _run(world):
    return run_ranks(run_rank, world, timeout=600)


def _dense(t, bits, group_size):
    g = t["qweight"].shape[1] * 32 // bits if group_size == -1 else group_size
    return dequantize(t["qweight"], t["scales"], t["table"], bits, g)


def _close(a, b, dtype):
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    tol = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}[dtype]
    return ((a.float() - b.float()).norm() / b.float().norm()).item() < tol


@pytest.fixture(scope="module")
def tp_outputs():
    return _run(1), _run(2)


@pytest.mark.parametrize("bits,group_size,dtype", CONFIGS)
def test_tp2_matches_tp1_and_reference(tp_outputs, bits, group_size, dtype):
    tp1, tp2 = tp_outputs
    ck = {k: _dense(v, bits, group_size) for k, v in make_checkpoint(bits, group_size).items()}
    x = torch.randn(5, HIDDEN, generator=torch.Generator().manual_seed(1)).to(dtype).float()
    # reference in float32 from the dequantized checkpoint
    ref_q, ref_k, ref_v = x @ ck["q_proj"].T, x @ ck["k_proj"].T, x @ ck["v_proj"].T
    # the layers hand activations on in `dtype`: round the reference at the same points
    r = lambda t: t.to(dtype).float()  # noqa: E731
    ref_o = r(ref_q) @ ck["o_proj"].T
    ref_down = (r(r(x @ ck["gate_proj"].T) * r(x @ ck["up_proj"].T))) @ ck["down_proj"].T
    one = tp1[0][(bits, group_size)]
    assert _close(one["qkv"], torch.cat([ref_q, ref_k, ref_v], 1), dtype)
    assert _close(one["o"], ref_o, dtype)
    assert _close(one["down"], ref_down, dtype)
    qs, kvs = HEADS * HEAD // 2, KV_HEADS * HEAD // 2
    for rank in (0, 1):
        got = tp2[rank][(bits, group_size)]
        local = torch.cat([ref_q[:, rank * qs:(rank + 1) * qs], ref_k[:, rank * kvs:(rank + 1) * kvs],
                           ref_v[:, rank * kvs:(rank + 1) * kvs]], 1)
        assert _close(got["qkv"], local, dtype)
        # row-parallel outputs are all-reduced: every rank holds the full result, equal to TP=1
        assert _close(got["o"], one["o"], dtype)
        assert _close(got["down"], one["down"], dtype)


def test_tp_size_that_splits_a_group_fails_clearly(tp_outputs):
    msg = tp_outputs[1][0]["split_error"]
    assert msg is not None
    assert "l.o_proj" in msg and "TP size 2" in msg and "split a scale group" in msg
