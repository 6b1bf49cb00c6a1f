"""The canonical flute checkpoint format, version 1 (GPU- and tensor-parallel-independent).

A checkpoint is an HF model directory whose config.json carries::

    "quantization_config": {"quant_method": "flute", "format_version": 1, "bits": b,
                            "group_size": G or -1, "table": "nf" | "int" | "fp" | "custom",
                            "modules_to_not_convert": [...]}

and, for every quantized linear layer ``prefix`` with dense weight ``W[N, K]``:

- ``prefix.qweight`` int32 ``[N, K*b/32]``: indices packed along K as one little-endian bit
  stream per row (quantize.pack). K % 32 == 0.
- ``prefix.scales``  ``[N, K/G]`` in the model dtype (channel-wise: ``[N, 1]``).
- ``prefix.table``   float32 ``[2^b]``.

``W_hat[n, k] = table[q[n, k]] * scales[n, k // G]``. Layers not quantized keep ``weight``.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from .tables import TABLE_KINDS, check_bits

QUANT_METHOD = "flute"
FORMAT_VERSION = 1
SUPPORTED_GROUP_SIZES = (32, 64, 128, 256, -1)
TENSOR_SUFFIXES = ("qweight", "scales", "table")
# What transformers' models keep dense by default: embeddings and the output head.
DEFAULT_MODULES_TO_NOT_CONVERT = ["lm_head"]


def check_group_size(group_size: int, what: str = "group_size") -> int:
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(
            f"{what}={group_size!r} is not supported: use one of 32, 64, 128, 256 or -1 (channel-wise)"
        )
    return int(group_size)


@dataclasses.dataclass
class FluteQuantConfig:
    """The ``quantization_config`` block of a flute checkpoint."""

    bits: int
    group_size: int
    table: str = "nf"
    modules_to_not_convert: list[str] = dataclasses.field(default_factory=lambda: list(DEFAULT_MODULES_TO_NOT_CONVERT))
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        check_bits(self.bits, "quantization_config.bits")
        check_group_size(self.group_size, "quantization_config.group_size")
        if self.table not in TABLE_KINDS + ("custom",):
            raise ValueError(
                f"quantization_config.table={self.table!r} is unknown: use one of {TABLE_KINDS + ('custom',)}"
            )
        if self.format_version != FORMAT_VERSION:
            raise ValueError(
                f"quantization_config.format_version={self.format_version!r}: this flute_vllm reads version {FORMAT_VERSION}"
            )
        self.modules_to_not_convert = list(self.modules_to_not_convert or [])

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> "FluteQuantConfig":
        method = cfg.get("quant_method", QUANT_METHOD)
        if method != QUANT_METHOD:
            raise ValueError(f"quantization_config.quant_method={method!r}, expected {QUANT_METHOD!r}")
        for key in ("bits", "group_size"):
            if key not in cfg:
                raise ValueError(f"quantization_config is missing the field {key!r}")
        return cls(
            bits=cfg["bits"],
            group_size=cfg["group_size"],
            table=cfg.get("table", "nf"),
            modules_to_not_convert=cfg.get("modules_to_not_convert") or [],
            format_version=cfg.get("format_version", FORMAT_VERSION),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "quant_method": QUANT_METHOD,
            "format_version": self.format_version,
            "bits": self.bits,
            "group_size": self.group_size,
            "table": self.table,
            "modules_to_not_convert": list(self.modules_to_not_convert),
        }

    def group_size_for(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size


def is_listed(module_name: str, modules_to_not_convert) -> bool:
    """Does ``modules_to_not_convert`` name this module? Entries match whole dotted components:
    "lm_head", "mlp" or "layers.1.self_attn" match "model.layers.1.self_attn.o_proj"-style names,
    "layers.1" does not match "layers.10"."""
    padded = f".{module_name}."
    return any(f".{entry}." in padded for entry in modules_to_not_convert)


def packed_words(in_features: int, bits: int) -> int:
    return in_features * bits // 32


def check_layer_shapes(prefix: str, out_features: int, in_features: int, cfg: FluteQuantConfig) -> None:
    """Can a ``[N, K]`` linear layer be stored in format v1 with this config?"""
    if in_features % 32:
        raise ValueError(f"{prefix}: in_features K={in_features} is not a multiple of 32, required to pack indices")
    g = cfg.group_size_for(in_features)
    if in_features % g:
        raise ValueError(f"{prefix}: group_size={cfg.group_size} does not divide in_features K={in_features}")


def expected_shapes(out_features: int, in_features: int, cfg: FluteQuantConfig) -> dict[str, tuple[int, ...]]:
    g = cfg.group_size_for(in_features)
    return {
        "qweight": (out_features, packed_words(in_features, cfg.bits)),
        "scales": (out_features, in_features // g),
        "table": (2**cfg.bits,),
    }


def check_tp_split(where: str, in_features: int, k_local: int, group_size: int) -> int:
    """The group size a row-parallel shard of ``k_local`` input features uses; raise if this split
    would cut a packed word or a scale group. Channel-wise (-1) scales span all of K, so each
    shard keeps them whole and uses ``G = k_local``."""
    if in_features % 32 or k_local % 32:
        raise ValueError(f"{where}: the input size per partition {k_local} is not a multiple of 32, "
                         "so the packed index words would be split")
    group = k_local if group_size == -1 else group_size
    if k_local % group:
        raise ValueError(f"{where}: group_size={group_size} does not divide the input size per partition "
                         f"{k_local}; this tensor-parallel size would split a scale group")
    return group


def shard_tensor(name: str, tensor, role: str, bits: int, group_size: int, in_features: int,
                 rows: tuple[int, int], k_range: tuple[int, int]):
    """This rank's slice of one format-v1 tensor: output ``rows`` = (start, count) and input
    features ``k_range`` = (start, count). Every shard is a plain slice (whole words, whole groups).
    ``role``: "qweight" or "scales" (tables are per sub-layer and are never sliced)."""
    (r0, nr), (k0, nk) = rows, k_range
    if role == "qweight":
        words = packed_words(in_features, bits)
        if tensor.shape[1] != words:
            raise ValueError(f"{name}: has {tensor.shape[1]} words per row; K={in_features} at bits={bits} "
                             f"needs {words} (wrong bits in quantization_config?)")
        c0, c1 = k0 * bits // 32, (k0 + nk) * bits // 32
    elif role == "scales":
        groups = 1 if group_size == -1 else in_features // group_size
        if tensor.shape[1] != groups:
            raise ValueError(f"{name}: has {tensor.shape[1]} groups per row; K={in_features} with "
                             f"group_size={group_size} needs {groups}")
        c0, c1 = (0, 1) if group_size == -1 else (k0 // group_size, (k0 + nk) // group_size)
    else:
        raise ValueError(f"{name}: cannot shard a tensor of role {role!r}")
    if tensor.shape[0] < r0 + nr:
        raise ValueError(f"{name}: has {tensor.shape[0]} rows, this shard needs rows {r0}..{r0 + nr}")
    return tensor[r0 : r0 + nr, c0:c1]


def read_quant_config(model_dir: str) -> FluteQuantConfig:
    path = os.path.join(model_dir, "config.json")
    with open(path) as f:
        config = json.load(f)
    if "quantization_config" not in config:
        raise ValueError(f"{path} has no quantization_config: not a flute checkpoint")
    return FluteQuantConfig.from_dict(config["quantization_config"])


__all__ = [
    "QUANT_METHOD", "FORMAT_VERSION", "SUPPORTED_GROUP_SIZES", "TENSOR_SUFFIXES",
    "FluteQuantConfig", "check_group_size", "check_layer_shapes", "expected_shapes",
    "packed_words", "read_quant_config", "is_listed", "check_tp_split", "shard_tensor",
]
