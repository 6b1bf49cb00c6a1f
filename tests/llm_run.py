"""``python tests/llm_run.py MODEL_DIR TP``: load MODEL_DIR with vllm.LLM (flute plugin via its
entry point), print the greedy token ids of two prompts as JSON on the last line."""
import json
import sys


def main():
    from vllm import LLM, SamplingParams

    llm = LLM(model=sys.argv[1], tensor_parallel_size=int(sys.argv[2]), enforce_eager=True,
              max_model_len=256, dtype="float32", quantization="flute")
    # float32 activations: TP=2 adds partial sums in a different order than TP=1; in bf16 that
    # rounding alone can flip a greedy choice, in float32 it cannot (at these logit margins).
    outs = llm.generate(["Hello, my name is", "The capital of France is"],
                        SamplingParams(max_tokens=8, temperature=0))
    print(json.dumps([list(o.outputs[0].token_ids) for o in outs]))


if __name__ == "__main__":
    main()
