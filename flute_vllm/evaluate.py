"""Perplexity of a dense or flute model on a text (sliding window, as in HF's perplexity guide)."""
from __future__ import annotations

import math

import torch


@torch.no_grad()
def perplexity(model, tokenizer, text: str, max_length: int = 1024, stride: int = 512) -> float:
    """exp(mean NLL) over all tokens of ``text``; each window scores only tokens not scored before,
    with up to ``max_length - stride`` tokens of left context."""
    if stride <= 0 or stride > max_length:
        raise ValueError(f"--stride {stride} must be in 1..--max-length {max_length}")
    ids = tokenizer(text, return_tensors="pt").input_ids
    if ids.shape[1] < 2:
        raise ValueError("the text has fewer than 2 tokens")
    device = next(model.parameters()).device
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, ids.shape[1], stride):
        end = min(begin + max_length, ids.shape[1])
        target_len = end - prev_end
        window = ids[:, begin:end].to(device)
        labels = window.clone()
        labels[:, :-target_len] = -100
        logits = model(window, use_cache=False).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        tgt = labels[:, 1:]
        mask = tgt != -100
        nll -= logp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)[mask].sum().item()
        count += int(mask.sum())
        prev_end = end
        if end == ids.shape[1]:
            break
    return math.exp(nll / count)
