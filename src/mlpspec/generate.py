"""`speculative_generate`: a batch of prompts decoded to the end, as a thin loop over the
engine (engine.py), the one decode loop the server and the bench also run on:

    engine = Engine(model, speculator, max_batch=b, ...)
    for each row: engine.add_request(its prompt, SamplingParams(...))
    while engine.has_unfinished(): engine.step()

Every row is its own request, prefilled alone, and leaves the batch when it is done.
"""

from __future__ import annotations

import math
import time
from typing import Callable, NamedTuple

import torch

from .adaptive import AdaptivePolicy
from .base import as_runner
from .decode import DecodeStats, eos_tokens
from .engine import Engine
from .errors import MLPSpecError
from .model import MLPSpeculator
from .runner import Runner
from .sequence import SamplingParams, check_warping


class GenerateOutput(NamedTuple):
    sequences: torch.Tensor  # b P+T   the prompt, then the new tokens, padded after EOS
    stats: DecodeStats


@torch.no_grad()
def speculative_generate(
    model,
    speculator: MLPSpeculator | None,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | list[int] | None = None,
    generator: torch.Generator | None = None,
    top_k_tokens_per_head: list[int] | None = None,
    n_candidates: int | None = None,
    streamer=None,
    on_step: Callable[[torch.Tensor], None] | None = None,
    adaptive: AdaptivePolicy | bool = False,
    lookup: int = 0,
) -> GenerateOutput:
    """Generate with the base model, faster, with exactly its output distribution.

    input_ids [b, P] (left-padded when rows differ in length, with attention_mask [b, P]).
    With speculator=None this is plain decoding through the same loop.

    Greedy (temperature 0): the output is token for token the base model's greedy output.

    Sampling (temperature > 0, optional top_k / top_p as in transformers): SpecInfer's
    naive stochastic verification (Miao et al. 2023, "SpecInfer", arXiv 2305.09781, sec. 4):
    at each accepted node draw x ~ p_target, the base model's warped distribution there;
    if a child carries x, accept it and continue from it, else emit x as the bonus token.
    Every emitted token is thus a draw from p_target given exactly the tokens before it,
    so the output distribution is the base model's own. Our drafts are the speculator's
    deterministic top-k tree, not samples from p_draft, so rejection sampling against
    p_draft (SpecTr, recursive rejection) would not be lossless here; and no lossless
    rule can accept a fixed child c with probability above p_target(c), which this one
    attains: for deterministic drafts it accepts the most. Each row draws its token at
    output position t from a uniform fixed for that position (sampler.py), taken from
    `generator`, so a generator seeded alike gives the same output with or without a
    speculator, whatever tree each step checked.

    top_k_tokens_per_head / n_candidates set the fixed tree (the speculator's config by
    default); a list shorter than the speculator's heads runs only that many stages, e.g.
    [1, 1] for a two-token chain.

    lookup=N adds a prompt-lookup branch of up to N tokens to every tree: a continuation
    copied from where the latest tokens occurred before in the prompt or the output
    (tree.lookup_branch). It works without a speculator too.

    adaptive=True picks each step's tree shape (or none) for the most tokens per second,
    from what it measures while decoding (adaptive.py); pass an AdaptivePolicy to keep
    what it learned across calls. Any shape is lossless.

    streamer (a transformers streamer, batch 1) receives the tokens as they come;
    on_step(emitted) is called after every engine step (each row's prefill, then each
    verification pass) with the tokens each row emitted, [b, w] with -1 where a row
    emitted nothing.

    Returns GenerateOutput(sequences [b, P + T], stats), T the longest row's new tokens;
    rows that stopped at EOS earlier are padded with the pad token, as in transformers.
    Everything runs on the model's device: the prompt moves there, and a generator must
    live there (torch.Generator(model.device)).
    """
    runner = as_runner(model)
    input_ids = input_ids.to(runner.device)
    attention_mask = attention_mask.to(runner.device) if attention_mask is not None else None
    if generator is not None and generator.device.type != runner.device.type:
        raise MLPSpecError(f"the generator is on {generator.device} and the model on {runner.device}: sampling draws "
                           f"where the model runs, so make it with torch.Generator({str(runner.device)!r})")
    prompt_valid = _check_prompt(runner, input_ids, attention_mask, max_new_tokens)
    _check_sampling(temperature, top_k, top_p)
    eos = eos_tokens(runner, eos_token_id, input_ids.device)
    b, P = input_ids.shape
    if streamer is not None and b != 1:
        raise MLPSpecError("streaming works for a single prompt only")
    longest = int(prompt_valid.sum(dim=1).max())
    engine = Engine(model, speculator, max_batch=b, max_waiting=b, max_len=longest + max_new_tokens,
                    top_k_tokens_per_head=top_k_tokens_per_head, n_candidates=n_candidates, lookup=lookup,
                    adaptive=adaptive, generator=generator)
    start = time.perf_counter()
    if max_new_tokens == 0:
        nothing = torch.zeros(b, dtype=torch.long)
        return GenerateOutput(input_ids.clone(), DecodeStats(n_predict=engine.n_predict, steps=0, emitted=nothing,
                                                             steps_per_row=nothing))
    params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            stop_token_ids=tuple(eos.tolist()), ignore_eos=True)
    requests = [engine.add_request(row[valid].tolist(), params) for row, valid in zip(input_ids, prompt_valid)]
    row_of = {request: row for row, request in enumerate(requests)}
    new_tokens: list[list[int]] = [[] for _ in range(b)]
    steps = [0] * b
    if streamer is not None:
        streamer.put(input_ids[0].cpu())
    while engine.has_unfinished():
        outputs = engine.step()
        width = max((len(out.new_ids) for out in outputs), default=0)
        emitted = torch.full((b, width), -1, dtype=torch.long)
        for out in outputs:
            row = row_of[out.id]
            new_tokens[row] += out.new_ids
            steps[row] += 1
            emitted[row, : len(out.new_ids)] = torch.tensor(out.new_ids, dtype=torch.long)
        if on_step is not None:
            on_step(emitted)
        if streamer is not None and len(emitted[0]) and int(emitted[0, 0]) >= 0:
            streamer.put(emitted[0][emitted[0] >= 0])
    if streamer is not None:
        streamer.end()

    stats = engine.stats
    stats.emitted = torch.tensor([len(t) for t in new_tokens])
    stats.steps_per_row = torch.tensor(steps)
    stats.seconds = time.perf_counter() - start
    return GenerateOutput(_sequences(runner, input_ids, new_tokens, eos), stats)


def _sequences(runner: Runner, input_ids: torch.Tensor, new_tokens: list[list[int]], eos: torch.Tensor) -> torch.Tensor:
    """The prompts [b, P] and each row's new tokens after them, padded to the longest row."""
    T = max(len(t) for t in new_tokens)
    pad = runner.pad_token_id
    pad = int(eos[0]) if pad is None and eos.numel() else (pad or 0)
    new = torch.tensor([t + [pad] * (T - len(t)) for t in new_tokens], dtype=input_ids.dtype)  # b T
    return torch.cat([input_ids, new.to(input_ids.device)], dim=1)

def _check_prompt(runner: Runner, input_ids, attention_mask, max_new_tokens) -> torch.Tensor:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise MLPSpecError("input_ids must be an int64 tensor of shape [batch, prompt length]")
    if input_ids.size(1) == 0:
        raise MLPSpecError("the prompt is empty: give at least one token")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise MLPSpecError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if attention_mask is None:
        valid = torch.ones_like(input_ids, dtype=torch.bool)
    else:
        if attention_mask.shape != input_ids.shape:
            raise MLPSpecError(
                f"attention_mask has shape {list(attention_mask.shape)}, input_ids {list(input_ids.shape)}"
            )
        valid = attention_mask.bool()
    lengths = valid.sum(dim=1)
    if bool((lengths == 0).any()):
        raise MLPSpecError(f"the prompt in row {int((lengths == 0).long().argmax())} is empty")
    if bool((valid[:, 1:] < valid[:, :-1]).any()):
        raise MLPSpecError("prompts of different lengths must be left-padded (padding first)")
    if int(input_ids[valid].max()) >= runner.vocab_size or int(input_ids[valid].min()) < 0:
        raise MLPSpecError("input_ids hold a token id outside the model's vocabulary")
    context = runner.context
    longest = int(lengths.max())
    if context is not None and longest > context:
        raise MLPSpecError(f"the prompt has {longest} tokens, more than the model's context of {context}")
    if context is not None and longest + max_new_tokens > context:
        raise MLPSpecError(
            f"prompt ({longest} tokens) plus max_new_tokens ({max_new_tokens}) exceeds the model's context of {context}"
        )
    return valid


def _check_sampling(temperature, top_k, top_p) -> None:
    if not isinstance(temperature, (int, float)) or temperature < 0 or math.isnan(temperature):
        raise MLPSpecError(f"temperature must be >= 0 (0 is greedy), got {temperature!r}")
    check_warping(top_k, top_p)
