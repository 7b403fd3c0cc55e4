"""The base model behind the decoder, through one small interface, so that the decoder,
the adaptive policy and the engine run on whichever runtime runs the base model fastest:
transformers (base.TransformersRunner: the default, and the path on GPUs) or llama.cpp
(llama_cpp.LlamaCppRunner).

A Runner
  prefills prompts into a cache of its own (`prefill`: each prompt's last logits and state);
  verifies a tree per row in one pass after that row's committed tokens (`verify`: the
      nodes' logits as the walk reads them, and their final post-norm states with the
      feature layers' behind them);
  and makes the engine's cache (`row_cache`), which keeps the accepted path
      (TreeCache.keep_path) and lets requests take and free rows (RowCache).
Everything else (proposing, walking, committing, the policy, the engine's loop) is the
same whatever runs the base model.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .cache import RowCache, TreeCache
from .tree import Tree


class Prefilled(NamedTuple):
    logits: torch.Tensor  # n V   at each prompt's last token
    hidden: torch.Tensor  # n (1+l)d   the state there (the feature layers' behind the final one)
    cache: TreeCache  # the prompts' keys, row by row (RowCache.write_row seats them)


class Runner:
    """What the decoder asks of a base model; subclasses fill it in."""

    device: torch.device
    vocab_size: int
    hidden_size: int
    num_layers: int
    context: int | None  # the most positions a sequence may have (None: no stated limit)
    eos_token_id: int | list[int] | None
    pad_token_id: int | None

    def row_cache(self, max_len: int, widest: int, max_rows: int, feature_layers: tuple[int, ...] = ()) -> RowCache:
        """The engine's cache: `max_rows` rows of `max_len` tokens each, with room for a
        pass of `widest` nodes, whose passes read the states after `feature_layers` too."""
        raise NotImplementedError

    def prefill(self, ids: torch.Tensor, prompt_valid: torch.Tensor, capacity: int,
                feature_layers: tuple[int, ...]) -> Prefilled:
        """Run left-padded prompts ids [n, W] (prompt_valid [n, W]) into a cache of `capacity` slots."""
        raise NotImplementedError

    def verify(self, cache: TreeCache, valid: torch.Tensor, position: torch.Tensor, tree: Tree,
               feature_layers: tuple[int, ...]):
        """Score every node of `tree` [b, q] after each row's committed slots (valid [b, S];
        the root at position [b]). Returns (logits_at, hidden [b, q, (1+l)d]): logits_at(nodes [b])
        gives the logits at node nodes[r] of each row r [b, V], as tree.walk reads them."""
        raise NotImplementedError

    def describe(self) -> dict:
        """As base.describe_base: class, hidden_size, layers, vocab_size, parameters, dtype."""
        raise NotImplementedError

    def identity(self) -> dict:
        """What a calibration of this runner's step costs depends on (decode.calibration_file)."""
        raise NotImplementedError
