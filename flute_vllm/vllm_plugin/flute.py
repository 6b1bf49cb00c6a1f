"""``--quantization flute``: config -> linear method -> flute op (the vLLM quantization pattern).

Checkpoint tensors are in the canonical format v1 (see flute_vllm/format.py). Every tensor-parallel
shard of it is a plain slice, so one small weight loader of ours serves every bits value (vLLM's
``PackedvLLMParameter`` cannot express 32/3 indices per word):

- column-parallel (and each q/k/v, gate/up sub-layer): rows of qweight and scales;
- row-parallel: words ``k0*b/32 .. k1*b/32`` of qweight and groups ``k0/G .. k1/G`` of scales.

Fused layers keep one table per sub-layer (``table`` is ``[S, 2^b]``); the op picks the table for
each output row from ``shard_ends``. After loading, ``process_weights_after_loading`` checks that
every tensor arrived and hands the local shard to ``ops.prepare_weights`` (the kernel layout).
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from .. import ops
from ..convert.flute_zoo import FLUTE_CONFIG, flute_weight_to_qweight, is_flute_zoo_config
from ..format import (
    FORMAT_VERSION, QUANT_METHOD, FluteQuantConfig, check_group_size, check_tp_split, is_listed, shard_tensor,
)
from ..tables import check_bits
from .compat import (
    LinearBase,
    LinearMethodBase,
    QKVParallelLinear,
    QuantizationConfig,
    UnquantizedLinearMethod,
    kv_head_replicas,
    layer_tp,
    register_quantization_config,
    set_weight_attrs,
)

_QKV_INDEX = {"q": 0, "k": 1, "v": 2}


@register_quantization_config(QUANT_METHOD)
class FluteConfig(QuantizationConfig):
    """Reads ``quantization_config`` (quant_method "flute") from config.json."""

    def __init__(self, spec: FluteQuantConfig, flute_zoo: bool = False) -> None:
        super().__init__()
        self.spec = spec
        # FLUTE's own (legacy model-zoo) layout on disk; converted to format v1 as it loads.
        self.flute_zoo = flute_zoo

    def __repr__(self) -> str:
        return f"FluteConfig({self.spec})"

    @classmethod
    def get_name(cls) -> str:
        return QUANT_METHOD

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        return [torch.float16, torch.bfloat16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 80  # the CUDA kernel uses sm_80+ instructions

    @staticmethod
    def get_config_filenames() -> list[str]:
        # Ours lives in config.json's quantization_config; FLUTE's model zoo ships flute_config.json.
        return [FLUTE_CONFIG]

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "FluteConfig":
        if is_flute_zoo_config(config):
            check_bits(config["num_bits"], "flute_config.json: num_bits")
            check_group_size(config["group_size"], "flute_config.json: group_size")
            # FLUTE quantizes the Linear layers inside model.layers only; its tables are per layer.
            spec = FluteQuantConfig(bits=config["num_bits"], group_size=config["group_size"], table="custom",
                                    modules_to_not_convert=["lm_head"])
            return cls(spec, flute_zoo=True)
        return cls(FluteQuantConfig.from_dict(config))

    @classmethod
    def override_quantization_method(cls, hf_quant_cfg, user_quant, hf_config=None) -> Optional[str]:
        # A flute checkpoint is served as flute without --quantization.
        if hf_quant_cfg.get("quant_method") == QUANT_METHOD and user_quant in (None, QUANT_METHOD):
            return QUANT_METHOD
        return None

    def is_skipped(self, prefix: str) -> bool:
        """True if ``modules_to_not_convert`` names this layer (for fused layers: all sub-layers)."""
        proj = prefix.rsplit(".", 1)[-1]
        subs = self.packed_modules_mapping.get(proj, [proj])
        names = [prefix[: len(prefix) - len(proj)] + s for s in subs]
        skipped = [is_listed(n, self.spec.modules_to_not_convert) for n in names]
        if any(skipped) and not all(skipped):
            raise ValueError(
                f"{prefix}: modules_to_not_convert lists only some of the fused sub-layers {subs}; "
                "vLLM runs them as one layer, so quantize all or none of them"
            )
        return all(skipped)

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if isinstance(layer, LinearBase):
            if self.is_skipped(prefix):
                return UnquantizedLinearMethod()
            return FluteLinearMethod(self, prefix)
        return None


class FluteLinearMethod(LinearMethodBase):
    """Linear layers whose weight is ``table[q] * scales`` (format v1 on disk)."""

    # checkpoint tensor name of each role: format v1, or FLUTE's model zoo (+ its derived tables2)
    V1_NAMES = {"qweight": "qweight", "scales": "scales", "table": "table"}
    ZOO_NAMES = {"qweight": "weight", "scales": "scales", "table": "tables", "ignored": "tables2"}

    def __init__(self, quant_config: FluteConfig, prefix: str = "") -> None:
        self.spec = quant_config.spec
        self.prefix = prefix
        self.flute_zoo = quant_config.flute_zoo
        self.names = self.ZOO_NAMES if self.flute_zoo else self.V1_NAMES
        proj = prefix.rsplit(".", 1)[-1]
        # checkpoint names of the sub-layers vLLM fused into this one (q/k/v_proj, gate/up_proj)
        self.sub_layer_names = quant_config.packed_modules_mapping.get(proj, [proj])

    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ) -> None:
        bits = self.spec.bits
        k_local = input_size_per_partition
        n_local = sum(output_partition_sizes)
        row_parallel = k_local != input_size
        rank, tp = layer_tp(layer)
        where = f"{self.prefix or 'layer'} (K={input_size}, N={output_size}, TP size {tp})"
        group = check_tp_split(where, input_size, k_local, self.spec.group_size)

        qweight = torch.nn.Parameter(
            torch.empty(n_local, k_local * bits // 32, dtype=torch.int32), requires_grad=False
        )
        scales = torch.nn.Parameter(torch.empty(n_local, k_local // group, dtype=params_dtype), requires_grad=False)
        table = torch.nn.Parameter(
            torch.empty(len(output_partition_sizes), 2**bits, dtype=torch.float32), requires_grad=False
        )
        k_start = rank * k_local if row_parallel else 0
        params = {"qweight": qweight, "scales": scales, "table": table}
        if "ignored" in self.names:  # accepted from the checkpoint, then dropped
            params["ignored"] = torch.nn.Parameter(torch.empty(0), requires_grad=False)
        for role, param in params.items():
            layer.register_parameter(self.names[role], param)
            loader = _ShardLoader(layer, role, self.names[role], self.spec, k_start, k_local, self.flute_zoo)
            set_weight_attrs(param, {"weight_loader": loader})
            param.flute_loaded = set()

        layer.flute_bits = bits
        layer.flute_group = group
        layer.flute_parts = list(output_partition_sizes)
        layer.flute_prefix = self.prefix

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        self._check_all_loaded(layer)
        shard_ends = torch.tensor(layer.flute_parts).cumsum(0).tolist()
        loaded = {role: getattr(layer, name).data for role, name in self.names.items()}
        qweight, scales, tables = ops.prepare_weights(
            loaded["qweight"], loaded["scales"], loaded["table"], shard_ends, layer.flute_bits, layer.flute_group
        )
        for name in self.names.values():
            delattr(layer, name)
        for name, value in (("qweight", qweight), ("scales", scales), ("table", tables)):
            layer.register_parameter(name, torch.nn.Parameter(value, requires_grad=False))
        layer.flute_shard_ends = shard_ends

    def _check_all_loaded(self, layer: torch.nn.Module) -> None:
        """Every sub-layer's qweight, scales and table must have come from the checkpoint."""
        proj = self.prefix.rsplit(".", 1)[-1]
        parent = self.prefix[: len(self.prefix) - len(proj)]
        num_parts = len(layer.flute_parts)
        if isinstance(layer, QKVParallelLinear):
            shard_ids = ["q", "k", "v"]
        else:
            shard_ids = list(range(num_parts)) if num_parts > 1 else [None]
        names = self.sub_layer_names if len(self.sub_layer_names) == len(shard_ids) else [proj] * len(shard_ids)
        for tensor in (self.names[r] for r in ("qweight", "scales", "table")):
            loaded = getattr(layer, tensor).flute_loaded
            if None in loaded:
                continue  # fused on disk: loaded in one piece
            missing = [f"{parent}{name}.{tensor}" for sid, name in zip(shard_ids, names) if sid not in loaded]
            if missing:
                raise ValueError(
                    f"flute checkpoint is missing {', '.join(missing)} (layer {self.prefix}); "
                    "every quantized layer needs qweight, scales and table"
                )

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        return ops.lut_linear(
            x, layer.qweight, layer.scales, layer.table, layer.flute_shard_ends,
            layer.flute_bits, layer.flute_group, bias,
        )


class _ShardLoader:
    """Copies this rank's slice of one checkpoint tensor into a flute parameter.

    Called by vLLM as ``weight_loader(param, loaded_weight[, shard_id])``; ``shard_id`` is "q"/"k"/"v"
    for QKVParallelLinear, an int for MergedColumnParallelLinear, None otherwise.
    """

    def __init__(self, layer, role: str, name: str, spec: FluteQuantConfig, k_start: int, k_local: int,
                 flute_zoo: bool = False) -> None:
        self.layer, self.role, self.name, self.spec = layer, role, name, spec
        self.k_start, self.k_local, self.flute_zoo = k_start, k_local, flute_zoo

    def _part_index(self, shard_id) -> Optional[int]:
        if shard_id is None:
            return None
        if isinstance(shard_id, str):
            return _QKV_INDEX[shard_id]
        if isinstance(shard_id, int):
            return shard_id
        raise NotImplementedError(f"flute: fused-on-disk shard ids {shard_id!r} are not supported")

    def _rows(self, part: Optional[int], shard_id) -> tuple[int, int, int]:
        """(local row offset, local rows, first source row) of this rank's output slice."""
        layer, parts = self.layer, self.layer.flute_parts
        if part is None:
            n_local = sum(parts)
            sharded = n_local != layer.output_size
            return 0, n_local, (layer_tp(layer)[0] * n_local if sharded else 0)
        offset, size = sum(parts[:part]), parts[part]
        rank = layer_tp(layer)[0]
        if isinstance(layer, QKVParallelLinear) and shard_id in ("k", "v"):
            rank //= kv_head_replicas(layer)  # KV heads replicated over ranks
        return offset, size, rank * size

    def __call__(self, param: torch.nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        prefix = f"{self.layer.flute_prefix}.{self.name}" + (f" (shard {shard_id})" if shard_id is not None else "")
        part = self._part_index(shard_id)
        bits = self.spec.bits
        if self.role == "ignored":
            return
        if self.role == "qweight" and self.flute_zoo:
            if loaded.dtype != torch.int16:
                raise ValueError(f"{prefix}: FLUTE checkpoints store int16 weights, got {loaded.dtype}")
            loaded = flute_weight_to_qweight(loaded, bits, self.layer.input_size)  # whole sub-layer, then slice
        if self.role == "table":
            if loaded.numel() != 2**bits:
                raise ValueError(f"{prefix}: table has {loaded.numel()} entries, but bits={bits} needs {2**bits}")
            rows = param.data if part is None else param.data[part : part + 1]
            rows.copy_(loaded.reshape(1, -1).to(torch.float32).expand_as(rows))
            param.flute_loaded.add(shard_id)
            return

        offset, size, src = self._rows(part, shard_id)
        if self.role == "qweight" and loaded.dtype != torch.int32:
            raise ValueError(f"{prefix}: expected int32 packed indices, got {loaded.dtype}")
        local = shard_tensor(prefix, loaded, self.role, bits, self.spec.group_size, self.layer.input_size,
                             (src, size), (self.k_start, self.k_local))
        param.data[offset : offset + size].copy_(local)
        param.flute_loaded.add(shard_id)


__all__ = ["FluteConfig", "FluteLinearMethod", "FORMAT_VERSION", "check_bits", "check_group_size"]
