"""Adaptive speculation: each step, the tree shape (or none at all) that should give the
most tokens per second, on this hardware, for this text.

A shape's worth is tokens per step divided by seconds per step. Neither is known in
advance: a step's cost depends on the machine, the batch and the tree size, and its
yield on how well the speculator knows the text at hand. So the policy measures both as
decoding goes: the first steps try every shape on the menu once (the calibration, which
also emits tokens), then each step takes the shape with the best estimate plus an
optimism bonus that shrinks with use (UCB), so a shape that fell behind is retried now
and then, and a drift in acceptance is noticed. Every shape is lossless, so the choice
changes only the speed.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from .model import MLPSpeculatorConfig


@dataclass(frozen=True)
class TreeShape:
    top_k: tuple[int, ...]  # one entry per stage run; () is plain decoding
    n_candidates: int

    @property
    def depth(self) -> int:
        return len(self.top_k)

    @property
    def max_nodes(self) -> int:
        return 1 + self.n_candidates * self.depth

    def __str__(self) -> str:
        return "plain" if not self.top_k else f"{list(self.top_k)}x{self.n_candidates}"


PLAIN = TreeShape((), 0)


def shape_menu(config: MLPSpeculatorConfig, top_k: list[int] | None = None, n_candidates: int | None = None) -> list[TreeShape]:
    """Plain decoding, top-1 chains of every depth, and the configured tree cut to every depth."""
    top_k = list(config.top_k_tokens_per_head if top_k is None else top_k)
    n = config.n_candidates if n_candidates is None else n_candidates
    menu = [PLAIN]
    menu += [TreeShape((1,) * d, 1) for d in range(1, len(top_k) + 1)]
    for d in range(1, len(top_k) + 1):
        shape = TreeShape(tuple(top_k[:d]), min(n, math.prod(top_k[:d])))
        if shape not in menu:
            menu.append(shape)
    return menu


@dataclass
class ShapeRecord:
    uses: int = 0
    tokens_per_step: float = 0.0  # per active row, moving average
    seconds: float = 0.0  # per step, moving average


@dataclass
class AdaptivePolicy:
    menu: list[TreeShape]
    smoothing: float = 0.1  # weight of the newest observation in the moving averages
    exploration: float = 0.3  # size of the optimism bonus, in tokens per step
    clock: object = time.perf_counter  # injectable, for tests
    records: dict[TreeShape, ShapeRecord] = field(default_factory=dict)
    steps: int = 0

    def __post_init__(self):
        self.records = {shape: ShapeRecord() for shape in self.menu}

    def choose(self, max_depth: int) -> TreeShape:
        """The shape to use for the next step, among those no deeper than max_depth."""
        allowed = [s for s in self.menu if s.depth <= max_depth]
        untried = [s for s in allowed if self.records[s].uses == 0]
        if untried:
            return untried[0]
        return max(allowed, key=self._score)

    def _score(self, shape: TreeShape) -> float:
        record = self.records[shape]
        bonus = 0.0 if shape == PLAIN else self.exploration * math.sqrt(math.log(self.steps + 1) / record.uses)
        return (record.tokens_per_step + bonus) / max(record.seconds, 1e-9)

    def update(self, shape: TreeShape, tokens_per_step: float, seconds: float) -> None:
        record = self.records[shape]
        a = 1.0 if record.uses == 0 else self.smoothing
        record.tokens_per_step += a * (tokens_per_step - record.tokens_per_step)
        record.seconds += a * (seconds - record.seconds)
        record.uses += 1
        self.steps += 1

    def summary(self) -> str:
        used = [(s, r) for s, r in self.records.items() if r.uses]
        used.sort(key=lambda item: -item[1].uses)
        return ", ".join(
            f"{s}: {r.uses} steps, {r.tokens_per_step:.2f} tok/step, {1000 * r.seconds:.0f} ms" for s, r in used
        )
