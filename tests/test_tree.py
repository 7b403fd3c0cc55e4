"""Hand-computed checks of the tree's index arithmetic (the example in tree.py)."""

import pytest
import torch

from mlpspec import MLPSpecError
from mlpspec.tree import (
    NO_TOKEN,
    PAD_NODE_TOKEN,
    at_nodes,
    build_tree,
    expansion_nodes,
    flat_tree,
    hindsight_accepted,
    likeliest_nodes,
    pad_tree,
    prompt_positions,
    root_only,
    sub_paths,
    tree_attention_mask,
    walk,
)

R, A, B, C, D, E, F, G = 10, 11, 12, 13, 14, 15, 16, 17
MIN = torch.finfo(torch.float32).min


def example():
    # candidates [[a b c], [a b d], [a e f]] under root r, as in the module docstring
    return build_tree(torch.tensor([R]), torch.tensor([[[A, B, C], [A, B, D], [A, E, F]]]))


def test_trie_nodes_parents_depths():
    tree = example()
    assert tree.tokens.tolist() == [[R, A, B, C, D, E, F]]
    assert tree.parent.tolist() == [[-1, 0, 1, 2, 2, 1, 5]]
    assert tree.depth.tolist() == [[0, 1, 2, 3, 3, 2, 3]]
    assert tree.node_of.tolist() == [[[1, 2, 3], [1, 2, 4], [1, 5, 6]]]


def test_ancestor_mask():
    seen = example().ancestors[0].int().tolist()
    assert seen == [
        [1, 0, 0, 0, 0, 0, 0],  # r
        [1, 1, 0, 0, 0, 0, 0],  # a
        [1, 1, 1, 0, 0, 0, 0],  # b
        [1, 1, 1, 1, 0, 0, 0],  # c
        [1, 1, 1, 0, 1, 0, 0],  # d
        [1, 1, 0, 0, 0, 1, 0],  # e
        [1, 1, 0, 0, 0, 1, 1],  # f
    ]


def test_batch_rows_pad_to_the_largest_tree():
    # row 1: all three candidates identical -> r + 2 nodes, padded to row 0's 7
    candidates = torch.tensor([[[A, B, C], [A, B, D], [A, E, F]], [[A, B, C]] * 3])
    tree = build_tree(torch.tensor([R, R]), candidates)
    assert tree.tokens[1].tolist() == [R, A, B, C, 0, 0, 0]
    assert tree.parent[1].tolist() == [-1, 0, 1, 2, -1, -1, -1]
    assert tree.depth[1].tolist() == [0, 1, 2, 3, 0, 0, 0]
    # padding nodes see only themselves
    assert tree.ancestors[1, 5].int().tolist() == [0, 0, 0, 0, 0, 1, 0]


def test_candidates_diverging_at_the_first_token():
    tree = build_tree(torch.tensor([R]), torch.tensor([[[A, B], [C, B], [A, D]]]))
    assert tree.tokens.tolist() == [[R, A, B, C, B, D]]
    assert tree.parent.tolist() == [[-1, 0, 1, 0, 3, 1]]


def test_tree_mask_after_context_with_a_hole():
    tree = build_tree(torch.tensor([R]), torch.tensor([[[A, B], [C, D]]]))  # r, a, b, c, d
    context_valid = torch.tensor([[True, False, True]])  # slot 1 is a hole
    mask = tree_attention_mask(tree, context_valid, torch.float32)
    assert mask.shape == (1, 1, 5, 3 + 5)
    allowed = (mask[0, 0] == 0).int().tolist()
    assert allowed == [
        # ctx     r  a  b  c  d
        [1, 0, 1, 1, 0, 0, 0, 0],
        [1, 0, 1, 1, 1, 0, 0, 0],
        [1, 0, 1, 1, 1, 1, 0, 0],
        [1, 0, 1, 1, 0, 0, 1, 0],
        [1, 0, 1, 1, 0, 0, 1, 1],
    ]
    assert mask[0, 0, 0, 1] == MIN


def test_sliding_window_mask_by_hand():
    # a chain r, a, b after 4 context slots, slot 1 a hole: committed positions 0, -, 1, 2,
    # so r sits at position 3, a at 4, b at 5. A window of 2 sees positions p - 1 and p.
    tree = build_tree(torch.tensor([R]), torch.tensor([[[A, B]]]))
    mask = tree_attention_mask(tree, torch.tensor([[True, False, True, True]]), torch.float32, window=2)
    assert (mask[0, 0] == 0).int().tolist() == [
        # ctx (positions 0 - 1 2)  r  a  b
        [0, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 1, 1],
    ]
    # a window wider than the context and the tree hides nothing the plain mask shows
    wide = tree_attention_mask(tree, torch.tensor([[True, False, True, True]]), torch.float32, window=7)
    assert torch.equal(wide, tree_attention_mask(tree, torch.tensor([[True, False, True, True]]), torch.float32))


def test_padded_tree_in_a_static_cache_mask():
    # r, a, b padded to 4 nodes, after 2 context slots (slot 0 a hole), in a cache of 8 slots
    tree = pad_tree(build_tree(torch.tensor([R]), torch.tensor([[[A, B]]])), 4)
    assert tree.tokens.tolist() == [[R, A, B, PAD_NODE_TOKEN]]
    assert tree.parent.tolist() == [[-1, 0, 1, -1]]
    assert tree.depth.tolist() == [[0, 1, 2, 0]]
    mask = tree_attention_mask(tree, torch.tensor([[False, True]]), torch.float32, slots=8)
    assert mask.shape == (1, 1, 4, 8)
    assert (mask[0, 0] == 0).int().tolist() == [
        # ctx   r  a  b  pad  unused
        [0, 1, 1, 0, 0, 0, 0, 0],
        [0, 1, 1, 1, 0, 0, 0, 0],
        [0, 1, 1, 1, 1, 0, 0, 0],
        [0, 1, 0, 0, 0, 1, 0, 0],
    ]


def test_padding_a_tree_to_its_own_size_changes_nothing():
    tree = build_tree(torch.tensor([R]), torch.tensor([[[A, B]]]))
    assert pad_tree(tree, 3) is tree


def test_positions_of_a_left_padded_prompt():
    valid = torch.tensor([[False, False, True, True], [True, True, True, True]])
    assert prompt_positions(valid).tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]


def one_hot_logits(tree, choices, V=20):
    """Logits under which the base model picks choices[node] after each node."""
    logits = torch.zeros(1, tree.size, V)
    for node, token in enumerate(choices):
        logits[0, node, token] = 1.0
    return logits


def argmax(logits, depth):
    return logits.argmax(-1)


def test_walk_accepts_the_longest_matching_path():
    tree = example()  # r a b c d e f
    # after r the model says a, after a it says e, after e it says f, after f it says 3
    path, n, bonus = walk(tree, at_nodes(one_hot_logits(tree, [A, E, 0, 0, 0, F, 3])), argmax)
    assert path.tolist() == [[0, 1, 5, 6]] and n.tolist() == [3] and bonus.tolist() == [3]
    # after r the model says b: nothing matches, b is the bonus
    path, n, bonus = walk(tree, at_nodes(one_hot_logits(tree, [B, 0, 0, 0, 0, 0, 0])), argmax)
    assert path.tolist() == [[0]] and n.tolist() == [0] and bonus.tolist() == [B]
    # a, then b, then 7 (neither c nor d)
    path, n, bonus = walk(tree, at_nodes(one_hot_logits(tree, [A, B, 7, 0, 0, 0, 0])), argmax)
    assert path.tolist() == [[0, 1, 2]] and n.tolist() == [2] and bonus.tolist() == [7]


def test_walk_ragged_batch_pads_paths_with_their_last_node():
    candidates = torch.tensor([[[A, B]], [[A, B]]])
    tree = build_tree(torch.tensor([R, R]), candidates)  # r a b in both rows
    logits = torch.zeros(2, 3, 20)
    logits[0, 0, A], logits[0, 1, B], logits[0, 2, 5] = 1, 1, 1  # row 0 accepts a, b
    logits[1, 0, A], logits[1, 1, 9] = 1, 1  # row 1 accepts a only
    path, n, bonus = walk(tree, at_nodes(logits), argmax)
    assert path.tolist() == [[0, 1, 2], [0, 1, 1]]
    assert n.tolist() == [2, 1] and bonus.tolist() == [5, 9]


def test_root_only_tree():
    tree = root_only(torch.tensor([4, 5]))
    path, n, bonus = walk(tree, at_nodes(one_hot_logits(tree, [7]).expand(2, 1, 20)), argmax)
    assert path.tolist() == [[0], [0]] and n.tolist() == [0, 0] and bonus.tolist() == [7, 7]


def test_teacher_forcing_offsets_by_hand():
    from mlpspec.tree import teacher_forcing

    window = torch.arange(9).view(1, 9)  # n = 5, h = 3: 5 + 3 + 1 tokens
    base_ids, ids, targets = teacher_forcing(window, 5, 3)
    assert base_ids.tolist() == [[0, 1, 2, 3, 4]]
    assert ids.tolist() == [[1, 2, 3, 4, 5, 6, 7, 8]]
    # head i at position p predicts window[p + i + 2]
    assert targets[:, 0].tolist() == [[2, 3, 4, 5, 6], [3, 4, 5, 6, 7], [4, 5, 6, 7, 8]]
    # stage i reads ids[p + i] = window[p + i + 1]: what head i - 1 was asked to predict
    assert ids[0, 1 : 1 + 5].tolist() == targets[0, 0].tolist()


def test_greedy_targets_offsets_by_hand():
    from mlpspec.tree import greedy_targets

    greedy = torch.arange(100, 108).view(1, 8)  # n = 5, h = 3: choices over window[:, :8]
    targets = greedy_targets(greedy, 5, 3)
    # head i at position p is checked against the base's choice for token p + i + 2,
    # which the base made at position p + i + 1
    assert targets[:, 0].tolist() == [[101, 102, 103, 104, 105], [102, 103, 104, 105, 106], [103, 104, 105, 106, 107]]
    with pytest.raises(ValueError, match="span 8 positions, got 7"):
        greedy_targets(greedy[:, :7], 5, 3)


def test_ragged_candidates_end_at_no_token():
    from mlpspec.tree import NO_TOKEN as X

    # a tree of depth 2 next to a lookup copy of 4: [a b], [c d], [a e f g]; row 1 has no copy
    candidates = torch.tensor([[[A, B, X, X], [C, D, X, X], [A, E, F, G]],
                               [[A, B, X, X], [C, D, X, X], [X, X, X, X]]])
    tree = build_tree(torch.tensor([R, R]), candidates)
    assert tree.tokens.tolist() == [[R, A, B, C, D, E, F, G], [R, A, B, C, D, 0, 0, 0]]
    assert tree.parent.tolist() == [[-1, 0, 1, 0, 3, 1, 5, 6], [-1, 0, 1, 0, 3, -1, -1, -1]]
    assert tree.depth.tolist() == [[0, 1, 2, 1, 2, 2, 3, 4], [0, 1, 2, 1, 2, 0, 0, 0]]
    assert tree.node_of[0].tolist() == [[1, 2, -1, -1], [3, 4, -1, -1], [1, 5, 6, 7]]
    assert tree.node_of[1, 2].tolist() == [-1, -1, -1, -1]
    assert tree.ancestors[0, 7].int().tolist() == [1, 1, 0, 0, 0, 1, 1, 1]  # g sees r a e f g
    assert tree.ancestors[1, 6].int().tolist() == [0, 0, 0, 0, 0, 0, 1, 0]  # padding sees itself


def test_lookup_branch_copies_what_followed_the_last_occurrence():
    from mlpspec.tree import NO_TOKEN as X, lookup_branch

    context = torch.tensor([
        [5, 6, 7, 8, 9, 5, 6, 1, 2, 5, 6, 0, 0],  # "5 6" occurs at 0 and 5; the latest is 5 -> 1 2 5 6
        [5, 6, 7, 8, 9, 3, 5, 6, 7, 8, 9, 4, 7],  # ends 11 with "9 4": no 2-gram, no 1-gram "4" before
        [-1, -1, 3, 4, 3, 0, 0, 0, 0, 0, 0, 0, 0],  # left padding; "3" at 2 -> 4 3, and again 4 3
    ])
    ends = torch.tensor([11, 12, 5])
    branch, matched = lookup_branch(context, ends, 4)
    assert branch.tolist() == [[1, 2, 5, 6], [X, X, X, X], [4, 3, 4, 3]]
    assert matched.tolist() == [2, 0, 1]
    # the longest n-gram wins: "7 8 9" recurs at 2 and 8 for a row ending there
    branch, matched = lookup_branch(context[1:2], torch.tensor([11]), 3, ngrams=(3, 1))
    assert (branch.tolist(), matched.tolist()) == ([[3, 5, 6]], [3])
    branch, matched = lookup_branch(context[1:2], torch.tensor([11]), 3, ngrams=(1,))
    assert (branch.tolist(), matched.tolist()) == ([[3, 5, 6]], [1])
    # a run of one token continues as the run: the copy overlaps itself
    branch, matched = lookup_branch(torch.tensor([[8, 2, 2, 2]]), torch.tensor([4]), 5)
    assert (branch.tolist(), matched.tolist()) == ([[2, 2, 2, 2, 2]], [2])


def test_flat_tree_is_the_root_with_q_minus_one_children():
    tree = flat_tree(torch.tensor([7, 8]), 3)
    assert tree.tokens.tolist() == [[7, 0, 1], [8, 0, 1]]
    assert tree.parent.tolist() == [[-1, 0, 0]] * 2 and tree.depth.tolist() == [[0, 1, 1]] * 2
    # each child sees the root and itself, not its sibling
    assert tree.ancestors[0].tolist() == [[True, False, False], [True, True, False], [True, False, True]]
    assert flat_tree(torch.tensor([7, 8]), 1).tokens.tolist() == [[7], [8]]


def test_hindsight_accepted_by_hand():
    N = -1  # NO_TOKEN: the candidate ended
    candidates = torch.tensor([
        [[A, B, C], [A, D, N]],  # emitted a b e: the first shares a b, the second a
        [[A, B, C], [E, N, N]],  # emitted a b c, but only a b known yet (the row stopped)
        [[N, N, N], [F, F, F]],  # an empty candidate matches nothing; the other matches all
        [[B, A, A], [C, A, A]],  # no first token right: nothing accepted
    ])
    emitted = torch.tensor([[A, B, E], [A, B, C], [F, F, F], [A, A, A]])
    known = torch.tensor([3, 2, 3, 3])
    assert hindsight_accepted(candidates, emitted, known).tolist() == [2, 2, 3, 0]


def test_sub_paths_picks_leaves_by_their_ranks():
    # expansion order of a [3, 2, 2] tree: leaf 4 * r1 + 2 * r2 + r3 has sibling ranks (r1, r2, r3)
    paths = torch.arange(12).view(1, 12, 1).expand(1, 12, 3)  # each path holds its own index
    scores = torch.arange(36.0).view(1, 12, 3)
    assert sub_paths(paths, scores, [3, 2, 2], [2, 1, 1])[0][0, :, 0].tolist() == [0, 4]
    assert sub_paths(paths, scores, [3, 2, 2], [2, 2])[0][0, :, 0].tolist() == [0, 2, 4, 6]
    assert sub_paths(paths, scores, [3, 2, 2], [3])[0][0, :, 0].tolist() == [0, 4, 8]
    assert sub_paths(paths, scores, [3, 2, 2], [1, 2, 2])[0][0, :, 0].tolist() == [0, 1, 2, 3]
    sub, sub_scores = sub_paths(paths, scores, [3, 2, 2], [2, 2])
    assert sub.shape == (1, 4, 2) and sub_scores[0].tolist() == [1.0, 7.0, 13.0, 19.0]  # after stage 2
    for bad in ([4], [1, 1, 1, 1], []):
        with pytest.raises(MLPSpecError, match="not inside"):
            sub_paths(paths, scores, [3, 2, 2], bad)



def test_expansion_nodes_by_hand():
    # top_k [2, 2]: leaves 0..3 carry sibling ranks (0,0) (0,1) (1,0) (1,1); the two
    # depth-1 nodes are the first leaves below them, 0 and 2
    leaf, depth = expansion_nodes([2, 2])
    assert leaf.tolist() == [0, 2, 0, 1, 2, 3] and depth.tolist() == [1, 1, 2, 2, 2, 2]
    leaf, depth = expansion_nodes([3, 1, 2])  # 3 + 3 + 6 nodes
    assert leaf.tolist() == [0, 2, 4, 0, 2, 4, 0, 1, 2, 3, 4, 5] and depth.tolist() == [1] * 3 + [2] * 3 + [3] * 6


def test_likeliest_nodes_rank_every_node_by_its_path_probability():
    paths = torch.tensor([[[5, 7], [5, 8], [6, 9], [6, 1]]])  # b=1, expand(..., [2, 2])'s leaves
    p_path = torch.tensor([[[0.6, 0.3], [0.6, 0.2], [0.4, 0.35], [0.4, 0.01]]])  # after each stage
    candidates, p_draft = likeliest_nodes(paths, p_path.log(), [2, 2])
    assert candidates[0].tolist() == [[5, NO_TOKEN], [6, NO_TOKEN], [6, 9], [5, 7], [5, 8], [6, 1]]
    assert p_draft[0].tolist() == pytest.approx([0.6, 0.4, 0.35, 0.3, 0.2, 0.01])
    # a child as likely as its parent (its own step certain) still comes after it
    tie = torch.tensor([[[0.5, 0.5], [0.5, 0.0], [0.4, 0.1], [0.4, 0.1]]]).clamp(min=1e-6)
    assert likeliest_nodes(paths, tie.log(), [2, 2])[0][0, :2].tolist() == [[5, NO_TOKEN], [5, 7]]
