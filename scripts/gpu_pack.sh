#!/bin/bash
# Pack what scripts/gpu_train.py needs on a lent GPU into two folders that git ignores, each
# small enough to travel beside the working tree in one device call (64 MiB a call):
#   .gpu-a/  the first half of the embedded default's GGUF file (xz), the gguf wheel, PROMPTS
#   .gpu-b/  the second half
# Usage: bash scripts/gpu_pack.sh PROMPTS.jsonl
# Then, at once one after the other (the machine stays warm 30 s), the two calls in
# gpu_train.py's docstring: the first carries .gpu-a and copies it to /tmp/stash, the second
# carries .gpu-b and runs the script.
set -euo pipefail
cd "$(dirname "$0")/.."
prompts=${1:?usage: bash scripts/gpu_pack.sh PROMPTS.jsonl}
gguf=$(.venv/bin/python -c "from mlpspec.base import default_gguf_file; print(default_gguf_file())")
for folder in .gpu-a .gpu-b; do
  grep -qx "/$folder/" .git/info/exclude 2>/dev/null || echo "/$folder/" >> .git/info/exclude
  rm -rf "$folder" && mkdir "$folder"
done
xz -9e -T2 -c "$gguf" > .gpu-a/gguf.xz  # 94 MiB -> 86 MiB, about a minute
half=$(( $(stat -c %s .gpu-a/gguf.xz) / 2 ))
tail -c +$(( half + 1 )) .gpu-a/gguf.xz > .gpu-b/gguf.xz.part-b
head -c "$half" .gpu-a/gguf.xz > .gpu-a/gguf.xz.part-a && rm .gpu-a/gguf.xz
version=$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('gguf'))")
.venv/bin/python -m pip download -q --no-deps --only-binary=:all: -d .gpu-a "gguf==$version"
cp "$prompts" .gpu-a/
du -sh .gpu-a .gpu-b
