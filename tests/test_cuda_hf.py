"""The transformers integration on a GPU: FluteLinear runs the CUDA kernel (after its repack) and a
whole prepared model generates on CUDA as it does on the CPU reference path."""
import pytest
import torch

from flute_vllm import hf, ops

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible)")]


def _tiny_llama(dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=8,
                      num_key_value_heads=4, vocab_size=1000, initializer_range=0.25)
    return LlamaForCausalLM(cfg).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits,group_size", [(4, 64), (3, 128), (2, -1)])
def test_flute_linear_on_cuda_uses_the_kernel_and_matches_the_cpu_reference(dtype, bits, group_size):
    model = hf.prepare_model(_tiny_llama(dtype), bits, group_size, progress=False)
    layer = model.model.layers[0].mlp.gate_proj
    x = torch.randn(7, 512, dtype=dtype)
    ref = layer(x.float().to(dtype)).float()  # CPU op: float32 math on the canonical layout
    layer.cuda()
    y = layer(x.cuda())
    assert layer._prepared[3].dtype == torch.int32  # the CUDA repack's table layout: the kernel ran
    assert ((y.float().cpu() - ref).norm() / ref.norm()).item() < (3e-3 if dtype == torch.float16 else 1.5e-2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_prepared_model_on_cuda_matches_the_cpu_reference(dtype):
    model = hf.prepare_model(_tiny_llama(dtype), 4, 64, progress=False).float()
    ids = torch.tensor([[1, 17, 400, 23, 99, 5, 8, 13]])
    with torch.no_grad():
        ref = model(ids).logits  # CPU, float32 everywhere
        gpu_model = model.to("cuda", dtype)
        assert isinstance(gpu_model.model.layers[0].self_attn.q_proj, hf.FluteLinear)
        got = gpu_model(ids.cuda()).logits.float().cpu()
    assert ((got - ref).norm() / ref.norm()).item() < (1e-2 if dtype == torch.float16 else 4e-2)
    out = gpu_model.generate(ids.cuda(), max_new_tokens=8, do_sample=False)
    assert out.shape == (1, 16)
    if dtype == torch.float16:  # fp16 keeps this confident model's greedy choices (bf16 may flip late ones)
        assert torch.equal(out[0, 8:11].cpu(), model.float().cpu().generate(ids, max_new_tokens=3, do_sample=False)[0, 8:])


def test_cuda_op_is_registered_for_the_hf_path():
    model = hf.prepare_model(_tiny_llama(torch.float16), 4, 64, progress=False).cuda()
    layer = model.model.layers[0].self_attn.o_proj
    x = torch.randn(1, 512, device="cuda", dtype=torch.float16)
    layer(x)
    qweight_k, scales_k, tables_k = layer._prepared[1:]
    # the kernel layout is not the canonical one: the CUDA repack ran
    assert tables_k.dtype == torch.int32
    torch.testing.assert_close(layer(x), ops.lut_linear(x, qweight_k, scales_k, tables_k, [512], 4, 64))
