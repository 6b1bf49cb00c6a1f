#!/usr/bin/env bash
# Install into ./.venv (if missing) and run the whole test suite (GPU tests skip without CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pytest -q -rs tests "$@"
