"""Reading and writing model directories (dense sources, flute checkpoints): one writer for all tools."""
from __future__ import annotations

import json
import os
import shutil
from typing import Iterable, Optional

import torch

from .format import FluteQuantConfig

# Tokenizer / generation files copied verbatim from a local source directory.
AUX_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "chat_template.jinja", "generation_config.json", "vocab.json", "merges.txt", "added_tokens.json",
)


def copy_aux_files(src: Optional[str], dst: str) -> None:
    if src and os.path.isdir(src) and os.path.abspath(src) != os.path.abspath(dst):
        for fname in AUX_FILES:
            path = os.path.join(src, fname)
            if os.path.exists(path):
                shutil.copy(path, os.path.join(dst, fname))


def drop_tied_lm_head(state: dict, config: dict) -> None:
    if config.get("tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # tied to embed_tokens; stored once


def write_checkpoint(
    dst: str,
    state: dict[str, torch.Tensor],
    config: dict,
    quant_config: Optional[FluteQuantConfig],
    aux_from: Optional[str] = None,
    tokenizer=None,
    extra_json: Optional[dict[str, dict]] = None,
) -> str:
    """safetensors shards + config.json (with ``quant_config`` as quantization_config, if given)
    + tokenizer files (from ``tokenizer`` or copied from ``aux_from``) + ``extra_json`` files."""
    from huggingface_hub import save_torch_state_dict

    os.makedirs(dst, exist_ok=True)
    state = {k: v.contiguous() for k, v in state.items()}
    drop_tied_lm_head(state, config)
    save_torch_state_dict(state, dst, max_shard_size="5GB")
    config = dict(config)
    config.pop("quantization_config", None)
    if quant_config is not None:
        config["quantization_config"] = quant_config.to_dict()
    files = {"config.json": config, **(extra_json or {})}
    for name, content in files.items():
        with open(os.path.join(dst, name), "w") as f:
            json.dump(content, f, indent=2)
    copy_aux_files(aux_from, dst)
    if tokenizer is not None:
        tokenizer.save_pretrained(dst)
    return dst


def load_state_dict_dir(model_dir: str) -> dict[str, torch.Tensor]:
    """All tensors of a directory's *.safetensors files, in one dict."""
    from safetensors.torch import load_file

    files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir} has no *.safetensors files")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(os.path.join(model_dir, f)))
    return state


def _is_hub_id(src: str) -> bool:
    return not src.startswith((".", "/", "~")) and src.count("/") == 1


def load_dense(src: str, dtype: str | torch.dtype = "auto", **kwargs):
    """A dense HF causal LM from a local directory or hub id (downloads cached by huggingface_hub)."""
    from transformers import AutoModelForCausalLM

    if not os.path.isdir(src) and not _is_hub_id(src):
        raise FileNotFoundError(f"model path {src!r} does not exist")
    try:
        return AutoModelForCausalLM.from_pretrained(src, dtype=dtype, **kwargs)
    except OSError as e:
        raise FileNotFoundError(f"cannot load a model from {src!r}: {e}") from e
    except (KeyError, ValueError) as e:  # e.g. "Unrecognized model": a model_type transformers lacks
        raise ValueError(f"cannot load {src!r} as a causal LM with transformers: {e}") from e


def load_tokenizer(src: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(src)


def quantize_model_dir(
    src: str,
    dst: str,
    bits: int,
    group_size: int,
    table: str | Iterable[float] = "nf",
    modules_to_not_convert: Optional[list[str]] = None,
    device: Optional[str] = None,
) -> str:
    """``python -m flute_vllm quantize`` (round to nearest) in one call. Returns ``dst``."""
    from . import hf

    model = load_dense(src)
    hf.prepare_model(model, bits, group_size, table, modules_to_not_convert, device)
    tokenizer = None if os.path.isdir(src) else load_tokenizer(src)
    hf.save_pretrained(model, dst, tokenizer=tokenizer, aux_from=src)
    return dst
