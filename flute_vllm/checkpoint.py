"""Model-level quantization: a dense HF model -> a flute format-v1 checkpoint directory."""
from __future__ import annotations

import json
import os
import shutil
from typing import Callable, Iterable, Optional

import torch
from tqdm.auto import tqdm

from .format import FluteQuantConfig, check_layer_shapes
from .quantize import pack, quantize_weight
from .tables import resolve_table

# Tokenizer / generation files copied verbatim from a local source directory.
AUX_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "chat_template.jinja", "generation_config.json", "vocab.json", "merges.txt", "added_tokens.json",
)


def should_quantize(name: str, module: torch.nn.Module, cfg: FluteQuantConfig) -> bool:
    """nn.Linear layers not named in modules_to_not_convert (matched at a name-component boundary)."""
    if not isinstance(module, torch.nn.Linear):
        return False
    for skip in cfg.modules_to_not_convert:
        if name == skip or name.endswith("." + skip) or ("." + skip + ".") in ("." + name + "."):
            return False
    return True


def quantizable_linears(model: torch.nn.Module, cfg: FluteQuantConfig) -> list[tuple[str, torch.nn.Linear]]:
    layers = [(n, m) for n, m in model.named_modules() if should_quantize(n, m, cfg)]
    if not layers:
        raise ValueError("no nn.Linear layers to quantize in this model (check modules_to_not_convert)")
    for name, m in layers:
        check_layer_shapes(name, m.out_features, m.in_features, cfg)
    return layers


def quantize_linear(
    weight: torch.Tensor, cfg: FluteQuantConfig, table: torch.Tensor, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """``W[N, K]`` -> ``{"qweight", "scales", "table"}`` in format v1."""
    q, scales = quantize_weight(weight, cfg.bits, cfg.group_size, table)
    return {"qweight": pack(q.cpu(), cfg.bits), "scales": scales.to(dtype).cpu(), "table": table.clone().cpu()}


def quantized_state_dict(
    model: torch.nn.Module,
    cfg: FluteQuantConfig,
    table: Optional[torch.Tensor] = None,
    device: Optional[str] = None,
    layer_fn: Optional[Callable[[str, torch.Tensor], dict[str, torch.Tensor]]] = None,
) -> dict[str, torch.Tensor]:
    """The model's state dict with every quantizable Linear's ``weight`` replaced by flute tensors.

    ``layer_fn(name, weight)`` overrides how one layer is quantized (NFL uses it).
    """
    table = resolve_table(cfg.table if table is None else table, cfg.bits)
    state = {k: v for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # tied to embed_tokens; save once
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    for name, module in tqdm(quantizable_linears(model, cfg), desc="quantizing", unit="layer"):
        w = module.weight.detach().to(device)
        tensors = layer_fn(name, w) if layer_fn else quantize_linear(w, cfg, table, module.weight.dtype)
        del state[f"{name}.weight"]
        for suffix, t in tensors.items():
            state[f"{name}.{suffix}"] = t.contiguous()
    return state


def save_checkpoint(
    model: torch.nn.Module,
    state: dict[str, torch.Tensor],
    cfg: FluteQuantConfig,
    dst: str,
    aux_from: Optional[str] = None,
    tokenizer=None,
) -> None:
    """Write safetensors shards + config.json (with quantization_config) + tokenizer files."""
    from huggingface_hub import save_torch_state_dict

    os.makedirs(dst, exist_ok=True)
    save_torch_state_dict(state, dst, max_shard_size="5GB")
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["quantization_config"] = cfg.to_dict()
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(dst)
    if tokenizer is not None:
        tokenizer.save_pretrained(dst)
    elif aux_from and os.path.isdir(aux_from):
        for fname in AUX_FILES:
            src = os.path.join(aux_from, fname)
            if os.path.exists(src):
                shutil.copy(src, os.path.join(dst, fname))


def load_dense(src: str, dtype: str | torch.dtype = "auto", **kwargs):
    """A dense HF causal LM from a local directory or hub id (cached by huggingface_hub)."""
    from transformers import AutoModelForCausalLM

    if not os.path.isdir(src) and os.path.sep in src and not src.count("/") == 1:
        raise FileNotFoundError(f"model path {src!r} does not exist")
    try:
        return AutoModelForCausalLM.from_pretrained(src, dtype=dtype, **kwargs)
    except OSError as e:
        raise FileNotFoundError(f"cannot load a model from {src!r}: {e}") from e


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
    """``python -m flute_vllm quantize`` in one call. Returns ``dst``."""
    table_kind = table if isinstance(table, str) else "custom"
    cfg = FluteQuantConfig(
        bits=bits, group_size=group_size, table=table_kind,
        **({"modules_to_not_convert": modules_to_not_convert} if modules_to_not_convert is not None else {}),
    )
    model = load_dense(src)
    tokenizer = None if os.path.isdir(src) else load_tokenizer(src)
    state = quantized_state_dict(model, cfg, resolve_table(table, bits), device=device)
    save_checkpoint(model, state, cfg, dst, aux_from=src, tokenizer=tokenizer)
    return dst
