"""Where the speculator's guesses fail, on the base model's own greedy answers to a prompt file.

    .venv/bin/python scripts/speculator_diagnostics.py {chat,code,PROMPTS.jsonl} [--speculator DIR]
        [--stage2 runs/chat-s2/stage2 ...] [--trees]

`chat` and `code` are the bench's 12 chat prompts and 12 code prompts (its per-kind runs).

For every position t of each answer, the first head reads the base state h_t and the token
x_(t+1) and guesses x_(t+2). Prints:
- head-1 accuracy, split by how sure the base model itself was of x_(t+2);
- the share of answer tokens outside the draft vocabulary, as shipped and as it would be if
  chosen from the corpus, from the stage-2 rows (`--stage2` folders), or from both;
- teacher-forced tokens/step of the top-1 chain and the tree, each alone and with the
  better of it and a trigram chain (bigram fallback) counted from the corpus and the
  stage-2 rows;
- with `--trees`, fixed trees of growing size decoded for real: tokens/step, and speed
  against plain decoding through the same loop (timed here, so run it on an idle machine).
"""

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mlpspec import load_base, load_speculator
from mlpspec.base import base_outputs, cache_dir
from mlpspec.bench import named_prompts
from mlpspec.data import load_generations, split_heldout, tokenized_corpus
from mlpspec.generate import speculative_generate
from mlpspec.text import encode_prompt
from mlpspec.tree import NO_TOKEN, hindsight_accepted

parser = argparse.ArgumentParser()
parser.add_argument("prompts", help="chat, code, or a prompt file (.jsonl)")
parser.add_argument("--speculator", default=None, help="a speculator folder (default: the shipped one)")
parser.add_argument("--stage2", type=Path, nargs="*", default=[], help="folders of stage-2 shards (shard-*.pt)")
parser.add_argument("--new-tokens", type=int, default=64)
parser.add_argument("--trees", action="store_true", help="also decode with fixed trees of growing size")
args = parser.parse_args()

torch.set_num_threads(2)
model, tokenizer = load_base(dtype="bfloat16")
speculator = load_speculator(args.speculator, dtype=torch.bfloat16, base=model)
V, depth = speculator.config.vocab_size, speculator.config.n_predict
prompts = [encode_prompt(tokenizer, p, chat=False) for p in named_prompts(args.prompts)]

# The base model's greedy answers, and at each answer position the speculator's guesses
# with the tokens that judge them (tree.hindsight_accepted, as the decoder judges in hindsight).
answers, hits, confidence, guesses = [], [], [], []
with torch.inference_mode():
    for ids in prompts:
        out = speculative_generate(model, None, torch.tensor([ids]), max_new_tokens=args.new_tokens)
        seq = out.sequences[0, : len(ids) + int(out.stats.emitted[0])]  # T
        hidden, logits = base_outputs(model, seq[None], feature_layers=speculator.config.feature_layers)  # 1 T (1+l)d, 1 T V
        at = torch.arange(len(ids) - 1, len(seq) - 2)  # n   h_t made x_(t+1), an answer token
        state, last = hidden[0, at].unsqueeze(1), seq[at + 1].unsqueeze(1)  # n 1 (1+l)d, n 1
        chain, _ = speculator.propose(state, last, [1] * depth, 1)  # n 1 D
        tree, _ = speculator.propose(state, last)  # n k D
        hits.append(chain[:, 0, 0] == seq[at + 2])
        confidence.append(torch.softmax(logits[0, at + 1].float(), dim=-1).amax(dim=-1))  # n
        answers.append(seq[len(ids):].numpy())
        emitted = F.pad(seq, (0, depth))[(at + 2).unsqueeze(1) + torch.arange(depth)]  # n D
        known = (len(seq) - (at + 2)).clamp(max=depth)  # n
        guesses.append((seq.tolist(), at.tolist(), chain, tree, emitted, known))
hits, confidence = torch.cat(hits).float(), torch.cat(confidence)

print(f"head-1 accuracy {hits.mean():.3f} over {len(hits)} positions; by the base model's top-1 probability:")
for low, high in [(0, 0.3), (0.3, 0.5), (0.5, 0.7), (0.7, 0.9), (0.9, 1.01)]:
    band = (confidence >= low) & (confidence < high)
    print(f"  {low:.1f}-{min(high, 1):.1f}: share {band.float().mean():.2f}, head-1 accuracy {hits[band].mean():.2f}")

# Draft vocabularies: the shipped one, and the most frequent tokens of each source.
train_tokens, _ = split_heldout(tokenized_corpus(["default"], tokenizer, cache_dir() / "tokens"))
generated = [row.numpy() for row in load_generations(sorted(f for d in args.stage2 for f in d.glob("shard-*.pt")))]
counts = {"corpus": np.bincount(train_tokens, minlength=V).astype(float)}
if generated:
    counts["stage-2 rows"] = np.bincount(np.concatenate(generated), minlength=V).astype(float)
    counts["both"] = sum(c / c.sum() for c in list(counts.values()))
answer_tokens = np.concatenate(answers)


def outside(vocab: np.ndarray) -> float:
    inside = np.zeros(V, dtype=bool)
    inside[vocab] = True
    return float((~inside[answer_tokens]).mean())


print(f"answer tokens outside the shipped draft vocabulary: {outside(speculator.draft_vocab.numpy()):.1%}")
for name, c in counts.items():
    print(f"  chosen from {name}: " + ", ".join(f"{k} tokens {outside(np.argsort(-c)[:k]):.1%}" for k in (8192, 16384)))


def ngram_table(rows: list[np.ndarray], n: int) -> dict[int, int]:
    """The most frequent next token after each n-token context, keyed by the context's ids in base V."""
    keys, nexts = [], []
    for row in rows:
        row = np.asarray(row, dtype=np.int64)
        if len(row) > n:
            key = np.zeros(len(row) - n, dtype=np.int64)
            for i in range(n):
                key = key * V + row[i : len(row) - n + i]
            keys.append(key)
            nexts.append(row[n:])
    pairs, count = np.unique(np.concatenate(keys) * V + np.concatenate(nexts), return_counts=True)
    context, token = pairs // V, pairs % V
    order = np.lexsort((-count, context))  # by context, most frequent next token first
    context, token = context[order], token[order]
    first = np.r_[True, context[1:] != context[:-1]]
    return dict(zip(context[first].tolist(), token[first].tolist()))


rows = generated + [np.asarray(train_tokens)]
trigrams, bigrams = ngram_table(rows, 2), ngram_table(rows, 1)


def ngram_chain(a: int, b: int) -> list[int]:
    """The trigram table's guess of the next `depth` tokens after a, b (NO_TOKEN once it has none)."""
    guess = []
    for _ in range(depth):
        c = trigrams.get(a * V + b, bigrams.get(b, NO_TOKEN))
        if c == NO_TOKEN:
            break
        guess.append(c)
        a, b = b, c
    return guess + [NO_TOKEN] * (depth - len(guess))


scores = {"chain": [], "chain | n-gram": [], "tree": [], "tree | n-gram": []}
for seq, positions, chain, tree, emitted, known in guesses:
    ngram = torch.tensor([ngram_chain(seq[t], seq[t + 1]) for t in positions]).unsqueeze(1)  # n 1 D
    for name, candidates in [("chain", chain), ("chain | n-gram", torch.cat([chain, ngram], dim=1)),
                             ("tree", tree), ("tree | n-gram", torch.cat([tree, ngram], dim=1))]:
        scores[name].append(hindsight_accepted(candidates, emitted, known))  # n
print(f"teacher-forced tokens/step ({len(trigrams)} trigram contexts): "
      + ", ".join(f"{name} {1 + torch.cat(v).float().mean():.3f}" for name, v in scores.items()))

if args.trees:
    shapes = [None, ([1] * depth, 1), (None, None), ([8, 4, 2, 2], 16), ([8, 6, 4, 3], 32), ([12, 8, 6, 4], 64)]
    totals = {}
    with torch.inference_mode():
        for ids in prompts:
            for shape in shapes:
                kw = {} if shape is None else dict(top_k_tokens_per_head=shape[0], n_candidates=shape[1])
                tick = time.perf_counter()
                out = speculative_generate(model, None if shape is None else speculator, torch.tensor([ids]),
                                           max_new_tokens=args.new_tokens, **kw)
                total = totals.setdefault(str(shape), [0, 0, 0.0])
                total[0] += int(out.stats.emitted.sum())
                total[1] += out.stats.row_steps
                total[2] += time.perf_counter() - tick
    plain = totals["None"][0] / totals["None"][2]
    for name, (tokens, steps, seconds) in totals.items():
        label = "plain" if name == "None" else "configured tree" if name == "(None, None)" else name
        print(f"  {label}: {tokens / steps:.3f} tokens/step, {tokens / seconds / plain:.2f}x plain decoding")
