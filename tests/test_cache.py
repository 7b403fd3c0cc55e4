import torch

from mlpspec.cache import StaticTreeCache, TreeCache


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


def test_a_static_cache_pass_writes_its_padded_width_and_keeps_its_nodes():
    cache = StaticTreeCache(1, capacity=8)
    assert cache.capacity == 256 and StaticTreeCache(1, capacity=300).capacity == 512  # powers of two
    prompt = torch.ones(1, 1, 3, 2)
    keys, _ = cache.update(prompt, -prompt, 0)  # an eager pass (the prompt): as a TreeCache
    assert keys.shape == (1, 1, 3, 2) and cache.length == 3
    width = cache.pass_width(3, 1)
    assert [cache.pass_width(q, 1) for q in (1, 2, 3, 4, 5, 9)] == [4, 4, 4, 4, 8, 16] and width == 4
    assert [cache.pass_width(q, 2) for q in (1, 2, 5)] == [1, 4, 8]  # from batch 2 one token is rows enough
    assert cache.mask_slots(width) == 256  # the mask spans every slot
    cache.open(width)
    tree = 2 + torch.arange(width, dtype=torch.float).view(1, 1, width, 1).expand(1, 1, width, 2)
    keys, values = cache.update(tree, -tree, 0)
    assert keys.shape == (1, 1, 256, 2)  # all slots, whatever the length
    assert keys[0, 0, :8, 0].tolist() == [1, 1, 1, 2, 3, 4, 5, 0] and torch.equal(values, -keys)
    assert cache.get_mask_sizes(width, 0) == (256, 0)
    cache.close(3)  # three real nodes; the padding node's slot 6 lies beyond the length
    assert cache.length == 6 and cache.layers[0].write_at is None
    cache.keep(3, torch.tensor([[3, 5]]))
    assert cache.length == 5 and cache.layers[0].keys[0, 0, :5, 0].tolist() == [1, 1, 1, 2, 4]
