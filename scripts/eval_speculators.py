"""Score speculators on one held-out set, larger than a training run's own eval: the
base model's greedy answers to prompts cut from the held-out slice of `--data default`
(the same slice every training run holds out), scoring only the tokens it wrote. With
`--prompts chat` or `--prompts code` (the bench's per-kind prompt sets) or a prompt file,
the answers are to those prompts instead.

    .venv/bin/python scripts/eval_speculators.py runs/a runs/b/checkpoints/step-800 --rows 24
    .venv/bin/python scripts/eval_speculators.py runs/a runs/b --prompts chat
"""

import argparse
from pathlib import Path

import torch

from mlpspec import load_base, load_speculator
from mlpspec.base import cache_dir
from mlpspec.bench import named_prompts
from mlpspec.data import generate_shards, generated_positions, load_generations, pad_windows, split_heldout, tokenized_corpus
from mlpspec.train import SpeculatorObjective, evaluate

parser = argparse.ArgumentParser()
parser.add_argument("speculators", nargs="+", type=Path)
parser.add_argument("--rows", type=int, default=24)
parser.add_argument("--new-tokens", type=int, default=64)
parser.add_argument("--prompts", help="chat, code (the bench's 12 of each) or a prompt file; default: held-out corpus cuts")
parser.add_argument("--cache", type=Path, default=Path("runs/eval-set"), help="where the eval rows are kept")
args = parser.parse_args()

model, tokenizer = load_base(dtype="bfloat16")
if args.prompts:
    prompts = named_prompts(args.prompts)
    folder = args.cache / f"{Path(args.prompts).stem}-{len(prompts)}"
    files = generate_shards(model, tokenizer, None, folder, [0], len(prompts), new_tokens=args.new_tokens,
                            temperature=0.0, prompts=prompts)  # messages get the chat template
else:
    _, heldout = split_heldout(tokenized_corpus(["default"], tokenizer, cache_dir() / "tokens"))
    files = generate_shards(model, tokenizer, heldout, args.cache / f"rows-{args.rows}", [0], args.rows, 64,
                            args.new_tokens, temperature=0.0, chat=True, seed=1)
rows = load_generations(files)
for path in args.speculators:
    speculator = load_speculator(path, dtype=torch.float32, base=model)
    h = speculator.config.n_predict
    n = max(len(r) for r in rows) - h - 1
    windows, valid = pad_windows(rows, n + h + 1, tokenizer.pad_token_id or 0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = evaluate(model, SpeculatorObjective(speculator), windows, valid,
                          generated_positions(files, n + h + 1), n, h)
    print(f"{path}: tokens/step {result['tokens_per_step']:.3f}, head accuracy {result['accuracy']}, "
          f"chain {result['chain_acceptance']}")
