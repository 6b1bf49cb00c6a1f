"""End to end on the CPU: quantize SmolLM2 (NF4 W4G64) with the CLI, serve it with vLLM's OpenAI
server through our launcher, ask it questions, and compare its perplexity with the dense model's."""
import math
from importlib import resources

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("vllm")

from server import openai_server  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2_dirs(smollm2_dense, smollm2_w4g64):
    return smollm2_dense, smollm2_w4g64


def _perplexity(client, model, text):
    # echo + logprobs gives the log-probability vLLM assigns to every prompt token.
    r = client.completions.create(model=model, prompt=text, max_tokens=1, echo=True, logprobs=0, temperature=0)
    lps = [lp for lp in r.choices[0].logprobs.token_logprobs if lp is not None]
    assert len(lps) > 100
    return math.exp(-sum(lps) / len(lps))


def test_serve_quantized_smollm2_and_compare_perplexity(smollm2_dirs):
    dense, quant = smollm2_dirs
    text = resources.files("flute_vllm").joinpath("data/eval.txt").read_text()
    with openai_server(quant, launcher=("-m", "flute_vllm"), extra_args=("--quantization", "flute")) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none")
        model = client.models.list().data[0].id
        c = client.completions.create(model=model, prompt="The capital of France is", max_tokens=8, temperature=0)
        answer = c.choices[0].text
        assert answer.strip(), "empty completion"
        assert "Paris" in answer
        stream = client.completions.create(model=model, prompt="The capital of France is", max_tokens=8,
                                           temperature=0, stream=True)
        assert "".join(chunk.choices[0].text for chunk in stream) == answer
        chat = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=16, temperature=0)
        assert chat.choices[0].message.content.strip()
        ppl_quant = _perplexity(client, model, text)
    with openai_server(dense, launcher=("launch.py",)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none")
        ppl_dense = _perplexity(client, client.models.list().data[0].id, text)
    print(f"\nSmolLM2 perplexity: dense {ppl_dense:.3f}  flute NF4 W4G64 {ppl_quant:.3f}  answer {answer!r}")
    assert ppl_quant < 1.3 * ppl_dense
    assert ppl_quant > ppl_dense * 0.95  # quantization should not make it (much) better
