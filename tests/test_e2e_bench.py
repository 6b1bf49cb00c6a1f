"""benchmarks/e2e.py (issue 9) on the CPU with a tiny Llama: the script runs end to end, builds
the flute variants with FluteLinear layers, and writes one record per (variant, batch)."""
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import e2e  # noqa: E402

from flute_vllm.hf import FluteLinear  # noqa: E402


def test_build_model_quantizes_every_projection_but_lm_head():
    m = e2e.build_model("tiny", "w3g64", torch.device("cpu"), torch.float32)
    flute = [n for n, mod in m.named_modules() if isinstance(mod, FluteLinear)]
    assert len(flute) == 2 * 7  # q, k, v, o, gate, up, down per layer
    assert all(mod.bits == 3 and mod.group_size == 64 for mod in m.modules() if isinstance(mod, FluteLinear))
    assert isinstance(m.lm_head, torch.nn.Linear)


def test_e2e_resume_measures_only_the_missing_pairs(tmp_path, monkeypatch):
    common = ["--model", "tiny", "--device", "cpu", "--dtype", "float32", "--prompt-len", "16", "--new-tokens", "2",
              "--reps", "1", "--out", str(tmp_path), "--variants", "dense,nf4g64"]
    first = {(r["variant"], r["batch"]): r for r in json.loads(e2e.main(common + ["--batches", "1"]).read_text())}
    calls = []
    run_variant = e2e.run_variant

    def spy(args, variant, device, dtype, batches, on_record):
        calls.append((variant, list(batches)))
        return run_variant(args, variant, device, dtype, batches, on_record)

    monkeypatch.setattr(e2e, "run_variant", spy)
    path = e2e.main(common + ["--batches", "1,2", "--resume"])
    assert calls == [("dense", [2]), ("nf4g64", [2])]
    recs = {(r["variant"], r["batch"]): r for r in json.loads(path.read_text())}
    assert set(recs) == {(v, b) for v in ("dense", "nf4g64") for b in (1, 2)}
    assert all(recs[k]["ms_per_step"] == first[k]["ms_per_step"] for k in first)  # kept, not re-measured
    assert recs[("nf4g64", 2)]["speedup_vs_dense"] is not None
    assert "| nf4g64 | 2 |" in path.with_suffix(".md").read_text()


def test_e2e_benchmark_runs_on_cpu(tmp_path):
    path = e2e.main(["--model", "tiny", "--device", "cpu", "--dtype", "float32", "--batches", "1,2",
                     "--prompt-len", "16", "--new-tokens", "3", "--reps", "1", "--out", str(tmp_path)])
    recs = json.loads(path.read_text())
    assert {(r["variant"], r["batch"]) for r in recs} == {(v, b) for v in ("dense", "nf4g64", "w3g64") for b in (1, 2)}
    assert all(r["decode_tok_s"] > 0 and r["ttft_ms"] > 0 for r in recs)
    assert all(r["method"] == "eager" and r["ms_per_step"] > 0 for r in recs)  # no CUDA graph on the CPU
    assert all(r["decode_tok_s"] == pytest.approx(r["batch"] * 1e3 / r["ms_per_step"], rel=1e-2) for r in recs)
    by = {(r["variant"], r["batch"]): r for r in recs}
    assert by[("dense", 1)]["speedup_vs_dense"] == 1.0
    # packed 4-bit / 3-bit projections: the quantized models hold fewer bytes than the dense one
    assert by[("w3g64", 1)]["model_gb"] < by[("nf4g64", 1)]["model_gb"] < by[("dense", 1)]["model_gb"]
    assert "eager" in (tmp_path / "e2e_cpu.md").read_text().splitlines()[0]
    # where a step's time goes: the dense model's projections are GEMMs, the flute models' are our op
    for (variant, _), r in by.items():
        b = r["step_breakdown_ms"]
        assert sum(b.values()) > 0 and b.get("other", 0) > 0
        assert ("flute" in b) == (variant != "dense"), (variant, b)
        assert b.get("gemm", 0) > 0  # dense projections, or the unquantized lm_head
    assert "time per decode step by kernel class" in (tmp_path / "e2e_cpu.md").read_text()


def test_kernel_classes():
    assert e2e.kernel_class("void lut_gemm_kernel<4, 1, 2, 8, __half>(GemmParams)") == "flute"
    assert e2e.kernel_class("flute_vllm::gemm") == "flute"
    assert e2e.kernel_class("sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize64x64x64") == "gemm"
    assert e2e.kernel_class("aten::mm") == "gemm"
    assert e2e.kernel_class("nvjet_hsh_128x256_64x4_2x1_v_bz_coopA_TNT") == "gemm"  # cuBLAS 12.8+ on Hopper
    assert e2e.kernel_class("aten::scaled_dot_product_attention") == "attention"
    assert e2e.kernel_class("void at::native::vectorized_elementwise_kernel<4, ...>") == "other"


def test_static_decoder_continues_the_prompt_as_generate_does():
    """The measured decode step (static cache, position/token tensors updated in place) produces
    the greedy continuation of HF generate(), also after a reset + refill of the cache."""
    for variant in ("dense", "nf4g64"):
        m = e2e.build_model("tiny", variant, torch.device("cpu"), torch.float32)
        prompt = torch.randint(0, 1024, (2, 16), generator=torch.Generator().manual_seed(3))
        dec = e2e.StaticDecoder(m, batch=2, prompt_len=16, new_tokens=8)
        with torch.inference_mode():
            ref = m.generate(prompt, max_new_tokens=9, min_new_tokens=9, do_sample=False)[:, 16:]
            assert torch.equal(dec.generate(prompt, 8), ref), variant
            assert torch.equal(dec.generate(prompt, 8), ref), variant  # reset: positions start over
            assert dec.pos.item() == 16 + 8
            with pytest.raises(ValueError, match="overrun"):
                dec.decode(9)


def test_check_graph_rejects_a_replay_that_is_not_the_decode_step(capsys):
    m = e2e.build_model("tiny", "dense", torch.device("cpu"), torch.float32)
    prompt = torch.randint(0, 1024, (4, 16), generator=torch.Generator().manual_seed(5))
    dec = e2e.StaticDecoder(m, batch=4, prompt_len=16, new_tokens=8)

    class Replay:  # stands in for the CUDA graph of one step
        def __init__(self, step):
            self.replay = step

    def stale_step():  # e.g. a capture that baked in the first step's input token
        dec.ids.fill_(7)
        dec.step()

    with torch.inference_mode():
        dec.graph = Replay(dec.step)
        e2e.check_graph(dec, prompt, 8, "same step")
        assert dec.graph is not None and "note" not in capsys.readouterr().out
        dec.graph = Replay(stale_step)
        with pytest.raises(RuntimeError, match="does not replay the eager one"):
            e2e.check_graph(dec, prompt, 8, "stale step")


@pytest.mark.parametrize("variant", ["dense", "nf4g64"])
def test_gqa_decode_attention_equals_transformers_sdpa(variant):
    """The benchmark's decode attention (query heads of one KV head as its query rows, no KV copy)
    gives transformers' sdpa logits: prefill, then decode steps through a static cache."""
    torch.manual_seed(0)
    prompt = torch.randint(0, e2e.MODELS["tiny"]["vocab_size"], (2, 12))
    logits = {}
    for attention in e2e.ATTENTIONS:
        m = e2e.build_model("tiny", variant, torch.device("cpu"), torch.float32, attention=attention)
        assert m.config._attn_implementation == attention
        dec = e2e.StaticDecoder(m, 2, prompt.shape[1], 3)
        with torch.inference_mode():
            dec.prefill(prompt)
            steps = []
            for _ in range(3):
                dec.step()
                steps.append(dec.ids.clone())
        logits[attention] = torch.stack(steps)
    assert torch.equal(logits["sdpa"], logits[e2e.GQA_DECODE_ATTENTION])


def test_gqa_decode_attention_matches_sdpa_numerically():
    """Direct check of the attention function against transformers' sdpa on random GQA tensors
    with a padding mask (q_len 1), and that q_len > 1 falls through to transformers' sdpa."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    class Mod(torch.nn.Module):
        num_key_value_groups = 4
        is_causal = True

    torch.manual_seed(0)
    b, hkv, g, length, d = 3, 2, 4, 20, 16
    k, v = torch.randn(b, hkv, length, d), torch.randn(b, hkv, length, d)
    mask = torch.ones(b, 1, 1, length, dtype=torch.bool)
    mask[:, :, :, 15:] = False  # unfilled static-cache positions
    mask[1, :, :, :3] = False   # left padding of one sequence
    q = torch.randn(b, hkv * g, 1, d)
    ours, _ = e2e.sdpa_gqa_decode(Mod(), q, k, v, mask, scaling=0.25)
    ref, _ = sdpa_attention_forward(Mod(), q, k, v, mask, scaling=0.25)
    assert ours.shape == ref.shape == (b, 1, hkv * g, d)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    q2 = torch.randn(b, hkv * g, 5, d)
    mask2 = torch.ones(b, 1, 5, length, dtype=torch.bool)
    torch.testing.assert_close(e2e.sdpa_gqa_decode(Mod(), q2, k, v, mask2, scaling=0.25)[0],
                               sdpa_attention_forward(Mod(), q2, k, v, mask2, scaling=0.25)[0])
