"""Whole models through vllm.LLM on the CPU: TP=1 and TP=2 agree; bad checkpoints fail clearly."""
import json
import os
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("vllm")
from safetensors.torch import load_file, save_file  # noqa: E402

pytestmark = pytest.mark.slow
HERE = os.path.dirname(os.path.abspath(__file__))
ENV = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0|1"}


def _quantize(src, dst, bits, group_size):
    subprocess.run([sys.executable, "-m", "flute_vllm", "quantize", src, dst, "--num-bits", str(bits),
                    "--group-size", str(group_size)], check=True)
    return dst


def _run_llm(model_dir, tp):
    env = ENV if tp > 1 else {**ENV, "VLLM_CPU_OMP_THREADS_BIND": "auto"}
    r = subprocess.run([sys.executable, os.path.join(HERE, "llm_run.py"), model_dir, str(tp)],
                       capture_output=True, text=True, env=env, timeout=900)
    return r.returncode, r.stdout + r.stderr


@pytest.fixture(scope="module")
def tiny_llama(cache_dir):
    from flute_vllm.demo import tiny_llama

    return tiny_llama(os.path.join(cache_dir, "tiny-llama-dense"))


@pytest.mark.parametrize("bits,group_size", [(4, 64), (3, 128)])
def test_tp1_and_tp2_give_the_same_greedy_tokens(tiny_llama, tmp_path, bits, group_size):
    quant = _quantize(tiny_llama, str(tmp_path / "q"), bits, group_size)
    results = {}
    for tp in (1, 2):
        code, out = _run_llm(quant, tp)
        assert code == 0, out[-3000:]
        results[tp] = json.loads([line for line in out.splitlines() if line.startswith("[[")][-1])
    assert len(results[1]) == 2 and all(len(t) == 8 for t in results[1])
    assert results[1] == results[2]


def _edit_config(model_dir, **changes):
    path = os.path.join(model_dir, "config.json")
    cfg = json.load(open(path))
    cfg["quantization_config"].update(changes)
    json.dump(cfg, open(path, "w"))


@pytest.fixture(scope="module")
def tiny_w4g64(tiny_llama, tmp_path_factory):
    return _quantize(tiny_llama, str(tmp_path_factory.mktemp("w4g64")), 4, 64)


def _copy(src, tmp_path):
    dst = str(tmp_path / "bad")
    shutil.copytree(src, dst)
    return dst


def test_bits_5_fails_naming_the_field(tiny_w4g64, tmp_path):
    bad = _copy(tiny_w4g64, tmp_path)
    _edit_config(bad, bits=5)
    code, out = _run_llm(bad, 1)
    assert code != 0 and "quantization_config.bits=5 is not supported" in out


def test_group_size_that_does_not_match_the_scales_fails(tiny_w4g64, tmp_path):
    bad = _copy(tiny_w4g64, tmp_path)
    _edit_config(bad, group_size=128)  # the scales on disk hold K/64 groups
    code, out = _run_llm(bad, 1)
    assert code != 0 and "group_size=128 needs" in out and ".scales" in out


def test_group_size_that_does_not_divide_k_fails(smollm2_w4g64, tmp_path):
    bad = _copy(smollm2_w4g64, tmp_path)
    _edit_config(bad, group_size=256)  # SmolLM2's K=576 is not a multiple of 256
    code, out = _run_llm(bad, 1)
    assert code != 0 and "group_size=256 does not divide the input size per partition 576" in out


def test_missing_scales_tensor_fails_naming_it(tiny_w4g64, tmp_path):
    bad = _copy(tiny_w4g64, tmp_path)
    path = os.path.join(bad, "model.safetensors")
    tensors = load_file(path)
    del tensors["model.layers.1.self_attn.k_proj.scales"]
    save_file(tensors, path, metadata={"format": "pt"})
    code, out = _run_llm(bad, 1)
    assert code != 0 and "model.layers.1.self_attn.k_proj.scales" in out


def test_tp_size_that_splits_a_group_fails(tiny_llama, tmp_path):
    quant = _quantize(tiny_llama, str(tmp_path / "g256"), 4, 256)  # o_proj K=256: TP=2 leaves 128
    code, out = _run_llm(quant, 2)
    assert code != 0 and "would split a scale group" in out and "o_proj" in out


def test_flute_model_zoo_checkpoint_serves_like_ours(tiny_llama, tiny_w4g64, tmp_path):
    """A checkpoint in FLUTE's own layout (int16 interleaved weight, tables, tables2,
    flute_config.json) is converted as vLLM loads it and generates what our format does."""
    from flute_vllm.convert.flute_zoo import make_zoo_checkpoint

    zoo = make_zoo_checkpoint(tiny_llama, str(tmp_path / "zoo"), 4, 64)
    assert os.path.exists(os.path.join(zoo, "flute_config.json"))
    assert "quantization_config" not in json.load(open(os.path.join(zoo, "config.json")))
    results = {}
    for name, model_dir in (("zoo", zoo), ("ours", tiny_w4g64)):
        code, out = _run_llm(model_dir, 1)
        assert code == 0, out[-3000:]
        results[name] = json.loads([line for line in out.splitlines() if line.startswith("[[")][-1])
    assert results["zoo"] == results["ours"]
