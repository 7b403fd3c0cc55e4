#!/usr/bin/env bash
# Installs the llama.cpp backend's package, llama-cpp-python, into .venv, compiled from its
# source for this CPU (PyPI has no CPU wheels of it): about 4-13 minutes on 2 cores, once.
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
# done already where this version is installed and batch invariant (see below); naming
# MLPSPEC_LLAMA_CPU or MLPSPEC_LLAMAFILE builds again
if [ -z "${MLPSPEC_LLAMA_CPU:-}${MLPSPEC_LLAMAFILE:-}" ] && .venv/bin/python -W ignore -c "
import sys, llama_cpp
from mlpspec.base import default_gguf_file
from mlpspec.llama_cpp import LlamaCppRunner
sys.exit(llama_cpp.__version__ != '$VERSION' or not LlamaCppRunner(default_gguf_file()).batch_invariant())" 2>/dev/null; then
    exit 0
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
# MLPSPEC_LLAMAFILE picks the matrix kernels:
#   invariant  (default) llamafile's kernels for every pass, a one-token pass included:
#              llama.cpp keeps them off one-token passes (one guard in ggml's sgemm.cpp,
#              removed here), and since they sum each product in the same order whatever
#              the pass's width, a pass of many tokens then computes each bit for bit as a
#              pass of one does. A tree's verification is then exactly llama.cpp's own
#              greedy decoding, and an F32 or F16 pass reads the weights once for all its
#              tokens. The runner checks this on load (LlamaCppRunner.batch_invariant).
#   on         llama.cpp as it ships: llamafile's kernels for passes of two or more tokens,
#              ggml's for one; fast, but a tree scores near ties otherwise than llama.cpp's
#              greedy decoding (logits moved by up to 0.71 on the shipped Q4_1 file)
#   off        ggml's kernels only: exact too, but each token of a pass costs about what a
#              one-token pass does on F16 and Q4_1 files, so trees rarely pay
# (docs/experiments/llama-cpp-backend.md)
KERNELS=${MLPSPEC_LLAMAFILE:-invariant}
case "$KERNELS" in
    invariant|on) LLAMAFILE=ON ;;
    off) LLAMAFILE=OFF ;;
    *) echo "MLPSPEC_LLAMAFILE must be invariant, on or off, not $KERNELS" >&2; exit 2 ;;
esac
export CMAKE_ARGS="$CPU -DGGML_LLAMAFILE=$LLAMAFILE -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF"
export CMAKE_BUILD_PARALLEL_LEVEL=$(nproc)
echo "building llama-cpp-python $VERSION, $KERNELS kernels ($CMAKE_ARGS): about 6-13 minutes on 2 cores"
pip() {
    .venv/bin/python -m pip --disable-pip-version-check -q "$@" 2>&1 \
        | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}
pip install "diskcache>=5.6.1" "jinja2>=2.11.3" "typing-extensions>=4.5"  # its own requirements
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
pip download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$work"
tar -xzf "$work"/llama_cpp_python-*.tar.gz -C "$work"
source_dir=$(echo "$work"/llama_cpp_python-*/)
if [ "$KERNELS" = invariant ]; then
    .venv/bin/python - "$source_dir/vendor/llama.cpp/ggml/src/ggml-cpu/llamafile/sgemm.cpp" <<'PATCH'
import sys
path = sys.argv[1]
text = open(path).read()
guard = """    // only enable sgemm for prompt processing
#if !defined(__MMA__)
    if (n < 2)
        return false;
#endif
"""
if text.count(guard) != 1:
    sys.exit(f"{path}: the one-token guard is not where this script expects it (another llama.cpp version?)")
open(path, "w").write(text.replace(guard, ""))
PATCH
fi
# --no-cache-dir: pip would otherwise reuse a wheel it built earlier with other flags
pip install --force-reinstall --no-deps --no-cache-dir "$source_dir"
.venv/bin/python -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"
