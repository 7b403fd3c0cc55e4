"""Does a decoding step's cost grow with the context? Milliseconds per step at batch 1, at
a few context lengths, for transformers' greedy `generate` (its DynamicCache), our loop
without speculation and our loop with the shipped speculator's fixed tree (lookup off);
then the speculator's own proposal time (its tree at batch 1).

    .venv/bin/python experiments/step_cost_by_context.py --dtype float32
    .venv/bin/python experiments/step_cost_by_context.py --dtype bfloat16

A step's cost is (time of N new tokens - time of 1) / (steps of N - steps of 1): the prefill
cancels. Each figure is the median of --repeats runs. Prints JSON lines.
"""

import argparse
import inspect
import json
import statistics
import time

import torch

from mlpspec import load_base, load_speculator
from mlpspec.generate import speculative_generate
from mlpspec.hardware import describe_machine


def timed(fn) -> tuple[float, object]:
    """The seconds fn() took, and what it returned."""
    tick = time.perf_counter()
    result = fn()
    return time.perf_counter() - tick, result


def ms_per_step(run, new_tokens: int, repeats: int) -> float:
    """run(max_new_tokens) -> steps taken (the prefill included)."""
    costs = []
    for _ in range(repeats):
        long_s, long_steps = timed(lambda: run(new_tokens))
        short_s, short_steps = timed(lambda: run(1))
        costs.append(1000 * (long_s - short_s) / (long_steps - short_steps))
    return statistics.median(costs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--contexts", default="128,512,1024,1536", help="prompt lengths in tokens")
    parser.add_argument("--new-tokens", type=int, default=33, help="tokens of the long run")
    parser.add_argument("--kernels", choices=["auto", "aten", "onednn", "compiled"], default="auto",
                        help="our passes' kernels (load_base's kernels)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per figure; the median is printed")
    args = parser.parse_args()
    print(json.dumps({"machine": describe_machine(), "dtype": args.dtype, "kernels": args.kernels}), flush=True)
    model, tokenizer = load_base(None, dtype=args.dtype, kernels=args.kernels)
    speculator = load_speculator(dtype=model.dtype, base=model)
    text_ids = tokenizer(inspect.getsource(inspect), return_tensors="pt").input_ids  # 1 N, stdlib text
    eos = tokenizer.eos_token_id

    for context in [int(c) for c in args.contexts.split(",")]:
        ids = text_ids[:, :context]  # 1 P

        def hf_greedy(n: int) -> int:
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=eos)
            return n

        def ours(speculator_or_none):
            def run(n: int) -> int:
                return speculative_generate(model, speculator_or_none, ids, max_new_tokens=n).stats.steps
            return run

        hf_greedy(2)  # warm-up at this length
        figures = {"context": context,
                   "hf_greedy_ms": ms_per_step(hf_greedy, args.new_tokens, args.repeats),
                   "ours_plain_ms": ms_per_step(ours(None), args.new_tokens, args.repeats),
                   "ours_fixed_tree_ms": ms_per_step(ours(speculator), args.new_tokens, args.repeats)}
        print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in figures.items()}), flush=True)

    width = model.config.hidden_size * (1 + len(speculator.config.feature_layers or []))
    state = torch.randn(1, 1, width, dtype=model.dtype)  # b 1 (1+l)d: the final state and any feature layers'
    token = torch.tensor([[1]])  # b 1
    speculator.propose(state, token)
    costs = [timed(lambda: speculator.propose(state, token))[0] for _ in range(20)]
    print(json.dumps({"propose_ms": round(1000 * statistics.median(costs), 1)}), flush=True)

if __name__ == "__main__":
    main()
