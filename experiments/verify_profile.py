"""Where a verify pass of q tree nodes spends its time, on this machine.

    .venv/bin/python experiments/verify_profile.py --dtype float32 --dtype bfloat16 --out runs/profile
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 .venv/bin/python experiments/verify_profile.py ...

For each dtype: the base forward (decode.verify on the decoder's own cache after a
150-token context, rolled back after each pass: what the adaptive policy calibrates) over
q = 1, 2, 4, 8, 16, 32 new tokens (flat trees: the root and q - 1 children; the LM head
over the nodes the walk reads first where the model allows, as decoding does), min of
--repeats, then torch.profiler's table of the q = 1 and q = 16 passes grouped by operator. Writes DIR/profile.json (the machine, the
timings) and DIR/<dtype>-q<q>.txt (the tables).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from mlpspec.base import load_base
from mlpspec.hardware import describe_machine
from mlpspec.kernels import KERNELS
from mlpspec.decode import prefill, verify
from mlpspec.tree import flat_tree


def time_passes(model, context: int, sizes: list[int], repeats: int, profile_sizes: list[int], out: Path, name: str):
    torch.manual_seed(0)
    ids = torch.randint(100, 20000, (1, context))
    state = prefill(model, ids, torch.ones_like(ids, dtype=torch.bool), context + 64, lambda logits, depth: logits.argmax(dim=-1),
                    64, 0)
    L = state.cache.length
    nothing = torch.empty(1, 0, dtype=torch.long)

    def one(q: int) -> float:
        tree = flat_tree(state.pending, q)
        tick = time.perf_counter()
        verify(model, state, tree)
        seconds = time.perf_counter() - tick
        state.cache.keep(L, nothing)
        return seconds

    for q in sizes:  # warm-up: first calls allocate
        one(q)
    seconds = {q: [] for q in sizes}
    for _ in range(repeats):  # round-robin, so that a slow spell of the machine hits every size
        for q in sizes:
            seconds[q].append(one(q))
    ms = {q: 1000 * min(s) for q, s in seconds.items()}
    for q in profile_sizes:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                one(q)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
        (out / f"{name}-q{q}.txt").write_text(table)
    return ms


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", action="append", default=None)
    parser.add_argument("--context", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--sizes", default="1,2,4,8,16,32")
    parser.add_argument("--profile", default="1,16", help="tree sizes to profile by operator ('' for none)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--flush-denormal", action="store_true")
    parser.add_argument("--kernels", choices=KERNELS, default="auto")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_flush_denormal(args.flush_denormal)
    sizes = [int(s) for s in args.sizes.split(",")]
    profile = [int(s) for s in args.profile.split(",") if s]
    env = {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
           if k in os.environ}
    results = {"kernels": args.kernels, "machine": describe_machine("cpu"), "env": env, "context": args.context, "ms": {}}
    for dtype in args.dtype or ["float32", "bfloat16"]:
        model, _ = load_base(None, dtype=dtype, kernels=args.kernels)
        ms = time_passes(model, args.context, sizes, args.repeats, profile, args.out, dtype)
        results["ms"][dtype] = ms
        print(dtype, " ".join(f"q={q}: {v:.1f}" for q, v in ms.items()), flush=True)
    (args.out / "profile.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
