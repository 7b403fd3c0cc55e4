"""A speculator's whole top-1 chain, carried in the hidden state a drafting loop feeds back.

vLLM's EAGLE proposer (v1/spec_decode/llm_base_proposer.py) calls a drafter once per draft
token: first on the target model's states, then on whatever state the drafter returned,
without telling it which draft this is, and the number of drafts may change from step to
step (dynamic speculative decoding). An MLP speculator's stage i has weights of its own,
so it must know i. Its first call therefore computes the whole chain, and the state it
returns carries the chain's tokens and the draft index instead of a hidden vector: each
later call moves the index on, and the logits name the chain's token at that index.

Layout of a packed row [d] (d: the base model's hidden size):
  [0:3]  TAG, which no hidden state of a real model holds (three exact powers of two);
  [3]    the index of the draft the row's logits name (0 for the first);
  [4]    the chain's length D;
  [5:5 + DIGITS * D]  its tokens, DIGITS base-256 digits each, most significant first.
Every value is an integer in [-2^15, 2^15] with at most 8 significant bits, exact in
bfloat16, float16 and float32, so a row survives the proposer's buffer in the model's dtype.
"""

from __future__ import annotations

import torch

from .errors import MLPSpecError

TAG = (32768.0, -32768.0, 32768.0)
BASE = 256
DIGITS = 3  # token ids below 256^3 = 16.7M
_HEADER = len(TAG) + 2


def width_needed(depth: int) -> int:
    """The hidden size a chain of `depth` tokens needs."""
    return _HEADER + DIGITS * depth


def pack(tokens: torch.Tensor, width: int, dtype: torch.dtype) -> torch.Tensor:
    """Chains [n, D] of token ids -> packed rows [n, width] naming their first token."""
    n, depth = tokens.shape
    if width < width_needed(depth):
        raise MLPSpecError(f"a chain of {depth} drafts needs a hidden size of at least {width_needed(depth)}, "
                           f"the base model has {width}")
    if bool((tokens < 0).any()) or bool((tokens >= BASE**DIGITS).any()):
        raise MLPSpecError(f"token ids must lie in [0, {BASE**DIGITS}) to be packed")
    powers = BASE ** torch.arange(DIGITS - 1, -1, -1, device=tokens.device)  # DIGITS
    digits = tokens.unsqueeze(-1) // powers % BASE  # n D DIGITS
    rows = torch.zeros(n, width, dtype=dtype, device=tokens.device)  # n w
    rows[:, : len(TAG)] = torch.tensor(TAG, dtype=dtype, device=tokens.device)
    rows[:, len(TAG) + 1] = depth
    rows[:, _HEADER : _HEADER + DIGITS * depth] = digits.flatten(1).to(dtype)
    return rows


def is_packed(rows: torch.Tensor) -> torch.Tensor:
    """Which rows [n, d] are packed chains [n] (the rest: the target model's states)."""
    tag = torch.tensor(TAG, dtype=rows.dtype, device=rows.device)
    return (rows[:, : len(TAG)] == tag).all(dim=-1)


def advance(rows: torch.Tensor) -> torch.Tensor:
    """Packed rows [n, d] naming their next draft (a new tensor)."""
    rows = rows.clone()
    rows[:, len(TAG)] += 1
    return rows


def current_tokens(rows: torch.Tensor) -> torch.Tensor:
    """The token each packed row [n, d] names [n]; a row past its chain's end names its last."""
    index = rows[:, len(TAG)].long()  # n
    depth = rows[:, len(TAG) + 1].long()  # n
    index = torch.minimum(index, depth - 1)
    columns = _HEADER + DIGITS * index.unsqueeze(1) + torch.arange(DIGITS, device=rows.device)  # n DIGITS
    digits = rows.gather(1, columns).long()  # n DIGITS
    powers = BASE ** torch.arange(DIGITS - 1, -1, -1, device=rows.device)  # DIGITS
    return (digits * powers).sum(dim=1)  # n


def one_hot_logits(rows: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Logits [n, V] whose argmax, and whose softmax at any temperature, is the named token:
    0 there, the dtype's lowest elsewhere. A drafter that samples its drafts then proposes
    the chain's token with probability 1, and rejection sampling stays lossless."""
    logits = torch.full((rows.size(0), vocab_size), torch.finfo(rows.dtype).min, dtype=rows.dtype, device=rows.device)
    return logits.scatter_(1, current_tokens(rows).unsqueeze(1), 0.0)
