"""Batch-1 speed of the main job (`mlpspec generate`: adaptive, lookup 10, the shipped
default speculator on the embedded default) for whichever mlpspec is on the path, as JSON
lines, one per prompt: run it for two checkouts in turn to compare them on one machine.

    PYTHONPATH=OLD/src python experiments/generate_ab.py --dtype float32 --tag old
    python experiments/generate_ab.py --dtype float32 --tag new
"""

import argparse
import json
import time

from mlpspec import load_base, load_speculator
from mlpspec.decode import DEFAULT_LOOKUP, remembered_policy
from mlpspec.text import encode_prompts

try:
    from mlpspec.generate import speculative_generate
except ImportError:  # a checkout from before the engine ran generate
    from mlpspec.decode import speculative_generate

PROMPTS = [
    "Write a Python function that checks whether a number is prime.",
    "Write a Python class for a stack with push, pop and peek, with docstrings.",
    "Explain in a few sentences why the sky is blue.",
    "Give three tips for writing clear emails at work.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--tag", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    args = parser.parse_args()
    model, tokenizer = load_base(None, dtype=args.dtype)
    speculator = load_speculator(dtype=model.dtype, base=model)
    policy, _ = remembered_policy(model, speculator, DEFAULT_LOOKUP)
    ids, mask = encode_prompts(tokenizer, ["Hello"], chat=True)  # warm-up: the calibration, if none is kept
    speculative_generate(model, speculator, ids, mask, max_new_tokens=8, adaptive=policy, lookup=DEFAULT_LOOKUP)
    for prompt in PROMPTS:
        ids, mask = encode_prompts(tokenizer, [prompt], chat=True)
        tick = time.perf_counter()
        out = speculative_generate(model, speculator, ids, mask, max_new_tokens=args.max_new_tokens, adaptive=policy,
                                   lookup=DEFAULT_LOOKUP)
        seconds = time.perf_counter() - tick
        tokens = int(out.stats.emitted.sum())
        print(json.dumps({"tag": args.tag, "dtype": args.dtype, "prompt": prompt[:30], "tokens": tokens,
                          "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 2),
                          "text": out.sequences[0, ids.size(1):].tolist()[:8]}), flush=True)


if __name__ == "__main__":
    main()
