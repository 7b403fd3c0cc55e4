#!/usr/bin/env bash
# Installs the llama.cpp backend's package (scripts/install_llama_cpp.sh: a build of about
# 4-13 minutes, once) and runs its tests, which the default test run skips without it.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_llama_cpp.sh
exec .venv/bin/python -m pytest tests/test_llama_cpp.py "$@"
