"""transformers integration: prepare_model, FluteLinear, save/load round trip, generate()."""
import os

import subprocess
import sys

import pytest
import torch

from flute_vllm import hf
from flute_vllm.quantize import dequantize


@pytest.fixture(scope="module")
def tiny_dense(cache_dir):
    from flute_vllm.demo import tiny_llama

    return tiny_llama(os.path.join(cache_dir, "tiny-llama-dense"))


def _load_dense(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


@pytest.mark.parametrize("bits,group_size", [(4, 64), (3, 128), (2, -1)])
def test_prepare_model_replaces_linears_with_the_dequantized_weight(tiny_dense, bits, group_size):
    dense = _load_dense(tiny_dense)
    model = hf.prepare_model(_load_dense(tiny_dense), bits, group_size, progress=False)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, hf.FluteLinear)]
    assert len(layers) == 2 * 7  # q k v o gate up down per block
    assert isinstance(model.lm_head, torch.nn.Linear)  # kept dense by default
    x = torch.randn(3, 256)
    for name, layer in layers[:4]:
        w_hat = dequantize(layer.qweight, layer.scales, layer.table, bits, layer.group_size)
        ref = x @ w_hat.T
        assert torch.allclose(layer(x), ref, atol=1e-4, rtol=1e-4)
        # and the quantized weight is close to the dense one it came from
        w = dense.get_submodule(name).weight
        assert ((w_hat - w).norm() / w.norm()).item() < {4: 0.15, 3: 0.3, 2: 0.7}[bits]
    assert model.config.quantization_config["bits"] == bits


def test_save_then_from_pretrained_gives_identical_logits(tiny_dense, tmp_path):
    model = hf.prepare_model(_load_dense(tiny_dense), 4, 64, progress=False)
    hf.save_pretrained(model, str(tmp_path), aux_from=tiny_dense)
    loaded = hf.from_pretrained(str(tmp_path), device="cpu", dtype=torch.float32)
    ids = torch.tensor([[1, 50, 900, 3000, 7]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    out = loaded.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 9)


def test_modules_to_not_convert(tiny_dense):
    model = hf.prepare_model(_load_dense(tiny_dense), 4, 64, modules_to_not_convert=["lm_head", "mlp"], progress=False)
    assert isinstance(model.model.layers[0].mlp.down_proj, torch.nn.Linear)
    assert isinstance(model.model.layers[0].self_attn.q_proj, hf.FluteLinear)


def test_from_pretrained_bad_path():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        hf.from_pretrained("/no/such/dir")


def test_perplexity_one_window_equals_hf_loss(tiny_dense):
    from transformers import AutoTokenizer

    from flute_vllm.evaluate import perplexity

    model, tok = _load_dense(tiny_dense), AutoTokenizer.from_pretrained(tiny_dense)
    text = "The quick brown fox jumps over the lazy dog. " * 10
    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = torch.exp(model(ids, labels=ids).loss).item()
    assert perplexity(model, tok, text, max_length=4096, stride=4096) == pytest.approx(expected, rel=1e-4)


def test_eval_cli_prints_the_perplexity(tiny_dense, tmp_path):
    from transformers import AutoTokenizer

    from flute_vllm.evaluate import perplexity

    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    r = subprocess.run([sys.executable, "-m", "flute_vllm", "eval", tiny_dense, "--text", str(text),
                        "--max-length", "64", "--stride", "32"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    ppl = float(r.stdout.split("perplexity")[1].split()[0])
    expected = perplexity(_load_dense(tiny_dense), AutoTokenizer.from_pretrained(tiny_dense), text.read_text(), 64, 32)
    assert ppl == pytest.approx(expected, rel=1e-3)


def test_casting_the_model_keeps_tables_float32(tiny_dense):
    model = hf.prepare_model(_load_dense(tiny_dense), 4, 64, progress=False).to(torch.float16)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.table.dtype == torch.float32 and layer.scales.dtype == torch.float16
    assert torch.equal(layer.table, hf.resolve_table("nf", 4))


FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 32}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 32, "query_pre_attn_scalar": 32}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 32, "query_pre_attn_scalar": 32}),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_model_families_quantize_save_load_generate(family, tmp_path):
    import transformers

    config_cls, model_cls, extra = FAMILIES[family]
    config = getattr(transformers, config_cls)(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=512, max_position_embeddings=256, **extra)
    torch.manual_seed(0)
    dense = getattr(transformers, model_cls)(config).float().eval()
    model = hf.prepare_model(dense, 4, 64, progress=False)
    n_flute = sum(isinstance(m, hf.FluteLinear) for m in model.modules())
    assert n_flute == 2 * 7, f"{family}: {n_flute} FluteLinear layers"
    hf.save_pretrained(model, str(tmp_path))
    loaded = hf.from_pretrained(str(tmp_path), device="cpu", dtype=torch.float32)
    ids = torch.tensor([[3, 17, 100, 42]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    assert loaded.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 7)


def test_flute_linear_compiles_without_graph_breaks_after_warmup():
    """After one eager call, torch.compile(fullgraph=True) traces FluteLinear (needed for
    transformers' static-cache generate, which compiles the decode step)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 64, bias=True)
    model = torch.nn.Sequential(lin)
    hf.prepare_model(model, num_bits=4, group_size=64, progress=False)
    x = torch.randn(3, 128)
    eager = model(x)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), eager)


def test_flute_linear_holds_the_weight_once_after_making_the_op_layout(monkeypatch):
    """On CUDA the kernel layout is a repacked copy of the weight: once it is made, the canonical
    buffers move to host memory (state_dict still is the checkpoint), nothing keeps the device
    copies alive, and a reload / cast re-derives the layout. The CPU stands in for the GPU here:
    _drops_canonical is forced on and prepare_weights returns copies, as the CUDA repack does."""
    import gc
    import weakref

    calls = []
    real_prepare = hf.ops.prepare_weights

    def repack(*args):
        calls.append(args[0].dtype)
        return tuple(t.clone() for t in real_prepare(*args))

    monkeypatch.setattr(hf.ops, "prepare_weights", repack)
    monkeypatch.setattr(hf.FluteLinear, "_drops_canonical", lambda self, device: True)
    torch.manual_seed(0)
    model = hf.prepare_model(torch.nn.Sequential(torch.nn.Linear(128, 64, bias=True)), 4, 64, progress=False)
    other = hf.prepare_model(torch.nn.Sequential(torch.nn.Linear(128, 64, bias=True)), 4, 64, progress=False)
    layer = model[0]
    x = torch.randn(3, 128)
    y_other = other(x)
    calls.clear()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    device_copies = [weakref.ref(layer._buffers[n]) for n in ("qweight", "scales", "table")]
    w_hat = dequantize(layer.qweight, layer.scales, layer.table, 4, 64)
    with torch.inference_mode():
        y = model(x)
    torch.testing.assert_close(y, x @ w_hat.T + layer.bias)
    gc.collect()
    assert [r() for r in device_copies] == [None] * 3  # only the op layout is left of the weight
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not layer.qweight.is_inference()  # made under inference_mode, still loadable
    model(x)
    assert len(calls) == 1  # the layout is reused
    torch.testing.assert_close(torch.compile(model, fullgraph=True, backend="eager")(x), y)

    model.load_state_dict(other.state_dict())  # copies into the host buffers: the layout is stale
    torch.testing.assert_close(model(x), y_other)
    assert len(calls) == 2

    model.to(torch.float16)  # cast: the layout is re-derived once, the table stays float32
    y16 = model(x.half())
    model(x.half())
    assert len(calls) == 3 and layer.table.dtype == torch.float32 and layer.scales.dtype == torch.float16
    torch.testing.assert_close(y16.float(), y_other, atol=2e-2, rtol=2e-2)
