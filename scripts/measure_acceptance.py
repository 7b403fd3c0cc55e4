"""Tokens per step and speed of a speculator against plain decoding, batch 1, greedy, on
prompts that no training data contains: code from installed third-party packages, and
chat prompts written for mlpspec. Used for the default speculator's model card.

    .venv/bin/python scripts/measure_acceptance.py [--speculator DIR] [--dtype bfloat16] [--max-new-tokens 64]
"""

import argparse

import torch

from mlpspec import load_base, load_speculator
from mlpspec.bench import chat_prompts, code_prompts, compare

parser = argparse.ArgumentParser()
parser.add_argument("--speculator", default=None, help="folder (default: the shipped default speculator)")
parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
parser.add_argument("--max-new-tokens", type=int, default=64)
parser.add_argument("--prompts", type=int, default=12)
args = parser.parse_args()

model, tokenizer = load_base(dtype=args.dtype)
speculator = load_speculator(args.speculator, dtype=model.dtype, base=model)
print(f"{'prompts':<8} {'tokens/step':>11} {'spec tok/s':>10} {'plain tok/s':>11} {'speedup':>7}  per-head acceptance")
for name, prompts, chat in (("code", code_prompts(args.prompts), False), ("chat", chat_prompts()[: args.prompts], True)):
    result = compare(model, tokenizer, speculator, prompts, chat=chat, max_new_tokens=args.max_new_tokens)
    lengths = torch.tensor(result.accepted_lengths)
    heads = " ".join(f"{float((lengths > j).float().mean()):.2f}" for j in range(speculator.config.n_predict))
    print(f"{name:<8} {result.tokens_per_step:>11.2f} {result.tokens / result.speculative_seconds:>10.1f} "
          f"{result.tokens / result.plain_seconds:>11.1f} {result.speedup:>7.2f}  {heads}")
