"""End-to-end decode benchmark (issue 9): a Llama-3.1-8B-shaped model with random weights (no
download), dense vs flute NF W4G64 vs flute W3G64, through the HF transformers integration.

No CUDA build of vLLM can reach the GPU machine (its wheel is larger than what travels there), so
this uses transformers with a static KV cache; on CUDA ``generate`` then compiles the decode step
(torch.compile, CUDA graphs), the same way for the dense and the flute models. Reported per variant:

- decode tokens/s at each batch size (``b * N / (t(N + 1 new tokens) - t(1 new token))``: the
  prefill and cache set-up cancel out),
- time to first token for one ``--prompt-len`` prompt (generate with 1 new token),
- GPU memory: weights + buffers of the loaded model, and the peak during the run.

    python benchmarks/e2e.py                        # llama3-8b, dense,nf4g64,w3g64, batch 1,8,32
    python benchmarks/e2e.py --model tiny --device cpu --dtype float32 --batches 1,2 --prompt-len 16 --new-tokens 4

Writes ``benchmarks/results/e2e_<device>.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flute_vllm import hf  # noqa: E402

MODELS = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024, max_position_embeddings=2048),
}
VARIANTS = {"dense": None, "nf4g64": (4, 64, "nf"), "w3g64": (3, 64, "nf")}


def build_model(model: str, variant: str, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A randomly initialised Llama of the given shape, quantized in place for flute variants."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    cfg = LlamaConfig(**MODELS[model])
    with torch.device(device):
        m = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    m.eval()
    m.generation_config.eos_token_id = None  # random weights: always generate the full length
    m.generation_config.pad_token_id = 0
    if VARIANTS[variant] is not None:
        bits, g, table = VARIANTS[variant]
        hf.prepare_model(m, num_bits=bits, group_size=g, table=table, progress=False)
    return m


def model_bytes(m) -> int:
    """Bytes of parameters and buffers (for flute layers: the checkpoint tensors; the kernel layout
    made on first use on CUDA is counted in the measured device memory instead)."""
    return sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_generate(m, ids, new_tokens: int, reps: int) -> float:
    """Median seconds of ``generate`` (greedy, static cache) producing exactly ``new_tokens``."""
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, cache_implementation="static")
    with torch.inference_mode():
        m.generate(ids, **kw)  # warm-up (compiles the decode step on CUDA)
        times = []
        for _ in range(reps):
            _sync(ids.device)
            t0 = time.perf_counter()
            out = m.generate(ids, **kw)
            _sync(ids.device)
            times.append(time.perf_counter() - t0)
    assert out.shape == (ids.shape[0], ids.shape[1] + new_tokens), out.shape
    return statistics.median(times)


def run_variant(args, variant: str, device: torch.device, dtype: torch.dtype) -> list[dict]:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    m = build_model(args.model, variant, device, dtype)
    gen = torch.Generator(device="cpu").manual_seed(1)
    vocab = MODELS[args.model]["vocab_size"]
    with torch.inference_mode():  # first call makes the kernel layout of every flute layer
        m(torch.randint(0, vocab, (1, 8), generator=gen).to(device))
    _sync(device)
    loaded = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    prompt = torch.randint(0, vocab, (1, args.prompt_len), generator=gen).to(device)
    ttft = timed_generate(m, prompt, 1, args.reps)
    records = []
    for b in args.batches:
        ids = torch.randint(0, vocab, (b, 32), generator=gen).to(device)
        t1 = timed_generate(m, ids, 1, args.reps)
        tn = timed_generate(m, ids, args.new_tokens + 1, args.reps)
        tok_s = b * args.new_tokens / max(tn - t1, 1e-9)
        rec = dict(device=args.device_name, model=args.model, variant=variant, dtype=str(dtype).split(".")[-1],
                   batch=b, new_tokens=args.new_tokens, decode_tok_s=round(tok_s, 2),
                   ms_per_step=round(1e3 * (tn - t1) / args.new_tokens, 3),
                   prompt_len=args.prompt_len, ttft_ms=round(ttft * 1e3, 2),
                   model_gb=round(model_bytes(m) / 2**30, 3),
                   loaded_gb=round(loaded / 2**30, 3) if loaded is not None else None,
                   peak_gb=round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None)
        records.append(rec)
        print(f"  {variant:7s} batch {b:3d}: {tok_s:9.1f} tok/s  {rec['ms_per_step']:8.2f} ms/step  "
              f"TTFT({args.prompt_len}) {rec['ttft_ms']:.1f} ms  model {rec['model_gb']} GB", flush=True)
    del m
    return records


def write_results(records: list[dict], out_dir: Path, name: str) -> Path:
    dense = {r["batch"]: r for r in records if r["variant"] == "dense"}
    for r in records:
        d = dense.get(r["batch"])
        r["speedup_vs_dense"] = round(r["decode_tok_s"] / d["decode_tok_s"], 3) if d else None
    stem = "e2e_" + re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(records, indent=1))
    lines = [f"# End-to-end decode on {name} ({records[0]['model']}, {records[0]['dtype']}, HF transformers, "
             "static KV cache)", "",
             "| variant | batch | decode tok/s | x dense | ms/step | TTFT ms (prompt) | model GB | loaded GB | peak GB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['variant']} | {r['batch']} | {r['decode_tok_s']:.1f} | "
                     f"{r['speedup_vs_dense'] or '':} | {r['ms_per_step']:.2f} | {r['ttft_ms']:.1f} ({r['prompt_len']}) | "
                     f"{r['model_gb']} | {r['loaded_gb'] if r['loaded_gb'] is not None else ''} | "
                     f"{r['peak_gb'] if r['peak_gb'] is not None else ''} |")
    (out_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")
    return out_dir / f"{stem}.json"


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama3-8b", choices=sorted(MODELS))
    ap.add_argument("--variants", default="dense,nf4g64,w3g64")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        if v not in VARIANTS:
            ap.error(f"--variants: unknown variant {v!r} (choose from {', '.join(VARIANTS)})")
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    args.device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{args.device_name}: {args.model} {args.dtype}, variants {variants}, batches {args.batches}", flush=True)
    records = []
    for v in variants:
        records += run_variant(args, v, device, dtype)
    path = write_results(records, Path(args.out), args.device_name)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
