"""One rank of the tensor-parallel check of issue 5 (spawned by test_multi_gpu.py).

A Llama-shaped attention/MLP pair — column-parallel fused q/k/v and gate/up (each sub-layer with
its own table and scales), then row-parallel o and down with an all-reduce — is quantized once
(identically on every rank), sharded with the same ``shard_tensor`` the vLLM weight loader uses,
repacked for this rank's device, and compared with the unsharded layer computed on the same
device. On GPUs it also times every rank's shard (CUDA graph, L2 defeated by rotating weight
copies) against the unsharded layer and against cuBLAS fp16 on the same shard.
"""
import os

import torch
import torch.distributed as dist

from flute_vllm import ops
from flute_vllm.format import check_tp_split, shard_tensor
from flute_vllm.quantize import pack, quantize_weight


# (name, sub-layer output sizes, K, parallel)
LLAMA3_70B = [("qkv", [8192, 1024, 1024], 8192, "column"), ("o", [8192], 8192, "row"),
              ("gate_up", [28672, 28672], 8192, "column"), ("down", [8192], 28672, "row")]
SMALL = [("qkv", [256, 128, 128], 256, "column"), ("o", [256], 256, "row"),
         ("gate_up", [512, 512], 256, "column"), ("down", [256], 512, "row")]


def quantized_layer(parts, k, bits, group_size, seed, device, dtype):
    """Full (unsharded) format-v1 tensors of a fused layer: one (qweight, scales, table) per part."""
    gen = torch.Generator(device=device).manual_seed(seed)
    subs = []
    for i, n in enumerate(parts):
        table = torch.randn(2**bits, generator=gen, device=device).sort().values
        w = torch.randn(n, k, generator=gen, device=device) / k**0.5
        q, scales = quantize_weight(w, bits, group_size, table)
        subs.append({"qweight": pack(q, bits), "scales": scales.to(dtype), "table": table})
        del w, q
    return subs


def local_tensors(name, subs, k, bits, group_size, parallel, rank, world):
    """This rank's (qweight, scales, tables, shard_ends, group) through format.shard_tensor."""
    k_local = k // world if parallel == "row" else k
    k0 = rank * k_local if parallel == "row" else 0
    group = check_tp_split(f"{name} (K={k}, TP size {world})", k, k_local, group_size)
    qs, ss, ends = [], [], []
    for i, sub in enumerate(subs):
        n = sub["qweight"].shape[0]
        n_local = n // world if parallel == "column" else n
        r0 = rank * n_local if parallel == "column" else 0
        qs.append(shard_tensor(f"{name}[{i}].qweight", sub["qweight"], "qweight", bits, group_size, k, (r0, n_local), (k0, k_local)))
        ss.append(shard_tensor(f"{name}[{i}].scales", sub["scales"], "scales", bits, group_size, k, (r0, n_local), (k0, k_local)))
        ends.append((ends[-1] if ends else 0) + n_local)
    tables = torch.stack([s["table"] for s in subs])
    return torch.cat(qs).contiguous(), torch.cat(ss).contiguous(), tables, ends, group, (k0, k_local)


def run_rank(rank, world, port, backend, configs, shapes_name, ms, timing, results):
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    device = torch.device(f"cuda:{rank}") if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=rank, world_size=world)
    shapes = {"llama3-70b": LLAMA3_70B, "small": SMALL}[shapes_name]
    out = {"errors": [], "timing": []}
    for bits, group_size, dtype in configs:
        for li, (name, parts, k, parallel) in enumerate(shapes):
            subs = quantized_layer(parts, k, bits, group_size, seed=1000 + li, device=device, dtype=dtype)
            full = ops.prepare_weights(torch.cat([s["qweight"] for s in subs]), torch.cat([s["scales"] for s in subs]),
                                       torch.stack([s["table"] for s in subs]),
                                       torch.tensor(parts).cumsum(0).tolist(), bits, group_size if group_size != -1 else k)
            full_ends = torch.tensor(parts).cumsum(0).tolist()
            qw, sc, tb, ends, group, (k0, kl) = local_tensors(name, subs, k, bits, group_size, parallel, rank, world)
            local = ops.prepare_weights(qw, sc, tb, ends, bits, group)
            for m in ms:
                x = torch.randn(m, k, generator=torch.Generator(device=device).manual_seed(m), device=device).to(dtype)
                ref = ops.lut_linear(x, *full, full_ends, bits, group_size if group_size != -1 else k).float()
                y = ops.lut_linear(x[:, k0 : k0 + kl].contiguous(), *local, ends, bits, group).float()
                if parallel == "row":
                    y = y.to(dtype)  # vLLM all-reduces in the activation dtype
                    dist.all_reduce(y)
                    expected = ref
                else:  # this rank's rows of every sub-layer
                    starts = [0] + full_ends[:-1]
                    expected = torch.cat([ref[:, s + rank * (p // world): s + (rank + 1) * (p // world)]
                                          for s, p in zip(starts, parts)], 1)
                err = ((y.float() - expected).norm() / expected.norm()).item()
                tol = {torch.float16: 2e-3, torch.bfloat16: 1.5e-2, torch.float32: 1e-4}[dtype]
                if not err < tol:
                    out["errors"].append(f"{name} bits={bits} G={group_size} {dtype} M={m}: rel err {err:.2e} >= {tol}")
                if timing and m in (1, 16):
                    out["timing"].append(_time_layer(name, parts, k, bits, group_size, dtype, m, x, full, full_ends,
                                                     local, ends, group, (k0, kl), parallel, world, device))
            del full, local, subs
    results.put((rank, out))
    dist.barrier()
    dist.destroy_process_group()
    # Leave without the interpreter's teardown: on a loaded 2-core CI machine a rank once aborted
    # there after its result was in ("terminate called without an active exception", exit code -6,
    # a C++ thread of the gloo backend destroyed at exit). The result is flushed to the pipe first.
    results.close()
    results.join_thread()
    os._exit(0)


def _time_layer(name, parts, k, bits, group_size, dtype, m, x, full, full_ends, local, ends, group, kr, parallel, world, device):
    k0, kl = kr
    g_full = group_size if group_size != -1 else k
    x_local = x[:, k0 : k0 + kl].contiguous()
    n_local = ends[-1]
    # enough copies that the rotated weights exceed 4x the L2 (50-60 MB on H100/H200)
    nbytes = local[0].numel() * 4 + local[1].numel() * local[1].element_size()
    copies = max(1, min(8, (240 << 20) // max(nbytes, 1) + 1))
    loc = [tuple(t.clone() for t in local) for _ in range(copies)]
    from flute_vllm.timing import time_graph  # the project's CUDA-graph timer

    ours = time_graph([lambda w=w: ops.lut_linear(x_local, *w, ends, bits, group) for w in loc], 200)
    unsharded = time_graph([lambda: ops.lut_linear(x, *full, full_ends, bits, g_full)], 200)
    dense = [torch.randn(n_local, kl, device=device, dtype=torch.float16) for _ in range(max(1, copies // 4))]
    xh = x_local.half()
    cublas = time_graph([lambda w=w: torch.nn.functional.linear(xh, w) for w in dense], 200)
    return {"gpu": torch.cuda.get_device_name(device), "tp": world, "layer": name, "bits": bits,
            "group_size": group_size, "dtype": str(dtype).replace("torch.", ""), "M": m, "N_local": n_local,
            "K_local": kl, "us": ours, "unsharded_us": unsharded, "cublas_fp16_shard_us": cublas,
            "speedup_vs_unsharded": unsharded / ours, "speedup_vs_cublas": cublas / ours}
