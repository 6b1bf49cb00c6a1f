"""Issue 5: the flute linear method sharded over 2/4/8 GPUs with NCCL equals one GPU.

``test_tp_on_gpus`` needs >= 2 CUDA devices (skips otherwise): Llama-3-70B-shaped qkv->o and
gate_up->down, W4/W3, G 64/128, fp16/bf16, M in {1, 16, 256}, sharded with format.shard_tensor
(the function the vLLM weight loader uses), and times every rank's shard, writing
benchmarks/results/tp_<gpu>.json/.md. ``test_tp_worker_on_cpu`` runs the same worker on the CPU
over gloo with small shapes, so the code path is checked on every CI run.
"""
import json
import os

import pytest
import torch

from multi_gpu_worker import run_rank
from spawn import run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _spawn(world, backend, configs, shapes, ms, timing=False):
    return run_ranks(run_rank, world, backend, configs, shapes, ms, timing)


def test_tp_worker_on_cpu():
    outs = _spawn(2, "gloo", [(4, 64, torch.float32), (3, 128, torch.bfloat16), (2, -1, torch.float16)],
                  "small", [1, 5])
    assert outs[0]["errors"] == [] and outs[1]["errors"] == []


def test_tp_split_errors_name_layer_and_size():
    from flute_vllm.format import check_tp_split

    with pytest.raises(ValueError, match=r"down \(K=576, TP size 2\).*would split a scale group"):
        check_tp_split("down (K=576, TP size 2)", 576, 288, 64)
    with pytest.raises(ValueError, match=r"o \(K=96, TP size 2\).*packed index words would be split"):
        check_tp_split("o (K=96, TP size 2)", 96, 48, 32)
    assert check_tp_split("o", 8192, 2048, 128) == 128
    assert check_tp_split("o", 8192, 2048, -1) == 2048  # channel-wise: each shard keeps whole scales


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs >= 2 CUDA GPUs (NCCL tensor parallelism)")
def test_tp_on_gpus():
    configs = [(b, g, d) for b in (4, 3) for g in (64, 128) for d in (torch.float16, torch.bfloat16)]
    records = []
    for world in (2, 4, 8):
        if world > torch.cuda.device_count():
            break
        outs = _spawn(world, "nccl", configs, "llama3-70b", [1, 16, 256], timing=True)
        for rank, out in outs.items():
            assert out["errors"] == [], f"TP={world} rank {rank}: {out['errors']}"
            records += [{**r, "rank": rank} for r in out["timing"]]
    gpu = records[0]["gpu"].replace(" ", "_")
    os.makedirs(os.path.join(ROOT, "benchmarks", "results"), exist_ok=True)
    with open(os.path.join(ROOT, "benchmarks", "results", f"tp_{gpu}.json"), "w") as f:
        json.dump(records, f, indent=1)
    lines = ["| TP | layer | dtype | bits | G | M | us (slowest rank) | vs unsharded | vs cuBLAS fp16 shard |",
             "|---|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r["tp"], r["layer"], r["dtype"], r["bits"], r["group_size"], r["M"]) for r in records})
    for key in keys:
        rows = [r for r in records if (r["tp"], r["layer"], r["dtype"], r["bits"], r["group_size"], r["M"]) == key]
        slow = max(rows, key=lambda r: r["us"])
        lines.append("| " + " | ".join(map(str, key)) + f" | {slow['us']:.1f} | {slow['speedup_vs_unsharded']:.2f}x"
                     f" | {slow['speedup_vs_cublas']:.2f}x |")
    with open(os.path.join(ROOT, "benchmarks", "results", f"tp_{gpu}.md"), "w") as f:
        f.write(f"# Tensor-parallel flute layers on {records[0]['gpu']}\n\n" + "\n".join(lines) + "\n")
