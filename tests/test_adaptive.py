import json
import math
from dataclasses import dataclass, field

import pytest
import torch

import mlpspec.decode as decode
from conftest import OracleSpeculator, prefill_passes, tiny_llama
from mlpspec import MLPSpeculatorConfig
from mlpspec.adaptive import LIKELIEST_NODES, PLAIN, AdaptivePolicy, TreeShape, shape_menu
from mlpspec.errors import MLPSpecError
from mlpspec.generate import speculative_generate
from mlpspec.tree import NO_TOKEN, lookup_branch
from test_decode import hf_greedy, left_padded, random_speculator


def test_shape_menu():
    cfg = MLPSpeculatorConfig(vocab_size=64, emb_dim=32, n_predict=3, top_k_tokens_per_head=[4, 3, 2], n_candidates=5)
    menu = shape_menu(cfg)
    likeliest = TreeShape((4, 3, 2), 0, nodes=LIKELIEST_NODES)  # of the whole tree's 4 + 12 + 24 nodes
    assert menu == [PLAIN, TreeShape((1,), 1), TreeShape((1, 1), 1), TreeShape((1, 1, 1), 1), likeliest]
    assert [s.max_nodes for s in menu] == [1, 2, 3, 4, 1 + LIKELIEST_NODES]
    with_lookup = shape_menu(cfg, lookup=8)
    assert with_lookup == menu + [TreeShape((), 0, 8), TreeShape((1, 1, 1), 1, 8), TreeShape((4, 3, 2), 0, 8, LIKELIEST_NODES)]
    assert [s.max_nodes for s in with_lookup[len(menu):]] == [9, 12, 9 + LIKELIEST_NODES]
    assert [str(s) for s in with_lookup[-4:]] == [f"[4, 3, 2]~{LIKELIEST_NODES}", "lookup8", "[1, 1, 1]x1+lookup8",
                                                  f"[4, 3, 2]~{LIKELIEST_NODES}+lookup8"]
    assert shape_menu(None, lookup=8) == [PLAIN, TreeShape((), 0, 8)]
    # a small tree's likeliest nodes are all of them; a chain has none beside its own
    small = shape_menu(cfg, top_k=[2, 2])
    assert small == [PLAIN, TreeShape((1,), 1), TreeShape((1, 1), 1), TreeShape((2, 2), 0, nodes=2 + 4)]
    assert shape_menu(cfg, top_k=[1, 1], lookup=8) == [PLAIN, TreeShape((1,), 1), TreeShape((1, 1), 1),
                                                       TreeShape((), 0, 8), TreeShape((1, 1), 1, 8)]


def calibrated(menu, forward, batch_size=1, policy=None):
    policy = policy or AdaptivePolicy(menu)
    policy.calibrate(batch_size, lambda q: forward[q], lambda shape: 0.0)
    return policy


def run_policy(policy, steps, outcome, batch_size=1):
    chosen = []
    for _ in range(steps):
        shape = policy.choose(batch_size, max_depth=2)
        chosen.append(shape)
        policy.update(shape, batch_size, [outcome[shape]], policy.seconds[policy.bucket(batch_size)][shape])
    return chosen


CHAIN1, CHAIN2, TREE = TreeShape((1,), 1), TreeShape((1, 1), 1), TreeShape((4, 3), 5)  # 2, 3 and 11 nodes
OUTCOME = {PLAIN: 1.0, CHAIN1: 1.8, CHAIN2: 1.9, TREE: 2.4}  # tokens per step


def test_calibration_interpolates_forward_time_between_tree_sizes():
    policy = calibrated([PLAIN, CHAIN1, CHAIN2, TREE], {1: 1.0, 2: 1.2, 11: 2.1})
    assert policy.seconds[1] == pytest.approx({PLAIN: 1.0, CHAIN1: 1.2, CHAIN2: 1.3, TREE: 2.1})


def test_a_calibration_restores_into_a_policy_with_the_same_menu():
    menu = [PLAIN, CHAIN1, CHAIN2, TREE]
    policy = AdaptivePolicy(menu)
    policy.calibrate(1, {1: 1.0, 2: 1.2, 11: 2.1}.get, {PLAIN: 0.0, CHAIN1: 0.1, CHAIN2: 0.2, TREE: 0.3}.get)
    policy.calibrate(3, {1: 2.0, 2: 2.6, 11: 5.0}.get, lambda shape: 0.4)  # the bucket of batch sizes 3-4
    saved = json.loads(json.dumps(policy.calibration()))  # as kept on disk
    again = AdaptivePolicy(menu)
    again.restore(saved)
    assert again.calibrated(1) and again.calibrated(4) and not again.calibrated(8)
    assert again.seconds == policy.seconds and again.seconds[1][TREE] == pytest.approx(2.1 + 0.3)
    with pytest.raises(MLPSpecError, match="a calibration of 4 shapes at 3 tree sizes does not fit this policy's 3"):
        AdaptivePolicy([PLAIN, CHAIN1, TREE]).restore(saved)


def test_costs_follow_the_tree_sizes_that_steps_report():
    policy = calibrated([PLAIN, CHAIN1, TREE], {1: 1.0, 2: 1.2, 11: 2.1})
    assert policy.cost(TREE, 1) == pytest.approx(2.1)  # its largest tree, 11 nodes, until told
    for nodes, seconds in ((4, 1.4), (6, 1.6), (5, 1.5)):  # candidates that shared prefixes
        policy.update(TREE, 1, [2.0], seconds, nodes=nodes)
    assert policy.seconds[1][TREE] == pytest.approx(1.5)  # 1.2 + 3/9 of the way to 2.1
    assert policy.cost(CHAIN1, 1) == pytest.approx(1.2 * policy.drift[(1, True)][1])
    assert policy.drift[(1, True)] == (3, pytest.approx(1.0, abs=0.01))  # each step timed as its own size predicts


def test_step_costs_follow_what_steps_measure_at_once_then_slowly():
    policy = calibrated([PLAIN, CHAIN1], {1: 1.0, 2: 1.2, 11: 2.1})
    for seconds in (1.2, 1.8, 2.4):  # calibrated 1.2: measured 1.0, 1.5, 2.0 times that
        policy.update(CHAIN1, 1, [2.0], seconds)
    assert policy.drift[(1, True)] == (3, pytest.approx(1.5))  # the plain mean of the first steps
    assert policy.cost(CHAIN1, 1) == pytest.approx(1.8)
    for _ in range(200):
        policy.update(CHAIN1, 1, [2.0], 1.2)
    before = policy.drift[(1, True)][1]
    policy.update(CHAIN1, 1, [2.0], 2.4)  # one slow step, late: a 0.03 share of its 2.0
    assert policy.drift[(1, True)][1] == pytest.approx(before + 0.03 * (2.0 - before))
    assert policy.drift.get((1, False)) is None  # plain steps keep their own


def test_policy_tries_what_could_pay_then_takes_the_best_per_second():
    policy = calibrated([PLAIN, CHAIN1, CHAIN2, TREE], {1: 1.0, 2: 1.2, 11: 2.8})
    # optimistic (1 + depth) tokens per calibrated second: CHAIN2 3/1.38, CHAIN1 2/1.2, TREE 3/2.8
    chosen = run_policy(policy, 60, OUTCOME)
    assert chosen[0] == CHAIN2
    assert chosen[-20:].count(CHAIN1) >= 16  # 1.5 tokens/s beats 1.38 and 1.0
    assert TREE not in chosen  # even at its best (3 tokens in 2.8 s) it could not beat what is known
    assert policy.choose(1, max_depth=0) == PLAIN  # nothing deeper fits the remaining budget


def test_at_a_large_batch_shapes_that_cannot_pay_are_never_tried():
    # a big batch: the forward time grows almost in proportion to the tree
    policy = calibrated([PLAIN, CHAIN1, CHAIN2, TREE], {1: 1.0, 2: 1.9, 11: 12.0})
    chosen = run_policy(policy, 50, {**OUTCOME, CHAIN1: 1.5})
    assert CHAIN2 not in chosen and TREE not in chosen  # 3 tokens could never pay for 3 s or 12 s
    assert chosen.count(PLAIN) >= 45  # the one shape that could pay was tried, and lost


def test_plain_picks_in_a_row_rest_the_choice():
    policy = calibrated([PLAIN, CHAIN1], {1: 1.0, 2: 3.0})  # 2 tokens can never pay for 3 plain steps
    asked = []
    for step in range(1, 61):
        if not policy.resting(1):
            asked.append(step)
            assert policy.choose(1, max_depth=1) == PLAIN
    # after n plain picks in a row, min(n, 8) steps rest: asked 1, rest 1; asked 3, rest 2; ...
    assert asked == [1, 3, 6, 10, 15, 21, 28, 36, 45, 54]
    assert not calibrated([PLAIN, CHAIN1], {1: 1.0, 2: 1.0}, policy=policy).resting(2)  # another batch size
    fresh = calibrated([PLAIN, CHAIN1], {1: 1.0, 2: 3.0})
    assert fresh.choose(1, max_depth=0) == PLAIN and not fresh.resting(1)  # forced by the tokens left: no rest
    cheap = calibrated([PLAIN, CHAIN1], {1: 1.0, 2: 1.0})
    assert cheap.choose(1, max_depth=1) == CHAIN1 and not cheap.resting(1)  # a speculative pick: no rest
    close = calibrated([PLAIN, CHAIN1], {1: 1.0, 2: 1.5})
    close.update(CHAIN1, 1, [1.6], 1.5)
    close.steps = close.record(CHAIN1).uses = 10**6  # no optimism left
    # 1.6 tokens in 1.5 s, 0.97 of plain's pace before the margin: plain, but only just, so no rest
    assert close.choose(1, max_depth=1) == PLAIN and not close.resting(1)


def test_what_one_batch_size_learned_guides_another():
    policy = calibrated([PLAIN, CHAIN1, CHAIN2, TREE], {1: 1.0, 2: 1.2, 11: 2.8})
    run_policy(policy, 20, OUTCOME)  # batch 1: every shape that could pay has been measured
    calibrated(None, {1: 2.0, 2: 4.2, 11: 13.0}, batch_size=8, policy=policy)
    # at batch 8 CHAIN2 could give 3 tokens in 5.2 s (better than plain's 1 in 2), but it is
    # known to give 1.9: plain wins, and nothing is tried
    assert run_policy(policy, 10, OUTCOME, batch_size=8) == [PLAIN] * 10


def test_measured_step_times_correct_plain_and_speculative_costs_apart():
    policy = calibrated([PLAIN, CHAIN1, CHAIN2], {1: 1.0, 2: 1.2, 3: 1.4})
    for _ in range(200):  # speculative steps really cost 20% more than calibrated; plain ones as calibrated
        policy.update(CHAIN1, 1, [1.8], 1.44)
        policy.update(PLAIN, 1, [1.0], 1.0)
    assert policy.cost(CHAIN2, 1) == pytest.approx(1.68, rel=1e-3)  # corrected though never timed itself
    assert policy.cost(PLAIN, 1) == pytest.approx(1.0)


def test_speculation_must_beat_plain_decoding_by_a_margin():
    policy = calibrated([PLAIN, CHAIN1], {1: 1.0, 2: 1.5})
    policy.update(CHAIN1, 1, [2], 1.5)
    policy.record(CHAIN1).at_least = [0.62]  # 1.62 tokens, 8% more per second than plain: within the noise
    policy.steps = 10**6  # no optimism left to spend
    policy.record(CHAIN1).uses = 10**6
    assert policy.choose(1, max_depth=1) == PLAIN
    policy.record(CHAIN1).at_least = [0.73]  # 15% more: worth it
    assert policy.choose(1, max_depth=1) == CHAIN1


@pytest.fixture
def fake_costs(monkeypatch):
    """A deterministic machine: a verify pass costs 1 + 0.05 per tree node, a proposal 0.3."""
    clock = {"now": 0.0}
    verify, propose = decode.verify, decode.propose

    def timed_verify(model, state, tree):
        clock["now"] += 1.0 + 0.05 * tree.size
        return verify(model, state, tree)

    def timed_propose(state, speculator, shape, depth, branch=None, policy=None, matched=None):
        tree, parts = propose(state, speculator, shape, depth, branch, policy, matched)
        clock["now"] += 0.3 if tree.size > 1 else 0.0
        return tree, parts

    monkeypatch.setattr(decode, "verify", timed_verify)
    monkeypatch.setattr(decode, "propose", timed_propose)
    return lambda: clock["now"]


def test_adaptive_goes_deep_with_a_good_speculator_and_stays_lossless(fake_costs):
    model = tiny_llama(seed=1)
    ids, mask = left_padded([5, 9], seed=1)
    expected = hf_greedy(model, ids, mask, 60, eos=None)
    oracle = OracleSpeculator(model, expected, mask.bool(), n_predict=3)
    policy = AdaptivePolicy(shape_menu(oracle.config), clock=fake_costs)
    out = speculative_generate(model, oracle, ids, mask, max_new_tokens=60, eos_token_id=[], adaptive=policy)
    assert out.sequences.tolist() == expected.tolist()
    deepest = sum(n for s, n in out.stats.shapes.items() if s.count(",") == 2)  # three-stage shapes
    assert deepest >= 0.6 * out.stats.steps
    assert out.stats.tokens_per_step > 2.5


def test_adaptive_falls_back_to_plain_with_a_useless_speculator(fake_costs):
    model = tiny_llama(seed=2)
    ids, mask = left_padded([5, 9], seed=2)
    expected = hf_greedy(model, ids, mask, 60, eos=None)
    useless = OracleSpeculator(model, expected, mask.bool(), n_predict=3, right=torch.tensor([False, False]))
    policy = AdaptivePolicy(shape_menu(useless.config), clock=fake_costs)
    out = speculative_generate(model, useless, ids, mask, max_new_tokens=60, eos_token_id=[], adaptive=policy)
    assert out.sequences.tolist() == expected.tolist()
    assert out.stats.shapes["plain"] >= 0.7 * out.stats.steps


def test_adaptive_with_real_timing_is_lossless_in_a_batch():
    model = tiny_llama(seed=3)
    ids, mask = left_padded([2, 9, 5, 13], seed=3)
    expected = hf_greedy(model, ids, mask, 30, eos=None)
    out = speculative_generate(model, random_speculator(model, 3), ids, mask, max_new_tokens=30,
                               eos_token_id=[], adaptive=True)
    assert out.sequences.tolist() == expected.tolist()
    # every step but the rows' prefills has a shape
    assert sum(out.stats.shapes.values()) == out.stats.steps - prefill_passes([2, 9, 5, 13])



def test_node_counts_take_the_likeliest_nodes_while_they_pay_for_the_batch():
    likeliest = TreeShape((4, 3), 0, nodes=4)
    policy = calibrated([PLAIN, likeliest], {1: 1.0, 2: 1.1, 5: 1.4}, batch_size=3)  # 0.1 a node
    p_draft = torch.tensor([[0.9, 0.5, 0.05, 0.01], [0.99, 0.98, 0.97, 0.96], [0.05, 0.01, 0.0, 0.0]])
    # alone, row 0 would take two nodes (2.4 / 1.2 = 2.0 tokens per second, the most), row 2
    # one; but the pass pads each row to the widest, and row 1 wants all four (4.9 / 1.4).
    # For the batch: a row's mean 1.65 / 1.1, 2.14 / 1.2, 2.48 / 1.3, 2.81 / 1.4 = 2.0: four each
    assert policy.node_counts(3, likeliest, p_draft).tolist() == [4, 4, 4]
    calibrated(policy.menu, {1: 1.0, 2: 1.1, 5: 1.4}, batch_size=1, policy=policy)
    assert policy.node_counts(1, likeliest, p_draft[:1]).tolist() == [2]
    assert policy.node_counts(1, likeliest, p_draft[2:]).tolist() == [1]  # the fewest a tree of this shape has


def test_lookup_chances_are_what_the_branch_alone_accepted_at_each_match_length():
    policy = AdaptivePolicy([PLAIN, TreeShape((), 0, 4)])
    policy.learn(TreeShape((), 0, 4), [3.0, 2.0], matched=[2, 2])  # 2 and 1 tokens accepted after 2-gram matches
    assert policy.lookup_chances(4, [2, 0, 3]).tolist() == [
        [1.0, 0.5, 0.0, 0.0],  # P(accepts >= 1), P(>= 2), ...
        [0.0] * 4,  # no match: an empty branch
        [1.0] * 4,  # a 3-gram match, never seen: the most it could be
    ]


def test_likeliest_takes_the_nodes_and_branch_tokens_most_likely_right_while_they_pay():
    shape = TreeShape((2, 2), 0, 3, nodes=6)
    policy = calibrated([PLAIN, shape], {1: 1.0, 2: 1.1, 10: 1.9}, batch_size=2)  # 0.1 a node
    policy.record(TreeShape((), 0, 3), 2).at_least, policy.record(TreeShape((), 0, 3), 2).uses = [0.9, 0.5, 0.05], 9
    paths = torch.tensor([[[5, 7], [5, 8], [6, 9], [6, 1]]]).expand(2, -1, -1)  # expand(..., [2, 2])'s leaves
    p_path = torch.tensor([[[0.6, 0.3], [0.6, 0.2], [0.4, 0.35], [0.4, 0.01]]]).expand(2, -1, -1)
    branch = torch.tensor([[[8, 8, 8]], [[NO_TOKEN] * 3]])  # row 1 matched nothing
    candidates, taken = decode.likeliest(policy, shape, paths, p_path.log(), [2, 2], branch, torch.tensor([2, 0]))
    # row 0: 0.9 (branch) 0.6 0.5 (branch) 0.4 0.35 0.3 0.2 ...; row 1, nodes alone: 0.6 0.4 0.35
    # 0.3 0.2 0.01. The rows' mean with m each: 1.75 / 1.1, 2.25 / 1.2, 2.675 / 1.3, 3.025 / 1.4,
    # 3.3 / 1.5 = 2.2, 3.455 / 1.6: five each, two of them branch tokens for row 0
    assert taken.tolist() == [2, 0]
    assert candidates[0].tolist() == [[5, NO_TOKEN], [6, NO_TOKEN], [6, 9], [NO_TOKEN] * 2, [NO_TOKEN] * 2]
    assert candidates[1].tolist() == [[5, NO_TOKEN], [6, NO_TOKEN], [6, 9], [5, 7], [5, 8]]

def test_the_likeliest_nodes_tree_takes_the_runner_up_where_it_pays_and_stays_lossless(fake_costs):
    model = tiny_llama(seed=4)
    ids, mask = left_padded([5, 9], seed=4)
    expected = hf_greedy(model, ids, mask, 40, eos=None)
    # at every third position the speculator's top-1 second token is wrong, its runner-up right
    oracle = OracleSpeculator(model, expected, mask.bool(), n_predict=3, wrong=lambda p, j: j == 1 and p % 3 == 0)
    likeliest = [s for s in shape_menu(oracle.config) if s.nodes]
    policy = AdaptivePolicy([PLAIN, *likeliest], clock=fake_costs)
    out = speculative_generate(model, oracle, ids, mask, max_new_tokens=40, eos_token_id=[], adaptive=policy)
    chain = speculative_generate(model, oracle, ids, mask, max_new_tokens=40, eos_token_id=[],
                                 top_k_tokens_per_head=[1, 1, 1], n_candidates=1)
    assert out.sequences.tolist() == chain.sequences.tolist() == expected.tolist()
    assert out.stats.shapes.get("plain", 0) <= 3  # where too few tokens are left for a tree
    # the chain stops at each wrong token; the tree's runner-up (drafted at 1/e) carries on
    tree_steps, chain_steps = out.stats.accepted_lengths, chain.stats.accepted_lengths
    assert sum(tree_steps) / len(tree_steps) > sum(chain_steps) / len(chain_steps) + 0.5


def test_the_likeliest_nodes_trees_are_lossless_in_a_batch_beside_a_lookup_branch():
    model = tiny_llama(seed=5)
    ids, mask = left_padded([2, 9, 5, 13], seed=5)
    expected = hf_greedy(model, ids, mask, 30, eos=None)
    speculator = random_speculator(model, 3)
    menu = [s for s in shape_menu(speculator.config, lookup=4) if s.nodes or s == PLAIN]
    policy = AdaptivePolicy(menu, margin=-0.9)  # speculate even where it cannot pay
    out = speculative_generate(model, speculator, ids, mask, max_new_tokens=30, eos_token_id=[], adaptive=policy,
                               lookup=4)
    assert out.sequences.tolist() == expected.tolist()
    assert out.stats.shapes.get("plain", 0) <= 4  # near the end only

def test_batch_sizes_share_costs_in_power_of_two_buckets():
    assert [AdaptivePolicy.bucket(b) for b in (1, 2, 3, 4, 5, 8, 9, 16)] == [1, 2, 4, 4, 8, 8, 16, 16]
    policy = calibrated([PLAIN, CHAIN1], {1: 1.0, 2: 1.5}, batch_size=3)
    assert policy.calibrated(4) and not policy.calibrated(5)
    assert sorted(policy.seconds) == [4]


def test_lookup_shapes_are_judged_by_what_each_row_matched():
    LOOKUP = TreeShape((), 0, 6)  # 7 nodes
    policy = calibrated([PLAIN, CHAIN1, LOOKUP], {1: 1.0, 2: 1.1, 7: 1.3})
    # a 3-gram match is copied right: 4 tokens a step; a 1-gram match is not: 1.05
    outcome = {3: 4.0, 1: 1.05}
    for _ in range(30):
        for n in (3, 1):
            shape = policy.choose(1, max_depth=6, matched=[n])
            tokens = outcome[n] if shape == LOOKUP else {PLAIN: 1.0, CHAIN1: 1.5}[shape]
            policy.update(shape, 1, [tokens], policy.seconds[1][shape], [n])
    assert policy.record(LOOKUP, 3).tokens_per_step == pytest.approx(4.0)
    assert policy.choose(1, max_depth=6, matched=[3]) == LOOKUP
    assert policy.choose(1, max_depth=6, matched=[1]) == CHAIN1  # tried, and lost to the chain
    assert policy.choose(1, max_depth=6, matched=[0]) == CHAIN1  # no match: lookup shapes are out
    assert policy.record(CHAIN1, 3) is policy.record(CHAIN1, 1)  # the speculator's shapes pool contexts
    # a row with no match counts for the shape's twin without the branch (here plain decoding)
    assert policy.record(LOOKUP, 0) is policy.record(PLAIN)
    # a lookup shape not yet tried for an n is credited with its most, 1 + 6 tokens
    assert policy.choose(1, max_depth=6, matched=[2]) == LOOKUP


def test_a_batch_step_is_worth_its_rows_mean_gain():
    LOOKUP = TreeShape((), 0, 6)
    policy = calibrated([PLAIN, LOOKUP], {1: 1.0, 2: 1.1, 7: 1.5}, batch_size=4)
    policy.update(LOOKUP, 4, [5.0], 1.5, [3])  # known: a 3-gram row gains 4 tokens
    policy.update(PLAIN, 4, [1.0], 1.0)
    policy.steps = 10**6
    policy.record(LOOKUP, 3).uses = 10**6  # no optimism left
    # one row of four matched: it gains 5 tokens, the other three 1 each
    assert policy.expected_tokens(LOOKUP, [3, 0, 0, 0]) == pytest.approx(2.0)
    assert policy.choose(4, max_depth=6, matched=[3, 0, 0, 0]) == LOOKUP  # 2 tokens in 1.5 s, with the margin
    policy.seconds[4][LOOKUP] = 2.3  # 2 tokens in 2.3 s, less the margin: no
    assert policy.choose(4, max_depth=6, matched=[3, 0, 0, 0]) == PLAIN
    assert policy.expected_tokens(LOOKUP, [3, 3, 3, 3]) == pytest.approx(5.0)
    assert policy.choose(4, max_depth=6, matched=[3, 3, 3, 3]) == LOOKUP
    assert policy.choose(4, max_depth=6, matched=[0, 0, 0, 0]) == PLAIN  # no match: the branch is empty
    # past lookup_cost_ratio plain steps a lookup shape is not offered at all, whatever its estimate
    assert policy.seconds[4][PLAIN] == 1.0
    policy.seconds[4][LOOKUP] = policy.lookup_cost_ratio + 0.1
    assert policy.choose(4, max_depth=6, matched=[3, 3, 3, 3]) == PLAIN
    # a step of rows with and without a match updates each row's own record
    policy.update(LOOKUP, 4, [3.0, 1.0, 1.0, 1.0], 2.1, [2, 0, 0, 0])
    assert policy.record(LOOKUP, 2).tokens_per_step == pytest.approx(3.0)
    assert policy.record(PLAIN).uses == 2


def test_a_tree_with_a_lookup_branch_starts_from_what_its_parts_gave():
    LOOKUP, TREE_LOOKUP = TreeShape((), 0, 6), TreeShape((4, 3), 5, 6)
    policy = calibrated([PLAIN, TREE, LOOKUP, TREE_LOOKUP], {1: 1.0, 2: 1.1, 17: 2.0})
    assert policy.expected_tokens(TREE_LOOKUP, [3]) == 7.0  # nothing known: 1 + its reach
    for tokens in (3, 4):  # 3.5 on average
        policy.update(LOOKUP, 1, [tokens], 1.3, [3])
    assert policy.expected_tokens(TREE_LOOKUP, [3]) == 3.5  # the branch alone is known
    for tokens in (2, 3, 2, 3, 2):  # 2.4 on average
        policy.update(TREE, 1, [tokens], 2.0)
    assert policy.expected_tokens(TREE_LOOKUP, [3]) == 3.5  # the better of the two parts
    assert policy.expected_tokens(TREE_LOOKUP, [1]) == 2.4  # for a 1-gram match only the tree is known


def test_a_chain_step_teaches_every_shorter_chain_exactly():
    CHAIN3 = TreeShape((1, 1, 1), 1)
    policy = calibrated([PLAIN, CHAIN1, CHAIN2, CHAIN3, TREE], {1: 1.0, 2: 1.1, 11: 2.0}, batch_size=2)
    # two rows: one accepted 3 of 3 candidates (4 tokens), the other 1 (2 tokens)
    policy.update(CHAIN3, 2, [4.0, 2.0], 1.2)
    assert policy.record(CHAIN3).tokens_per_step == pytest.approx(3.0)
    assert policy.record(CHAIN2).tokens_per_step == pytest.approx((3 + 2) / 2)  # min(accepted, 2) + 1
    assert policy.record(CHAIN1).tokens_per_step == pytest.approx((2 + 2) / 2)
    assert [policy.record(s).uses for s in (CHAIN1, CHAIN2, CHAIN3)] == [1, 1, 1]
    # a shorter chain says nothing of a longer one, and no chain speaks for a tree or plain decoding
    policy.update(CHAIN1, 2, [2.0, 1.0], 1.1)
    assert policy.record(CHAIN3).uses == 1 and policy.record(CHAIN1).uses == 2
    assert policy.record(TREE).uses == 0 and policy.record(PLAIN).uses == 0


def test_a_batch_is_worth_the_mean_of_its_rows():
    policy = calibrated([PLAIN, CHAIN1, CHAIN2], {1: 1.0, 2: 1.2, 3: 1.3}, batch_size=8)
    policy.steps = 10**6
    for shape, at_least in ((CHAIN1, [0.7]), (CHAIN2, [0.5, 0.5])):
        policy.record(shape).uses, policy.record(shape).at_least = 10**6, at_least
    assert policy.expected_tokens(CHAIN2, [0]) == pytest.approx(2.0)  # one row: 1 + 0.5 + 0.5
    # rows leave the batch when done, so none waits for the slowest: eight rows, the same mean
    assert policy.expected_tokens(CHAIN2, [0] * 8) == pytest.approx(2.0)
    # a chain pays for eight rows: 2 tokens a step in 1.3 s (less the margin) against plain's 1 in 1
    assert policy.choose(8, max_depth=63, matched=[0] * 8) == CHAIN2
    assert policy.choose(8, max_depth=0, matched=[0] * 8) == PLAIN  # no room for a candidate
    # but not where its tokens do not pay for its step: 2 in 2.1 s, 1.7 in 1.9 s
    calibrated(policy.menu, {1: 1.0, 2: 1.9, 3: 2.1}, batch_size=8, policy=policy)
    assert policy.choose(8, max_depth=63, matched=[0] * 8) == PLAIN


def test_a_lookup_shape_is_worth_the_mean_over_rows_with_and_without_a_match():
    LOOKUP = TreeShape((), 0, 6)
    policy = calibrated([PLAIN, CHAIN2, LOOKUP], {1: 1.0, 2: 1.2, 7: 1.9}, batch_size=4)
    policy.steps = 10**6
    for shape, n, at_least in ((CHAIN2, 0, [0.6, 0.3]), (LOOKUP, 3, [1.0, 1.0, 1.0, 1.0])):
        policy.record(shape, n).uses, policy.record(shape, n).at_least = 10**6, at_least
    # row A's 3-gram copy gives 5 tokens a step; B, with no match, gets plain decoding's 1
    assert policy.expected_tokens(LOOKUP, [3, 0]) == pytest.approx(3.0)
    # 3 tokens in 1.9 s beat the chain's 1.9 in 1.34 s
    assert policy.choose(4, max_depth=6, matched=[3, 0]) == LOOKUP
    # one copy among four rows does not: 2 tokens a row in 1.9 s
    assert policy.expected_tokens(LOOKUP, [3, 0, 0, 0]) == pytest.approx(2.0)
    assert policy.choose(4, max_depth=6, matched=[3, 0, 0, 0]) == CHAIN2


def test_two_unlucky_first_steps_do_not_rule_out_a_long_lookup_branch():
    LOOKUP = TreeShape((), 0, 6)
    policy = calibrated([PLAIN, CHAIN1, LOOKUP], {1: 1.0, 2: 1.1, 7: 1.3})
    policy.update(CHAIN1, 1, [1.6], 1.1)
    policy.record(CHAIN1).uses = 10**3  # well known: 1.6 tokens for 1.1 s
    for _ in range(2):
        policy.update(LOOKUP, 1, [1.0], 1.3, [3])  # the branch's first two copies were wrong
    policy.steps = 100
    # the optimism lifts each of the branch's 6 tails by 0.2 * sqrt(ln 101 / 2), so it is tried again
    lift = 0.2 * (math.log(101) / 2) ** 0.5
    assert policy.expected_tokens(LOOKUP, [3], bonus=True) == pytest.approx(1 + 6 * lift)
    assert policy.choose(1, max_depth=6, matched=[3]) == LOOKUP
    # beside a row that matched nothing, half of that on average
    assert policy.expected_tokens(LOOKUP, [3, 0], bonus=True) == pytest.approx(1 + 3 * lift)
    policy.record(LOOKUP, 3).uses = 10**4  # after many wrong copies it is not
    assert policy.choose(1, max_depth=6, matched=[3]) == CHAIN1


@dataclass
class Always(AdaptivePolicy):
    """Runs one shape every step, and logs what it learns."""

    shape: TreeShape = PLAIN
    log: list = field(default_factory=list)

    def choose(self, batch_size, max_depth, matched=(0,)):
        return self.shape

    def learn(self, shape, row_tokens, matched=None):
        self.log.append((shape, list(row_tokens)))
        super().learn(shape, row_tokens, matched)


def test_hindsight_learns_what_running_each_other_shape_would_have_given(fake_costs):
    """Run one tree every step; the chain, the tree cut to fewer stages or narrowed, the
    lookup branch alone, and the chain and the tree with the branch beside them, learned in hindsight,
    must each give at every step exactly what a decode that runs that shape from the same
    point gives on its first step (a shape with a branch speaks only for rows whose lookup
    matched)."""
    model = tiny_llama(seed=4)
    ids, mask = left_padded([6], seed=4)
    max_new = 43  # the last step has room for one token only
    expected = hf_greedy(model, ids, mask, max_new, eos=None)
    oracle = OracleSpeculator(model, expected, mask.bool(), n_predict=3, wrong=lambda p, j: (p * 7 + j * 3) % 11 < 4)
    tree, chain, lookup = TreeShape((2, 2, 2), 3), TreeShape((1, 1, 1), 1), TreeShape((), 0, 4)
    cut1, cut2 = TreeShape((2,), 2), TreeShape((2, 2), 3)
    narrow1, narrow2 = TreeShape((2, 1, 1), 2), TreeShape((1, 2, 2), 2)
    chain_lookup, tree_lookup = TreeShape((1, 1, 1), 1, 4), TreeShape((2, 2, 2), 3, 4)
    menu = [PLAIN, chain, narrow1, narrow2, cut1, cut2, tree, lookup, chain_lookup, tree_lookup]
    policy = Always(menu, clock=fake_costs, shape=tree)
    sizes = []
    out = speculative_generate(model, oracle, ids, mask, max_new_tokens=max_new, eos_token_id=[], adaptive=policy,
                               on_step=lambda emitted: sizes.append(int((emitted >= 0).sum())))
    assert out.sequences.tolist() == expected.tolist()
    assert out.stats.shapes == {str(tree): len(sizes) - 1}  # the tree ran on every step, nothing else

    P = ids.size(1)
    wanted = {chain: [], narrow1: [], narrow2: [], cut1: [], cut2: [], lookup: [], chain_lookup: [], tree_lookup: []}
    for e in torch.tensor(sizes[:-1]).cumsum(0).tolist():  # tokens emitted before each step
        room = max_new - e - 1  # candidate tokens the step had room for
        if room < 1:  # a step with room for no candidate teaches nothing
            continue
        prefix = expected[:, : P + e - 1]  # the pending token is the one a prefill of this picks
        matched = int(lookup_branch(expected[:, : P + e], torch.tensor([P + e]), 4)[1])

        def first_step(speculator, top_k=None, n=None, lookup=0):
            alone = speculative_generate(model, speculator, prefix, max_new_tokens=max_new - e + 1, eos_token_id=[],
                                         top_k_tokens_per_head=top_k, n_candidates=n, lookup=lookup)
            return 1 + int(alone.stats.accepted[0][0])

        # near the end every shape is cut to the tokens left, alone as in hindsight; a shape
        # with the branch beside it speaks only where the row matched
        wanted[chain].append(first_step(oracle, [1, 1, 1], 1))
        wanted[cut2].append(first_step(oracle, [2, 2], 3))
        wanted[cut1].append(first_step(oracle, [2], 2))
        wanted[narrow1].append(first_step(oracle, [2, 1, 1], 2))
        wanted[narrow2].append(first_step(oracle, [1, 2, 2], 2))
        if matched:
            wanted[lookup].append(first_step(None, lookup=4))
            wanted[chain_lookup].append(first_step(oracle, [1, 1, 1], 1, lookup=4))
            wanted[tree_lookup].append(first_step(oracle, [2, 2, 2], 3, lookup=4))
    learned = {shape: [] for shape in wanted}
    for shape, tokens in policy.log:
        if shape in learned:
            learned[shape] += tokens
    for shape in wanted:
        assert sorted(learned[shape]) == sorted(wanted[shape]), shape
    assert len(wanted[chain]) >= 8 and len(set(wanted[chain])) >= 2  # a chain of varied luck
    assert len(set(wanted[cut2])) >= 2  # and its cut to two stages (one stage always holds the truth)
    assert wanted[narrow2] != wanted[chain]  # a narrowed tree's runner-ups do get accepted
    assert wanted[lookup] and max(wanted[lookup]) > 1  # the branch matched and copied right
    rooms = [max_new - e - 1 for e in torch.tensor(sizes[:-1]).cumsum(0).tolist()]
    assert 1 in rooms  # the step cut short is really there


def test_a_later_call_reuses_the_step_costs_kept_on_this_machine(calibrations_apart, monkeypatch):
    model = tiny_llama()
    speculator = random_speculator(model)
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    policy, file = decode.remembered_policy(model, speculator, lookup=3)
    assert not policy.calibrated(1) and file.parent == calibrations_apart
    first = speculative_generate(model, speculator, ids, max_new_tokens=12, adaptive=policy, lookup=3)
    decode.remember_calibration(policy, file)
    timed = []
    monkeypatch.setattr(decode, "calibrate", lambda *args: timed.append(args))
    again, same = decode.remembered_policy(model, speculator, lookup=3)
    assert same == file and again.calibrated(1) and again.calibration() == policy.calibration()
    second = speculative_generate(model, speculator, ids, max_new_tokens=12, adaptive=again, lookup=3)
    assert timed == [] and torch.equal(second.sequences, first.sequences)
    # another menu, or another speculator, is timed on its own
    assert decode.remembered_policy(model, speculator, lookup=0)[1] != file
    assert decode.remembered_policy(model, random_speculator(model, n_predict=2), lookup=3)[1] != file
    assert not decode.remembered_policy(model, speculator, lookup=3, recalibrate=True)[0].calibrated(1)
    for broken in ("{", "[]", '{"1": []}'):
        file.write_text(broken)
        with pytest.warns(UserWarning, match="not a calibration this policy can use"):
            assert not decode.remembered_policy(model, speculator, lookup=3)[0].calibrated(1)


def test_a_likeliest_tree_that_takes_its_branch_alone_stays_lossless_and_teaches_the_rest(fake_costs):
    # a random speculator's nodes are seldom likely, and a tiny model's output repeats
    # itself, so the branch's tokens (at first credited with every chance) often take the
    # whole tree: a step with no speculator node at all
    model = tiny_llama(seed=6)
    ids, mask = left_padded([5, 8], seed=6)
    expected = hf_greedy(model, ids, mask, 40, eos=None)
    speculator = random_speculator(model, 3)
    menu = shape_menu(speculator.config, lookup=4)
    likeliest_lookup = menu[-1]
    assert likeliest_lookup.nodes and likeliest_lookup.lookup
    policy = Always(menu, clock=fake_costs, shape=likeliest_lookup)
    out = speculative_generate(model, speculator, ids, mask, max_new_tokens=40, eos_token_id=[], adaptive=policy,
                               lookup=4)
    assert out.sequences.tolist() == expected.tolist()
    assert out.stats.shapes == {str(likeliest_lookup): out.stats.steps - prefill_passes([5, 8])}  # but the prefill
    learned = {shape for shape, _ in policy.log}
    assert {TreeShape((1, 1, 1), 1), TreeShape((), 0, 4)} <= learned  # the chain, the branch alone


def test_what_a_shape_accepted_at_a_batch_size_scales_what_its_records_promise_there():
    policy = calibrated([PLAIN, CHAIN2], {1: 1.0, 2: 1.2, 3: 1.5})
    calibrated(policy.menu, {1: 1.0, 2: 1.2, 3: 1.5}, batch_size=16, policy=policy)
    policy.update(CHAIN2, 1, [3.0], 1.5)  # records: 2 candidate tokens a step
    policy.record(CHAIN2).uses = policy.steps = 10**6  # no optimism left
    assert policy.choose(16, max_depth=5, matched=[0] * 16) == CHAIN2  # 3 tokens in 1.5 s
    # at batch 16 its steps accept a quarter of what the records say (1.5 tokens in 1.5 s):
    # the first step moves its yield there a fifth of the way, and a dozen or so more turn the choice
    policy.update(CHAIN2, 16, [1.5] * 16, 1.5)
    assert policy.yields[(16, CHAIN2)] == (1, pytest.approx(1 - 0.75 / 5))
    for steps in range(2, 40):
        policy.update(CHAIN2, 16, [1.5] * 16, 1.5)
        if policy.choose(16, max_depth=5, matched=[0] * 16) == PLAIN:
            break
    assert steps < 20 and policy.choose(1, max_depth=5) == CHAIN2  # batch 1 keeps its own
    policy.yields.clear()  # the records alone, which batch 16's steps pulled down too, still say speculate
    assert policy.choose(16, max_depth=5, matched=[0] * 16) == CHAIN2


def test_the_optimism_bonus_shrinks_with_the_batch_so_the_policy_explores_where_it_is_cheap():
    policy = calibrated([PLAIN, CHAIN2], {1: 1.0, 2: 1.2, 3: 1.3})
    calibrated(policy.menu, {1: 1.0, 2: 1.2, 3: 1.3}, batch_size=16, policy=policy)
    for _ in range(2):
        policy.update(CHAIN2, 1, [1.0], 1.3)  # two steps that accepted nothing
    policy.steps = 100
    # the bonus, 0.2 * sqrt(ln 101 / 2) on each of the two tails: 1.61 tokens in 1.3 s, with
    # the margin 1.13 plain steps' worth at batch 1; a sixteenth of it at batch 16, 0.73
    assert policy.choose(1, max_depth=5) == CHAIN2
    assert policy.choose(16, max_depth=5, matched=[0] * 16) == PLAIN


def test_chains_glanced_at_on_plain_steps_bring_a_policy_back_to_a_speculator_that_got_good(fake_costs):
    """Text changes under a policy (code, then chat). Records that say the chains accept
    nothing, and no optimism left: plain steps alone would never show the policy otherwise.
    The chain it drafts beside the plain steps it chooses (decode.glance), judged by the
    tokens that follow, shows it that the speculator is right now, and it speculates again."""
    model = tiny_llama(seed=1)
    ids, mask = left_padded([5], seed=1)
    expected = hf_greedy(model, ids, mask, 120, eos=None)
    oracle = OracleSpeculator(model, expected, mask.bool(), n_predict=3)  # always right
    policy = AdaptivePolicy(shape_menu(oracle.config), clock=fake_costs)
    for shape in policy.menu:
        if shape != PLAIN:
            policy.record(shape).uses, policy.record(shape).at_least = 10**6, [0.0] * shape.depth
    policy.steps = 10**6
    out = speculative_generate(model, oracle, ids, mask, max_new_tokens=120, eos_token_id=[], adaptive=policy)
    assert out.sequences.tolist() == expected.tolist()
    assert policy.record(TreeShape((1, 1, 1), 1)).tokens_per_step > 2.0  # learned in hindsight, then by use
    # plain until about ten glances (the records' moving average: 3% of the way each), then the chain
    assert out.stats.shapes.get("[1, 1, 1]x1", 0) >= 15 and out.stats.shapes["plain"] <= 40
