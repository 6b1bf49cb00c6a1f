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


def current_platform_is_cuda() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cuda()
