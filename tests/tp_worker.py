"""Worker for test_vllm_tp.py: builds vLLM parallel linear layers with the flute method on one
rank of a gloo group, loads a checkpoint's tensors through the method's own weight loaders, and
returns this rank's outputs. (A module, not a test: spawned processes import it by name.)"""
import os

import torch

CONFIGS = [(4, 64, torch.float32), (3, 128, torch.bfloat16), (2, -1, torch.float16), (4, 32, torch.bfloat16)]
HIDDEN, HEAD, HEADS, KV_HEADS, INTER = 256, 64, 4, 2, 512


def make_checkpoint(bits, group_size, seed=0):
    """Format-v1 tensors for one attention + MLP block; each sub-layer has its own random table."""
    from flute_vllm.quantize import pack, quantize_weight

    gen = torch.Generator().manual_seed(seed)
    shapes = {"q_proj": (HEADS * HEAD, HIDDEN), "k_proj": (KV_HEADS * HEAD, HIDDEN),
              "v_proj": (KV_HEADS * HEAD, HIDDEN), "o_proj": (HIDDEN, HEADS * HEAD),
              "gate_proj": (INTER, HIDDEN), "up_proj": (INTER, HIDDEN), "down_proj": (HIDDEN, INTER)}
    ckpt = {}
    for name, shape in shapes.items():
        table = torch.randn(2**bits, generator=gen).sort().values
        weight = torch.randn(*shape, generator=gen) / shape[1] ** 0.5  # keep activations O(1)
        q, scales = quantize_weight(weight, bits, group_size, table)
        ckpt[name] = {"qweight": pack(q, bits), "scales": scales, "table": table}
    return ckpt


def run_rank(rank, world, port, results):
    os.environ.setdefault("VLLM_DIST_IDENT", f"flute-test-{port}")
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.model_executor.layers.linear import (
        MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear,
    )

    import flute_vllm

    flute_vllm.register()
    from flute_vllm.vllm_plugin.flute import FluteConfig

    out = {}
    with set_current_vllm_config(VllmConfig()):
        init_distributed_environment(world_size=world, rank=rank, local_rank=rank, backend="gloo",
                                     distributed_init_method=f"tcp://127.0.0.1:{port}")
        initialize_model_parallel(tensor_model_parallel_size=world)
        for bits, group_size, dtype in CONFIGS:
            cfg = FluteConfig.from_config({"quant_method": "flute", "bits": bits, "group_size": group_size})
            cfg.packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"],
                                          "gate_up_proj": ["gate_proj", "up_proj"]}
            kw = dict(bias=False, quant_config=cfg, params_dtype=dtype)
            qkv = QKVParallelLinear(HIDDEN, HEAD, HEADS, KV_HEADS, prefix="l.qkv_proj", **kw)
            o = RowParallelLinear(HEADS * HEAD, HIDDEN, prefix="l.o_proj", **kw)
            gate_up = MergedColumnParallelLinear(HIDDEN, [INTER, INTER], prefix="l.gate_up_proj", **kw)
            down = RowParallelLinear(INTER, HIDDEN, prefix="l.down_proj", **kw)
            ckpt = make_checkpoint(bits, group_size)
            loads = [(qkv, "q_proj", "q"), (qkv, "k_proj", "k"), (qkv, "v_proj", "v"), (o, "o_proj", None),
                     (gate_up, "gate_proj", 0), (gate_up, "up_proj", 1), (down, "down_proj", None)]
            for layer, name, shard in loads:
                for suffix, tensor in ckpt[name].items():
                    if suffix == "scales":
                        tensor = tensor.to(dtype)
                    param = getattr(layer, suffix)
                    if shard is None:
                        param.weight_loader(param, tensor)
                    else:
                        param.weight_loader(param, tensor, shard)
            for layer in (qkv, o, gate_up, down):
                layer.quant_method.process_weights_after_loading(layer)
            x = torch.randn(5, HIDDEN, generator=torch.Generator().manual_seed(1)).to(dtype)
            qkv_out, _ = qkv(x)
            q_local = qkv_out[:, : qkv.num_heads * HEAD]
            o_out, _ = o(q_local)
            gu, _ = gate_up(x)
            gate, up = gu.chunk(2, dim=-1)
            down_out, _ = down(gate * up)
            # numpy pickles by value (torch tensors would go through shared memory that dies with us)
            out[(bits, group_size)] = {k: v.float().numpy() for k, v in (("qkv", qkv_out), ("o", o_out), ("down", down_out))}
        # A TP size that splits a scale group must fail when the layer is built.
        if world > 1:
            cfg = FluteConfig.from_config({"quant_method": "flute", "bits": 4, "group_size": 256})
            try:
                RowParallelLinear(256, 256, bias=False, quant_config=cfg, prefix="l.o_proj")
                out["split_error"] = None
            except ValueError as e:
                out["split_error"] = str(e)
    results.put((rank, out))
