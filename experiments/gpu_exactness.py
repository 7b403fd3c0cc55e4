"""Greedy decoding on a GPU is lossless: every way of decoding emits HF `generate`'s tokens.

    python experiments/gpu_exactness.py [--device cuda] [--out DIR]

CI and this project's machine have no GPU, so the tests check exactness on the CPU only.
This runs the same comparison on a lent GPU, in float32 with TF32 off: a Llama-3.2-1B-shaped
model with random weights, ragged prompts at batch 1 and 4, and our loop plain, with the
fixed tree, with the lookup branch, and adaptive. The speculator has random weights too,
so it rarely guesses right; random models fall into loops, which the lookup branch then
copies many tokens at a time, so multi-token acceptance and the cache's bookkeeping are
exercised too. Prints each row's first divergence, if any, with the logit gap there
(equality.find_divergences, as the bench reports them), and writes DIR/exactness.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from gpu_verify_cost import llama_1b_config, speculator_for


def main() -> None:
    from transformers import LlamaForCausalLM

    from mlpspec.generate import speculative_generate
    from mlpspec.equality import find_divergences

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model: checks the script on a CPU")
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device(args.device)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    with device:
        model = LlamaForCausalLM(llama_1b_config(args.tiny)).float().eval()
    speculator = speculator_for(model)
    V = model.config.vocab_size
    methods = {
        "ours_plain": (None, {}),
        "ours_tree": (speculator, {}),
        "ours_lookup": (None, {"lookup": 10}),
        "ours_tree_lookup": (speculator, {"lookup": 10}),
        "ours_adaptive": (speculator, {"lookup": 10, "adaptive": True}),
    }
    report, failures = {}, 0
    with torch.inference_mode():
        for b, lengths in ((1, [37]), (4, [37, 5, 120, 64])):
            P = max(lengths)
            ids = torch.randint(1, V, (b, P), generator=gen)
            mask = torch.zeros(b, P, dtype=torch.long)
            for row, n in enumerate(lengths):  # left padding, as HF expects for decoder-only models
                mask[row, P - n:] = 1
            ids = ids.masked_fill(mask == 0, 0).to(device)
            mask = mask.to(device)
            expected = model.generate(ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                                      min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
            for method, (spec, kwargs) in methods.items():
                out = speculative_generate(model, spec, ids, mask, max_new_tokens=args.new_tokens, **kwargs)
                found = find_divergences(model, ids, mask, out.sequences, expected)
                equal = not found and out.sequences.shape == expected.shape  # find_divergences allows a prefix
                entry = {"tokens_per_step": round(out.stats.tokens_per_step, 3), "equal": equal,
                         "divergences": [d.__dict__ for d in found]}
                failures += not equal
                report[f"{method}@b{b}"] = entry
                print(f"b={b} {method:18s} {'equal' if equal else f'DIFFERS: {found[:1] or list(out.sequences.shape)}'}"
                      f"  ({entry['tokens_per_step']:.2f} tokens/step)", flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "exactness.json").write_text(json.dumps(report, indent=1))
    print(f"{failures} of {len(report)} runs differ from HF generate")


if __name__ == "__main__":
    main()
