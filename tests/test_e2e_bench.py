"""benchmarks/e2e.py (issue 9) on the CPU with a tiny Llama: the script runs end to end, builds
the flute variants with FluteLinear layers, and writes one record per (variant, batch)."""
import json
import os
import sys

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


def test_e2e_benchmark_runs_on_cpu(tmp_path):
    path = e2e.main(["--model", "tiny", "--device", "cpu", "--dtype", "float32", "--batches", "1,2",
                     "--prompt-len", "16", "--new-tokens", "3", "--reps", "1", "--out", str(tmp_path)])
    recs = json.loads(path.read_text())
    assert {(r["variant"], r["batch"]) for r in recs} == {(v, b) for v in ("dense", "nf4g64", "w3g64") for b in (1, 2)}
    assert all(r["decode_tok_s"] > 0 and r["ttft_ms"] > 0 for r in recs)
    by = {(r["variant"], r["batch"]): r for r in recs}
    assert by[("dense", 1)]["speedup_vs_dense"] == 1.0
    # packed 4-bit / 3-bit projections: the quantized models hold fewer bytes than the dense one
    assert by[("w3g64", 1)]["model_gb"] < by[("nf4g64", 1)]["model_gb"] < by[("dense", 1)]["model_gb"]
    assert (tmp_path / "e2e_cpu.md").is_file()
