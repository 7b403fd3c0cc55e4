import torch

from mlpspec.cache import TreeCache


def filled(b=2, slots=6, layers=2):
    """A cache whose slot s of row r holds the value 10 r + s (keys) and -(10 r + s) (values)."""
    cache = TreeCache(layers, capacity=8)
    marks = (10 * torch.arange(b).view(b, 1) + torch.arange(slots)).float()  # b slots
    keys = marks.view(b, 1, slots, 1).expand(b, 2, slots, 3).clone()  # b heads slots dim
    for i in range(layers):
        cache.update(keys, -keys, i)
    return cache


def contents(cache, layer=0):
    keys = cache.layers[layer].keys[:, 0, : cache.length, 0]
    assert torch.equal(cache.layers[layer].values[:, 0, : cache.length, 0], -keys)
    return keys.long().tolist()


def test_keep_moves_each_rows_slots_into_place():
    cache = filled()
    cache.keep(2, torch.tensor([[2, 3, 5], [2, 4, 5]]))  # row 0's first two already in place
    assert cache.length == 5
    for layer in range(2):
        assert contents(cache, layer) == [[0, 1, 2, 3, 5], [10, 11, 12, 14, 15]]


def test_keep_of_slots_already_in_place_only_moves_the_end():
    cache = filled()
    cache.keep(2, torch.tensor([[2, 3], [2, 3]]))
    assert cache.length == 4 and contents(cache) == [[0, 1, 2, 3], [10, 11, 12, 13]]
    cache.keep(0, torch.tensor([[0, 3], [1, 2]]))  # compaction-like: squeeze out holes
    assert cache.length == 2 and contents(cache) == [[0, 3], [11, 12]]
