"""Give a trained speculator a new draft vocabulary, chosen from the corpus and stage-2 rows
together, for a run to continue from (`mlpspec train --init-from OUT`).

    .venv/bin/python scripts/redraft_vocab.py src/mlpspec/default_speculator runs/revocab \
        --stage2 runs/py-s2/stage2

The heads score the K most frequent tokens of a draft vocabulary that training fixed from
the corpus alone (Python source and docs). Chat answers fence code in "```" and say
"concept" and "CSV", which that corpus rarely writes: 6.8% of the bench's chat answer tokens
lie outside it (scripts/speculator_diagnostics.py). Here the counts of the corpus and of the
stage-2 rows are each normalised to sum to one and added, and the K most frequent tokens of
that mix become the new draft vocabulary.

A token kept keeps its trained head row; a new one starts from its base LM head row mapped
into the trained rows' geometry (MLPSpeculator.change_draft_vocab). On the seventh default
the trained rows have drifted far from the base rows (cosine 0.17), but the least-squares
linear map from base rows to trained rows recovers them at cosine 0.97.
"""

import argparse
from pathlib import Path

import numpy as np
import torch

from mlpspec import load_base
from mlpspec.base import cache_dir
from mlpspec.data import load_generations, split_heldout, tokenized_corpus
from mlpspec.model import MLPSpeculator

parser = argparse.ArgumentParser()
parser.add_argument("speculator", help="a trained speculator folder with a draft vocabulary")
parser.add_argument("out", type=Path, help="where the re-vocabularied speculator goes")
parser.add_argument("--stage2", type=Path, nargs="+", required=True, help="folders of stage-2 shards (shard-*.pt)")
args = parser.parse_args()

model, tokenizer = load_base(dtype="bfloat16")
speculator = MLPSpeculator.from_pretrained(args.speculator, dtype=torch.float32, base=model)
cfg = speculator.config
if not cfg.draft_vocab_size:
    raise SystemExit(f"{args.speculator} scores the whole vocabulary; there is no draft vocabulary to choose")
K, V = cfg.draft_vocab_size, cfg.vocab_size

train_tokens, _ = split_heldout(tokenized_corpus(["default"], tokenizer, cache_dir() / "tokens"))
rows = load_generations(sorted(f for d in args.stage2 for f in d.glob("shard-*.pt")))
if not rows:
    raise SystemExit(f"no shard-*.pt files under {', '.join(map(str, args.stage2))}")
mix = sum(c / c.sum() for c in (np.bincount(train_tokens, minlength=V).astype(float),
                                 np.bincount(torch.cat(rows).numpy(), minlength=V).astype(float)))
new_vocab = torch.from_numpy(np.argsort(-mix, kind="stable")[:K].copy()).sort().values  # K, in id order

new_tokens = speculator.change_draft_vocab(new_vocab, model)
speculator.save_pretrained(args.out)
print(f"{new_tokens} of {K} draft tokens are new (their rows mapped from the base LM head); saved to {args.out}")
