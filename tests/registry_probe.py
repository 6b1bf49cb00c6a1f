"""Run by the launcher tests as the "module": reports whether flute is registered with vLLM (without
loading vLLM's plugins itself) and which arguments it was given."""
import json
import sys

from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS

if __name__ == "__main__":
    print(json.dumps({"flute": "flute" in QUANTIZATION_METHODS, "argv": sys.argv[1:]}))
