"""A request's life in the engine: what it asked for (SamplingParams), where it stands
(Request), and what one engine step tells its caller about it (RequestOutput)."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

import torch

from .detokenizer import Detokenizer
from .errors import MLPSpecError

_ids = itertools.count()


class BadSetting(MLPSpecError):
    """A SamplingParams field that is out of range; `field` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def check_warping(top_k, top_p) -> None:
    """Refuse a top_k or top_p that transformers' warpers would not take."""
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise BadSetting("top_k", f"top_k must be an integer >= 1, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not (isinstance(top_p, (int, float)) and 0 < top_p <= 1)):
        raise BadSetting("top_p", f"top_p must be in (0, 1], got {top_p!r}")


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding settings. temperature 0 is greedy; top_k / top_p warp the
    distribution as transformers does; a seed makes a sampled output reproducible, alone or
    batched; a request stops after any of stop_token_ids (the model's EOS tokens are added
    by the engine unless ignore_eos), or at the token that completes any of the `stop`
    strings, its text ending before it."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # return each token's log-probability and this many likeliest alternatives (<= 20)
    stop: tuple[str, ...] = ()  # stop strings: the text ends before the first (needs the engine's tokenizer)

    def __post_init__(self):
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise BadSetting("max_tokens", f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not 0 <= self.temperature <= 2:
            raise BadSetting("temperature", f"temperature must be a number in [0, 2], got {self.temperature!r}")
        check_warping(self.top_k, self.top_p)
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise BadSetting("seed", f"seed must be an integer, got {self.seed!r}")
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids):
            raise BadSetting("stop_token_ids", f"stop_token_ids must be token ids, got {self.stop_token_ids!r}")
        if self.logprobs is not None and (isinstance(self.logprobs, bool) or not isinstance(self.logprobs, int)
                                          or not 0 <= self.logprobs <= 20):
            raise BadSetting("logprobs", f"logprobs must be an integer from 0 to 20, got {self.logprobs!r}")
        if isinstance(self.stop, str) or not all(isinstance(s, str) and s for s in self.stop):
            raise BadSetting("stop", f"stop must be a sequence of non-empty strings, got {self.stop!r}")
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        object.__setattr__(self, "stop", tuple(self.stop))


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    """One request: its prompt, settings and the tokens it has so far. `uniforms` holds
    the draws its sampled tokens use, one per output position, made once from its seed:
    the token at position t is drawn with uniforms[t] whatever tree a step checked and
    whichever rows shared the step, so a seed gives the same output alone or batched."""

    prompt_ids: list[int]
    params: SamplingParams
    id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    status: Status = Status.WAITING
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (a stop token or string), "length" or "abort"
    uniforms: torch.Tensor | None = None  # T   float64 in [0, 1)
    steps: int = 0  # verification passes this request rode in
    detokenizer: Detokenizer | None = None  # its text, where the engine has a tokenizer


@dataclass(frozen=True)
class TokenLogprob:
    """The base model's log-probability of a token where it was chosen (log-softmax of its
    logits, before any temperature), and the likeliest tokens there."""

    logprob: float
    top: list[tuple[int, float]]


@dataclass(frozen=True)
class RequestOutput:
    """What one step did for one request: the tokens it added (with their logprobs, when
    asked), and whether it is done."""

    id: str
    new_ids: list[int]
    finished: bool
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None
    text: str | None = None  # the text that may be shown now (the engine's tokenizer decodes; None without one)
