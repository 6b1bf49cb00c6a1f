"""Every vLLM import flute_vllm needs, in one place (tested with vLLM 0.32; names as of 0.24-0.33).

vLLM moves things between releases; keeping the imports here means a version bump touches only
this file.
"""
from __future__ import annotations

from vllm.model_executor.layers.linear import (  # noqa: F401  (stable since 0.4)
    LinearBase,
    LinearMethodBase,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    UnquantizedLinearMethod,
)
from vllm.model_executor.layers.quantization import register_quantization_config  # noqa: F401
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig  # noqa: F401
from vllm.model_executor.utils import set_weight_attrs  # noqa: F401


def layer_tp(layer) -> tuple[int, int]:
    """(rank, size) of the layer's tensor-parallel group. Layers carry ``tp_rank``/``tp_size`` in
    recent vLLM (and 1/0 when built with ``disable_tp``); older releases only had the global group."""
    if hasattr(layer, "tp_rank") and hasattr(layer, "tp_size"):
        return layer.tp_rank, layer.tp_size
    from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

    return get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()


def kv_head_replicas(layer) -> int:
    """How many TP ranks share one KV head of a QKVParallelLinear (1 when KV heads are split)."""
    return getattr(layer, "num_kv_head_replicas", 1)
