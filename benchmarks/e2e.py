"""End-to-end decode benchmark (issue 9): a Llama-3.1-8B-shaped model with random weights (no
download), dense vs flute NF W4G64 vs flute W3G64, through the HF transformers integration.

No CUDA build of vLLM can reach the GPU machine (its wheel is larger than what travels there), so
this drives the transformers model directly, the way gpt-fast measures decode: a static KV cache
(transformers ``StaticCache``) of ``prompt_len + new_tokens`` positions, an eager prefill of the
prompt, then ONE decode step (1 token per sequence -> greedy argmax, on static input/output tensors)
captured into a ``torch.cuda.CUDAGraph`` after a 3-step warm-up on a side stream and replayed
``--new-tokens`` times with no host sync in between. The same for the dense and the flute models,
so the step time is that of the kernels (weights, KV cache, attention), not of Python, ``generate``
or launch overhead. On the CPU (CI) the same step runs eagerly. Reported per variant:

- decode tokens/s and ms/step at each batch size (``batch / seconds per step``; median over
  ``--reps`` runs of ``--new-tokens`` steps, each after a fresh prefill of a ``--prompt-len`` prompt),
- time to first token: the eager prefill of one ``--prompt-len`` prompt (batch 1) + its argmax,
- memory: checkpoint bytes of the model, GPU memory of the loaded model (flute: the kernel layout;
  the canonical checkpoint tensors are in host memory by then), and the peak during each batch,
- where a step's time goes: device time per step by kernel class (flute / cuBLAS / attention /
  other), from ``torch.profiler`` over a few eager steps (:func:`step_breakdown`).

    python benchmarks/e2e.py                        # llama3-8b, dense,nf4g64,w3g64, batch 1,8,32
    python benchmarks/e2e.py --compile --batches 1  # + torch.compile of the step: e2e_<gpu>_compiled.*
    python benchmarks/e2e.py --model tiny --device cpu --dtype float32 --batches 1,2 --prompt-len 16 --new-tokens 4
    python benchmarks/e2e.py --compile --variants w3g64 --resume   # add to the file a cut-short run left

Writes ``benchmarks/results/e2e_<device>.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import collections
import gc
import inspect
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
WARMUP_STEPS = 3  # eager decode steps on a side stream before the capture (PyTorch's CUDA-graph docs)
GRAPH_METHOD = "cuda-graph decode step (static KV cache)"
COMPILED_METHOD = "torch.compile'd decode step in a cuda graph (static KV cache)"
EAGER_METHOD = "eager"


# Attention of the benchmark models. transformers' "sdpa" repeats each KV head for its query heads
# (repeat_kv) whenever a mask is passed, which a static cache always does: at batch 32 and a 1k
# context that copy made attention 10.6 of a 17 ms decode step on H200 (2026-11-30), the same for
# every variant, hiding the linear layers. GQA_DECODE_ATTENTION runs a decode step's query heads of
# one KV head as that head's query rows instead (no copy; what vLLM's attention kernels do), and
# prefill through transformers' sdpa.
GQA_DECODE_ATTENTION = "sdpa_gqa_decode"
ATTENTIONS = ("sdpa", GQA_DECODE_ATTENTION)


def sdpa_gqa_decode(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None,
                    **kwargs):
    """transformers attention function: q_len 1 with grouped KV heads -> one SDPA over the KV heads
    with each head's G query heads as G query rows ([B, H, 1, D] -> [B, H/G, G, D]; the mask
    [B, 1, 1, L] broadcasts over them). Anything else: transformers' sdpa."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    b, h, q_len, d = query.shape
    if q_len != 1 or groups == 1 or kwargs.get("position_bias") is not None or kwargs.get("cache") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    q = query.reshape(b, h // groups, groups, d)  # head kv * G + j uses KV head kv (transformers' repeat_kv order)
    out = torch.nn.functional.scaled_dot_product_attention(q, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                                           scale=scaling, is_causal=False)
    return out.reshape(b, h, 1, d).transpose(1, 2).contiguous(), None


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(GQA_DECODE_ATTENTION, sdpa_gqa_decode)
    AttentionMaskInterface.register(GQA_DECODE_ATTENTION, AttentionMaskInterface._global_mapping["sdpa"])


def build_model(model: str, variant: str, device: torch.device, dtype: torch.dtype, seed: int = 0,
                attention: str = GQA_DECODE_ATTENTION):
    """A randomly initialised Llama of the given shape, quantized in place for flute variants."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    if attention not in ATTENTIONS:
        raise ValueError(f"attention={attention!r}: choose from {', '.join(ATTENTIONS)}")
    if attention == GQA_DECODE_ATTENTION:
        _register_attention()
    torch.manual_seed(seed)
    cfg = LlamaConfig(**MODELS[model])
    with torch.device(device):
        m = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=attention)
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


def make_static_cache(m, batch: int, max_len: int):
    """A transformers ``StaticCache`` of ``max_len`` positions for ``m``.

    transformers 5.x (5.17 .. 5.19): ``StaticCache(config, max_cache_len)``; each layer allocates its
    ``[batch, kv_heads, max_len, head_dim]`` tensors on its first update (the prefill) and keeps
    them (``reset`` zeroes them in place, so a captured graph stays valid). 4.x also took the
    batch size, device and dtype up front: passed where the signature has them.
    """
    from transformers import StaticCache

    params = inspect.signature(StaticCache.__init__).parameters
    extra = {k: v for k, v in (("max_batch_size", batch), ("batch_size", batch), ("device", m.device),
                               ("dtype", m.dtype)) if k in params}
    return StaticCache(config=m.config, max_cache_len=max_len, **extra)


class StaticDecoder:
    """Greedy decoding of ``batch`` sequences with a static KV cache: eager prefill, then a decode
    step on static tensors (``ids`` [b, 1]: the last token; ``pos`` [1, 1]: its position) that
    writes the next token back into ``ids`` and advances ``pos``; on CUDA the step is captured once
    into a CUDA graph (:meth:`capture`) and :meth:`decode` replays it."""

    def __init__(self, m, batch: int, prompt_len: int, new_tokens: int, compile_step: bool = False):
        self.m, self.batch, self.prompt_len = m, batch, prompt_len
        # --compile: the decode step (not the prefill) through torch.compile, so HF's many small
        # eager kernels (norms, rotary, cache writes) are fused before the graph capture
        self._step_token = (torch.compile(self._next_token, fullgraph=False, dynamic=False) if compile_step
                            else self._next_token)
        # room for the timed steps and for the warm-up steps that precede the capture
        self.max_len = prompt_len + max(new_tokens, WARMUP_STEPS)
        self.cache = make_static_cache(m, batch, self.max_len)
        params = inspect.signature(m.forward).parameters
        self._cache_position = "cache_position" in params  # 4.x; 5.x keeps the write position in the cache
        self._logits_to_keep = "logits_to_keep" in params
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=m.device)
        self.pos = torch.zeros(1, 1, dtype=torch.long, device=m.device)
        self.graph = None

    def _next_token(self, ids, position_ids):
        kw = dict(past_key_values=self.cache, use_cache=True, position_ids=position_ids)
        if self._cache_position:
            kw["cache_position"] = position_ids[0]
        if self._logits_to_keep:
            kw["logits_to_keep"] = 1
        return self.m(input_ids=ids, **kw).logits[:, -1].argmax(-1, keepdim=True)

    def reset(self) -> None:
        """Empty the cache (in place: the tensors a captured graph uses stay where they are)."""
        self.cache.reset()

    def prefill(self, prompt: torch.Tensor) -> torch.Tensor:
        """Run ``prompt`` [b, P] through the (empty) cache eagerly; ``ids`` = the first new token."""
        assert prompt.shape == (self.batch, self.prompt_len), prompt.shape
        positions = torch.arange(self.prompt_len, device=prompt.device).unsqueeze(0)
        self.ids.copy_(self._next_token(prompt, positions))
        self.pos.fill_(self.prompt_len)
        return self.ids

    def step(self) -> None:
        """One eager decode step: the token in ``ids`` at ``pos`` -> the next token in ``ids``."""
        self.ids.copy_(self._step_token(self.ids, self.pos))
        self.pos.add_(1)

    def capture(self) -> None:
        """After a prefill: warm the step up on a side stream, then record one step into a graph.
        (The warm-up also makes the flute kernel layouts and loads the CUDA extension.)"""
        s = torch.cuda.Stream(self.ids.device)
        s.wait_stream(torch.cuda.current_stream(self.ids.device))
        with torch.cuda.stream(s):
            for _ in range(WARMUP_STEPS):
                self.step()
        torch.cuda.current_stream(self.ids.device).wait_stream(s)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.step()

    def decode(self, steps: int, out: torch.Tensor | None = None) -> None:
        """``steps`` decode steps (graph replays when captured), no host sync in between; ``out``
        [b, >= steps] (optional) receives each step's token."""
        if steps > self.max_len - self.prompt_len:
            raise ValueError(f"{steps} steps after a {self.prompt_len}-token prompt overrun the "
                             f"{self.max_len}-position cache")
        for i in range(steps):
            if self.graph is not None:
                self.graph.replay()
            else:
                self.step()
            if out is not None:
                out[:, i : i + 1].copy_(self.ids)

    def generate(self, prompt: torch.Tensor, steps: int) -> torch.Tensor:
        """Greedy continuation ``[b, 1 + steps]`` of ``prompt`` (the prefill's token, then the steps')."""
        self.reset()
        out = torch.empty(self.batch, 1 + steps, dtype=torch.long, device=self.ids.device)
        out[:, :1] = self.prefill(prompt)
        self.decode(steps, out[:, 1:])
        return out


def check_graph(dec: StaticDecoder, prompt: torch.Tensor, steps: int, what: str) -> None:
    """Compare ``steps`` replayed steps with the same steps run eagerly (a capture that did not
    advance the positions or read stale inputs would time garbage). Random-weight logits are
    near-ties, so an fp16 rounding difference (cuBLAS may pick another kernel under capture) can
    flip a late greedy token; a broken capture diverges from the first steps in most sequences."""
    replayed = dec.generate(prompt, steps)
    graph, dec.graph = dec.graph, None
    eager = dec.generate(prompt, steps)
    dec.graph = graph
    diff = (replayed != eager).cpu()
    first = [int(row.nonzero()[0]) for row in diff if row.any()]  # first differing token per sequence
    if not first:
        return
    msg = (f"{what}: graph replay == eager decoding for {len(diff) - len(first)}/{len(diff)} sequences over "
           f"{steps} steps; the others first differ at token(s) {sorted(first)}")
    if 2 * sum(f <= 2 for f in first) > len(diff):
        raise RuntimeError(f"the captured decode step does not replay the eager one: {msg}")
    print(f"  note: {msg}", flush=True)


class _Timer:
    """Seconds between start() and stop(): CUDA events on CUDA, perf_counter + sync elsewhere."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            self._events = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def start(self) -> None:
        _sync(self.device)
        if self.device.type == "cuda":
            self._events[0].record()
        else:
            self._t0 = time.perf_counter()

    def stop(self) -> float:
        if self.device.type == "cuda":
            self._events[1].record()
            self._events[1].synchronize()
            return self._events[0].elapsed_time(self._events[1]) / 1e3
        return time.perf_counter() - self._t0


def time_decode(dec: StaticDecoder, prompt: torch.Tensor, steps: int, reps: int) -> float:
    """Median seconds per decode step over ``reps`` runs of ``steps`` steps, each after a fresh
    prefill of ``prompt`` (so the cache positions stay in range)."""
    timer = _Timer(dec.ids.device)
    times = []
    for _ in range(reps):
        dec.reset()
        dec.prefill(prompt)
        timer.start()
        dec.decode(steps)
        times.append(timer.stop() / steps)
    return statistics.median(times)


TTFT_WARMUP_S = 0.5  # of back-to-back prefills before timing: the GPU leaves its idle clocks
TTFT_MIN_REPS = 7


def time_ttft(m, prompt: torch.Tensor, reps: int) -> float:
    """Median seconds of the eager prefill of ``prompt`` [1, P] + its argmax, over at least
    :data:`TTFT_MIN_REPS` runs after :data:`TTFT_WARMUP_S` of warm-up prefills (the 2026-11-30 H200
    run with one warm-up and 3 runs moved by up to 2x with the order of the variants)."""
    dec = StaticDecoder(m, 1, prompt.shape[1], 1)
    timer = _Timer(prompt.device)
    t_end = time.perf_counter() + TTFT_WARMUP_S
    while True:  # warm-up: allocates the cache, brings clocks up
        dec.reset()
        dec.prefill(prompt)
        _sync(prompt.device)
        if time.perf_counter() >= t_end:
            break
    times = []
    for _ in range(max(reps, TTFT_MIN_REPS)):
        dec.reset()
        timer.start()
        dec.prefill(prompt)
        times.append(timer.stop())
    return statistics.median(times)


# Kernel (CUDA) or operator (CPU) names -> the class a decode step's time is reported under.
KERNEL_CLASSES = [
    ("flute", re.compile(r"lut_gemm|lut_wgmma|dequant_kernel|flute", re.I)),
    # nvjet_*: cuBLAS's Hopper GEMM kernels (CUDA 12.8+); the v11 run missed them (dense "other" 4.7 ms)
    ("gemm", re.compile(r"gemm|gemv|cutlass|xmma|nvjet|cublas|aten::(mm|addmm|bmm|linear|matmul)$", re.I)),
    ("attention", re.compile(r"attention|attn|flash|fmha|sdpa|softmax", re.I)),
]


def kernel_class(name: str) -> str:
    return next((cls for cls, pat in KERNEL_CLASSES if pat.search(name)), "other")


def step_breakdown(dec: StaticDecoder, prompt: torch.Tensor, steps: int) -> dict[str, float]:
    """Milliseconds per decode step by kernel class (:data:`KERNEL_CLASSES`): on CUDA the device
    time of the kernels, on the CPU the self time of the operators, from ``torch.profiler`` over
    ``steps`` eager steps after a fresh prefill (a graph replay hides its kernels from the
    profiler; the kernels are the same). Says what a step's time goes to beyond the GEMMs."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = dec.ids.device.type == "cuda"
    dec.reset()
    dec.prefill(prompt)
    _sync(dec.ids.device)
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(steps):
            dec.step()
        _sync(dec.ids.device)
    totals: collections.Counter = collections.Counter()
    for e in prof.key_averages():
        if cuda and e.device_type != DeviceType.CUDA:
            continue
        us = (getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)) if cuda \
            else e.self_cpu_time_total
        totals[kernel_class(e.key)] += us
    return {cls: round(us / 1e3 / steps, 3) for cls, us in sorted(totals.items())}


def free_memory(device: torch.device) -> None:
    """Release what a finished variant / batch left: compiled graphs, cycles, the allocator's cache."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _gb(n) -> float | None:
    return None if n is None else round(n / 2**30, 3)


def run_variant(args, variant: str, device: torch.device, dtype: torch.dtype, batches: list[int],
                on_record=lambda rec: None) -> list[dict]:
    """Build, quantize and measure one variant at ``batches``; ``on_record`` sees each record as it
    is made (main writes the results file there, so a run cut short keeps what it measured)."""
    cuda = device.type == "cuda"
    free_memory(device)
    base = torch.cuda.memory_allocated(device) if cuda else 0
    t_start = time.perf_counter()
    m = build_model(args.model, variant, device, dtype, attention=args.attention)
    gen = torch.Generator(device="cpu").manual_seed(1)
    vocab = MODELS[args.model]["vocab_size"]
    with torch.inference_mode():  # first call makes the kernel layout of every flute layer
        m(torch.randint(0, vocab, (1, 8), generator=gen).to(device))
    _sync(device)
    loaded = torch.cuda.memory_allocated(device) - base if cuda else None
    method = (COMPILED_METHOD if args.compile else GRAPH_METHOD) if cuda else EAGER_METHOD
    records = []
    with torch.inference_mode():
        prompt = torch.randint(0, vocab, (1, args.prompt_len), generator=gen).to(device)
        ttft = time_ttft(m, prompt, args.reps)
        for b in batches:
            free_memory(device)
            ids = torch.randint(0, vocab, (b, args.prompt_len), generator=gen).to(device)
            dec = StaticDecoder(m, b, args.prompt_len, args.new_tokens, compile_step=args.compile)
            if cuda:
                dec.prefill(ids)
                dec.capture()
                check_graph(dec, ids, min(8, args.new_tokens), f"{variant} batch {b}")
            s = time_decode(dec, ids, args.new_tokens, args.reps)
            peak = torch.cuda.max_memory_allocated(device) - base if cuda else None
            breakdown = step_breakdown(dec, ids, min(8, args.new_tokens))
            del dec
            rec = dict(device=args.device_name, model=args.model, variant=variant, dtype=str(dtype).split(".")[-1],
                       method=method, attention=args.attention, batch=b, new_tokens=args.new_tokens, decode_tok_s=round(b / s, 2),
                       ms_per_step=round(1e3 * s, 3), prompt_len=args.prompt_len, ttft_ms=round(ttft * 1e3, 2),
                       model_gb=_gb(model_bytes(m)), loaded_gb=_gb(loaded), peak_gb=_gb(peak),
                       step_breakdown_ms=breakdown)
            records.append(rec)
            on_record(rec)
            print(f"  {variant:7s} batch {b:3d}: {rec['decode_tok_s']:9.1f} tok/s  {rec['ms_per_step']:8.3f} ms/step  "
                  f"TTFT({args.prompt_len}) {rec['ttft_ms']:.1f} ms  model {rec['model_gb']} GB  "
                  f"loaded {rec['loaded_gb']} GB  peak {rec['peak_gb']} GB", flush=True)
    del m
    free_memory(device)
    print(f"  {variant}: {time.perf_counter() - t_start:.1f} s (build, quantize, measure)", flush=True)
    return records


def results_path(out_dir: Path, name: str, suffix: str = "") -> Path:
    """``<out_dir>/e2e_<device>[suffix].json`` (the ``.md`` beside it)."""
    return out_dir / ("e2e_" + re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_") + suffix + ".json")


def write_results(records: list[dict], out_dir: Path, name: str, suffix: str = "") -> Path:
    dense = {r["batch"]: r for r in records if r["variant"] == "dense"}
    for r in records:
        d = dense.get(r["batch"])
        r["speedup_vs_dense"] = round(r["decode_tok_s"] / d["decode_tok_s"], 3) if d else None
    path = results_path(out_dir, name, suffix)
    out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=1))
    r0 = records[0]
    lines = [f"# End-to-end decode on {name} ({r0['model']}, {r0['dtype']}, HF transformers, {r0['method']}, "
             f"attention {r0.get('attention', 'sdpa')})", "",
             f"Decode step: {r0['prompt_len']}-token prompt, static KV cache, median over runs of "
             f"{r0['new_tokens']} steps. TTFT: eager prefill of one {r0['prompt_len']}-token prompt "
             f"(median of >= {TTFT_MIN_REPS} runs after {TTFT_WARMUP_S} s of warm-up prefills). "
             "Loaded / peak GB: GPU memory of the model / during the batch's run.", "",
             "| variant | batch | decode tok/s | x dense | ms/step | TTFT ms (prompt) | model GB | loaded GB | peak GB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['variant']} | {r['batch']} | {r['decode_tok_s']:.1f} | "
                     f"{r['speedup_vs_dense'] or '':} | {r['ms_per_step']:.3f} | {r['ttft_ms']:.1f} ({r['prompt_len']}) | "
                     f"{r['model_gb']} | {r['loaded_gb'] if r['loaded_gb'] is not None else ''} | "
                     f"{r['peak_gb'] if r['peak_gb'] is not None else ''} |")
    classes = sorted({c for r in records for c in r.get("step_breakdown_ms") or {}})
    if classes:
        unit = "device" if records[0]["device"] != "cpu" else "CPU operator"
        lines += ["", f"{unit} time per decode step by kernel class, ms (torch.profiler over eager steps; "
                  "`flute`: our kernels, `gemm`: cuBLAS incl. lm_head, `other`: norms, rotary, cache writes, "
                  "elementwise, sampling; the profiler adds a few us to every kernel it traces, so short kernels "
                  "read long here: use the shares, and ms/step for totals):", "",
                  "| variant | batch | " + " | ".join(classes) + " | sum | ms/step |",
                  "|---|---|" + "---|" * (len(classes) + 2)]
        for r in records:
            b = r.get("step_breakdown_ms") or {}
            lines.append(f"| {r['variant']} | {r['batch']} | " + " | ".join(f"{b.get(c, 0):.3f}" for c in classes)
                         + f" | {sum(b.values()):.3f} | {r['ms_per_step']:.3f} |")
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return path


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
    ap.add_argument("--attention", default=GQA_DECODE_ATTENTION, choices=ATTENTIONS,
                    help="transformers attention of the model (sdpa: transformers' own, which copies the KV heads "
                         "per query head at every decode step)")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile the decode step before the graph capture (writes e2e_<gpu>_compiled.*)")
    ap.add_argument("--resume", action="store_true",
                    help="keep the records of the existing results file and measure only the (variant, batch) "
                         "pairs it lacks (for runs split across time-limited sessions)")
    args = ap.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        if v not in VARIANTS:
            ap.error(f"--variants: unknown variant {v!r} (choose from {', '.join(VARIANTS)})")
    if args.new_tokens < 1 or args.prompt_len < 1 or args.reps < 1:
        ap.error("--new-tokens, --prompt-len and --reps must be >= 1")
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    args.device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{args.device_name}: {args.model} {args.dtype}, variants {variants}, batches {args.batches}, "
          f"{(COMPILED_METHOD if args.compile else GRAPH_METHOD) if device.type == 'cuda' else EAGER_METHOD}", flush=True)
    suffix = "_compiled" if args.compile else ""
    path = results_path(Path(args.out), args.device_name, suffix)
    records = json.loads(path.read_text()) if args.resume and path.exists() else []
    same = [r for r in records if r.get("attention", "sdpa") == args.attention]  # files before it: sdpa
    if len(same) < len(records):
        print(f"--resume: dropping {len(records) - len(same)} records measured with another --attention", flush=True)
        records = same
    done = {(r["variant"], r["batch"]) for r in records}
    if done:
        print(f"--resume: keeping {len(records)} records of {path}", flush=True)

    def keep(rec):  # write after every record: a run cut short keeps what it measured
        records.append(rec)
        write_results(records, Path(args.out), args.device_name, suffix)

    for v in variants:
        todo = [b for b in args.batches if (v, b) not in done]
        if todo:
            run_variant(args, v, device, dtype, todo, keep)
    if not records:
        raise SystemExit("nothing measured")
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
