"""Slow tooling checks on the real SmolLM2: NFL beats plain NF on held-out text; the transformers
integration generates exactly what vLLM generates."""
import json
import os
import subprocess
import sys
from importlib import resources

import pytest
import torch

from flute_vllm import hf
from flute_vllm.evaluate import perplexity

pytestmark = pytest.mark.slow
HERE = os.path.dirname(os.path.abspath(__file__))


def _ppl(model_dir, text):
    from transformers import AutoTokenizer

    model = hf.from_pretrained(model_dir, device="cpu", dtype=torch.float32)
    return perplexity(model, AutoTokenizer.from_pretrained(model_dir), text)


def test_nfl_lowers_held_out_perplexity(smollm2_dense, smollm2_w4g64, tmp_path):
    nfl_dir = str(tmp_path / "nfl")
    # Tiny settings for CI; calibration is the default (Python docs), never the eval text.
    subprocess.run([sys.executable, "-m", "flute_vllm", "quantize", smollm2_dense, nfl_dir, "--num-bits", "4",
                    "--group-size", "64", "--nfl", "--samples", "8", "--seq-len", "64", "--steps", "8"], check=True)
    cfg = json.load(open(os.path.join(nfl_dir, "config.json")))["quantization_config"]
    assert (cfg["bits"], cfg["group_size"], cfg["table"]) == (4, 64, "nf")
    text = resources.files("flute_vllm").joinpath("data/eval.txt").read_text()
    ppl_nf, ppl_nfl = _ppl(smollm2_w4g64, text), _ppl(nfl_dir, text)
    print(f"\nSmolLM2 W4G64 held-out perplexity: NF {ppl_nf:.3f}  NFL {ppl_nfl:.3f}")
    assert ppl_nfl < ppl_nf


def test_hf_generate_equals_vllm_greedy(smollm2_w4g64):
    from transformers import AutoTokenizer

    r = subprocess.run([sys.executable, os.path.join(HERE, "llm_run.py"), smollm2_w4g64, "1"], capture_output=True,
                       text=True, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}, timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    vllm_tokens = json.loads([line for line in r.stdout.splitlines() if line.startswith("[[")][-1])
    model = hf.from_pretrained(smollm2_w4g64, device="cpu", dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(smollm2_w4g64)
    hf_tokens = []
    for prompt in ["Hello, my name is", "The capital of France is"]:  # llm_run.py's prompts
        ids = tok(prompt, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
        hf_tokens.append(out[0, ids.shape[1]:].tolist())
    assert hf_tokens == vllm_tokens
