"""The functions of one speculative decoding step over one `DecodeState` (the engine,
engine.py, runs them every step for its live batch):

    propose   the speculator grows its candidate tree from the pending token (and look_up
              adds a branch copied from the text so far, when asked to)
    build     the candidates merge into a trie (tree.py)
    verify    the base model scores every node in one forward pass
    accept    walk the trie with the base model's own choices
    commit    keep the accepted path in the KV cache, emit its tokens plus one bonus token

With an adaptive policy, each step also queues the other trees its parts make (the top-1
chain the speculator grew, the tree cut to fewer stages, the lookup branch alone, the chain
or the tree with the branch beside it or taken away), and once their tokens have been
emitted the policy learns what they would have accepted (learn_in_hindsight), without
spending a step on them.

Plain decoding runs through the same step with a tree that is only the root, which makes
it the honest in-process baseline.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from .adaptive import PLAIN, AdaptivePolicy, TreeShape, shape_menu
from .base import as_runner, cache_dir, check_pair
from .cache import TreeCache
from .errors import MLPSpecError
from .fileio import atomic_write, keyed_file
from .kernels import compiles, graph_built
from .model import MLPSpeculator, check_proposal_shape
from .tree import (NO_TOKEN, Tree, best_paths, build_tree, flat_tree, hindsight_accepted, is_inside, likeliest_nodes,
                   lookup_branch, root_only, sub_paths)


# Tokens in the prompt-lookup branch that the CLI, the bench and the server add to the
# speculator's tree (transformers' prompt lookup proposes 10 as well).
DEFAULT_LOOKUP = 10


@dataclass
class DecodeStats:
    """What a generate call did. A step is one base forward pass (the prefill included),
    so plain decoding makes exactly one token per step per row."""

    n_predict: int
    steps: int = 0
    row_steps: int = 0  # steps summed over rows, counting a row only while it was active
    steps_per_row: torch.Tensor | None = None  # b   the same, row by row
    accepted: list[torch.Tensor] = field(default_factory=list)  # per speculative step: b, -1 where idle
    shapes: dict[str, int] = field(default_factory=dict)  # steps per tree shape ("plain" for none)
    emitted: torch.Tensor | None = None  # b   tokens emitted per row
    seconds: float = 0.0

    @property
    def tokens_per_step(self) -> float:
        return float(self.emitted.sum()) / max(self.row_steps, 1)

    @property
    def tokens_per_second(self) -> float:
        return float(self.emitted.sum()) / self.seconds if self.seconds > 0 else 0.0

    @property
    def accepted_lengths(self) -> list[int]:
        """Accepted candidate tokens of every active row in every speculative step."""
        return [int(n) for step in self.accepted for n in step if n >= 0]

    def summary(self) -> str:
        line = (
            f"{int(self.emitted.sum())} tokens in {self.seconds:.2f} s: {self.tokens_per_second:.1f} tokens/s, "
            f"{self.tokens_per_step:.2f} tokens/step over {self.steps} steps"
        )
        if self.n_predict:
            heads = " ".join(f"{a:.2f}" for a in self.per_head_acceptance)
            line += f"; per-head acceptance {heads}"
        return line

    @property
    def per_head_acceptance(self) -> list[float]:
        return head_acceptance(self.accepted_lengths, self.n_predict)


def head_acceptance(accepted_lengths: list[int], n_predict: int) -> list[float]:
    """For head j, the share of row-steps that accepted at least j + 1 candidate tokens
    (zeros when there were no speculative steps)."""
    lengths = torch.tensor(accepted_lengths, dtype=torch.long)
    if lengths.numel() == 0:
        return [0.0] * n_predict
    return [float((lengths > j).float().mean()) for j in range(n_predict)]


@dataclass
class DecodeState:
    """Everything that changes while decoding. The cache holds every committed token but
    the pending one, which the next verification pass feeds first (as the tree's root)."""

    cache: TreeCache
    prompt: torch.Tensor  # b P   the prompt, NO_TOKEN at padding (prompt lookup reads it)
    valid: torch.Tensor  # b S    cache slots that hold committed tokens
    position: torch.Tensor  # b   position id of the pending token
    pending: torch.Tensor  # b    last emitted token, not yet in the cache
    hidden: torch.Tensor  # b (1+l)d   base state that produced `pending` (and the feature layers' behind it)
    tokens: torch.Tensor  # b T   emitted tokens (padded)
    n_emitted: torch.Tensor  # b
    finished: torch.Tensor  # b   bool
    stats: DecodeStats
    hindsight: list[Hindsight] = field(default_factory=list)  # trees not run, judged once their tokens are out
    feature_layers: tuple[int, ...] = ()  # the base layers whose states the speculator reads besides the final one


class Draft(NamedTuple):
    """What one step proposed, part by part."""

    speculator: torch.Tensor | None  # b k D   the speculator's best candidates (None: no stage ran)
    expansion: tuple[torch.Tensor, torch.Tensor] | None  # every leaf it grew, MLPSpeculator.expand's
    top_k: tuple[int, ...]  # the stages it ran
    lookup: torch.Tensor | None  # b 1 L   the lookup branch, whether or not this step's tree has it
    lookup_taken: torch.Tensor | None = None  # b   its tokens each row's tree takes, where chosen by their chances


class Hindsight(NamedTuple):
    """A tree a step could have checked instead, waiting for the tokens that judge it.
    Everything is per row it speaks for, so that rows may join and leave meanwhile."""

    shape: TreeShape
    candidates: torch.Tensor  # r k L
    start: torch.Tensor  # r   where in DecodeState.tokens the guessed tokens go
    rows: torch.Tensor  # r   the rows it speaks for
    matched: list[int]  # r   the n-gram size each of them matched

    def only(self, keep: torch.Tensor) -> Hindsight:
        """The same tree for the rows where keep [r] is True."""
        return Hindsight(self.shape, self.candidates[keep], self.start[keep], self.rows[keep],
                         [n for n, k in zip(self.matched, keep.tolist()) if k])


def target_probs(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """The base model's sampling distribution p_target [.., V], warped as transformers'
    generate warps it: temperature, then top-k (ties at the k-th value kept), then top-p
    (the smallest set whose mass exceeds top_p, at least one token)."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p is not None and top_p < 1.0:
        ascending, order = logits.sort(dim=-1)
        drop = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
        drop[..., -1] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), -math.inf)
    return logits.softmax(dim=-1)


def prefill(model, input_ids, prompt_valid, capacity, choose, max_emit, n_predict, feature_layers=()) -> DecodeState:
    """Run the prompt, pick the first new token, and set up the state. `capacity`: cache
    slots for the prompt, the new tokens and the widest tree pass (TreeCache.pass_width).
    `model`: a transformers model or a runner.Runner."""
    b, P = input_ids.shape
    out = as_runner(model).prefill(input_ids, prompt_valid, capacity, tuple(feature_layers))
    valid = torch.zeros(b, capacity, dtype=torch.bool, device=input_ids.device)
    valid[:, :P] = prompt_valid
    return DecodeState(
        cache=out.cache,
        prompt=input_ids.masked_fill(~prompt_valid, NO_TOKEN),
        valid=valid,
        position=prompt_valid.sum(dim=1),
        pending=choose(out.logits, 0),  # b
        hidden=out.hidden,
        tokens=torch.zeros(b, max_emit, dtype=input_ids.dtype, device=input_ids.device),
        n_emitted=torch.zeros(b, dtype=torch.long, device=input_ids.device),
        finished=torch.zeros(b, dtype=torch.bool, device=input_ids.device),
        stats=DecodeStats(n_predict=n_predict, steps=1, row_steps=b,
                          steps_per_row=torch.ones(b, dtype=torch.long, device=input_ids.device)),
        feature_layers=tuple(feature_layers),
    )


def look_up(state: DecodeState, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt-lookup branch [b, length] copied from the prompt and the output so far
    (tree.lookup_branch), and the n-gram size each row matched [b] (0: no match)."""
    context = torch.cat([state.prompt, state.tokens], dim=1)  # b P+T   the pending token last
    return lookup_branch(context, state.prompt.size(1) + state.n_emitted, length)


def draft(state: DecodeState, speculator: MLPSpeculator | None, shape: TreeShape, depth: int,
          branch: torch.Tensor | None = None, policy: AdaptivePolicy | None = None,
          matched: torch.Tensor | None = None) -> Draft:
    """The parts of this step's candidates: the speculator's tree (with every leaf it grew
    on its way) and the lookup branch [b, >= shape.lookup] from look_up (whose rows matched
    n-grams of `matched` [b] tokens), each cut to `depth` tokens when fewer remain to be
    generated. A shape of the likeliest nodes (TreeShape.nodes) takes as many nodes, and
    as much of its branch, as the policy's costs say pay (likeliest)."""
    candidates = expansion = taken = None
    top_k = tuple(shape.top_k[:depth])
    lookup = branch[:, :depth].unsqueeze(1) if branch is not None and depth > 0 else None  # b 1 L
    if speculator is not None and top_k:
        expansion = speculator.expand(
            state.hidden.unsqueeze(1).to(speculator.dtype), state.pending.unsqueeze(1), list(top_k)
        )  # b N D, b N D
        paths, scores = expansion
        if shape.nodes:
            with_branch = lookup[..., : shape.lookup] if shape.lookup and lookup is not None else None
            candidates, taken = likeliest(policy, shape, paths, scores, list(top_k), with_branch, matched)
        else:
            candidates, _ = best_paths(paths, scores[..., -1], min(shape.n_candidates, paths.size(1)))  # b k D
    return Draft(candidates, expansion, top_k, lookup, taken)


def likeliest(policy: AdaptivePolicy, shape: TreeShape, paths: torch.Tensor, scores: torch.Tensor, top_k: list[int],
              branch: torch.Tensor | None, matched: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The likeliest nodes of the speculator's expansion (paths, scores), at most
    shape.nodes, and with a lookup branch [b, 1, L] its first tokens, as many of all these
    as pay (AdaptivePolicy.node_counts): a node's chance is the draft's path probability
    (tree.likeliest_nodes), a branch token's what the branch alone accepted for rows that
    matched as long an n-gram (AdaptivePolicy.lookup_chances). A branch copied after a
    1-gram match is seldom right past its first tokens, and each costs as much as a node.
    Returns (the speculator's candidates [b, m, D], the branch tokens each row takes [b];
    None without a branch)."""
    ranked, p_draft = (t[:, : shape.nodes] for t in likeliest_nodes(paths, scores, top_k))  # b n D, b n
    b, n = p_draft.shape
    chances = p_draft[:, :0]  # b 0
    if branch is not None:
        chances = policy.lookup_chances(shape.lookup, matched.tolist())[:, : branch.size(2)].to(p_draft)  # b L
    p = torch.cat([p_draft, chances], dim=1)  # b n+L
    order = p.argsort(dim=1, descending=True, stable=True)  # b n+L
    count = policy.node_counts(b, shape, p.gather(1, order))  # b
    ranks = torch.arange(p.size(1), device=p.device).expand(b, -1)  # b n+L
    taken = torch.zeros_like(p, dtype=torch.bool).scatter_(1, order, ranks < count.unsqueeze(1))  # b n+L
    # both lists are descending, so what is taken of each is a prefix of it
    nodes = taken[:, :n].sum(dim=1)  # b
    keep = torch.arange(int(nodes.max()), device=p.device) < nodes.unsqueeze(1)  # b m
    candidates = ranked[:, : keep.size(1)].masked_fill(~keep.unsqueeze(-1), NO_TOKEN)  # b m D
    return candidates, (taken[:, n:].sum(dim=1) if branch is not None else None)


def propose(state: DecodeState, speculator: MLPSpeculator | None, shape: TreeShape, depth: int,
            branch: torch.Tensor | None = None, policy: AdaptivePolicy | None = None,
            matched: torch.Tensor | None = None) -> tuple[Tree, Draft]:
    """The candidates for this step (see draft), merged into a tree under the pending token:
    the speculator's, and the lookup branch when the shape has one."""
    parts = draft(state, speculator, shape, depth, branch, policy, matched)
    chosen = [] if parts.speculator is None else [parts.speculator]
    if shape.lookup and parts.lookup is not None:
        branch = parts.lookup[..., : shape.lookup]  # b 1 L
        if parts.lookup_taken is not None:
            cut = torch.arange(branch.size(2), device=branch.device) >= parts.lookup_taken.view(-1, 1, 1)  # b 1 L
            branch = branch.masked_fill(cut, NO_TOKEN)
        chosen.append(branch)
    if not chosen:
        return root_only(state.pending), parts
    return build_tree(state.pending, _side_by_side(chosen)), parts


def _side_by_side(parts: list[torch.Tensor]) -> torch.Tensor:
    """Candidate sets [b, k_i, D_i] as one [b, sum k_i, max D_i], shorter ones padded with NO_TOKEN."""
    width = max(part.size(2) for part in parts)
    return torch.cat([torch.nn.functional.pad(part, (0, width - part.size(2)), value=NO_TOKEN) for part in parts], dim=1)


def foresee(policy: AdaptivePolicy, shape: TreeShape, parts: Draft, start: torch.Tensor, active: torch.Tensor,
            matched: torch.Tensor) -> list[Hindsight]:
    """The other shapes on the policy's menu that this step's parts make, for rows active
    [b] that had emitted start [b] tokens and whose lookup matched [b]: the top-1 chain,
    this tree cut to fewer stages or narrowed, the lookup branch alone, and the chain or this tree with
    the branch beside it or taken away. A row speaks once for each record, and not for plain
    decoding's: a row that matched nothing counts for a shape with a branch as for its twin
    without one (and for the branch alone as for no speculation at all)."""
    if parts.expansion is None and parts.lookup is None:
        return []  # a plain step makes no other tree: the usual step at large batches
    grown = {}  # speculator shape -> its candidates [b, k, D]
    if parts.expansion is not None:
        paths, scores = parts.expansion  # b N D, b N D
        top_k, D = list(parts.top_k), len(parts.top_k)  # near the end, fewer stages than the shape has
        if parts.lookup_taken is None:  # nodes chosen beside a branch are not those the tree alone would take
            grown[shape.without_lookup] = parts.speculator
        # the chain (a chain's step already teaches the shorter ones) and every smaller tree
        # (fewer stages or fewer children per stage), each keyed as its own step would be,
        # which near the end is cut the same way
        grown.setdefault(TreeShape((1,) * shape.depth, 1), paths[:, :1])  # b 1 D
        for other in policy.menu:
            if other.is_chain or other.lookup or other.nodes or other in grown or not is_inside(other.top_k, shape.top_k):
                continue
            sub, sub_scores = sub_paths(paths, scores, top_k, list(other.top_k[:D]))  # b N_s d, b N_s
            grown[other] = best_paths(sub, sub_scores, min(other.n_candidates, sub.size(1)))[0]
    rows_n = [(r, n) for r, (n, on) in enumerate(zip(matched.tolist(), active.tolist())) if on]
    taught = {r: {policy.key(shape, n), (PLAIN, 0)} for r, n in rows_n}  # records each row has spoken for
    waiting = []
    for other in policy.menu:
        if other.lookup and parts.lookup is not None and (not other.top_k or other.without_lookup in grown):
            branch = parts.lookup[..., : other.lookup]  # b 1 L
            candidates = _side_by_side([grown[other.without_lookup], branch]) if other.top_k else branch
        elif not other.lookup and other in grown:
            candidates = grown[other]
        else:
            continue
        rows = [(r, n) for r, n in rows_n if policy.key(other, n) not in taught[r]]
        for r, n in rows:
            taught[r].add(policy.key(other, n))
        if rows:
            index = torch.tensor([r for r, _ in rows], device=start.device)
            waiting.append(Hindsight(other, candidates[index], start[index], index, [n for _, n in rows]))
    return waiting


def glance(policy: AdaptivePolicy, state: DecodeState, speculator: MLPSpeculator | None, depth: int,
           active: torch.Tensor) -> list[Hindsight]:
    """The speculator's top-1 chain from where rows active [b] stand, drafted but not
    verified, to be judged in hindsight (learn_in_hindsight) by the tokens that plain
    decoding emits: what the deepest chain on the menu (no deeper than `depth`) would have
    accepted, which teaches the shorter chains too (AdaptivePolicy.learn).

    For the plain steps the policy chooses (not those it rests on): a plain step teaches it
    nothing of the speculator, so text that changes under it would be judged by what the
    chains did before. One policy for three code prompts, then three chat prompts, on F16
    llama.cpp (AVX2 kernels): chat ran at 1.01x llama.cpp plain, where a fresh policy made
    1.49x. A glance costs a chain's proposal, 1-3 ms at batch 1 (1.2 / 3.0 ms for one / four
    heads on F16), on about one plain step in nine where the policy rests on plain."""
    chains = [s for s in policy.menu if s.is_chain and not s.lookup and s.depth <= depth]
    if speculator is None or not chains:
        return []
    deepest = max(chains, key=lambda s: s.depth)
    paths, _ = speculator.expand(state.hidden.unsqueeze(1).to(speculator.dtype), state.pending.unsqueeze(1),
                                 list(deepest.top_k))  # b 1 D, b 1 D
    rows = active.nonzero().flatten()  # r
    return [Hindsight(deepest, paths[rows], state.n_emitted[rows], rows, [0] * rows.numel())]


def learn_in_hindsight(policy: AdaptivePolicy, state: DecodeState) -> None:
    """Judge every waiting tree whose rows have emitted all the tokens it guessed (or
    stopped), and tell the policy what it would have accepted (tree.hindsight_accepted)."""
    waiting = []
    for seen in state.hindsight:
        known = _known(state, seen)  # r
        if bool(((known >= seen.candidates.size(2)) | state.finished[seen.rows]).all()):
            _judge(policy, state, seen, known)
        else:
            waiting.append(seen)
    state.hindsight = waiting


def judge_leaving(policy: AdaptivePolicy, state: DecodeState, leaving: list[int]) -> None:
    """Before rows leave the batch, judge the waiting trees now for those that finished
    (their tokens are final; an aborted row's are not, and it teaches nothing), and keep
    the trees waiting for the other rows only."""
    gone = torch.tensor(leaving, dtype=torch.long)
    waiting = []
    for seen in state.hindsight:
        leaves = torch.isin(seen.rows, gone.to(seen.rows.device))  # r
        done = leaves & state.finished[seen.rows]  # r
        if bool(done.any()):
            finished = seen.only(done)
            _judge(policy, state, finished, _known(state, finished))
        if not bool(leaves.all()):
            waiting.append(seen.only(~leaves))
    state.hindsight = waiting


def renumber_hindsight(state: DecodeState, source: int, target: int) -> None:
    """Row `source` moved to `target` (engine.Engine._leave): the waiting trees follow it."""
    state.hindsight = [seen._replace(rows=torch.where(seen.rows == source, target, seen.rows))
                       for seen in state.hindsight]


def _known(state: DecodeState, seen: Hindsight) -> torch.Tensor:
    """How many of the tokens a waiting tree guessed each of its rows has emitted [r]."""
    return (state.n_emitted[seen.rows] - seen.start).clamp(0, seen.candidates.size(2))


def _judge(policy: AdaptivePolicy, state: DecodeState, seen: Hindsight, known: torch.Tensor) -> None:
    """Tell the policy what the waiting tree would have accepted for its rows, `known` [r]
    of whose guessed tokens are out (tree.hindsight_accepted)."""
    slots = seen.start.unsqueeze(1) + torch.arange(seen.candidates.size(2), device=known.device)  # r L
    accepted = hindsight_accepted(seen.candidates, state.tokens[seen.rows].gather(1, slots), known)  # r
    policy.learn(seen.shape, (accepted + 1).tolist(), seen.matched)


def verify(model, state: DecodeState, tree: Tree):
    """Score every tree node in one forward pass after the committed context (`model`: a
    transformers model or a runner.Runner). Returns the logits at its nodes, as the walk
    reads them (logits_at), and the states there [b, q, (1+l)d]."""
    cache, (b, q) = state.cache, tree.tokens.shape
    if cache.length + cache.pass_width(q, b) > cache.capacity:
        compact(state)
    return as_runner(model).verify(cache, state.valid, state.position, tree, state.feature_layers)


def build_graphs(model, state: DecodeState, largest: int) -> None:
    """On a static cache (a compiled model), one pass of every width that trees of up to
    `largest` nodes pad to, rolled back: each builds its graph on first use, tens of
    seconds, which must not land in a step that the adaptive policy times."""
    if not state.cache.static:
        return
    b, L = state.pending.size(0), state.cache.length
    for width in sorted({state.cache.pass_width(n, b) for n in range(1, largest + 1)}):
        if compiles(model, b * width) and not graph_built(model, b, width, state.cache.capacity):
            verify(model, state, flat_tree(state.pending, width))
            state.cache.roll_back(L)


def calibrate(policy: AdaptivePolicy, model, state: DecodeState, speculator: MLPSpeculator) -> None:
    """Time the base model's forward over trees of a few sizes, and the speculator's
    proposals, on the real context; nothing is committed, the cache is rolled back."""
    b = state.pending.size(0)
    L = state.cache.length

    def forward_seconds(q: int) -> float:
        tree = flat_tree(state.pending, q)
        tick = policy.clock()
        verify(model, state, tree)
        _wait(state.pending.device)
        seconds = policy.clock() - tick
        state.cache.roll_back(L)
        return seconds

    def propose_seconds(shape: TreeShape) -> float:
        tick = policy.clock()
        branch, matched = look_up(state, shape.lookup) if shape.lookup else (None, None)
        propose(state, speculator, shape, max(shape.depth, shape.lookup), branch, policy, matched)
        _wait(state.pending.device)
        return policy.clock() - tick

    policy.calibrate(b, forward_seconds, propose_seconds)


def calibration_file(model, speculator: MLPSpeculator, menu: list[TreeShape]) -> Path:
    """Where a policy's calibration (AdaptivePolicy.calibration) is kept on this machine,
    one file per host, base model, dtype, device, thread count, CPU kernels (their path and
    capability), speculator and menu: a change in any of them times the steps again."""
    identity = as_runner(model).identity() | {"speculator": speculator.config.to_dict(),
                                              "menu": [str(shape) for shape in menu]}
    return keyed_file(cache_dir() / "calibration", identity)


def remembered_policy(model, speculator: MLPSpeculator, lookup: int = 0,
                      recalibrate: bool = False) -> tuple[AdaptivePolicy, Path]:
    """An adaptive policy for this pair, with the step costs an earlier process measured on
    this machine where they are kept (calibration_file; not with `recalibrate`, nor where the
    file does not read back), and the file to keep them in (remember_calibration)."""
    policy = AdaptivePolicy(shape_menu(speculator.config, lookup=lookup))
    file = calibration_file(model, speculator, policy.menu)
    if file.is_file() and not recalibrate:
        try:
            policy.restore(json.loads(file.read_text()))
        except (ValueError, KeyError, TypeError, MLPSpecError) as error:
            warnings.warn(f"{file}: not a calibration this policy can use ({error}); timing the steps again")
            policy = AdaptivePolicy(policy.menu)
    return policy, file


def remember_calibration(policy: AdaptivePolicy, file: Path) -> None:
    atomic_write(file, lambda tmp: Path(tmp).write_text(json.dumps(policy.calibration())))


def _wait(device: torch.device) -> None:
    """Let the work queued on an accelerator finish, so that a host clock times it. Decoding
    steps need none: each reads its result back to the host before the policy's clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compact(state: DecodeState) -> None:
    """Squeeze out the holes that ragged acceptance left, keeping each row's order."""
    L = state.cache.length
    valid = state.valid[:, :L]
    count = valid.sum(dim=1)  # b
    keep = int(count.max())
    order = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices[:, :keep]  # b keep
    state.cache.keep(0, order)
    state.valid.zero_()
    state.valid[:, :keep] = torch.arange(keep, device=valid.device) < count.unsqueeze(1)


def commit(state: DecodeState, tree: Tree, hidden, path, n_accepted, bonus, eos: torch.Tensor,
           max_new: int | torch.Tensor) -> torch.Tensor:
    """Keep the accepted path in the cache and emit its tokens plus the bonus token.

    path [b, A+1] are node ids (root first) of the tree just verified, n_accepted [b] the
    accepted candidate tokens, bonus [b] the base model's next token. Returns the tokens
    emitted this step, [b, A+1], with -1 past each row's count."""
    b, width = path.shape
    rows = torch.arange(b, device=path.device)
    L = state.cache.length - tree.size  # the tree sat at L..L+q
    if tree.size > 1:  # a lone root is already in place
        state.cache.keep_path(L, L + path, n_accepted + 1)
    kept = torch.arange(width, device=path.device) < (n_accepted + 1).unsqueeze(1)  # b A+1

    # The pending token (the root) was emitted when it was picked; now come the accepted
    # candidates, then the bonus token, which becomes the new pending token.
    new = torch.cat([tree.tokens.gather(1, path[:, 1:]), bonus.unsqueeze(1)], dim=1)  # b A+1
    new.scatter_(1, n_accepted.unsqueeze(1), bonus.unsqueeze(1))  # bonus right after each row's accepted
    new = _emit(state, new, n_accepted + 1, eos, max_new)
    # Only rows still going keep what they committed: a row that finished this step (at EOS,
    # or at max_new with accepted tokens to spare) rides along from now on, and must not
    # hold cache room that compaction could not then find for the others.
    state.valid[:, L : L + width] = kept & ~state.finished.unsqueeze(1)
    state.valid[:, L + width :] = False
    state.position += n_accepted + 1
    state.pending = bonus
    state.hidden = hidden[rows, path[rows, n_accepted]]  # b (1+l)d   the state that produced bonus
    return new


def _emit(state: DecodeState, new: torch.Tensor, count: torch.Tensor, eos: torch.Tensor,
          max_new: int | torch.Tensor) -> torch.Tensor:
    """Append up to `count` [b] of `new` [b, w] to each unfinished row, stopping after a
    stop token (eos: [E] for every row, or [b, E] each row its own, -1 padding) or at
    max_new tokens (one for all, or [b]). Returns `new` with -1 where nothing was emitted."""
    steps = torch.arange(new.size(1), device=new.device)
    count = torch.minimum(count, max_new - state.n_emitted)
    stops = torch.isin(new, eos) if eos.dim() == 1 else (new.unsqueeze(-1) == eos.unsqueeze(1)).any(dim=-1)  # b w
    is_eos = stops & (steps < count.unsqueeze(1))  # b w
    hit_eos = is_eos.any(dim=1) & ~state.finished
    count = torch.where(hit_eos, is_eos.long().argmax(dim=1) + 1, count)  # up to and with the EOS
    count = torch.where(state.finished, 0, count)
    emit = steps < count.unsqueeze(1)  # b w
    # the token buffer has room for max_new + reach + 1 tokens, so these slots never overflow
    slots = state.n_emitted.unsqueeze(1) + steps  # b w
    state.tokens.scatter_(1, slots, torch.where(emit, new, state.tokens.gather(1, slots)))
    state.n_emitted += count
    state.finished |= hit_eos | (state.n_emitted >= max_new)
    return torch.where(emit, new, -1)


def decoding_shapes(model, speculator: MLPSpeculator | None, top_k_tokens_per_head: list[int] | None,
                    n_candidates: int | None, lookup: int, adaptive: AdaptivePolicy | bool
                    ) -> tuple[TreeShape, AdaptivePolicy | None, int]:
    """The tree shape every step uses (the speculator's, or top_k_tokens_per_head /
    n_candidates, with a lookup branch of `lookup` tokens), the adaptive policy that picks
    one each step instead (adaptive=True makes one over that shape's menu), and the
    speculator stages a step runs at most."""
    if isinstance(lookup, bool) or not isinstance(lookup, int) or lookup < 0:
        raise MLPSpecError(f"lookup must be an integer >= 0 (0: no prompt-lookup branch), got {lookup!r}")
    h, cfg, shape, policy = 0, None, TreeShape((), 0, lookup), None
    if speculator is not None:
        check_pair(model, speculator)
        cfg = speculator.config
        top_k = list(cfg.top_k_tokens_per_head if top_k_tokens_per_head is None else top_k_tokens_per_head)
        n_candidates = cfg.n_candidates if n_candidates is None else n_candidates
        check_proposal_shape(top_k, n_candidates, cfg.n_predict, cfg.head_size)
        h = len(top_k)
        shape = TreeShape(tuple(top_k), n_candidates, lookup)
    if adaptive is True:
        policy = AdaptivePolicy(shape_menu(cfg, list(shape.top_k) or None, lookup)) if shape != PLAIN else None
    elif adaptive:
        policy = adaptive
    menu = policy.menu if policy is not None else [shape]
    if speculator is None and any(s.depth for s in menu):
        raise MLPSpecError("the adaptive policy's shapes need a speculator")
    return shape, policy, h


def eos_tokens(model, eos_token_id, device) -> torch.Tensor:
    if eos_token_id is None:
        eos_token_id = as_runner(model).eos_token_id
    if eos_token_id is None:
        eos_token_id = []
    if isinstance(eos_token_id, int):
        eos_token_id = [eos_token_id]
    return torch.tensor(list(eos_token_id), dtype=torch.long, device=device)
