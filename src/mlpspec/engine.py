"""The engine loop: continuous batching with speculation at every step.

    engine = Engine(model, speculator)
    engine.add_request(prompt_ids, SamplingParams(max_tokens=64))  # any time
    while engine.has_unfinished():
        for out in engine.step():                # new tokens per request, and who finished
            ...

Each step: waiting requests join the batch while it has room (scheduler.py), prefilled
together where their lengths are close (scheduler.prefill_groups), each written into a free
row of the engine's KV cache (cache.RowCache), their first tokens out at once; or, when
none joins, one speculative step runs over the live batch, as decode.py's loop runs one (propose,
verify, walk, commit), with every row's own sampling settings (sampler.RowChooser), stop
tokens and token budget; then the requests that finished leave, and their rows go to the
next ones. A request that arrives while others decode joins at the next step instead of
waiting for a batch to end.
"""

from __future__ import annotations

import torch

from .adaptive import PLAIN, AdaptivePolicy
from .base import as_runner
from . import decode  # its step functions by module (decode.propose ...): tests time them there
from .decode import (DecodeState, DecodeStats, build_graphs, commit, decoding_shapes, eos_tokens, foresee, glance,
                     judge_leaving, learn_in_hindsight, look_up, prefill, renumber_hindsight)
from .detokenizer import Detokenizer
from .errors import MLPSpecError
from .model import MLPSpeculator
from .sampler import RowChooser
from .scheduler import Scheduler, prefill_groups
from .sequence import Request, RequestOutput, SamplingParams, Status, TokenLogprob
from .tree import NO_TOKEN, walk

# DecodeState's per-row tensors, which a request's row joins and leaves
ROW_FIELDS = ("prompt", "valid", "position", "pending", "hidden", "tokens", "n_emitted", "finished")
KEPT_STEPS = 4096  # steps whose acceptance stats.accepted keeps
DEFAULT_MAX_LEN = 2048  # KV slots per row unless the model's context is shorter: 1.5 GB at 16 rows for SmolLM2
# joining prompts share a prefill pass (scheduler.prefill_groups) of at most this many
# tokens, padding included (the pass keeps every layer's states: 146 MB at 2048 for SmolLM2),
# and with at most this share of padding over their own tokens
PREFILL_TOKENS, PREFILL_PADDING = 2048, 0.25


class Engine:
    """Continuous batching over one base model and speculator (None: plain decoding)."""

    def __init__(self, model, speculator: MLPSpeculator | None = None, *, max_batch: int = 16,
                 max_waiting: int = 256, max_len: int | None = None, top_k_tokens_per_head: list[int] | None = None,
                 n_candidates: int | None = None, lookup: int = 0, adaptive: AdaptivePolicy | bool = False,
                 generator: torch.Generator | None = None, tokenizer=None):
        """adaptive=True picks each step's tree shape for the live batch size, from step
        costs timed once per batch-size bucket and acceptance learned as it goes
        (adaptive.py); pass an AdaptivePolicy to keep what it learned. Otherwise every
        step uses the speculator's tree (or top_k_tokens_per_head / n_candidates). With a
        tokenizer, every output carries its text, and requests may have stop strings."""
        self.model, self.speculator = model, speculator
        self.runner = runner = as_runner(model)
        self.device = runner.device
        self.shape, self.policy, h = decoding_shapes(runner, speculator, top_k_tokens_per_head, n_candidates, lookup,
                                                     adaptive)
        menu = self.policy.menu if self.policy is not None else [self.shape]
        self.lookup = max(s.lookup for s in menu)  # the branch every step looks up, for whichever shape wants it
        self.n_predict = h
        self.feature_layers = tuple(speculator.config.feature_layers) if speculator is not None else ()
        self.max_len = min(runner.context or DEFAULT_MAX_LEN, max_len or DEFAULT_MAX_LEN)
        self.reach = max(max(s.depth, s.lookup) for s in menu)  # the most candidate tokens a step accepts
        self.widest = max(s.max_nodes for s in menu)
        self.cache = runner.row_cache(self.max_len, self.widest, max_batch, self.feature_layers)
        # a compiled model's tree passes run on graphs of fixed shapes (kernels "compiled",
        # a static cache), built for each live batch size when it is first seen
        self.graphs: set[int] = set()  # batch sizes whose graphs are built
        self.scheduler = Scheduler(max_batch, max_waiting)
        self.generator = generator
        self.eos = eos_tokens(runner, None, self.device).tolist()
        self.tokenizer = tokenizer
        self.rows: list[Request] = []  # the live batch, row by row
        self.state: DecodeState | None = None
        self.requests: dict[str, Request] = {}
        self.stats = DecodeStats(n_predict=h)
        self.speculated_rows, self.head_hits = 0, torch.zeros(h, dtype=torch.long)  # rows of speculative steps, and
        # how many of them accepted head i's token

    # ---- requests in and out

    def add_request(self, prompt_ids: list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        """Queue a request; it joins the batch at a coming step. Returns its id."""
        params = params or SamplingParams()
        vocab = self.runner.vocab_size
        if not prompt_ids:
            raise MLPSpecError("the prompt is empty: give at least one token")
        if not all(isinstance(t, int) and 0 <= t < vocab for t in prompt_ids):
            raise MLPSpecError("the prompt holds a token id outside the model's vocabulary")
        if len(prompt_ids) + params.max_tokens > self.max_len:
            raise MLPSpecError(f"prompt ({len(prompt_ids)} tokens) plus max_tokens ({params.max_tokens}) exceeds "
                               f"this engine's {self.max_len} tokens a request")
        if params.stop and self.tokenizer is None:
            raise MLPSpecError("stop strings need text: give the engine a tokenizer (Engine(..., tokenizer=...))")
        request = Request(list(prompt_ids), params, **({"id": request_id} if request_id else {}))
        if self.tokenizer is not None:
            request.detokenizer = Detokenizer(self.text_of, params.stop)
        if request.id in self.requests:
            raise MLPSpecError(f"request id {request.id!r} is in use")
        seeded = torch.Generator().manual_seed(params.seed) if params.seed is not None else self.generator
        request.uniforms = torch.rand(self._token_room(params), generator=seeded, dtype=torch.float64,
                                      device=seeded.device if seeded is not None else None)
        self.scheduler.add(request)
        self.requests[request.id] = request
        return request.id

    def abort(self, request_id: str) -> None:
        """Drop a request, waiting or running; its row is free at once."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return
        if self.scheduler.drop(request_id) is None and request in self.rows:
            self._leave([self.rows.index(request)])
        request.status, request.finish_reason = Status.FINISHED, "abort"

    def has_unfinished(self) -> bool:
        return bool(self.rows) or bool(self.scheduler.waiting)

    def head_acceptance(self) -> list[float]:
        """Per head i, the share of rows in speculative steps that accepted its token."""
        return (self.head_hits / max(self.speculated_rows, 1)).tolist()

    def text_of(self, tokens: list[int]) -> str:
        """An output's text: its tokens decoded, the model's EOS tokens and special tokens left out."""
        return self.tokenizer.decode([t for t in tokens if t not in self.eos], skip_special_tokens=True)

    @property
    def running(self) -> int:
        return len(self.rows)

    @property
    def waiting(self) -> int:
        return len(self.scheduler.waiting)

    def warm_up(self, prompt_ids: list[int]) -> None:
        """Decode batches of every batch-size bucket up to the max batch (1, 2, 4, ...) of
        this prompt, a few tokens each, so that the adaptive policy's timings, taken when a
        bucket is first seen, cost no real request anything. Nothing to do without a policy."""
        b = 1
        while self.policy is not None and b <= self.scheduler.max_batch:
            for _ in range(b):
                self.add_request(prompt_ids, SamplingParams(max_tokens=4, ignore_eos=True))
            while self.has_unfinished():
                self.step()
            b *= 2

    # ---- one step

    @torch.no_grad()
    def step(self) -> list[RequestOutput]:
        """Admit who fits (prefilled together where their lengths allow, their first tokens
        out at once) or, when none is waiting, run one speculative step over the live batch;
        then let the finished leave. Returns, per request that got tokens or finished, what
        it got."""
        joining = self.scheduler.admit(len(self.rows))
        outputs = [out for group in prefill_groups([len(r.prompt_ids) for r in joining], PREFILL_TOKENS, PREFILL_PADDING)
                   for out in self._join([joining[i] for i in group])]
        if not outputs and self.rows and not bool(self.state.finished.all()):
            outputs = self._decode()
        done = [row for row, request in enumerate(self.rows) if request.status == Status.FINISHED]
        if done:
            self._leave(done)
        return outputs

    def _decode(self) -> list[RequestOutput]:
        state, b, policy = self.state, len(self.rows), self.policy
        active = ~state.finished  # b
        depth = int((self.max_new - state.n_emitted)[active].max()) - 1  # the deepest tree any row can use
        if self.cache.static and b not in self.graphs:  # before any step is timed: tens of seconds a graph
            build_graphs(self.model, state, self.widest)
            self.graphs.add(b)
        if policy is not None and not policy.calibrated(b):  # once per batch-size bucket, rolled back
            decode.calibrate(policy, self.runner, state, self.speculator)
        resting = policy is not None and policy.resting(b)  # a plain step, unasked
        wanted = self.lookup and not resting and (policy is None or bool(policy.lookup_shapes(b)))
        branch, matched = look_up(state, self.lookup) if wanted else (None, torch.zeros_like(state.n_emitted))
        if resting:
            shape = PLAIN
        elif policy is not None:
            shape = policy.choose(b, max_depth=depth, matched=matched[active].tolist())
        else:
            shape = self.shape
        # a chain drafted beside a plain step the policy chose, judged later (decode.glance);
        # before the clock, as it is the policy's learning, not the step's cost
        chose_plain = policy is not None and shape == PLAIN and not resting
        glanced = glance(policy, state, self.speculator, depth, active) if chose_plain else []
        tick = policy.clock() if policy is not None else 0.0
        before = state.n_emitted.clone()  # b
        tree, parts = decode.propose(state, self.speculator, shape, depth, branch, policy, matched)
        logits, hidden = decode.verify(self.runner, state, tree)
        wants = [row for row, r in enumerate(self.rows) if r.params.logprobs is not None]
        choose = RowChooser([self._setting(r) for r in self.rows], self.uniforms, state.n_emitted.clone(), wants)
        path, n_accepted, bonus = walk(tree, logits, choose)
        emitted = commit(state, tree, hidden, path, n_accepted, bonus, self.stops, self.max_new)
        if policy is not None:
            # the hindsight's bookkeeping is part of what a speculative step costs (it grows
            # with the batch): the step's time is taken after it
            state.hindsight += foresee(policy, shape, parts, before, active, matched) + glanced
            learn_in_hindsight(policy, state)
            policy.update(shape, b, (n_accepted + 1)[active].tolist(), policy.clock() - tick,
                          matched[active].tolist(), tree.size)
        self.stats.steps += 1
        self.stats.row_steps += int(active.sum())
        self.stats.shapes[str(shape)] = self.stats.shapes.get(str(shape), 0) + 1
        if shape != PLAIN:
            step = torch.where(active, n_accepted, -1).cpu()  # b
            self.stats.accepted.append(step)
            del self.stats.accepted[:-KEPT_STEPS]  # a server runs for ever: the counts below keep the rest
            accepted = step[step >= 0]  # r
            self.speculated_rows += accepted.numel()
            self.head_hits += (accepted.unsqueeze(1) > torch.arange(self.n_predict)).sum(dim=0)
        outputs = []
        for row, (request, new) in enumerate(zip(self.rows, emitted.tolist())):
            if not bool(active[row]):
                continue
            request.steps += 1
            new = [t for t in new if t >= 0]
            logprobs = _logprobs(choose, wants.index(row), new, request.params.logprobs) if row in wants else None
            outputs.append(self._record(request, new, bool(state.finished[row]), logprobs))
            state.finished[row] |= outputs[-1].finished  # a stop string ends it too
        return outputs

    # ---- rows

    def _token_room(self, params: SamplingParams) -> int:
        # a step may write up to reach + 1 tokens past a row's budget before _emit cuts them
        return params.max_tokens + self.reach + 1

    @staticmethod
    def _setting(request: Request) -> tuple:
        p = request.params
        return (float(p.temperature), p.top_k, p.top_p)

    def _stop_ids(self, params: SamplingParams) -> list[int]:
        return list(params.stop_token_ids) + ([] if params.ignore_eos else self.eos)

    def _record(self, request: Request, new: list[int], finished: bool,
                logprobs: list[TokenLogprob] | None = None) -> RequestOutput:
        """Add a step's tokens to the request, with their text where the engine has a
        tokenizer: a stop string ends it at the token that completes it."""
        text, words = None, request.detokenizer
        if words is not None:
            text, used = words.take(new, final=finished)
            if words.stopped:
                new, finished = new[:used], True
                logprobs = logprobs[:used] if logprobs is not None else None
        request.output_ids += new
        if finished:
            request.status = Status.FINISHED
            stopped = bool(request.output_ids) and request.output_ids[-1] in self._stop_ids(request.params)
            request.finish_reason = "stop" if stopped or (words is not None and words.stopped) else "length"
            self.requests.pop(request.id, None)
        return RequestOutput(request.id, new, finished, request.finish_reason, logprobs, text)

    def _join(self, requests: list[Request]) -> list[RequestOutput]:
        """Prefill these requests in one pass (left-padded to the longest), write each one's
        keys into the next free row (its prompt ending at the shared slot counter), and emit
        their first tokens."""
        n, lengths = len(requests), [len(r.prompt_ids) for r in requests]
        W, T = max(lengths), self.max_len + self.reach + 1
        self.stats.steps += 1  # a step is a forward pass: this one over the prompts
        self.stats.row_steps += n
        ids = torch.tensor([[0] * (W - P) + r.prompt_ids for r, P in zip(requests, lengths)], device=self.device)  # n W
        padding = torch.tensor([W - P for P in lengths], device=self.device)  # n
        prompt_valid = torch.arange(W, device=self.device) >= padding.unsqueeze(1)  # n W
        wants = [i for i, r in enumerate(requests) if r.params.logprobs is not None]
        room = max(r.uniforms.numel() for r in requests)
        uniforms = torch.stack([_right_pad(r.uniforms.unsqueeze(0), room, 0.0)[0] for r in requests]).to(self.device)
        first_choice = RowChooser([self._setting(r) for r in requests], uniforms,
                                  torch.zeros(n, dtype=torch.long, device=self.device), wants)
        joined = prefill(self.runner, ids, prompt_valid, W, first_choice, T, self.n_predict, self.feature_layers)
        if not self.cache.allocated:
            self.cache.allocate_like(joined.cache)
        if W > self.cache.length:
            self.cache.set_length(W)
        outputs = []
        for i, request in enumerate(requests):
            request.steps += 1
            logprobs = (_logprobs(first_choice, wants.index(i), [int(joined.pending[i])], request.params.logprobs)
                        if i in wants else None)
            outputs.append(self._seat(request, joined, i, W - lengths[i], logprobs))
        return outputs

    def _seat(self, request: Request, joined: DecodeState, i: int, first: int,
              logprobs: list[TokenLogprob] | None) -> RequestOutput:
        """Give `request` the next free row: its prompt's keys (row i of the prefill
        `joined`, from slot `first` on) end at the shared slot counter."""
        P, cache, row = len(request.prompt_ids), self.cache, len(self.rows)
        start = cache.length - P
        cache.write_row(row, start, joined.cache, i, first, P)
        cache.set_rows(row + 1)

        valid = torch.zeros(1, cache.capacity, dtype=torch.bool, device=self.device)
        valid[0, start : start + P] = True
        stops = self._stop_ids(request.params)
        seated = {name: getattr(joined, name)[i : i + 1] for name in ROW_FIELDS} | {"valid": valid}
        if self.state is None:
            self.state = DecodeState(cache=cache, stats=self.stats, feature_layers=self.feature_layers, **seated)
            self.max_new = torch.tensor([request.params.max_tokens], device=self.device)
            self.stops = torch.tensor([stops or [-1]], device=self.device)
            self.uniforms = request.uniforms.unsqueeze(0).to(self.device)
        else:
            s = self.state
            width = max(s.prompt.size(1), seated["prompt"].size(1))  # prompts are left-padded with NO_TOKEN
            s.prompt = torch.cat([_left_pad(s.prompt, width), _left_pad(seated["prompt"], width)])  # (look_up reads them)
            for name in ROW_FIELDS:
                if name != "prompt":  # padded above
                    setattr(s, name, torch.cat([getattr(s, name), seated[name]]))
            self.max_new = torch.cat([self.max_new, torch.tensor([request.params.max_tokens], device=self.device)])
            E = max(self.stops.size(1), len(stops) or 1)
            self.stops = torch.cat([_right_pad(self.stops, E), _right_pad(torch.tensor([stops or [-1]],
                                                                                       device=self.device), E)])
            room = max(self.uniforms.size(1), request.uniforms.numel())
            self.uniforms = torch.cat([_right_pad(self.uniforms, room, 0.0),
                                       _right_pad(request.uniforms.unsqueeze(0).to(self.device), room, 0.0)])
        self.rows.append(request)

        token = int(joined.pending[i])
        s = self.state
        s.tokens[row, 0] = token
        s.n_emitted[row] = 1
        out = self._record(request, [token], token in stops or request.params.max_tokens == 1, logprobs)
        s.finished[row] = out.finished
        return out

    def _leave(self, rows: list[int]) -> None:
        """Free these rows: the batch's last row moves into each freed one."""
        s, cache = self.state, self.cache
        if self.policy is not None:
            judge_leaving(self.policy, s, rows)
        for row in sorted(rows, reverse=True):
            last = len(self.rows) - 1
            if row != last:
                cache.move_row(last, row)
                renumber_hindsight(s, last, row)
                for name in ROW_FIELDS:
                    getattr(s, name)[row] = getattr(s, name)[last]
                for tensor in (self.max_new, self.stops, self.uniforms):
                    tensor[row] = tensor[last]
                self.rows[row] = self.rows[last]
            self.rows.pop()
            for name in ROW_FIELDS:
                setattr(s, name, getattr(s, name)[:last])
            self.max_new, self.stops, self.uniforms = self.max_new[:last], self.stops[:last], self.uniforms[:last]
            cache.set_rows(last)
        if not self.rows:  # every lane is free: start again from slot 0
            cache.set_length(0)
            self.state = None


def _logprobs(choose: RowChooser, at: int, tokens: list[int], top: int) -> list[TokenLogprob]:
    """The logprobs of a row's tokens this step: the j-th was chosen at depth j of the
    walk, where the chooser kept the row's log-softmax (record index `at`)."""
    entries = []
    for depth, token in enumerate(tokens):
        logprobs = choose.recorded[depth][at]  # V
        values, ids = logprobs.topk(top) if top else (logprobs[:0], logprobs[:0].long())
        entries.append(TokenLogprob(float(logprobs[token]), list(zip(ids.tolist(), values.tolist()))))
    return entries


def _left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(t, (width - t.size(1), 0), value=NO_TOKEN)


def _right_pad(t: torch.Tensor, width: int, value=-1) -> torch.Tensor:
    return torch.nn.functional.pad(t, (0, width - t.size(1)), value=value)
