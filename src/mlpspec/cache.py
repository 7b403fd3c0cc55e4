"""A preallocated KV cache for tree verification, built on transformers' public Cache API.

HF's DynamicCache concatenates on every update, copying the whole context each step. This
cache allocates [b, heads, capacity, head_dim] once per layer, writes the new tree's keys
after the committed slots, and afterwards keeps only the accepted path by copying those
few slots into place: the work per step grows with the tokens touched, not the context.

All rows share one slot counter, `length`; with ragged acceptance some rows leave holes,
which the decoder's own `valid` mask hides from attention and `compact` squeezes out when
the cache runs out of room.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class SlotLayer(CacheLayerMixin):
    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, heads, _, k_dim = key_states.shape
        self.keys = key_states.new_zeros(b, heads, self.capacity, k_dim)
        self.values = value_states.new_zeros(b, heads, self.capacity, value_states.size(-1))
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.size(-2)
        if end > self.capacity:
            raise RuntimeError(f"KV cache overflow: {end} slots needed, {self.capacity} allocated")
        self.keys[:, :, self.length : end] = key_states
        self.values[:, :, self.length : end] = value_states
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.capacity

    def keep(self, start: int, slots: torch.Tensor) -> None:
        """Move slots [b, n] (absolute indices) to start..start+n, per row; drop the rest."""
        b, n = slots.shape
        for cache in (self.keys, self.values) if n else ():
            index = slots.view(b, 1, n, 1).expand(b, cache.size(1), n, cache.size(-1))
            cache[:, :, start : start + n] = cache.gather(2, index)
        self.length = start + n


class StaticSlotLayer(SlotLayer):
    """A SlotLayer whose tree passes have the same shapes at every length, so that one
    compiled graph serves every step: while its cache holds a pass open, it writes the new
    keys at the slots named by `write_at` (a tensor: the slot is data, not part of the
    graph) and returns all `capacity` slots, for a mask as wide (tree_attention_mask's
    `slots`) to hide those not in use. Other passes (the prompt) it takes as a SlotLayer."""

    write_at: torch.Tensor | None = None  # q   slots of an open pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.write_at is None:
            return super().update(key_states, value_states)
        self.keys.index_copy_(2, self.write_at, key_states)
        self.values.index_copy_(2, self.write_at, value_states)
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return (self.capacity, 0) if self.write_at is not None else super().get_mask_sizes(query_length)


class TreeCache(Cache):
    """A tree pass runs as: `width = pass_width(q, b)` nodes a row (the tree padded), a mask over
    `mask_slots(width)` slots, `open(width)`, the forward pass, `close(q)`. Here that is the
    plain pass: q nodes, a mask over length + q slots, the layers advancing themselves."""

    layer_class = SlotLayer
    static = False

    def __init__(self, num_layers: int, capacity: int):
        super().__init__(layers=[self.layer_class(capacity) for _ in range(num_layers)])
        self.capacity = capacity

    @staticmethod
    def pass_width(nodes: int, batch: int) -> int:
        return nodes

    def mask_slots(self, width: int) -> int:
        return self.length + width

    def open(self, width: int) -> None:
        pass

    def close(self, nodes: int) -> None:
        pass

    @property
    def length(self) -> int:
        return self.layers[0].length

    def keep(self, start: int, slots: torch.Tensor) -> None:
        """Keep, per row, the cache slots `slots` [b, n] at start..start+n; the cache then
        ends there. Used to commit the accepted path and to squeeze out holes.

        Leading slots already in place are not copied: a path down the tree's first branch
        (a chain's only one) is, and the copy is 60 small ops, a few percent of a step at
        batch 1."""
        n = slots.size(1)
        moved = (slots != torch.arange(start, start + n, device=slots.device)).any(dim=0)  # n
        first = int(moved.long().argmax()) if bool(moved.any()) else n  # the first column that moves
        for layer in self.layers:
            layer.keep(start + first, slots[:, first:])

    def keep_path(self, start: int, slots: torch.Tensor, counts: torch.Tensor) -> None:
        """Commit a tree pass: per row r, the first counts[r] of slots [b, n] (the accepted
        path, root first) go to start..; the cache ends at start + n. Here the whole width
        moves, and the decoder's `valid` hides each row's slots past its count."""
        self.keep(start, slots)

    def roll_back(self, start: int) -> None:
        """Forget the pass that began at slot `start`, as if it had not run."""
        self.keep(start, torch.empty(1, 0, dtype=torch.long))


# Trees of 1-4 nodes share one graph at batch 1: compiled, a pass over 2 or 4 nodes took
# 24.8 / 23.3 ms (SmolLM2-135M, bfloat16, 2-core AMD EPYC with native bfloat16; 16.6 / 19.5
# held to AVX2 kernels), and a graph costs 35-90 s to build. A one-token pass with the LM
# head took 20.4 ms padded to 4 nodes, 24.6 on a graph of its own and 22.7 eagerly (14.8 /
# 14.4 / 22.5 held to AVX2 kernels). From batch 2 a one-token pass has rows enough alone.
SMALLEST_TREE_WIDTH = 4
SMALLEST_CAPACITY = 256


class StaticTreeCache(TreeCache):
    """The TreeCache of a compiled forward (kernels "compiled"): a tree pass has a fixed
    shape, its nodes padded to a power of two (4, 8, 16, ...: one graph each; a one-token
    pass stays one token wide from batch 2) and its mask over every slot, so neither
    depends on the context's length (its capacity is a power of two too). The padding nodes' keys land in the slots after the tree's,
    beyond `length` once the pass closes."""

    layer_class = StaticSlotLayer
    static = True

    def __init__(self, num_layers: int, capacity: int, *rest):
        # the mask spans every slot, so the capacity is part of each graph's shape: a power
        # of two, so that prompts of other lengths reuse the graphs
        super().__init__(num_layers, max(SMALLEST_CAPACITY, 1 << (capacity - 1).bit_length()), *rest)

    @staticmethod
    def pass_width(nodes: int, batch: int) -> int:
        if nodes == 1 and batch > 1:
            return 1
        return max(SMALLEST_TREE_WIDTH, 1 << (nodes - 1).bit_length())

    def mask_slots(self, width: int) -> int:
        return self.capacity

    def open(self, width: int) -> None:
        at = torch.arange(self.length, self.length + width, device=self.layers[0].keys.device)  # w
        for layer in self.layers:
            layer.write_at = at

    def close(self, nodes: int) -> None:
        for layer in self.layers:
            layer.write_at = None
            layer.length += nodes


class RowSlotLayer(SlotLayer):
    """A SlotLayer whose storage holds a fixed number of rows, of which the first `rows`
    are in use: `keys` and `values` are views of them, so a request joins or leaves by
    writing its own row, without copying the others."""

    def allocate(self, max_rows: int, heads: int, k_dim: int, v_dim: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.key_store = torch.zeros(max_rows, heads, self.capacity, k_dim, dtype=dtype, device=device)
        self.value_store = torch.zeros(max_rows, heads, self.capacity, v_dim, dtype=dtype, device=device)
        self.is_initialized = True
        self.set_rows(0)

    def set_rows(self, rows: int) -> None:
        self.keys, self.values = self.key_store[:rows], self.value_store[:rows]


class RowCache(TreeCache):
    """The engine's TreeCache: `max_rows` rows of `capacity` slots, allocated once (the
    first request's prefill gives the shapes); rows [0, rows) are the live batch.

    All rows share the slot counter `length`, as in TreeCache: a request that joins puts
    its prompt's keys just before it (or from slot 0 on, moving `length` up, when its
    prompt is the longer), and its row's `valid` mask (DecodeState) hides what it does
    not own. Compaction (decode.compact) squeezes the holes out when room runs short."""

    layer_class = RowSlotLayer

    def __init__(self, num_layers: int, capacity: int, max_rows: int):
        super().__init__(num_layers, capacity)
        self.max_rows, self.rows = max_rows, 0

    @property
    def allocated(self) -> bool:
        return self.layers[0].is_initialized

    def allocate_like(self, prefilled: TreeCache) -> None:
        """Storage shaped as `prefilled`'s layers (heads, head sizes, dtype, device)."""
        for layer, like in zip(self.layers, prefilled.layers):
            _, heads, _, k_dim = like.keys.shape
            layer.allocate(self.max_rows, heads, k_dim, like.values.size(-1), like.keys.dtype, like.keys.device)

    def set_rows(self, rows: int) -> None:
        self.rows = rows
        for layer in self.layers:
            layer.set_rows(rows)

    def set_length(self, length: int) -> None:
        for layer in self.layers:
            layer.length = length

    def write_row(self, row: int, start: int, prefilled: TreeCache, source: int, first: int, count: int) -> None:
        """Copy `count` slots of `prefilled`'s row `source`, from slot `first` on, to slots
        start.. of `row`."""
        for layer, like in zip(self.layers, prefilled.layers):
            layer.key_store[row, :, start : start + count] = like.keys[source, :, first : first + count]
            layer.value_store[row, :, start : start + count] = like.values[source, :, first : first + count]

    def move_row(self, source: int, target: int) -> None:
        """Copy row `source`'s used slots over row `target`'s."""
        for layer in self.layers:
            layer.key_store[target, :, : layer.length] = layer.key_store[source, :, : layer.length]
            layer.value_store[target, :, : layer.length] = layer.value_store[source, :, : layer.length]


class StaticRowSlotLayer(StaticSlotLayer, RowSlotLayer):
    """RowSlotLayer's rows with StaticSlotLayer's fixed-shape tree passes."""


class StaticRowCache(StaticTreeCache, RowCache):
    """The engine's cache for a compiled model (kernels "compiled"): RowCache's rows, with
    StaticTreeCache's fixed pass shapes. A graph's shape includes the batch, so each live
    batch size builds its own graphs (decode.build_graphs) when first seen."""

    layer_class = StaticRowSlotLayer
