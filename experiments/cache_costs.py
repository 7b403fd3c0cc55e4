"""What the engine's slotted KV cache costs, against what a paged one would, and what a
newcomer's prefill costs alone (issue 26's "slotted or paged, alone or chunked: measure").

    .venv/bin/python experiments/cache_costs.py [--dtype float32]

On the embedded default (SmolLM2-135M: 30 layers, 3 key/value heads of 64), batch 16:
- slotted (cache.RowCache): a request that leaves costs one copy of the batch's last row
  into its row (`move_row`, its used slots in every layer); joining writes its own row;
- paged, on transformers' attention (no paged kernel on CPU): every step gathers each live
  row's pages into one contiguous tensor per layer before attention, as a block-table
  cache without its own kernel must;
- a decode step of 16 rows (plain, one token each), for scale;
- a newcomer's prompt alone (its prefill pass), against the pass over one token: the fixed
  cost a chunked prefill (its prompt riding in a decode pass) would save per join.
Prints milliseconds, the median of several runs.
"""

import argparse
import statistics
import time

import torch

from mlpspec import load_base, run_base
from mlpspec.cache import RowCache, TreeCache

parser = argparse.ArgumentParser()
parser.add_argument("--dtype", default="float32")
parser.add_argument("--rows", type=int, default=16)
args = parser.parse_args()
model, _ = load_base(dtype=args.dtype)
text = model.config.get_text_config()
layers, kv_heads = text.num_hidden_layers, text.num_key_value_heads
head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
dtype, b = model.dtype, args.rows


def ms(fn, repeats=7) -> float:
    fn()
    times = []
    for _ in range(repeats):
        tick = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tick)
    return round(1000 * statistics.median(times), 2)


for context in (256, 1024):
    cache = RowCache(layers, context + 64, b)
    like = TreeCache(layers, context)
    for layer in like.layers:
        layer.keys = torch.randn(1, kv_heads, context, head_dim, dtype=dtype)
        layer.values = torch.randn(1, kv_heads, context, head_dim, dtype=dtype)
    cache.allocate_like(like)
    cache.set_rows(b)
    cache.set_length(context)
    move = ms(lambda: cache.move_row(b - 1, 3))
    write = ms(lambda: cache.write_row(5, 0, like, 0, 0, context))
    # paged: a pool of 16-slot pages, each row's pages scattered; gather them for every layer
    page = 16
    pages = b * context // page
    pool_k = torch.randn(pages, kv_heads, page, head_dim, dtype=dtype)
    pool_v = torch.randn_like(pool_k)
    table = torch.randperm(pages).view(b, context // page)

    def gather():
        for _ in range(layers):
            for pool in (pool_k, pool_v):
                pool[table].permute(0, 2, 1, 3, 4).reshape(b, kv_heads, context, head_dim)

    paged = ms(gather)
    ids = torch.randint(100, 1000, (b, 1))
    mask = torch.ones(b, context + 1, dtype=torch.long)
    past = RowCache(layers, context + 8, b)
    past.allocate_like(like)
    past.set_rows(b)

    def step():
        past.set_length(context)
        run_base(model, ids, attention_mask=mask, position_ids=torch.full((b, 1), context), cache=past)

    decode = ms(step, repeats=5)
    print(f"context {context}, batch {b}, {args.dtype}: slotted: a leave's row move {move} ms, a join's row write "
          f"{write} ms; paged: gathering every row's pages {paged} ms a step; a plain decode step {decode} ms")

for prompt in (50, 200):
    ids = torch.randint(100, 1000, (1, prompt))
    alone = ms(lambda: run_base(model, ids, cache=TreeCache(layers, prompt + 1), last_logits_only=True), repeats=5)
    one = ms(lambda: run_base(model, ids[:, :1], cache=TreeCache(layers, 2), last_logits_only=True), repeats=5)
    print(f"prefill alone: {prompt} tokens {alone} ms; a pass over 1 token {one} ms (what chunking would save per join)")
