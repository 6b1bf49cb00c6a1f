"""NFL: learned normal-float quantization (learned group scales, optionally learned tables).

Start from round-to-nearest NF quantization; then, block by block (each decoder layer in turn),
learn the scales (and optionally each layer's table) so that the quantized block reproduces the
dense block's outputs on calibration text. The rounding is not differentiable; we use the
straight-through estimator: the indices are recomputed without gradient at every step, and the
gradient flows through ``table[idx] * scale`` to the scale (and table). Blocks see the outputs of
the already-quantized blocks before them, so errors do not compound unseen.

Scales are learned in log space (``s = s0 * exp(u)``), so one learning rate suits every layer;
``u`` starts at the per-group clipping factor with the least weight error (a grid search).
"""
from __future__ import annotations

import math
import random
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .format import FluteQuantConfig
from .hf import linear_layers, replace_linear, set_quant_config
from .quantize import codes_for, pack
from .tables import resolve_table


class _LearnableLUTLinear(nn.Module):
    """``nn.Linear`` stand-in whose weight is ``table[idx(W/s)] * s`` with learnable s (and table)."""

    def __init__(self, linear: nn.Linear, bits: int, group_size: int, table: torch.Tensor, learn_table: bool):
        super().__init__()
        w = linear.weight.detach().float()
        n, k = w.shape
        self.g = group_size
        self.register_buffer("w", w.view(n, k // group_size, group_size))
        s0 = self.w.abs().amax(-1) / table.abs().max()
        self.register_buffer("s0", torch.where(s0 == 0, torch.full_like(s0, 1e-8), s0))
        self.log_scale = nn.Parameter(self._clip_search(table))
        if learn_table:
            self.table = nn.Parameter(table.clone().float())
        else:
            self.register_buffer("table", table.clone().float())
        self.bias = None if linear.bias is None else linear.bias.detach().float()
        self.bits = bits

    @torch.no_grad()
    def _clip_search(self, table: torch.Tensor, factors=torch.linspace(0.5, 1.0, 11)) -> torch.Tensor:
        """Per group, the shrink of the absmax scale with the least weight MSE: the starting point
        of the learned log-scales (matters most at 2-3 bits, where clipping outliers pays)."""
        best_err = torch.full_like(self.s0, float("inf"))
        best = torch.zeros_like(self.s0)
        for f in factors.tolist():
            s = (self.s0 * f).unsqueeze(-1)
            err = ((table[codes_for(self.w / s, table)] * s - self.w) ** 2).sum(-1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, torch.full_like(best, math.log(f)), best)
        return best

    def scales(self) -> torch.Tensor:
        return self.s0 * self.log_scale.exp()

    def codes(self) -> torch.Tensor:
        with torch.no_grad():
            return codes_for(self.w / self.scales().unsqueeze(-1), self.table.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx = self.codes()
        w_hat = (self.table[idx] * self.scales().unsqueeze(-1)).flatten(1)
        return F.linear(x.float(), w_hat, self.bias)


def calibration_batches(tokenizer, texts: Sequence[str], samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """``samples`` random windows of ``seq_len`` tokens from the calibration text: ``[samples, seq_len]``."""
    ids = tokenizer("\n\n".join(texts), return_tensors="pt").input_ids[0]
    if ids.numel() < seq_len + 1:
        raise ValueError(f"calibration text has {ids.numel()} tokens, fewer than --seq-len {seq_len}")
    rng = random.Random(seed)
    starts = [rng.randrange(0, ids.numel() - seq_len) for _ in range(samples)]
    return torch.stack([ids[s : s + seq_len] for s in starts])


def default_calibration_texts() -> list[str]:
    """The Python reference docs bundled with CPython: long, varied, and never our eval text."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder blocks (the ModuleList as long as config.num_hidden_layers)."""
    n = getattr(model.config, "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}: NFL supports decoder-only "
                     "transformers whose blocks form one nn.ModuleList (Llama, Mistral, Qwen, Gemma, ...)")


class _Captured(Exception):
    pass


def _capture_layer_inputs(model, layers, input_ids, device):
    """Run the model up to the first block; return the block's hidden-state input and its kwargs."""
    store = {}

    def hook(module, args, kwargs):
        store["x"] = args[0] if args else kwargs.pop("hidden_states")
        store["kwargs"] = kwargs
        raise _Captured

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(input_ids.to(device), use_cache=False)
    except _Captured:
        pass
    finally:
        handle.remove()
    kwargs = {k: v for k, v in store["kwargs"].items() if k not in ("past_key_values", "past_key_value", "use_cache", "cache_position")}
    return store["x"], kwargs


def _block_out(layer, x, kwargs):
    out = layer(x, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def nfl_quantize(
    model: nn.Module,
    tokenizer,
    num_bits: int = 4,
    group_size: int = 64,
    calibration_texts: Optional[Sequence[str]] = None,
    samples: int = 16,
    seq_len: int = 128,
    steps: int = 20,
    batch_size: int = 4,
    lr: float = 1e-2,
    learn_table: bool = False,
    modules_to_not_convert: Optional[list[str]] = None,
    device: Optional[str] = None,
    seed: int = 0,
) -> nn.Module:
    """Quantize ``model`` in place with NFL; returns it ready for :func:`flute_vllm.hf.save_pretrained`."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    cfg = FluteQuantConfig(
        bits=num_bits, group_size=group_size, table="custom" if learn_table else "nf",
        **({"modules_to_not_convert": modules_to_not_convert} if modules_to_not_convert is not None else {}),
    )
    nf = resolve_table("nf", num_bits)
    layers = decoder_layers(model)
    to_quantize = dict(linear_layers(model, cfg))
    texts = calibration_texts if calibration_texts is not None else default_calibration_texts()
    ids = calibration_batches(tokenizer, texts, samples, seq_len, seed)
    model_dtype = next(model.parameters()).dtype
    model.to(device)
    with torch.no_grad():
        x, kwargs = _capture_layer_inputs(model, layers, ids, device)
    x = x.float()
    kwargs = {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else
                  tuple(t.float() for t in v) if isinstance(v, tuple) else v) for k, v in kwargs.items()}
    prefix = _layer_prefix(model, layers)
    bar = tqdm(total=len(layers) * steps, desc="NFL", unit="step")
    for i, layer in enumerate(layers):
        layer.float()
        with torch.no_grad():
            target = torch.cat([_block_out(layer, x[b : b + batch_size], kwargs_for(kwargs, b, batch_size, x))
                                for b in range(0, x.shape[0], batch_size)])
        names = [n for n in to_quantize if n.startswith(f"{prefix}.{i}.")]
        learners = {}
        for name in names:
            linear = to_quantize[name]
            learners[name] = _LearnableLUTLinear(linear, num_bits, cfg.group_size_for(linear.in_features), nf, learn_table)
            _swap(model, name, learners[name])
        params = [p for m in learners.values() for p in m.parameters()]
        opt = torch.optim.Adam(params, lr=lr)
        for step in range(steps):
            b = (step * batch_size) % x.shape[0]
            loss = F.mse_loss(_block_out(layer, x[b : b + batch_size], kwargs_for(kwargs, b, batch_size, x)),
                              target[b : b + batch_size])
            opt.zero_grad()
            loss.backward()
            opt.step()
            bar.update(1)
            bar.set_postfix(layer=i, loss=f"{loss.item():.3g}")
        with torch.no_grad():  # the next block sees this block's quantized outputs
            x = torch.cat([_block_out(layer, x[b : b + batch_size], kwargs_for(kwargs, b, batch_size, x))
                           for b in range(0, x.shape[0], batch_size)])
        for name, m in learners.items():
            linear = to_quantize[name]
            qweight = pack(m.codes().flatten(1).cpu(), num_bits)
            scales = m.scales().detach().to("cpu", model_dtype)
            table = m.table.detach().cpu().float()
            layer_module = replace_linear(model, name, linear, qweight, scales, table, cfg)
            layer_module.to(device)
        layer.to(model_dtype)
    bar.close()
    set_quant_config(model, cfg)
    return model.to(model_dtype)


def kwargs_for(kwargs, start, size, x):
    """Slice per-sample tensors (attention masks) to the mini-batch; keep shared ones (RoPE cos/sin)."""
    def cut(v):
        if isinstance(v, tuple):
            return tuple(cut(t) for t in v)
        if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == x.shape[0] and x.shape[0] != 1:
            return v[start : start + size]
        return v

    return {k: cut(v) for k, v in kwargs.items()}


def _layer_prefix(model, layers) -> str:
    for name, module in model.named_modules():
        if module is layers:
            return name
    raise ValueError("decoder layers are not a submodule of the model")


def _swap(model, name, module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


__all__ = ["nfl_quantize", "calibration_batches", "default_calibration_texts", "decoder_layers"]
