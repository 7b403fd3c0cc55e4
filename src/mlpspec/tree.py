"""The candidate tree, and every other piece of index arithmetic: where each head's
input and target sit in a training window, and the masks and positions of decoding.

The speculator proposes k candidate continuations of depth D for each row. Many share
prefixes, so they are merged into a trie whose root is the pending token (sampled by the
base model, not yet run through it). The base model then scores every distinct node once,
in one forward pass, where each node attends to the committed context, its ancestors and
itself. Walking the trie with the base model's own choices gives the accepted path.

Example (one row, root r, candidates [[a b c], [a b d], [a e f]]):

    node   0  1  2  3  4  5  6          r
    token  r  a  b  c  d  e  f          └ a
    parent -  0  1  2  2  1  5            ├ b ┬ c
    depth  0  1  2  3  3  2  3            │   └ d
                                          └ e ─ f
Shapes: b batch, k candidates, D depth, q tree nodes (root included), S cache slots.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import MLPSpecError

PAD_NODE_TOKEN = 0  # token fed for padding nodes; they attend only to themselves
NO_TOKEN = -1  # in a candidate: no token here (the candidate ended earlier)


@dataclass
class Tree:
    tokens: torch.Tensor  # b q    node tokens; node 0 is the root
    parent: torch.Tensor  # b q    parent node, -1 for the root and for padding
    depth: torch.Tensor  # b q     0 for the root, j + 1 for a candidate's j-th token
    ancestors: torch.Tensor  # b q q  bool: node u sees node v (v is u itself or above it)
    node_of: torch.Tensor  # b k D  which node holds candidate k's j-th token (-1: it has none)

    @property
    def size(self) -> int:
        return self.tokens.size(1)


def build_tree(root: torch.Tensor, candidates: torch.Tensor) -> Tree:
    """Merge candidates [b, k, D] under roots [b] into a trie, numbering new nodes in
    candidate-major order (candidate 0's tokens first), so a parent precedes its children.
    A candidate may be shorter than D: NO_TOKEN (-1) from some column on marks its end, and
    a candidate that is all NO_TOKEN adds nothing. Rows with fewer distinct nodes are padded
    to the batch's largest tree."""
    b, k, D = candidates.shape
    device = candidates.device
    real = candidates != NO_TOKEN  # b k D
    # same_prefix[b, i, i2, j]: candidates i and i2 agree on tokens 0..j
    same = candidates.unsqueeze(2) == candidates.unsqueeze(1)  # b k k D
    same_prefix = same.long().cumprod(dim=-1).bool()  # b k k D
    first = same_prefix.long().argmax(dim=2)  # b k D   lowest candidate sharing the prefix
    is_new = (first == torch.arange(k, device=device).view(1, k, 1)) & real  # b k D
    new_id = is_new.flatten(1).long().cumsum(dim=1).view(b, k, D)  # b k D   1-based node ids
    n_nodes = 1 + is_new.flatten(1).sum(dim=1)  # b
    q = int(n_nodes.max())
    # a duplicate takes its first occurrence's id; a missing token goes to a spare column q
    node_of = torch.where(real, new_id.gather(1, first), q)  # b k D

    tokens = torch.full((b, q + 1), PAD_NODE_TOKEN, dtype=candidates.dtype, device=device)
    tokens[:, 0] = root
    tokens.scatter_(1, node_of.flatten(1), candidates.flatten(1))
    parent = torch.full((b, q + 1), -1, dtype=torch.long, device=device)
    parent_of = torch.cat([torch.zeros_like(node_of[..., :1]), node_of[..., :-1]], dim=-1)  # b k D
    parent.scatter_(1, node_of.flatten(1), parent_of.flatten(1))
    depth = torch.zeros((b, q + 1), dtype=torch.long, device=device)
    levels = torch.arange(1, D + 1, device=device).expand(b, k, D)
    depth.scatter_(1, node_of.flatten(1), levels.flatten(1))
    tokens, parent, depth = tokens[:, :q], parent[:, :q], depth[:, :q]  # the spare column goes

    # Ancestor closure: after D rounds of "what my parent sees, plus me" every node sees
    # its whole path. Root and padding nodes point at themselves for this.
    eye = torch.eye(q, dtype=torch.bool, device=device).expand(b, q, q)
    self_parent = torch.where(parent >= 0, parent, torch.arange(q, device=device))  # b q
    ancestors = eye.clone()
    for _ in range(D):
        ancestors = eye | ancestors.gather(1, self_parent.unsqueeze(-1).expand(b, q, q))
    return Tree(tokens, parent, depth, ancestors, torch.where(real, node_of, -1))


def lookup_branch(context: torch.Tensor, ends: torch.Tensor, length: int, ngrams=(3, 2, 1)):
    """Prompt-lookup drafting: a continuation copied from the context itself.

    context [b, C] holds each row's tokens so far in columns [0, ends[b]) (anything < 0 is
    padding and never matches). For the longest n in `ngrams` whose last n tokens occurred
    before, take the most recent such occurrence and return the `length` tokens that
    followed it: (branch [b, length], NO_TOKEN where the row has no match; matched [b], the
    n that matched, 0 for none). Code and quoted text repeat themselves, and a copy can run
    far past a speculator's depth.
    """
    b, C = context.shape
    device = context.device
    out = torch.full((b, length), NO_TOKEN, dtype=context.dtype, device=device)
    matched = torch.zeros(b, dtype=torch.long, device=device)
    for n in ngrams:
        if C <= n:
            continue
        key = context.gather(1, (ends.unsqueeze(1) - n + torch.arange(n, device=device)).clamp(min=0))  # b n
        windows = context.unfold(1, n, 1)  # b C-n+1 n   windows[:, j] = context[:, j : j + n]
        starts = torch.arange(C - n + 1, device=device)  # C-n+1
        # an earlier occurrence with at least one token after it (the key itself has none)
        match = (windows == key.unsqueeze(1)).all(-1) & (starts + n < ends.unsqueeze(1))  # b C-n+1
        match &= (key >= 0).all(-1, keepdim=True) & (matched == 0).unsqueeze(1)
        has = match.any(dim=1)  # b
        latest = (match.long() * (starts + 1)).argmax(dim=1)  # b   the last matching start
        # the copy starts after the match and, reaching the end, goes on copying itself (as
        # LZ77 does): a text that repeats with period ends - start keeps repeating
        start = latest + n  # b
        period = (ends - start).clamp(min=1)  # b
        at = start.unsqueeze(1) + torch.arange(length, device=device) % period.unsqueeze(1)  # b length
        copy = context.gather(1, at.clamp(max=C - 1))  # b length
        out = torch.where(has.unsqueeze(1), copy, out)
        matched = torch.where(has, n, matched)
    return out, matched


def root_only(root: torch.Tensor) -> Tree:
    """The tree of plain decoding: the pending token alone."""
    b = root.size(0)
    device = root.device
    return Tree(
        tokens=root.view(b, 1),
        parent=torch.full((b, 1), -1, dtype=torch.long, device=device),
        depth=torch.zeros((b, 1), dtype=torch.long, device=device),
        ancestors=torch.ones((b, 1, 1), dtype=torch.bool, device=device),
        node_of=torch.zeros((b, 0, 0), dtype=torch.long, device=device),
    )


def flat_tree(root: torch.Tensor, q: int) -> Tree:
    """A tree of q nodes one level deep: the root with q - 1 distinct children. What timing
    a verification of q nodes needs (the calibration), whatever the tokens."""
    if q == 1:
        return root_only(root)
    children = torch.arange(q - 1, device=root.device).view(1, q - 1, 1).expand(root.size(0), -1, -1)  # b q-1 1
    return build_tree(root, children)


def pad_tree(tree: Tree, width: int) -> Tree:
    """The tree with padding nodes appended up to `width` nodes (PAD_NODE_TOKEN, no parent,
    depth 0, seeing only themselves), as build_tree pads its shorter rows: a pass of a
    fixed, bucketed shape scores them and the walk never reaches them."""
    b, q = tree.tokens.shape
    extra = width - q
    if extra <= 0:
        return tree
    eye = torch.eye(width, dtype=torch.bool, device=tree.tokens.device).expand(b, width, width)
    ancestors = eye.clone()  # b w w
    ancestors[:, :q, :q] = tree.ancestors
    return Tree(
        tokens=torch.cat([tree.tokens, tree.tokens.new_full((b, extra), PAD_NODE_TOKEN)], dim=1),  # b w
        parent=torch.cat([tree.parent, tree.parent.new_full((b, extra), -1)], dim=1),  # b w
        depth=torch.cat([tree.depth, tree.depth.new_zeros(b, extra)], dim=1),  # b w
        ancestors=ancestors,
        node_of=tree.node_of,
    )


def tree_attention_mask(tree: Tree, context_valid: torch.Tensor, dtype: torch.dtype,
                        slots: int | None = None, window: int | None = None) -> torch.Tensor:
    """The 4D additive mask for scoring the tree after a committed context.

    context_valid [b, L] marks the cache slots that hold committed tokens (holes left by
    ragged acceptance and prompt padding are False); the tree's q nodes sit in slots L..L+q.
    Returns [b, 1, q, slots] (slots: L + q unless given, for a cache that attends over all
    of its slots): 0 where a node may attend, the dtype's minimum where not.

    With `window`, the mask of a sliding-window layer: a node sees only tokens fewer than
    `window` positions back. Committed slots hold positions 0, 1, ... in slot order (holes
    skipped), and a node sits at the pending token's position, the committed count, plus
    its depth."""
    b, q = tree.tokens.shape
    L = context_valid.size(1)
    slots = L + q if slots is None else slots
    allowed = torch.zeros(b, q, slots, dtype=torch.bool, device=tree.tokens.device)  # b q S
    allowed[:, :, :L] = context_valid.unsqueeze(1)
    allowed[:, :, L : L + q] = tree.ancestors
    if window is not None:
        slot_position = context_valid.long().cumsum(dim=1) - 1  # b L
        node_position = context_valid.sum(dim=1, keepdim=True) + tree.depth  # b q
        allowed[:, :, :L] &= slot_position.unsqueeze(1) > (node_position - window).unsqueeze(2)  # b q L
        allowed[:, :, L : L + q] &= (tree.depth.unsqueeze(2) - tree.depth.unsqueeze(1)) < window  # b q q
    return _additive(allowed, dtype)  # b 1 q S


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool [b, q, k] "may attend" into the additive [b, 1, q, k] mask attention adds:
    0 where allowed, the dtype's minimum where not."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask.unsqueeze(1)


def prompt_positions(prompt_valid: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded prompt: 0 at the first real token (pads get 0)."""
    return (prompt_valid.long().cumsum(dim=1) - 1).clamp(min=0)  # b P


def walk(tree: Tree, logits_at, choose) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Follow the base model's own choices down the tree.

    logits_at(nodes [b]) gives the base model's logits [b, V] at one node of each row
    (base.NodeLogits computes them only there; `at_nodes` reads a full [b, q, V]). From
    the root, `choose` picks the base model's next token from the logits of the current
    node (argmax for greedy, a draw from the target distribution for sampling), as
    choose(logits [b, V], depth): depth 0 picks the token after the root. If a child
    of the current node carries that token, move there and repeat; otherwise that token is
    the bonus and the walk ends. Returns (path [b, A + 1] node ids, root first, where A is
    the longest acceptance in the batch and shorter paths repeat their last node;
    n_accepted [b] candidate tokens accepted; bonus [b] the next token).
    """
    b, q = tree.tokens.shape
    device = tree.tokens.device
    current = torch.zeros(b, dtype=torch.long, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    n_accepted = torch.zeros(b, dtype=torch.long, device=device)
    bonus = torch.zeros(b, dtype=tree.tokens.dtype, device=device)
    path = [current]
    for depth in range(int(tree.depth.max()) + 1):
        token = choose(logits_at(current), depth)  # b
        is_child = (tree.parent == current.unsqueeze(1)) & (tree.tokens == token.unsqueeze(1))  # b q
        found = is_child.any(dim=1) & ~done
        bonus = torch.where(~done & ~found, token, bonus)
        done |= ~found
        current = torch.where(found, is_child.long().argmax(dim=1), current)
        n_accepted += found.long()
        path.append(current)
        if bool(done.all()):
            break
    return torch.stack(path, dim=1)[:, : int(n_accepted.max()) + 1], n_accepted, bonus


def at_nodes(logits: torch.Tensor):
    """walk's logits_at for logits already computed at every node [b, q, V]."""
    rows = torch.arange(logits.size(0), device=logits.device)
    return lambda nodes: logits[rows, nodes]  # b V


def hindsight_accepted(candidates: torch.Tensor, emitted: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """What a tree of these candidates would have accepted, judged once the tokens it
    guessed have been emitted: the longest run of leading tokens that any candidate
    [b, k, L] shares with the tokens emitted after the step's pending token [b, L], of
    which the first known [b] are real (a row that stopped earlier has fewer).

    The walk accepts the path that carries the base model's own choices, and a lossless
    decoder emits those choices whatever tree it checked (when sampling, the same draws:
    the emitted tokens are one draw, so this is one draw of what that tree accepts). So
    one step teaches what every tree made of its candidates would have done. [b]
    """
    L = candidates.size(2)
    real = torch.arange(L, device=candidates.device) < known.unsqueeze(1)  # b L
    match = (candidates == emitted.unsqueeze(1)) & real.unsqueeze(1)  # b k L   NO_TOKEN never matches
    return match.long().cumprod(dim=-1).sum(dim=-1).amax(dim=1)  # b


def teacher_forcing(window: torch.Tensor, n: int, n_predict: int):
    """Split training windows [b, n + h + 1] into the reference recipe's three views.

    The base model reads window[:, :n]; its state at position p produced window[p + 1].
    The speculator reads ids = window[:, 1 : n + h + 1], so its stage i at position p reads
    window[p + i + 1] (the token stage i - 1 predicted) and head i's target is
    window[p + i + 2]. Returns (base_ids [b, n], ids [b, n + h], targets [h, b, n]).
    """
    h = n_predict
    if window.size(1) != n + h + 1:
        raise ValueError(f"a window for n={n}, h={h} has {n + h + 1} tokens, got {window.size(1)}")
    targets = torch.stack([window[:, i + 2 : i + 2 + n] for i in range(h)])  # h b n
    return window[:, :n], window[:, 1:], targets


def greedy_targets(per_position: torch.Tensor, n: int, n_predict: int) -> torch.Tensor:
    """Self-distilled targets [h, b, n, ...] in place of teacher_forcing's text targets.

    per_position[:, j] is what the base model says about token j + 1 after reading
    window[:, :n + h]: its greedy choice [b, n + h], or its logits [b, n + h, K].
    Head i at position p has read tokens up to window[p + i + 1], and verification will
    check it against the base model's choice for token p + i + 2: per_position[:, p + i + 1].
    """
    h = n_predict
    if per_position.size(1) != n + h:
        raise ValueError(f"base outputs for n={n}, h={h} span {n + h} positions, got {per_position.size(1)}")
    return torch.stack([per_position[:, i + 1 : i + 1 + n] for i in range(h)])  # h b n ...


# ---- the speculator's tree of candidates (MLPSpeculator.expand grows it: top_k[i]
# children a node at stage i, leaves in expansion order), and the smaller trees inside it


def best_paths(paths: torch.Tensor, scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best-scoring of paths [b, N, D] with scores [b, N]: ([b, k, D], [b, k]), best first."""
    best_scores, best = scores.topk(k, dim=1)  # b k
    return paths.gather(1, best.unsqueeze(-1).expand(-1, -1, paths.size(2))), best_scores  # b k D


def is_inside(sub_top_k, top_k) -> bool:
    """Whether the tree keeping sub_top_k[i] children at stage i (one stage or more) lies
    inside the one keeping top_k[i]: no more stages, and no more children at any stage."""
    return 0 < len(sub_top_k) <= len(top_k) and all(s <= t for s, t in zip(sub_top_k, top_k))


def sub_paths(paths: torch.Tensor, scores: torch.Tensor, top_k: list[int], sub_top_k: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """MLPSpeculator.expand(..., top_k)'s leaves as a smaller tree would have them: the tree
    that keeps sub_top_k[i] <= top_k[i] children at stage i and runs len(sub_top_k) stages.
    Returns ([b, N_s, d] paths, [b, N_s] scores), N_s = prod(sub_top_k), d = len(sub_top_k),
    in that tree's own expansion order. A leaf's place in expansion order is its ranks among
    its siblings, read as digits in the mixed radix top_k; a smaller tree's leaf is the first
    leaf whose ranks it shares (later ranks 0): the tree cut to fewer stages, or narrowed."""
    d = len(sub_top_k)
    if not is_inside(sub_top_k, top_k):
        raise MLPSpecError(f"a tree keeping {sub_top_k} children per stage is not inside one keeping {top_k}")
    index = sub_paths_index(top_k, sub_top_k).to(paths.device)
    return paths[:, index, :d], scores[:, index, d - 1]  # b N_s d, b N_s


def expansion_nodes(top_k: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Every node of the tree MLPSpeculator.expand(..., top_k) grows, as (leaf [n], depth
    [n]): a node at depth d is the first leaf below it in expansion order (its sibling
    ranks, then ranks 0: see sub_paths) cut to d tokens. Shallower nodes come first, so a
    parent precedes its children. n = t1 + t1 t2 + ... + prod(top_k)."""
    leaves, depths = [], []
    for d in range(1, len(top_k) + 1):
        index = sub_paths_index(top_k, top_k[:d])
        leaves.append(index)
        depths.append(torch.full_like(index, d))
    return torch.cat(leaves), torch.cat(depths)


def sub_paths_index(top_k: list[int], sub_top_k: list[int]) -> torch.Tensor:
    """The leaves of expand(..., top_k) that sub_paths keeps for sub_top_k, in order [N_s]."""
    index = torch.zeros(1, dtype=torch.long)
    for i, k in enumerate(sub_top_k):  # each stage's children after their parent's, best first
        index = (index.unsqueeze(1) + math.prod(top_k[i + 1:]) * torch.arange(k)).flatten()
    return index


def likeliest_nodes(paths: torch.Tensor, scores: torch.Tensor, top_k: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """expand's nodes (expansion_nodes), likeliest first by the draft's own probability of
    the whole path to each (exp of its summed log-probs): (candidates [b, n, D], each the
    path to its node with NO_TOKEN (-1) after it; p_draft [b, n], descending). Any first m
    of them make a tree (a child is never likelier than its parent; ties keep the parent
    first), the m nodes a draft of m tokens is likeliest to get accepted (EAGLE-2's
    dynamic draft tree, Li et al. 2024, arXiv 2406.16858)."""
    leaf, depth = (t.to(paths.device) for t in expansion_nodes(top_k))  # n, n
    D = paths.size(2)
    p_draft = scores[:, leaf, depth - 1].float().exp()  # b n
    order = p_draft.argsort(dim=1, descending=True, stable=True)  # b n
    cut = torch.arange(D, device=paths.device) >= depth.unsqueeze(1)  # n D
    candidates = paths[:, leaf].masked_fill(cut, NO_TOKEN)  # b n D
    return candidates.gather(1, order.unsqueeze(-1).expand(-1, -1, D)), p_draft.gather(1, order)  # b n D, b n
