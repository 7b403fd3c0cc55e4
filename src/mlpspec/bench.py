"""Measuring speculation: prompt sets the training data never saw, and runs that compare
speculative decoding with plain decoding in one process, on the same prompts."""

from __future__ import annotations

import sysconfig
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from .adaptive import AdaptivePolicy, shape_menu
from .decode import speculative_generate
from .text import encode_prompts, read_prompt_file

# Third-party packages whose source serves as unseen code: training uses the standard
# library only, never site-packages.
CODE_PACKAGES = ("transformers", "requests", "urllib3", "tqdm", "jinja2", "huggingface_hub", "datasets", "click")


def code_prompts(n: int = 12, context_lines: int = 12) -> list[str]:
    """`n` prompts cut from installed third-party packages: the lines that lead up to a
    function definition, ending with its `def` line, so the model writes the body."""
    site = Path(sysconfig.get_paths()["purelib"])
    per_package: list[list[str]] = []
    for package in CODE_PACKAGES:
        files = sorted((site / package).rglob("*.py")) if (site / package).is_dir() else []
        prompts = []
        for file in files[:: max(1, len(files) // 8)]:
            lines = file.read_text(encoding="utf-8", errors="replace").splitlines()
            defs = [i for i, line in enumerate(lines) if line.lstrip().startswith("def ") and line.rstrip().endswith(":")]
            if defs:
                i = defs[len(defs) // 2]
                prompts.append("\n".join(lines[max(0, i - context_lines) : i + 1]) + "\n")
        per_package.append(prompts)
    # round-robin over packages, so a small n still spans several code bases
    longest = max((len(g) for g in per_package), default=0)
    mixed = [g[k] for k in range(longest) for g in per_package if k < len(g)]
    return mixed[:n]


def chat_prompts() -> list:
    """Chat prompts written for mlpspec (not from any training data)."""
    return read_prompt_file(Path(str(resources.files("mlpspec") / "prompts" / "chat.jsonl")))


@dataclass
class Comparison:
    tokens: int
    steps: int
    speculative_seconds: float
    plain_seconds: float
    accepted_lengths: list[int]

    @property
    def tokens_per_step(self) -> float:
        return self.tokens / max(self.steps, 1)

    @property
    def speedup(self) -> float:
        return self.plain_seconds / self.speculative_seconds


def compare(model, tokenizer, speculator, prompts: list, chat: bool, max_new_tokens: int = 64,
            adaptive: bool = False) -> Comparison:
    """Batch-1 greedy decoding of every prompt, speculative then plain, interleaved so
    that both see the same machine state; returns the totals. With `adaptive`, one policy
    learns across all the prompts, as it would in a serving process."""
    total = Comparison(0, 0, 0.0, 0.0, [])
    policy = AdaptivePolicy(shape_menu(speculator.config)) if adaptive else False
    for prompt in prompts:
        ids, mask = encode_prompts(tokenizer, [prompt], chat=chat)
        start = time.perf_counter()
        out = speculative_generate(model, speculator, ids, mask, max_new_tokens=max_new_tokens, adaptive=policy)
        total.speculative_seconds += time.perf_counter() - start
        start = time.perf_counter()
        plain = speculative_generate(model, None, ids, mask, max_new_tokens=max_new_tokens)
        total.plain_seconds += time.perf_counter() - start
        total.tokens += int(out.stats.emitted.sum())
        total.steps += out.stats.row_steps
        total.accepted_lengths += out.stats.accepted_lengths
        if model.dtype == torch.float32 and not torch.equal(out.sequences, plain.sequences):
            raise AssertionError("speculative and plain greedy decoding differ in float32")
    return total
