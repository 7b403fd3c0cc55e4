"""Issue 27's speed question: on one GGUF file, batch 1, greedy, how fast is ours (the
adaptive policy with prompt lookup, on the llama.cpp backend) against llama.cpp's own
greedy decoding and its prompt lookup, in tokens/s after the first token, and is ours
token-identical to llama.cpp's greedy output? Each method runs each prompt once untimed,
then once timed. Figures: docs/experiments/llama-cpp-backend.md.

    PYTHONPATH=src .venv/bin/python experiments/llama_cpp_speed.py FILE.gguf [--tokens 128] [--prompts 3]
"""

import argparse
import json
import time

import torch

from mlpspec.adaptive import AdaptivePolicy, shape_menu
from mlpspec.base import load_base
from mlpspec.bench import chat_prompts, code_prompts
from mlpspec.checkpoint import load_speculator
from mlpspec.generate import speculative_generate
from mlpspec.llama_cpp import LlamaCppPeer, LlamaCppRunner
from mlpspec.text import encode_prompt


def timed(method, ids):
    """(tokens, tokens/s after the first token, tokens a step) of one run of
    `method(ids, on_token)`, which returns (tokens, tokens a step or None)."""
    stamps = []
    tokens, per_step = method(ids, lambda n: stamps.extend([time.perf_counter()] * n))
    return tokens, (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0, per_step


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("file")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--prompts", type=int, default=3, help="prompts of each kind (code, chat)")
    parser.add_argument("--policy", choices=["shared", "per-kind"], default="shared",
                        help="one adaptive policy for every prompt (code first), or a fresh one for each kind")
    args = parser.parse_args()
    runner, tokenizer = load_base(args.file, backend="llama.cpp")
    assert isinstance(runner, LlamaCppRunner)
    speculator = load_speculator(base=runner)
    eos = runner.eos_token_id
    peers = {"plain": LlamaCppPeer(args.file), "lookup": LlamaCppPeer(args.file, lookup=10)}
    policy = AdaptivePolicy(shape_menu(speculator.config, lookup=10))

    def peer(name):
        def run(ids, on_token):
            out = []
            for token in peers[name].stream(ids, args.tokens, eos):
                out.append(token)
                on_token(1)
            return out, None
        return run

    def ours(ids, on_token):
        out = speculative_generate(runner, speculator, torch.tensor([ids]), max_new_tokens=args.tokens,
                                   adaptive=policy, lookup=10, eos_token_id=eos,
                                   on_step=lambda emitted: on_token(int((emitted[0] >= 0).sum())))
        return out.sequences[0, len(ids):len(ids) + int(out.stats.emitted[0])].tolist(), out.stats.tokens_per_step

    methods = {"plain": peer("plain"), "lookup": peer("lookup"), "ours": ours}
    report = {"file": args.file, "policy": args.policy, "system": runner.system_info(),
              "batch_invariant": runner.batch_invariant(), "kinds": {}}
    for kind, prompts in (("code", code_prompts(args.prompts)), ("chat", chat_prompts()[: args.prompts])):
        if args.policy == "per-kind":
            policy = AdaptivePolicy(shape_menu(speculator.config, lookup=10))
        rates = {name: [] for name in methods}
        per_step, equal = [], 0
        for prompt in prompts:
            ids = encode_prompt(tokenizer, prompt, chat=kind == "chat")
            tokens = {}
            for name, method in methods.items():
                timed(method, ids)  # untimed: warm
                tokens[name], rate, steps = timed(method, ids)
                rates[name].append(rate)
            per_step.append(steps)  # ours, the last method
            equal += tokens["ours"] == tokens["plain"]
        mean = {name: sum(v) / len(v) for name, v in rates.items()}
        report["kinds"][kind] = mean | {"ours/plain": mean["ours"] / mean["plain"],
                                        "ours/lookup": mean["ours"] / mean["lookup"],
                                        "tokens/step": sum(per_step) / len(per_step),
                                        "equal to plain": f"{equal} of {len(prompts)}"}
        print(kind, json.dumps(report["kinds"][kind]), flush=True)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
