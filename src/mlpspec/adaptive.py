"""Adaptive speculation: each step, the tree shape (or none at all) that should give the most
tokens per second, on this hardware, at this batch size, for this text.

The menu (shape_menu) is plain decoding, top-1 chains, and the likeliest nodes of the
speculator's whole tree, which shapes itself within the step: every node the speculator
grows is scored by the draft's probability of the path to it, and a row's tree is the m
likeliest, m chosen for the most tokens per second (node_counts), with a lookup branch's
tokens competing for a place by how often such copies were right (lookup_chances).

A shape's worth is tokens per step divided by seconds per step. The seconds come from a
cost model calibrated at start-up on the real context: the base model's forward time at a
few tree sizes (one node, two, the largest tree) for the batch at hand, interpolated in
between, plus the speculator's own time for each shape. The tokens come from decoding: for
each shape, how often a row accepted at least j tokens is tracked as a moving average once
it has been used (a top-1 chain's step also counts for every shorter chain, and the decoder
reports in hindsight what the other trees a step's parts make would have accepted:
decode.foresee), and a shape not yet used is credited with the most it could ever give, 1 +
its depth (or its lookup branch's length). So a shape is tried only if it could pay at all:
at a large batch, where a big tree costs more than it could ever return, it is never tried.
A batch's worth is the tokens all its rows gain per second: its rows join and leave at any
step (engine.py), so a row done early frees its place, and each row counts at its own mean
(expected_tokens). Each step takes the best
estimate with each row's acceptance tails raised by an optimism bonus that shrinks with use
(UCB), so a shape that fell behind is retried now and then and a drift in acceptance is
noticed.

Costs keep the calibrated shape, monotone in tree size: per-shape averages of measured step
times are noisy, and the policy would pick whichever shape was timed luckiest (at a batch
where speculation only breaks even, that cost 10% in the bench). What a shape's steps do
report is their tree's size, which is steadier: candidates that share prefixes make fewer
nodes than the most the shape allows, and a shape's cost is read at its mean size. What
calibration cannot see (a speculative step's bookkeeping: keeping the accepted path,
compacting the cache; a context that grew) comes in as two correction factors per batch
size, measured over all plain steps and over all speculative steps, which pool many steps
and stay steady. For the same reason speculation must beat plain decoding by a margin.
Every shape is lossless, so the choice changes only the speed.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from .errors import MLPSpecError
from .model import MLPSpeculatorConfig
from .tree import expansion_nodes


@dataclass(frozen=True)
class TreeShape:
    top_k: tuple[int, ...]  # one entry per speculator stage run; () runs none
    n_candidates: int
    lookup: int = 0  # tokens of a prompt-lookup branch beside the speculator's candidates
    # > 0: instead of the best n_candidates leaves, the tree is the likeliest of the nodes
    # these stages grow, at most this many, as many as pay for themselves this step
    # (tree.likeliest_nodes, AdaptivePolicy.node_counts)
    nodes: int = 0

    @property
    def depth(self) -> int:
        return len(self.top_k)

    @property
    def max_nodes(self) -> int:
        return 1 + (self.nodes or self.n_candidates * self.depth) + self.lookup

    @property
    def is_chain(self) -> bool:
        """A top-1 chain: the speculator's single best guess at each depth, nothing else."""
        return bool(self.top_k) and set(self.top_k) == {1} and not self.lookup

    @property
    def without_lookup(self) -> "TreeShape":
        """The same speculator tree with no lookup branch (plain decoding for lookup alone)."""
        return TreeShape(self.top_k, self.n_candidates, nodes=self.nodes)

    def __str__(self) -> str:
        if not self.top_k:
            return f"lookup{self.lookup}" if self.lookup else "plain"
        tree = f"{list(self.top_k)}~{self.nodes}" if self.nodes else f"{list(self.top_k)}x{self.n_candidates}"
        return f"{tree}+lookup{self.lookup}" if self.lookup else tree


PLAIN = TreeShape((), 0)
# The likeliest-nodes tree takes at most this many of the whole tree's nodes. Replayed
# over every position of the bench's chat and code outputs (teacher-forced, this CPU's step
# costs), its choice averaged 7.4 nodes on chat and 5.5 on code with room for 40, and 12
# gave the same speed as 20 and 40 (2.49x plain decoding on chat, the best fixed shape 2.29x).
LIKELIEST_NODES = 12


def shape_menu(config: MLPSpeculatorConfig | None, top_k: list[int] | None = None,
               lookup: int = 0) -> list[TreeShape]:
    """Plain decoding, top-1 chains of every depth, and, where the configured tree
    branches, its likeliest nodes (TreeShape.nodes): a tree sized and shaped each step by
    the draft's own confidence, which stands in for every fixed tree inside the whole one.
    With `lookup`, also the prompt-lookup branch alone, and beside the deepest chain and
    beside the likeliest nodes: few shapes, since each is tracked per matched n-gram size.

    Fixed trees were on the menu before the likeliest nodes (the whole tree cut to every
    depth, and narrow ones with the runner-up at the first one or two stages). Against
    them, at batch 1 on the bench's chat prompts, this menu made 2.10x our plain decoding
    where they made 2.05x, code 2.46x both, and batch 2 (chat and code mixed) 1.55x and
    1.52x: fewer shapes to try and to track, and none of them better."""
    chains, deepest = [], []  # the deepest: the longest chain, and the likeliest nodes
    if config is not None:
        top_k = list(config.top_k_tokens_per_head if top_k is None else top_k)
        chains = [TreeShape((1,) * d, 1) for d in range(1, len(top_k) + 1)]
        deepest = [chains[-1]]
        if math.prod(top_k) > 1:
            grown = expansion_nodes(top_k)[0].numel()  # nodes of the whole tree
            deepest.append(TreeShape(tuple(top_k), 0, nodes=min(LIKELIEST_NODES, grown)))
    menu = [PLAIN, *chains, *deepest[1:]]
    if lookup:
        menu += [TreeShape((), 0, lookup), *(TreeShape(s.top_k, s.n_candidates, lookup, s.nodes) for s in deepest)]
    return menu


@dataclass
class ShapeRecord:
    uses: int = 0  # steps learned from: the shape's own, and for chains those a deeper chain implied
    # at_least[j - 1]: how often a row accepted j candidate tokens or more, moving average
    at_least: list[float] = field(default_factory=list)

    @property
    def tokens_per_step(self) -> float:
        """Per row: the bonus token plus the expected accepted ones."""
        return 1.0 + sum(self.at_least)


@dataclass
class AdaptivePolicy:
    """Keep one policy across generate calls (a server keeps one for its lifetime): what it
    learns of each shape's tokens per step holds at every batch size, while step costs are
    calibrated and tracked per batch size (in power-of-two buckets)."""

    menu: list[TreeShape]
    smoothing: float = 0.03  # weight of the newest observation in the moving averages
    exploration: float = 0.2  # size of the optimism bonus on each acceptance tail P(accepts >= j)
    margin: float = 0.10  # speculate only where the estimate beats plain decoding by this much
    rounds: int = 3  # calibration rounds
    # a lookup shape is offered only where its step costs at most this many plain steps: a
    # copy's yield averages 2-3 tokens over the rows that matched, so beyond that it cannot
    # pay, though its reach (1 + 10 tokens) says it could (the bench lost 16% at batch 8,
    # where the policy picked lookup steps expecting 3.7 tokens a row and got 2.7). 3, not 2:
    # once a one-token bfloat16 pass ran on PyTorch's own kernels (24 ms against 41-50 ms for
    # 2-16 tree nodes on oneDNN, native bfloat16), every tree with the branch cost over two
    # plain steps, and on unseen code at batch 1 the policy decoded plain on 406 steps of 445
    # (1.09x our plain loop) where the branch alone made 1.33x
    lookup_cost_ratio: float = 3.0
    # after n plain picks in a row at a batch size, the next min(n, rest_limit) steps there are
    # plain without asking (see resting)
    rest_limit: int = 8
    # ... counting only plain picks that beat every other shape by this much: where plain
    # only edges ahead (batch 2 here), resting on it would stop the learning (a plain step
    # teaches nothing) that could turn the choice back, and one bench run at batch 2 took
    # 199 plain steps of 278 that way (1.21x HF greedy where v27 made 1.71x). Plain's lead
    # over the best other shape, at the 90th percentile of its choices: 1.01 at batch 2;
    # at the median: 1.16 at batch 4, 1.21 at batch 8 (at 0.2 the bench's batch 8 rested
    # less, and its all-plain steps took 0.964x our plain loop's pace)
    rest_margin: float = 0.1
    clock: object = time.perf_counter  # injectable, for tests
    records: dict[tuple[TreeShape, int], ShapeRecord] = field(default_factory=dict)  # (shape, context)
    seconds: dict[int, dict[TreeShape, float]] = field(default_factory=dict)  # bucket -> shape -> s/step
    # (bucket, speculative) -> (steps, measured over calibrated seconds: their plain mean at
    # first, a moving average later). Calibration sees a short context in an idle engine;
    # serving, a speculative step at batch 32 in bfloat16 took 1.65 times its calibrated
    # time, and a moving average from the warm-up's first steps still said 1.31 after 26
    # such steps, which the policy kept taking at 0.95x plain decoding's pace
    drift: dict[tuple[int, bool], tuple[int, float]] = field(default_factory=dict)
    forward: dict[int, tuple[list[int], list[float]]] = field(default_factory=dict)  # bucket -> tree sizes, s
    propose_seconds: dict[int, dict[TreeShape, float]] = field(default_factory=dict)  # bucket -> shape -> s
    nodes: dict[tuple[int, TreeShape], tuple[int, float]] = field(default_factory=dict)  # -> (steps, mean tree size)
    rest: dict[int, tuple[int, int]] = field(default_factory=dict)  # bucket -> (plain picks in a row, steps to rest)
    # (bucket, shape) -> (steps, what its steps accepted over what its records expected, a
    # moving average). The records hold at every batch size, but a likeliest-nodes tree
    # takes fewer nodes where a step's cost grows faster with its width, and accepts less:
    # its steps at batch 16 gave 1.56 tokens a row where its records, learned mostly at
    # small batches, said more, and speculation ran at 0.90x plain decoding (closed loop,
    # float32, 2-core AMD EPYC; experiments/engine_ab.py)
    yields: dict[tuple[int, TreeShape], tuple[int, float]] = field(default_factory=dict)
    yield_prior: int = 4  # steps' worth of belief in the records at first: one unlucky step moves a yield a fifth
    steps: int = 0

    def __post_init__(self):
        self.records = {}

    def record(self, shape: TreeShape, matched: int = 0) -> ShapeRecord:
        """What a shape has done for one row whose lookup matched an n-gram of `matched`
        tokens (0: none). A lookup shape is tracked per n (a 3-gram match is copied right far
        more often than a 1-gram one); for a row with no match its lookup branch is empty, so
        the row counts for the shape's twin without the branch. The speculator's own shapes
        do not depend on n."""
        return self.records.setdefault(self.key(shape, matched), ShapeRecord())

    @staticmethod
    def key(shape: TreeShape, matched: int = 0) -> tuple[TreeShape, int]:
        """The record a row with that match counts for (see record)."""
        if shape.lookup and not matched:
            shape = shape.without_lookup
        return shape, matched if shape.lookup else 0

    @staticmethod
    def bucket(batch_size: int) -> int:
        """Batch sizes share costs in power-of-two buckets (1, 2, 4, 8, ...): a server with
        a live batch size calibrates a handful of times, not once per size."""
        return 1 << (batch_size - 1).bit_length()

    def calibrated(self, batch_size: int) -> bool:
        return self.bucket(batch_size) in self.seconds

    def calibrate(self, batch_size: int, forward_seconds: Callable[[int], float],
                  propose_seconds: Callable[[TreeShape], float]) -> None:
        """Set every shape's cost at this batch size: forward_seconds(q) times the base
        model's forward over q tree nodes (measured at 1, 2 and the largest tree, linear in
        between), and propose_seconds(shape) the speculator's (and the lookup's) work for
        that shape, each the best of `rounds` timings. A shape's tree is taken at its largest
        until steps report its real size (candidates share prefixes: the [4, 3, 2] x 5 tree of
        16 nodes averaged 12.6 at batch 1, and the calibrated cost overstated its steps by 14%)."""
        largest = max(s.max_nodes for s in self.menu)
        points = sorted({1, min(2, largest), largest})
        # the best of a few rounds, each timing every size once: a busy spell on a shared
        # machine then slows one round of all sizes, not one size of all rounds
        measured = [min(times) for times in zip(*[[forward_seconds(q) for q in points] for _ in range(self.rounds)])]
        bucket = self.bucket(batch_size)
        self.forward[bucket] = (points, measured)  # node_counts reads it while proposals are timed
        self.propose_seconds[bucket] = {PLAIN: 0.0}
        # proposals too: timed once each, two narrow trees read 3.7 ms where their best of
        # four rounds was 2.1 (the chain's), and the policy passed them over
        shapes = [shape for shape in self.menu if shape != PLAIN]
        proposed = [min(times) for times in zip(*[[propose_seconds(s) for s in shapes] for _ in range(self.rounds)])]
        self.propose_seconds[bucket].update(zip(shapes, proposed))
        self.seconds[bucket] = {shape: self._seconds(bucket, shape, shape.max_nodes) for shape in self.menu}

    def calibration(self) -> dict:
        """What calibrate measured at each batch-size bucket, as JSON, for restore: a later
        process on the same machine (the CLI's next generate) then skips the timing."""
        return {str(bucket): {"points": points, "forward_s": measured,
                              "propose_s": [self.propose_seconds[bucket][shape] for shape in self.menu]}
                for bucket, (points, measured) in self.forward.items()}

    def restore(self, saved: dict) -> None:
        """Take the buckets of an earlier calibration() of a policy with the same menu. What
        decoding measures still corrects them, as it corrects a fresh calibration."""
        if not isinstance(saved, dict):
            raise MLPSpecError(f"a calibration is an object of batch-size buckets, got {type(saved).__name__}")
        for bucket, entry in saved.items():
            points, measured, propose = entry["points"], entry["forward_s"], entry["propose_s"]
            if len(points) != len(measured) or len(propose) != len(self.menu) or sorted(points) != points:
                raise MLPSpecError(f"a calibration of {len(propose)} shapes at {len(points)} tree sizes does not fit "
                                   f"this policy's {len(self.menu)} shapes")
            bucket = int(bucket)
            self.forward[bucket] = ([int(q) for q in points], [float(t) for t in measured])
            self.propose_seconds[bucket] = {shape: float(t) for shape, t in zip(self.menu, propose)}
            self.seconds[bucket] = {shape: self._seconds(bucket, shape, shape.max_nodes) for shape in self.menu}

    def _seconds(self, bucket: int, shape: TreeShape, nodes):
        """The calibrated time of a step of `shape` whose tree has `nodes` nodes (a number,
        or an array of them for an array of times)."""
        points, measured = self.forward[bucket]
        return np.interp(nodes, points, measured) + self.propose_seconds[bucket].get(shape, 0.0)

    def node_counts(self, batch_size: int, shape: TreeShape, chances: torch.Tensor) -> torch.Tensor:
        """How many of a tree's likeliest nodes each row takes [b], given their chances of
        acceptance [b, n] (descending: decode.likeliest): one count m for the whole batch,
        the one with the most tokens per second, the rows' mean of 1 + the sum of their
        first m chances over the calibrated time of a step of `shape` with m + 1 nodes.

        One count, because a pass pads every row's tree to the widest: a row given fewer
        nodes than another saves nothing, and each row's m likeliest are its own, by its
        own draft confidence and lookup match. That is the step's node budget, b (m + 1)
        nodes, chosen from the cost curve of this batch size.

        A step accepts the nodes on one path, so its expected accepted tokens are the sum of
        each node's chance that its whole path is right, and for the speculator's nodes the
        draft's path probability stands for that chance. The speculator's probabilities
        are honest: replaying the ninth default over the bench's chat outputs, a first token
        drafted at 0.1-0.2 was right 15% of the time, at 0.4-0.5 53%, at 0.8-0.9 87%; a table
        of such counts learned on half the prompts chose trees 1% faster on the other half
        than the draft's own word."""
        counts = np.arange(1, chances.size(1) + 1)  # m
        seconds = self._seconds(self.bucket(batch_size), shape, 1 + counts)  # m
        tokens = 1 + chances.float().cumsum(dim=1).mean(dim=0)  # m   a row's mean, with m nodes each
        best = int((tokens / torch.tensor(seconds, dtype=tokens.dtype, device=tokens.device)).argmax()) + 1
        return torch.full((chances.size(0),), best, dtype=torch.long, device=chances.device)  # b

    def lookup_chances(self, lookup: int, matched: Sequence[int]) -> torch.Tensor:
        """The chance that a lookup branch of `lookup` tokens is right up to and with its
        j-th token, for rows whose lookup matched n-grams of `matched` tokens [b, lookup]:
        what the branch alone accepted at that n (its record's tails; decode.foresee teaches
        it from every step with a branch), 1 where it has not been seen, 0 where nothing
        matched (the branch is empty)."""
        branch = TreeShape((), 0, lookup)
        rows = [(self.tails(branch, n) if n else []) + [0.0] * lookup for n in matched]
        return torch.tensor([row[:lookup] for row in rows], dtype=torch.float)

    def choose(self, batch_size: int, max_depth: int, matched: Sequence[int] = (0,)) -> TreeShape:
        """The shape to use for the next step, among those no deeper than max_depth (one less
        than the most tokens any active row has left), given for each active row the n-gram
        size its lookup matched. Where no row matched, the lookup shapes would not speed
        them: they are left out, their twins stand in for them."""
        offered = self.lookup_shapes(batch_size) if any(matched) else []
        allowed = [s for s in self.menu if s.depth <= max_depth and (not s.lookup or s in offered)]
        scores = {shape: self._score(shape, batch_size, matched) for shape in allowed}
        best = max(scores, key=scores.get)
        if len(allowed) > 1:  # a plain step forced by the tokens left says nothing of the batch size
            runner_up = max(score for shape, score in scores.items() if shape != PLAIN)
            clear = best == PLAIN and scores[PLAIN] >= (1 + self.rest_margin) * runner_up
            bucket = self.bucket(batch_size)
            streak = self.rest.get(bucket, (0, 0))[0] + 1 if clear else 0
            self.rest[bucket] = (streak, min(streak, self.rest_limit))
        return best

    def resting(self, batch_size: int) -> bool:
        """Whether the next step at this batch size is plain without asking choose (and
        without the lookup that feeds it). Where plain decoding wins every step, at batch
        4-16 here, choosing among 14 shapes took 0.3 ms of a 25 ms step, and the bench's
        floor (0.97x the best plain method) is missed by that much: so after n plain picks in
        a row, each beating every other shape by rest_margin, the next min(n, rest_limit)
        steps rest, and choose runs on about one step in nine. A shape the optimism bonus
        would retry is retried a few steps later."""
        bucket = self.bucket(batch_size)
        streak, left = self.rest.get(bucket, (0, 0))
        if left:
            self.rest[bucket] = (streak, left - 1)
        return left > 0

    def lookup_shapes(self, batch_size: int) -> list[TreeShape]:
        """The lookup shapes on offer at this batch size (see lookup_cost_ratio); where there
        are none, the decoder skips the lookup itself."""
        plain = self.cost(PLAIN, batch_size)
        return [s for s in self.menu if s.lookup and self.cost(s, batch_size) <= self.lookup_cost_ratio * plain]

    def tails(self, shape: TreeShape, matched: int = 0, bonus: bool = False) -> list[float]:
        """P(a row accepts j or more candidate tokens), j = 1, 2, ..., in one step of `shape`,
        for a row whose lookup matched an n-gram of `matched` tokens: its record's moving
        averages; with `bonus`, each raised by the optimism bonus (UCB). A shape not yet used
        is credited with the most it could give, every candidate token of its reach."""
        record = self.record(shape, matched)
        reach = max(shape.depth, shape.lookup if matched else 0)
        at_least, used = record.at_least, record.uses
        if not used:
            # a tree with a lookup branch gives at least what each part gives alone; where
            # the parts are known, that is its estimate (as if tried once), not its reach
            # of 1 + lookup tokens, which would make every batch size pay to try it
            parts = (TreeShape((), 0, shape.lookup), shape.without_lookup) if shape.lookup and shape.depth and matched else ()
            known = [r for r in (self.record(p, matched) for p in parts) if r.uses]
            best = max(known, key=lambda r: r.tokens_per_step) if known else None
            at_least, used = (best.at_least, 1) if best else ([1.0] * reach, 0)
        if bonus and used and reach:
            # UCB: each of the row's acceptance tails is raised by a bonus that shrinks with
            # use. At batch 1 this adds up to `reach` bonuses (UCB1's range: a lookup branch
            # of 10 that two unlucky first copies put at 1 token/step was never retried at
            # 0.2 tokens of optimism, and code fell from 2.36x to 1.50x on that luck); at
            # batch b the policy weighs it by 1 / b (_score)
            lift = self.exploration * math.sqrt(math.log(self.steps + 1) / used)
            at_least = [min(1.0, p + lift) for p in list(at_least) + [0.0] * (reach - len(at_least))]
        return list(at_least)

    def expected_tokens(self, shape: TreeShape, matched: Sequence[int] = (0,), bonus: bool = False) -> float:
        """Tokens per row a step of `shape` is expected to give, for active rows whose lookup
        matched n-grams of `matched` tokens: each row's 1 + the sum of its tails (tails,
        with the optimism bonus with `bonus`), averaged over the rows.

        The mean, not the slowest row: a row that finishes leaves the batch at once and a
        waiting request takes its place (engine.py), so the batch's tokens per second are
        the sum of its rows'. (When batches were decoded to their last row, a shape was
        judged by that row's expected finish, Clark's E[max] over the rows' steps to go.)"""
        known = {n: self.tails(shape, n, bonus) for n in set(matched)}
        return 1.0 + sum(sum(known[n]) for n in matched) / max(len(matched), 1)

    def _score(self, shape: TreeShape, batch_size: int, matched: Sequence[int]) -> float:
        """Expected tokens per second (a speculative shape's candidate tokens scaled by what
        its steps at this batch size accepted against its records: yields), less the margin."""
        tokens = self.expected_tokens(shape, matched, True)
        if shape == PLAIN:
            return tokens / max(self.cost(shape, batch_size), 1e-9)
        # the optimism bonus is not scaled by the yield (a shape that yielded little here is
        # still retried), but by the batch size: a retry costs every row a step, and what it
        # teaches is the same at any batch size, so the policy explores where that is cheapest
        mean = self.expected_tokens(shape, matched)
        yielded = self.yields.get((self.bucket(batch_size), shape), (0, 1.0))[1]
        accepted = (mean - 1) * yielded + (tokens - mean) / batch_size
        return (1 + accepted) / max(self.cost(shape, batch_size), 1e-9) / (1 + self.margin)

    def update(self, shape: TreeShape, batch_size: int, row_tokens: Sequence[float], seconds: float,
               matched: Sequence[int] | None = None, nodes: int | None = None) -> None:
        """One step of `shape` took `seconds` and gave each active row row_tokens tokens;
        matched holds the n-gram size each row's lookup matched (None: no lookup), and nodes
        the size of the tree it verified (None: as calibrated)."""
        bucket = self.bucket(batch_size)
        if shape != PLAIN:  # before this step is learned: what the records said of it
            expected = self.expected_tokens(shape, matched if matched is not None else [0] * len(row_tokens)) - 1
            if expected > 0:
                ratio = (sum(row_tokens) / len(row_tokens) - 1) / expected
                self.yields[(bucket, shape)] = self._averaged(self.yields.get((bucket, shape), (0, 1.0)), ratio,
                                                              self.yield_prior)
        self.learn(shape, row_tokens, matched)
        key = (bucket, shape != PLAIN)
        expected = self.seconds[bucket][shape] if nodes is None else self._seconds(bucket, shape, nodes)
        ratio = seconds / max(expected, 1e-9)
        self.drift[key] = self._averaged(self.drift.get(key, (0, 1.0)), ratio)
        if nodes is not None and shape != PLAIN:
            self.nodes[(bucket, shape)] = self._averaged(self.nodes.get((bucket, shape), (0, 0.0)), nodes)
            self.seconds[bucket][shape] = self._seconds(bucket, shape, self.nodes[(bucket, shape)][1])
        self.steps += 1

    def _averaged(self, entry: tuple[int, float], value: float, prior: int = 0) -> tuple[int, float]:
        """(observations, mean) with `value` folded in: the plain mean at first (the start
        value counting as `prior` observations), a moving average of weight `smoothing`
        once there are enough."""
        count, mean = entry
        return count + 1, mean + max(1.0 / (count + 1 + prior), self.smoothing) * (value - mean)

    def learn(self, shape: TreeShape, row_tokens: Sequence[float], matched: Sequence[int] | None = None) -> None:
        """What one step of `shape` gave (or, learned in hindsight, would have given) each
        row: row_tokens tokens, where its lookup matched an n-gram of matched tokens."""
        matched = matched if matched is not None else [0] * len(row_tokens)
        self._learn(shape, row_tokens, matched)
        if shape.is_chain:
            # a top-1 chain's first d tokens are the chain of depth d, so this step also says
            # exactly what every shorter chain would have given: one step teaches them all
            for chain in self.menu:
                if chain.is_chain and chain.depth < shape.depth:
                    self._learn(chain, [min(t, 1 + chain.depth) for t in row_tokens], matched)

    def _learn(self, shape: TreeShape, row_tokens: Sequence[float], matched: Sequence[int]) -> None:
        """Fold one step's tokens per row into the shape's records (one per matched n)."""
        by_match: dict[int, list[float]] = {}
        for n, tokens in zip(matched, row_tokens):
            by_match.setdefault(n, []).append(tokens)
        groups: dict[int, tuple[ShapeRecord, list[float]]] = {}  # rows that count for one record, averaged
        for n, tokens in by_match.items():
            record = self.record(shape, n)
            groups.setdefault(id(record), (record, []))[1].extend(tokens)
        for record, group in groups.values():
            record.uses += 1
            # the plain mean at first, a moving one later: a noisy early estimate would let
            # the policy chase luck (the shape it picks is the one that looked best so far)
            a = max(1.0 / record.uses, self.smoothing)
            accepted = [t - 1 for t in group]  # whole tokens in decoding; a mean (in tests) spreads as its share
            record.at_least += [0.0] * (math.ceil(max(accepted)) - len(record.at_least))
            for j in range(len(record.at_least)):
                share = sum(min(max(x - j, 0.0), 1.0) for x in accepted) / len(accepted)
                record.at_least[j] += a * (share - record.at_least[j])

    def cost(self, shape: TreeShape, batch_size: int) -> float:
        bucket = self.bucket(batch_size)
        return self.seconds[bucket][shape] * self.drift.get((bucket, shape != PLAIN), (0, 1.0))[1]

    def summary(self) -> str:
        used = [(key, r) for key, r in self.records.items() if r.uses]
        used.sort(key=lambda item: -item[1].uses)
        line = ", ".join(f"{s}{f' ({c}-gram match)' if c else ''}: {r.uses} steps, {r.tokens_per_step:.2f} tok/step"
                         for (s, c), r in used)
        never = [str(s) for s in self.menu if not any(r.uses for (s2, _), r in self.records.items() if s2 == s)]
        line += f"; never tried: {', '.join(never)}" if never else ""
        for b, cost in sorted(self.seconds.items()):
            line += f"\n  batch {b} ms/step: " + ", ".join(f"{s} {1000 * self.cost(s, b):.0f}" for s in cost)
        return line
