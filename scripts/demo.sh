#!/usr/bin/env bash
# The main job on a fresh CPU machine: install, make the bundled SmolLM2-135M-Instruct dense,
# quantize it NF4 W4G64, serve it with vLLM's OpenAI server (--quantization flute), ask it once.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
CACHE=${FLUTE_VLLM_CACHE:-$HOME/.cache/flute_vllm}
DENSE=$CACHE/smollm2-dense
QUANT=$CACHE/smollm2-nf4-w4g64
PORT=${PORT:-8000}
.venv/bin/python -m flute_vllm smollm2 "$DENSE"
.venv/bin/python -m flute_vllm quantize "$DENSE" "$QUANT" --num-bits 4 --group-size 64 --table nf

VLLM_CPU_KVCACHE_SPACE=1 .venv/bin/python -m flute_vllm vllm.entrypoints.openai.api_server \
  --model "$QUANT" --served-model-name smollm2-flute --quantization flute \
  --port "$PORT" --enforce-eager --max-model-len 2048 > "$CACHE/demo-server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
echo "waiting for the server (log: $CACHE/demo-server.log) ..."
for _ in $(seq 600); do
  curl -sf "localhost:$PORT/health" >/dev/null && break
  kill -0 $SERVER 2>/dev/null || { tail -50 "$CACHE/demo-server.log"; exit 1; }
  sleep 1
done
curl -s "localhost:$PORT/v1/completions" -H 'Content-Type: application/json' \
  -d '{"model": "smollm2-flute", "prompt": "The capital of France is", "max_tokens": 16, "temperature": 0}' \
  | tee "$CACHE/demo-answer.json" | .venv/bin/python -c 'import json,sys; print("completion:", repr(json.load(sys.stdin)["choices"][0]["text"]))'
