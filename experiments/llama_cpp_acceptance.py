"""Does the shipped speculator keep its acceptance when the base model runs on llama.cpp?
Tokens a verify pass of the fixed tree (no lookup, no adaptive choice), greedy, batch 1, on each
GGUF file given, against transformers in float32 on the embedded default's weights.

    PYTHONPATH=src .venv/bin/python experiments/llama_cpp_acceptance.py Q4_1.gguf F16.gguf [--tokens 96] [--prompts 6]

Prints one JSON line per base model and kind of prompt: tokens a step, and the share of
transformers' that it keeps.
"""

import argparse
import json

import torch

from mlpspec.base import load_base
from mlpspec.bench import chat_prompts, code_prompts
from mlpspec.checkpoint import load_speculator
from mlpspec.generate import speculative_generate
from mlpspec.text import encode_prompt


def tokens_per_step(model, tokenizer, prompts: list, chat: bool, tokens: int) -> float:
    speculator = load_speculator(base=model)
    eos = tokenizer.eos_token_id
    emitted = steps = 0
    for prompt in prompts:
        ids = torch.tensor([encode_prompt(tokenizer, prompt, chat=chat)])  # 1 P
        stats = speculative_generate(model, speculator, ids, max_new_tokens=tokens, eos_token_id=eos).stats
        # verify passes only: the prefill pass emits the first token and checks no tree
        emitted, steps = emitted + int(stats.emitted.sum()) - 1, steps + stats.row_steps - 1
    return emitted / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", help="GGUF files of the embedded default's weights")
    parser.add_argument("--tokens", type=int, default=96, help="new tokens a prompt")
    parser.add_argument("--prompts", type=int, default=6, help="prompts of each kind (code, chat)")
    args = parser.parse_args()
    kinds = {"code": code_prompts(args.prompts), "chat": chat_prompts()[: args.prompts]}
    bases = {"transformers float32": lambda: load_base(None, dtype="float32", backend="transformers")}
    bases |= {file: (lambda file=file: load_base(file, backend="llama.cpp")) for file in args.files}
    reference = {}
    for name, load in bases.items():
        model, tokenizer = load()
        for kind, prompts in kinds.items():
            rate = tokens_per_step(model, tokenizer, prompts, kind == "chat", args.tokens)
            reference.setdefault(kind, rate)
            print(json.dumps({"base": name, "kind": kind, "tokens_per_step": round(rate, 3),
                              "of_transformers": round(rate / reference[kind], 3)}), flush=True)


if __name__ == "__main__":
    main()
