"""How far does transformers disagree with itself in bfloat16? The same text scored all at
once and one token at a time (through its KV cache): each position's top-5 logits compared,
the difference in units in the last place (ulps) of the larger logit. This sets the near-tie
tolerance of mlpspec.equality.

    .venv/bin/python experiments/bf16_self_agreement.py

Prints one JSON line: positions, the largest and median difference in ulps, and how many
positions' greedy choice differs between the two, with the gap between the two choices at
each.
"""

import argparse
import inspect
import json
import statistics

import torch
from transformers import DynamicCache

from mlpspec import load_base
from mlpspec.equality import ulp
from mlpspec.hardware import describe_machine


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=256, help="positions of standard-library text scored")
    args = parser.parse_args()
    model, tokenizer = load_base(None, dtype="bfloat16")
    ids = tokenizer(inspect.getsource(json), return_tensors="pt").input_ids[:, : args.tokens]  # 1 n
    at_once = model(input_ids=ids).logits[0]  # n V
    cache = DynamicCache(config=model.config)
    one_by_one = torch.cat([model(input_ids=ids[:, i : i + 1], cache=cache, use_cache=True).logits[0]
                            for i in range(ids.size(1))])  # n V
    differences = []
    for position in range(ids.size(1)):
        for token in at_once[position].topk(5).indices.tolist():
            a, b = float(at_once[position, token]), float(one_by_one[position, token])
            differences.append(abs(a - b) / ulp(max(abs(a), abs(b)), torch.bfloat16))
    flips = (at_once.argmax(-1) != one_by_one.argmax(-1)).nonzero().flatten().tolist()
    flip_gaps = []  # at each flip, the all-at-once gap between the two choices, in ulps
    for position in flips:
        a, b = at_once[position, at_once[position].argmax()], at_once[position, one_by_one[position].argmax()]
        flip_gaps.append(round(float(a - b) / ulp(float(a), torch.bfloat16), 2))
    print(json.dumps({"machine": describe_machine(), "dtype": "bfloat16", "positions": ids.size(1),
                      "max_ulps": round(max(differences), 2), "median_ulps": round(statistics.median(differences), 2),
                      "greedy_flips": len(flips), "flip_gaps_ulps": flip_gaps}))


if __name__ == "__main__":
    main()
