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

from mlpspec.adaptive import AdaptivePolicy, shape_menu
from mlpspec.base import load_base
from mlpspec.bench import chat_prompts, code_prompts
from mlpspec.checkpoint import load_speculator
from mlpspec.generate import speculative_generate
from mlpspec.llama_cpp import LlamaCppPeer, LlamaCppRunner
from mlpspec.text import encode_prompt


def timed(generate):
    """(tokens, tokens/s after the first token) of one run of `generate(on_token)`."""
    stamps = []
    tokens = generate(lambda n: stamps.extend([time.perf_counter()] * n))
    return tokens, (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0


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
    plain, lookup = LlamaCppPeer(args.file), LlamaCppPeer(args.file, lookup=10)
    policy = AdaptivePolicy(shape_menu(speculator.config, lookup=10))

    def peer(llm, ids):
        def run(on_token):
            out = []
            for token in llm.stream(ids, args.tokens, eos):
                out.append(token)
                on_token(1)
            return out
        return run

    def ours(ids):
        def run(on_token):
            import torch

            out = speculative_generate(runner, speculator, torch.tensor([ids]), max_new_tokens=args.tokens,
                                       adaptive=policy, lookup=10, eos_token_id=eos,
                                       on_step=lambda emitted: on_token(int((emitted[0] >= 0).sum())))
            stats.append(out.stats.tokens_per_step)
            return out.sequences[0, len(ids):len(ids) + int(out.stats.emitted[0])].tolist()
        return run

    report = {"file": args.file, "policy": args.policy, "system": runner.system_info(),
              "batch_invariant": runner.batch_invariant(), "kinds": {}}
    for kind, prompts in (("code", code_prompts(args.prompts)), ("chat", chat_prompts()[: args.prompts])):
        if args.policy == "per-kind":
            policy = AdaptivePolicy(shape_menu(speculator.config, lookup=10))
        rows = {"plain": [], "lookup": [], "ours": []}
        stats, equal = [], 0
        for prompt in prompts:
            ids = encode_prompt(tokenizer, prompt, chat=kind == "chat")
            results = {}
            for name, make in (("plain", lambda: peer(plain, ids)), ("lookup", lambda: peer(lookup, ids)),
                               ("ours", lambda: ours(ids))):
                timed(make())
                results[name] = timed(make())
                rows[name].append(results[name][1])
            equal += results["ours"][0] == results["plain"][0]
        mean = {name: sum(v) / len(v) for name, v in rows.items()}
        report["kinds"][kind] = mean | {"ours/plain": mean["ours"] / mean["plain"],
                                        "ours/lookup": mean["ours"] / mean["lookup"],
                                        "tokens/step": sum(stats[1::2]) / len(stats[1::2]),
                                        "equal to plain": f"{equal} of {len(prompts)}"}
        print(kind, json.dumps(report["kinds"][kind]), flush=True)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
