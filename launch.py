"""``python launch.py <module> [args]``: register the flute vLLM plugin, then run the module.

Example: ``python launch.py vllm.entrypoints.openai.api_server --model DIR --quantization flute``
"""
import sys

from flute_vllm.cli import run_module

if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    run_module(sys.argv[1], sys.argv[2:])
