"""HuggingFace transformers integration.

- :class:`FluteLinear`: an ``nn.Module`` drop-in for ``nn.Linear`` that runs the flute op. Its
  persistent buffers are the format-v1 tensors (``qweight``, ``scales``, ``table``), so its
  state dict *is* the checkpoint; the kernel layout (CUDA) is derived on first use per device,
  and the canonical buffers then move to host memory, so the GPU holds the weight once.
- :func:`prepare_model`: quantize a loaded dense model in place (round-to-nearest, or NFL).
- :func:`from_pretrained`: load a flute checkpoint (local dir or hub id) into a transformers model.
- :func:`save_pretrained`: write a prepared model as a flute checkpoint.

Any model whose projections are ``nn.Linear`` works (Llama, Mistral, Qwen2/3, Gemma-2/3, ...);
``modules_to_not_convert`` (default: ``lm_head``) keeps layers dense.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import nn

from . import ops
from .format import QUANT_METHOD, FluteQuantConfig, check_layer_shapes, is_listed
from .quantize import pack, quantize_weight
from .tables import resolve_table


class FluteLinear(nn.Module):
    """``y = x @ (table[q] * scales).T + bias`` from packed indices."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool = False,
                 dtype: torch.dtype = torch.bfloat16, device=None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.group_size = in_features if group_size == -1 else group_size
        self.register_buffer("qweight", torch.empty(out_features, in_features * bits // 32, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.empty(out_features, in_features // self.group_size, dtype=dtype, device=device))
        self.register_buffer("table", torch.empty(2**bits, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None
        self._prepared: Optional[tuple] = None  # (key, qweight, scales, tables) in the op's layout

    @classmethod
    def from_quantized(cls, qweight, scales, table, bits, group_size, bias=None) -> "FluteLinear":
        n, k = qweight.shape[0], qweight.shape[1] * 32 // bits
        layer = cls(k, n, bits, group_size, bias is not None, scales.dtype, qweight.device)
        layer.qweight.copy_(qweight)
        layer.scales.copy_(scales)
        layer.table.copy_(table)
        if bias is not None:
            layer.bias.data.copy_(bias)
        return layer

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, group_size={self.group_size}"

    def _layout_key(self, device: torch.device) -> tuple:
        # The canonical tensors a layout was made from: a reassigned or reloaded buffer, a cast or
        # a move (see _apply, _load_from_state_dict) makes a new one.
        return (device, self.scales.dtype, self.qweight.data_ptr(), self.scales.data_ptr(), self.table.data_ptr())

    def _drops_canonical(self, device: torch.device) -> bool:
        """Whether the canonical buffers leave ``device`` once the op layout is made there.

        On CUDA the kernel layout is a repacked copy and the op never reads the canonical tensors:
        keeping both would hold the weight twice. On the CPU the op runs on the canonical tensors.
        """
        return device.type == "cuda"

    def _offload_canonical(self) -> None:
        """Replace the canonical buffers by host copies: ``state_dict()`` / :func:`save_pretrained`
        still see the checkpoint tensors, the device keeps only the op layout. A later ``.to()`` /
        ``.cuda()`` moves them back (and drops the layout, remade on next use)."""
        # Plain tensors even under inference_mode, so that load_state_dict can copy into them later.
        with torch.inference_mode(False), torch.no_grad():
            for name in ("qweight", "scales", "table"):
                t = self._buffers[name]
                self._buffers[name] = torch.empty(t.shape, dtype=t.dtype, device="cpu").copy_(t)

    def _op_tensors(self, x: torch.Tensor):
        dev = x.device
        if self._prepared is None or self._prepared[0] != self._layout_key(dev):
            self._prepared = None  # free a stale layout before making the new one
            # .to(dev) is a no-op unless the canonical tensors were offloaded (then: a temporary copy)
            prepared = ops.prepare_weights(self.qweight.to(dev), self.scales.to(dev), self.table.to(dev).view(1, -1),
                                           [self.out_features], self.bits, self.group_size)
            if self._drops_canonical(dev) and self.qweight.device == dev:
                self._offload_canonical()
            self._prepared = (self._layout_key(dev), *prepared)
        return self._prepared[1:]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling() and self._prepared is not None:
            # Under torch.compile the layout made by the eager warm-up call is used as is (the
            # data_ptr check of _op_tensors would break the graph); moving the module resets it.
            qweight, scales, tables = self._prepared[1:]
        else:
            qweight, scales, tables = self._op_tensors(x)
        out = ops.lut_linear(x.to(self.scales.dtype), qweight, scales, tables, [self.out_features],
                             self.bits, self.group_size, self.bias)
        return out.to(x.dtype)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._prepared = None  # new weights (copied in place): re-derive the op layout on next use

    def _apply(self, fn, recurse=True):
        self._prepared = None  # moved / cast: re-derive the op layout on next use
        table = self.table
        super()._apply(fn, recurse)
        # model.half() / .to(bf16) must not round the table (FLUTE issue #14: a cast table broke
        # outputs): keep the float32 values, follow only the device
        if self.table.dtype != torch.float32:
            self.table = table.to(self.table.device)
        return self


def linear_layers(model: nn.Module, cfg: FluteQuantConfig) -> list[tuple[str, nn.Linear]]:
    """The ``nn.Linear`` layers to quantize: all but ``modules_to_not_convert``."""
    layers = [(n, m) for n, m in model.named_modules()
              if isinstance(m, nn.Linear) and not is_listed(n, cfg.modules_to_not_convert)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layers to quantize "
                         f"(modules_to_not_convert={cfg.modules_to_not_convert})")
    for name, m in layers:
        check_layer_shapes(name, m.out_features, m.in_features, cfg)
    return layers


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def prepare_model(
    model: nn.Module,
    num_bits: int = 4,
    group_size: int = 64,
    table="nf",
    modules_to_not_convert: Optional[list[str]] = None,
    device: Optional[str] = None,
    progress: bool = True,
) -> nn.Module:
    """Quantize every ``nn.Linear`` of ``model`` in place (round to nearest) and return it.

    ``model.config.quantization_config`` is set, so :func:`save_pretrained` writes a checkpoint.
    ``table``: "nf" | "int" | "fp" or 2^bits values. ``device``: where to run the quantizer.
    """
    from tqdm.auto import tqdm

    cfg = FluteQuantConfig(
        bits=num_bits, group_size=group_size, table=table if isinstance(table, str) else "custom",
        **({"modules_to_not_convert": modules_to_not_convert} if modules_to_not_convert is not None else {}),
    )
    values = resolve_table(table, num_bits)
    layers = linear_layers(model, cfg)
    for name, linear in tqdm(layers, desc="quantizing", unit="layer", disable=not progress):
        w = linear.weight.detach()
        q, scales = quantize_weight(w.to(device) if device else w, num_bits, group_size, values)
        replace_linear(model, name, linear, pack(q, num_bits).to(w.device), scales.to(w.device, w.dtype), values, cfg)
    set_quant_config(model, cfg)
    return model


def replace_linear(model, name, linear: nn.Linear, qweight, scales, table, cfg: FluteQuantConfig) -> FluteLinear:
    layer = FluteLinear.from_quantized(qweight, scales, table.to(qweight.device), cfg.bits,
                                       cfg.group_size_for(linear.in_features), linear.bias)
    _set_module(model, name, layer)
    return layer


def set_quant_config(model: nn.Module, cfg: FluteQuantConfig) -> None:
    if getattr(model, "config", None) is not None:
        model.config.quantization_config = cfg.to_dict()


def save_pretrained(model: nn.Module, dst: str, tokenizer=None, aux_from: Optional[str] = None) -> None:
    """Write a model prepared by :func:`prepare_model` (or loaded by :func:`from_pretrained`)."""
    from .checkpoint import write_checkpoint

    qc = getattr(model.config, "quantization_config", None)
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
        raise ValueError("model has no flute quantization_config: call prepare_model first")
    write_checkpoint(dst, dict(model.state_dict()), model.config.to_dict(), FluteQuantConfig.from_dict(qc),
                     aux_from=aux_from, tokenizer=tokenizer)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(dst)


def _resolve_dir(path_or_id: str, revision: Optional[str] = None) -> str:
    from .checkpoint import _is_hub_id

    if os.path.isdir(path_or_id):
        return path_or_id
    if not _is_hub_id(path_or_id):
        raise FileNotFoundError(f"model path {path_or_id!r} does not exist")
    from huggingface_hub import snapshot_download

    return snapshot_download(path_or_id, revision=revision,
                             allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.jinja", "*.model", "*.txt"])


def from_pretrained(path_or_id: str, device: Optional[str] = None, dtype: Optional[torch.dtype] = None,
                    revision: Optional[str] = None, **hf_kwargs) -> nn.Module:
    """Load a flute checkpoint into a transformers causal LM whose linear layers run the flute op.

    ``hf_kwargs`` go to ``AutoConfig`` / ``AutoModelForCausalLM.from_config`` (e.g.
    ``attn_implementation``, ``trust_remote_code``). A dense checkpoint loads as usual.
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    model_dir = _resolve_dir(path_or_id, revision)
    config = AutoConfig.from_pretrained(model_dir, **hf_kwargs)
    qc = getattr(config, "quantization_config", None)
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype or "auto", **hf_kwargs).to(device or "cpu")
    cfg = FluteQuantConfig.from_dict(qc)
    del config.quantization_config
    dtype = dtype or getattr(config, "dtype", None) or torch.bfloat16
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    # Untouched torch.empty pages cost no memory: the dense weights we replace are never materialised.
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **hf_kwargs)
    from .checkpoint import load_state_dict_dir

    state = load_state_dict_dir(model_dir)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and f"{name}.qweight" in state:
            layer = FluteLinear(module.in_features, module.out_features, cfg.bits,
                                cfg.group_size_for(module.in_features), module.bias is not None, dtype)
            _set_module(model, name, layer)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ValueError(f"{model_dir}: checkpoint does not match the model: missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}")
    model.tie_weights()
    set_quant_config(model, cfg)
    return model.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval()


__all__ = ["FluteLinear", "prepare_model", "from_pretrained", "save_pretrained", "linear_layers"]
