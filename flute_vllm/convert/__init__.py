"""Converters from other LUT-quantized checkpoint formats into flute format v1.

- ``bnb``: a transformers model quantized with bitsandbytes 4-bit (nf4 / fp4, with or without
  double quantization), taken index for index, no re-rounding (:mod:`.bnb`).
- ``flute-zoo``: FLUTE's own legacy checkpoints (``flute_config.json`` + int16 ``weight`` in
  FLUTE's interleaved layout), e.g. the radi-cho/*-FLUTE models (:mod:`.flute_zoo`).

CLI: ``python -m flute_vllm convert {bnb,flute-zoo} SRC DST``. This module also holds the small
I/O helpers both converters share (reading a safetensors directory lazily, writing the output).
"""
from __future__ import annotations

import json
import os
import sys
from typing import Iterable, Optional

import torch

FORMATS = ("bnb", "flute-zoo")


# ----------------------------------------------------------------------------- shared helpers


def check_src_dir(src: str) -> str:
    if not os.path.exists(src):
        raise FileNotFoundError(f"SRC {src!r} does not exist")
    if not os.path.isdir(src):
        raise NotADirectoryError(f"SRC {src!r} is not a directory (expected an HF model directory)")
    if not os.path.isfile(os.path.join(src, "config.json")):
        raise FileNotFoundError(f"SRC {src!r} has no config.json: not an HF model directory")
    return src


class SafetensorsDir:
    """All tensors of a directory's ``*.safetensors`` files, opened lazily (one tensor at a time),
    so converting a large checkpoint does not need it all in memory at once."""

    def __init__(self, path: str):
        from safetensors import safe_open

        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if not files:
            raise FileNotFoundError(f"{path!r} has no *.safetensors files")
        self._handles = {f: safe_open(os.path.join(path, f), framework="pt") for f in files}
        self._where: dict[str, str] = {}
        for f, h in self._handles.items():
            for key in h.keys():
                self._where[key] = f

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._where:
            raise KeyError(f"tensor {key!r} is missing from the checkpoint")
        return self._handles[self._where[key]].get_tensor(key)


def read_config_json(src: str) -> dict:
    with open(os.path.join(src, "config.json")) as f:
        return json.load(f)


def dense_linear_names(config: dict, quantized: Iterable[str]) -> Optional[list[str]]:
    """Names of the model's nn.Linear layers that are not in ``quantized``, found by building the
    model on the meta device (no memory, no weights). None if transformers cannot build it."""
    try:
        from transformers import AutoConfig, AutoModelForCausalLM

        cfg = dict(config)
        cfg.pop("quantization_config", None)
        hf_config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_config)
    except Exception:  # unknown architecture, remote code, ...: the caller falls back
        return None
    quantized = set(quantized)
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in quantized]


# ----------------------------------------------------------------------------- CLI


def add_convert_parser(subparsers) -> None:
    """``convert {bnb,flute-zoo} SRC DST`` under the main CLI's subparsers."""
    c = subparsers.add_parser("convert", help="convert a bitsandbytes-4bit or FLUTE model-zoo checkpoint to flute")
    fmt = c.add_subparsers(dest="convert_format", required=True, metavar="{bnb,flute-zoo}")
    b = fmt.add_parser(
        "bnb", help="a transformers model quantized with bitsandbytes 4-bit (nf4/fp4, double quant ok)",
        description="Keeps bnb's indices and scales (no re-quantization): dequantized weights equal bnb's.",
    )
    b.add_argument("src", help="local directory saved by transformers' save_pretrained (bnb 4-bit)")
    b.add_argument("dst", help="output directory")
    b.add_argument(
        "--scales-dtype", choices=("auto", "float16", "bfloat16", "float32"), default="auto",
        help="dtype of the stored scales (default: the dtype bnb recorded for each layer, i.e. the model "
        "dtype; float32 keeps double-quantized scales bit-exact)",
    )
    z = fmt.add_parser(
        "flute-zoo", help="a FLUTE checkpoint (flute_config.json + int16 weight), e.g. radi-cho/*-FLUTE",
        description="Reads a legacy FLUTE directory (flute_config.json with num_bits/group_size; per layer "
        "int16 weight, scales, tables) and writes the same indices, scales and per-layer tables in flute "
        "format v1 (table 'custom'). The result runs on any GPU count/SM count.",
    )
    z.add_argument("src", help="local FLUTE model directory")
    z.add_argument("dst", help="output directory")


def run_convert(args) -> None:
    try:
        if args.convert_format == "bnb":
            from .bnb import convert_dir as convert_bnb

            dtype = None if args.scales_dtype == "auto" else getattr(torch, args.scales_dtype)
            convert_bnb(args.src, args.dst, scales_dtype=dtype)
        elif args.convert_format == "flute-zoo":
            from .flute_zoo import convert_dir as convert_zoo

            convert_zoo(args.src, args.dst)
        else:  # argparse's choices make this unreachable
            raise ValueError(f"unknown format {args.convert_format!r}: use one of {FORMATS}")
    except (FileNotFoundError, NotADirectoryError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {args.dst}")


# the one checkpoint writer, shared with the quantizer and the HF integration
from ..checkpoint import drop_tied_lm_head, write_checkpoint  # noqa: E402

__all__ = [
    "FORMATS", "SafetensorsDir", "add_convert_parser", "run_convert", "check_src_dir",
    "dense_linear_names", "drop_tied_lm_head", "write_checkpoint", "read_config_json",
]
