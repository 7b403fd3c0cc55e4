"""Speculation on against off on the engine itself, in rounds that take turns, so that a
slow spell of a shared machine falls on both alike: each round sends the same requests
(code and chat prompts taking turns, greedy) through an engine with the shipped default
speculator (adaptive) and through one without, with at most --max-batch running at once.

    .venv/bin/python experiments/engine_ab.py [--dtype float32] [--max-batch 16] [--requests 48] [--rounds 4]

Prints each round's tokens/s for both and their ratio, then the median ratio.
"""

import argparse
import statistics
import time

from mlpspec import load_base, load_speculator
from mlpspec.engine import Engine
from mlpspec.sequence import SamplingParams
from mlpspec.serving_bench import serving_prompts

parser = argparse.ArgumentParser()
parser.add_argument("--dtype", default="float32")
parser.add_argument("--max-batch", type=int, default=16)
parser.add_argument("--requests", type=int, default=48)
parser.add_argument("--max-tokens", type=int, default=48)
parser.add_argument("--rounds", type=int, default=4)
parser.add_argument("--lookup", type=int, default=0)
args = parser.parse_args()

model, tokenizer = load_base(dtype=args.dtype)
speculator = load_speculator(dtype=model.dtype, base=model)
asks = serving_prompts(tokenizer)
engines = {"on": Engine(model, speculator, max_batch=args.max_batch, adaptive=True, lookup=args.lookup),
           "off": Engine(model, None, max_batch=args.max_batch)}


def run(engine: Engine, n: int, max_tokens: int) -> float:
    """Tokens per second for n requests, all queued at once."""
    for i in range(n):
        engine.add_request(asks[i % len(asks)], SamplingParams(max_tokens=max_tokens))
    tokens, tick = 0, time.perf_counter()
    while engine.has_unfinished():
        tokens += sum(len(out.new_ids) for out in engine.step())
    return tokens / (time.perf_counter() - tick)


engines["on"].warm_up(asks[0])  # every batch-size bucket calibrated before anything is timed, as serve does
ratios = []
for r in range(args.rounds):
    order = ("on", "off") if r % 2 == 0 else ("off", "on")
    speed = {name: run(engines[name], args.requests, args.max_tokens) for name in order}
    ratios.append(speed["on"] / speed["off"])
    shapes = engines["on"].stats.shapes
    print(f"round {r}: on {speed['on']:.1f} tok/s, off {speed['off']:.1f}, on/off {ratios[-1]:.3f}; "
          f"speculative steps so far {sum(v for k, v in shapes.items() if k != 'plain')} of {sum(shapes.values())}",
          flush=True)
print(f"{args.dtype}, max batch {args.max_batch}: median on/off {statistics.median(ratios):.3f} over {args.rounds} rounds "
      f"({min(ratios):.3f}-{max(ratios):.3f})")
