"""Telling a real mismatch from a near tie when two greedy decodes differ.

In float32 speculative decoding reproduces transformers' greedy output token for token. In
bfloat16 it cannot always: scoring a tree of nodes in one pass sums in a different order
than scoring one token at a time, and with 8 mantissa bits two candidate logits that are
within a few units in the last place (ulps) of each other can swap places. transformers
itself disagrees with itself this way: on SmolLM2-135M-Instruct in bfloat16, its
all-at-once and one-token-at-a-time logits for the same text differ by up to 6 ulps
(median 1) on each position's top-5 tokens, and where its greedy choice differs the two
tokens' logits are within 3 ulps (experiments/bf16_self_agreement.py, on an Intel Xeon
with native bfloat16, 2026-12-06). So a divergence is a near tie when, at the first
position where the two outputs differ, the base model's logits for the two tokens are
within `NEAR_TIE_ULPS` ulps of the larger one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

NEAR_TIE_ULPS = 4.0


@dataclass
class Divergence:
    row: int
    index: int  # position among the new tokens where the outputs first differ
    ours: int
    theirs: int
    gap: float  # |logit(ours) - logit(theirs)| from the base model at that position
    ulps: float  # the gap in units in the last place of the larger logit, in the model's dtype
    near_tie: bool


def ulp(value: float, dtype: torch.dtype) -> float:
    """The spacing of `dtype`'s representable numbers at |value|."""
    value = abs(value)
    if value == 0:
        return torch.finfo(dtype).tiny
    return torch.finfo(dtype).eps * 2.0 ** math.floor(math.log2(value))


def _new_tokens(row: list[int], prompt_length: int, eos: set[int]) -> list[int]:
    new = row[prompt_length:]
    for i, token in enumerate(new):
        if token in eos:
            return new[: i + 1]
    return new


@torch.no_grad()
def find_divergences(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    ours: torch.Tensor,
    theirs: torch.Tensor,
    eos_token_id: int | list[int] | None = None,
    tolerance_ulps: float = NEAR_TIE_ULPS,
) -> list[Divergence]:
    """Compare two greedy outputs [b, P + T] of the same left-padded prompts [b, P] and
    classify each row's first difference (a row that matches has none)."""
    eos = set([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id or [])
    P = input_ids.size(1)
    found = []
    for r in range(input_ids.size(0)):
        a = _new_tokens(ours[r].tolist(), P, eos)
        b = _new_tokens(theirs[r].tolist(), P, eos)
        i = next((j for j in range(min(len(a), len(b))) if a[j] != b[j]), None)
        if i is None:
            continue  # equal, or one is a prefix of the other (a shorter max_new_tokens)
        prompt = input_ids[r, attention_mask[r].bool()].tolist()
        logits = model(torch.tensor([prompt + a[:i]], device=input_ids.device)).logits[0, -1]
        mine, other = float(logits[a[i]]), float(logits[b[i]])
        gap = abs(mine - other)
        in_ulps = gap / ulp(max(abs(mine), abs(other)), logits.dtype)
        found.append(Divergence(r, i, a[i], b[i], gap, in_ulps, in_ulps <= tolerance_ulps))
    return found
