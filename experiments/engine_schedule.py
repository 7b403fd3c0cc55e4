"""Issue 26's open line (speculation on at least 1.0x off at every rate), without HTTP: the
serving bench's schedule (its prompts, Poisson arrival times and token budget) replayed
in one process straight into the engine, speculation on and off taking turns, each round
on fresh engines warmed up as `mlpspec serve` warms them. Every step is timed and put in
one of three bins: prefill passes (joins), plain decode steps, speculative steps; and the
time the engine waited for an arrival. Figures: docs/experiments/serving-engine.md.

    PYTHONPATH=src .venv/bin/python experiments/engine_schedule.py [--rate 8] [--dtype float32] [--rounds 3]
"""

import argparse
import collections
import statistics
import time

import numpy as np

from mlpspec import load_base, load_speculator
from mlpspec.engine import Engine
from mlpspec.sequence import SamplingParams
from mlpspec.serve import WARM_UP_TEXT
from mlpspec.serving_bench import LENGTHS, arrivals, budgets, serving_prompts


def replay(engine: Engine, asks: list[list[int]], times: list[float], lengths: list[int]) -> dict:
    """Add each request at its arrival time and step the engine until all are done."""
    bins = collections.defaultdict(lambda: [0, 0.0])  # kind -> [count, seconds]
    by_rows = collections.defaultdict(lambda: np.zeros(3))  # decode steps by rows (up to 4, 8, ..): steps, seconds, tokens
    tokens, pending, start = 0, list(zip(times, asks, lengths)), time.perf_counter()
    while pending or engine.has_unfinished():
        now = time.perf_counter() - start
        while pending and pending[0][0] <= now:
            _, ask, budget = pending.pop(0)
            engine.add_request(ask, SamplingParams(max_tokens=budget))
        if not engine.has_unfinished():
            bins["idle"][0] += 1
            bins["idle"][1] += pending[0][0] - now
            time.sleep(pending[0][0] - now)
            continue
        shapes, rows, tick = dict(engine.stats.shapes), engine.running, time.perf_counter()
        outputs = engine.step()
        seconds = time.perf_counter() - tick
        got = sum(len(out.new_ids) for out in outputs)
        tokens += got
        changed = [s for s, n in engine.stats.shapes.items() if n != shapes.get(s, 0)]
        kind = "prefill" if not changed else "plain" if changed == ["plain"] else "speculative"  # a join decodes nothing
        bins[kind][0] += 1
        bins[kind][1] += seconds
        if kind != "prefill":
            by_rows[(rows + 3) // 4 * 4] += (1, seconds, got)
    wall = time.perf_counter() - start
    return {"tokens_per_s": tokens / wall, "wall": wall, **{k: tuple(v) for k, v in bins.items()},
            "by_rows": dict(sorted(by_rows.items()))}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=8.0)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lengths", choices=LENGTHS, default="mixed",
                        help="each request's max_tokens as the serving bench draws them (serving_bench.budgets)")
    args = parser.parse_args()

    model, tokenizer = load_base(dtype=args.dtype)
    speculator = load_speculator(dtype=model.dtype, base=model)
    prompts = serving_prompts(tokenizer)
    asks = [prompts[i % len(prompts)] for i in range(args.requests)]
    times = arrivals(args.rate, len(asks), args.seed)
    lengths = budgets(args.max_tokens, len(asks), args.lengths, args.seed)
    sample = tokenizer(WARM_UP_TEXT).input_ids
    ratios = []
    for r in range(args.rounds):
        runs = {}
        for name in ("on", "off") if r % 2 == 0 else ("off", "on"):
            engine = Engine(model, speculator if name == "on" else None, max_batch=args.max_batch,
                            adaptive=name == "on")
            engine.warm_up(sample)
            runs[name] = replay(engine, asks, times, lengths)
            run = runs[name]
            bins = ", ".join(f"{k} {run[k][0]} in {run[k][1]:.2f} s" for k in ("prefill", "plain", "speculative", "idle")
                             if k in run)
            print(f"round {r} {name}: {run['tokens_per_s']:.1f} tok/s, {run['wall']:.2f} s; {bins}", flush=True)
            print("   decode steps by rows (steps, s, tokens): " + "; ".join(
                f"<={k}: {int(v[0])}, {v[1]:.2f}, {int(v[2])}" for k, v in run["by_rows"].items()), flush=True)
        ratios.append(runs["on"]["tokens_per_s"] / runs["off"]["tokens_per_s"])
        print(f"round {r}: on/off {ratios[-1]:.3f}", flush=True)
    print(f"rate {args.rate}, {args.dtype}, max batch {args.max_batch}: median on/off {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
