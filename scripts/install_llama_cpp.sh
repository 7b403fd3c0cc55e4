#!/usr/bin/env bash
# Installs the llama.cpp backend's package, llama-cpp-python, into .venv, compiled from its
# source for this CPU (PyPI has no CPU wheels of it): about 10-13 minutes on 2 cores, once.
# Idempotent. MLPSPEC_LLAMA_CPU picks the instructions it is built for (default: avx512
# where this CPU has AVX512BW, else avx2):
#   avx2    AVX2 and FMA: runs on any x86-64 CPU of the last decade
#   avx512  AVX2 and AVX512 (F, BW, VL, VBMI, VNNI, BF16 where the CPU has them), no AMX
#   native  -march=native. On a CPU with AMX, ggml then multiplies with AMX tiles, which a
#           virtual machine that does not grant them to the process kills with SIGILL (seen
#           on a 2-core Intel Xeon VM, 2026-12-06): hence avx512 by default
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VERSION=${MLPSPEC_LLAMA_CPP_VERSION:-0.3.36}
if [ -z "${MLPSPEC_LLAMA_CPU:-}" ] && \
    .venv/bin/python -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$VERSION')" 2>/dev/null; then
    exit 0  # (naming MLPSPEC_LLAMA_CPU builds again)
fi
has() { grep -qw "$1" /proc/cpuinfo; }
default=avx2
has avx512bw && has avx512vl && default=avx512
AVX2="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
case "${MLPSPEC_LLAMA_CPU:-$default}" in
    native) CPU="-DGGML_NATIVE=ON" ;;
    avx2) CPU="$AVX2 -DGGML_AVX512=OFF" ;;
    avx512)
        CPU="$AVX2 -DGGML_AVX512=ON"
        has avx512vbmi && CPU="$CPU -DGGML_AVX512_VBMI=ON"
        has avx512_vnni && CPU="$CPU -DGGML_AVX512_VNNI=ON"
        has avx512_bf16 && CPU="$CPU -DGGML_AVX512_BF16=ON"
        ;;
    *) echo "MLPSPEC_LLAMA_CPU must be avx2, avx512 or native, not ${MLPSPEC_LLAMA_CPU}" >&2; exit 2 ;;
esac
# (a build with every CPU variant, GGML_CPU_ALL_VARIANTS with GGML_BACKEND_DL, leaves its CPU
# backends out of the wheel, and loading a model then fails: "no backends are loaded")
# GGML_LLAMAFILE=OFF: llamafile's matrix kernels take passes of several tokens and compute
# them otherwise than a one-token pass (the shipped Q4_1 file's logits moved by up to 0.71),
# so a tree's verification would not be llama.cpp's own greedy decoding. MLPSPEC_LLAMAFILE=ON
# trades that for speed on F16 and F32 files, whose passes then read the weights once for
# all their tokens (docs/experiments/llama-cpp-backend.md)
export CMAKE_ARGS="$CPU -DGGML_LLAMAFILE=${MLPSPEC_LLAMAFILE:-OFF} -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF"
export CMAKE_BUILD_PARALLEL_LEVEL=$(nproc)
echo "building llama-cpp-python $VERSION ($CMAKE_ARGS): about 10 minutes on 2 cores"
pip() {
    .venv/bin/python -m pip --disable-pip-version-check -q "$@" 2>&1 \
        | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}
pip install "diskcache>=5.6.1" "jinja2>=2.11.3" "typing-extensions>=4.5"  # its own requirements
# --no-cache-dir: pip would otherwise reuse a wheel it built earlier with other flags
pip install --force-reinstall --no-deps --no-cache-dir --no-binary llama-cpp-python "llama-cpp-python==$VERSION"
.venv/bin/python -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"
