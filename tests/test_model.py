import math

import pytest
import torch

from mlpspec import MLPSpecError, MLPSpeculator, MLPSpeculatorConfig
from mlpspec.tree import best_paths, sub_paths
from reference_impl import ReferenceSpeculator


def make(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=11, emb_dim=12, inner_dim=8, n_predict=3)
    cfg.update(kw)
    return MLPSpeculator(MLPSpeculatorConfig(**cfg)).eval()


def as_reference(model):
    tensors = {f"speculator.{k}": v for k, v in model.state_dict().items()}
    return ReferenceSpeculator(model.config.to_dict(), tensors)


def gelu(x):
    return 0.5 * x * (1 + math.erf(x / math.sqrt(2)))


def test_one_stage_by_hand():
    # V=4, d=3, m=2, one head: state_weight = 0.5**0.5, emb scale = sqrt(1 - 0.5) * sqrt(2/2).
    model = MLPSpeculator(MLPSpeculatorConfig(vocab_size=4, emb_dim=3, inner_dim=2, n_predict=1))
    with torch.no_grad():
        model.proj[0].weight.copy_(torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, -1.0]]))
        model.emb[0].weight.copy_(torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.5, -0.5], [0.0, 0.0]]))
        model.ln[0].weight.copy_(torch.tensor([2.0, 1.0]))
        model.ln[0].bias.copy_(torch.tensor([0.5, 0.0]))
        model.head[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, -2.0]]))
    state = torch.tensor([[[1.0, 2.0, 3.0]]])
    ids = torch.tensor([[2, 0]])  # stage 0 reads token 2

    # proj(s) = [4, -1]; x = 0.5**0.5 * ([4, -1] + [0.5, -0.5]) = 0.5**0.5 * [4.5, -1.5]
    x = [0.5**0.5 * 4.5, 0.5**0.5 * -1.5]
    rms = math.sqrt((x[0] ** 2 + x[1] ** 2) / 2 + 1e-6)
    y = [x[0] / rms * 2.0 + 0.5, x[1] / rms * 1.0 + 0.0]
    s = [gelu(v) for v in y]
    expected = [s[0], s[1], s[0] + s[1], s[0] - 2 * s[1]]

    logits = model(state, ids)  # h b n V
    assert logits.shape == (1, 1, 1, 4)
    assert logits[0, 0, 0].tolist() == pytest.approx(expected, abs=1e-6)


def test_weight_constants_match_reference():
    model = make(n_predict=4, inner_dim=8)
    sw = 0.5 ** (0.5 / 4)
    assert model.state_weight == pytest.approx(sw)
    assert model.emb_weight == pytest.approx(math.sqrt((1 - sw**2) * 8 / 2))


def test_inner_dim_zero_means_emb_dim():
    model = make(inner_dim=0)
    assert model.config.width == 12
    assert model.proj[1].weight.shape == (12, 12)


@pytest.mark.parametrize("tie,scale", [(False, False), (True, False), (False, True), (True, True)])
def test_forward_matches_reference_description(tie, scale):
    model = make(tie_weights=tie, scale_input=scale, n_predict=3)
    with torch.no_grad():  # non-trivial norm parameters, so ln is really exercised
        for ln in model.ln:
            ln.weight.normal_(1.0, 0.2)
            ln.bias.normal_(0.0, 0.2)
    state = torch.randn(2, 5, 12) * 3
    ids = torch.randint(0, 11, (2, 5 + 3))
    ours = model(state, ids)
    ref = as_reference(model).forward(state, ids)
    assert ours.shape == (3, 2, 5, 11)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_stage_i_reads_ids_offset_by_i():
    # Stage i at position p reads ids[p + i], so with n = 4, h = 3 the id at index
    # n + h - 2 = 5 reaches only head 2 at position 3, and the id at n + h - 1 = 6 (kept
    # for the reference's [b, n + h] shape; the recipe uses it only as a target) none.
    model = make()
    state = torch.randn(1, 4, 12)
    ids = torch.randint(0, 11, (1, 7))

    def effect(index):
        changed = ids.clone()
        changed[0, index] = (ids[0, index] + 1) % 11
        return (model(state, ids) - model(state, changed)).abs().sum(-1)[:, 0]  # h n

    diff = effect(5)
    assert diff[2, 3] > 0
    diff[2, 3] = 0
    assert diff.max() == 0
    assert effect(6).max() == 0
    # and ids[0] feeds only stage 0 at position 0, which then flows on to later stages there
    diff = effect(0)
    assert (diff[:, 0] > 0).all() and diff[:, 1:].max() == 0


def test_tie_weights_shares_everything_but_proj0():
    model = make(tie_weights=True, n_predict=4)
    for i in range(1, 4):
        assert model.emb[i].weight is model.emb[0].weight
        assert model.head[i].weight is model.head[0].weight
        assert model.ln[i].weight is model.ln[0].weight and model.ln[i].bias is model.ln[0].bias
    assert model.proj[0].weight is not model.proj[1].weight
    assert model.proj[2].weight is model.proj[1].weight and model.proj[3].weight is model.proj[1].weight
    untied = make(n_predict=4)
    m, d, V = 8, 12, 11
    assert untied.num_parameters() == 4 * (2 * V * m + 2 * m) + m * d + 3 * m * m
    assert model.num_parameters() == 2 * V * m + 2 * m + m * d + m * m


def test_tied_parameters_get_one_gradient():
    model = make(tie_weights=True, n_predict=3)
    model(torch.randn(1, 3, 12), torch.randint(0, 11, (1, 6))).sum().backward()
    # all three heads contribute to the single shared head weight
    assert model.head[0].weight.grad is model.head[2].weight.grad
    assert model.head[0].weight.grad.abs().sum() > 0


def test_tie_weights_with_two_heads():
    model = make(tie_weights=True, n_predict=2)
    assert model.emb[1].weight is model.emb[0].weight
    assert model.proj[1].weight is not model.proj[0].weight


def test_scale_input_normalises_the_base_state():
    scaled = make(scale_input=True)
    plain = make(scale_input=False)
    plain.load_state_dict(scaled.state_dict())
    state = torch.randn(2, 3, 12)
    ids = torch.randint(0, 11, (2, 6))
    normed = state * torch.rsqrt(state.pow(2).mean(-1, keepdim=True) + 1e-6) / math.sqrt(2)
    torch.testing.assert_close(scaled(state, ids), plain(normed, ids))
    # the input norm makes the output blind to the state's magnitude
    torch.testing.assert_close(scaled(state * 7, ids), scaled(state, ids), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(plain(state * 7, ids), plain(state, ids))


def test_reference_initialisation():
    model = make(vocab_size=2000, inner_dim=64, emb_dim=64)
    std = 1 / math.sqrt(64)
    for w in (model.emb[0].weight, model.head[1].weight, model.proj[2].weight):
        assert abs(w.std().item() - std) < 0.05 * std
        assert abs(w.mean().item()) < 0.05 * std
    assert torch.equal(model.ln[0].weight, torch.ones(64)) and torch.equal(model.ln[0].bias, torch.zeros(64))


@pytest.mark.parametrize("tie,scale", [(False, False), (True, True)])
def test_propose_matches_brute_force(tie, scale):
    model = make(vocab_size=7, n_predict=3, tie_weights=tie, scale_input=scale, seed=3)
    top_k, n = [3, 2, 2], 5
    state = torch.randn(2, 1, 12)
    last = torch.tensor([[1], [4]])
    candidates, scores = model.propose(state, last, top_k, n)  # b k h, b k
    assert candidates.shape == (2, 5, 3) and scores.shape == (2, 5)
    assert candidates.dtype == torch.int64
    expected = as_reference(model).propose(state, last, top_k, n)
    for b in range(2):
        assert candidates[b].tolist() == [path for path, _ in expected[b]]
        assert scores[b].tolist() == pytest.approx([score for _, score in expected[b]], abs=1e-5)


def test_expand_lists_every_leaf_with_the_top1_chain_first():
    model = make(vocab_size=7, n_predict=3, seed=5)
    state, last = torch.randn(3, 1, 12), torch.tensor([[1], [2], [6]])
    paths, scores = model.expand(state, last, [3, 2, 2])  # b N D, b N D
    assert paths.shape == (3, 12, 3) and scores.shape == (3, 12, 3)
    chain, _ = model.propose(state, last, [1, 1, 1], 1)
    assert paths[:, 0].tolist() == chain[:, 0].tolist()
    best, best_scores = model.propose(state, last, [3, 2, 2], 5)
    for b in range(3):  # propose keeps expand's best five
        order = sorted(range(12), key=lambda i: -float(scores[b, i, -1].detach()))[:5]
        assert best[b].tolist() == paths[b, order].tolist()
    # the tree cut to fewer stages, or narrowed, as propose grows it
    for sub, n in (([3], 3), ([3, 2], 4), ([2, 1, 1], 2), ([2, 2, 1], 3), ([1, 2], 2), ([3, 2, 2], 5)):
        cut, cut_scores = best_paths(*sub_paths(paths, scores, [3, 2, 2], sub), n)
        alone, alone_scores = model.propose(state, last, sub, n)
        assert cut.tolist() == alone.tolist()
        torch.testing.assert_close(cut_scores, alone_scores)


def test_propose_full_tree_and_defaults():
    model = make(vocab_size=7, n_predict=3, top_k_tokens_per_head=[2, 2, 1], n_candidates=4)
    state, last = torch.randn(1, 1, 12), torch.tensor([[0]])
    candidates, scores = model.propose(state, last)
    assert candidates.shape == (1, 4, 3)
    assert len({tuple(c) for c in candidates[0].tolist()}) == 4  # every leaf, each once
    assert (scores[0, :-1] >= scores[0, 1:]).all()  # best first
    candidates, _ = model.propose(state, last, [1, 1, 1], 1)
    greedy = []  # the chain of argmaxes
    s, t = state, last
    for i in range(3):
        s = model._stage(i, s, t)
        t = model.head[i](s).argmax(-1)
        greedy.append(int(t))
    assert candidates[0, 0].tolist() == greedy


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(n_predict=0), "n_predict"),
        (dict(vocab_size=True), "vocab_size"),
        (dict(inner_dim=-1), "inner_dim"),
        (dict(n_predict=1, tie_weights=True), "tie_weights"),
        (dict(top_k_tokens_per_head=[2, 2]), "top_k_tokens_per_head has 2 entries"),
        (dict(top_k_tokens_per_head=[2, 0, 1]), r"top_k_tokens_per_head\[1\]"),
        (dict(top_k_tokens_per_head=[2, 2, 1], n_candidates=5), "n_candidates"),
        (dict(scale_input="yes"), "scale_input"),
        (dict(feature_layers=3), "feature_layers must be a list"),
        (dict(feature_layers=[1, -1]), "each of feature_layers"),
        (dict(feature_layers=[2, 2]), "names a layer twice"),
    ],
)
def test_bad_config(kw, message):
    with pytest.raises(MLPSpecError, match=message):
        make(**kw)


def test_config_dict_round_trip_and_unknown_keys():
    cfg = MLPSpeculatorConfig(vocab_size=11, emb_dim=12, n_predict=4, tie_weights=True)
    raw = cfg.to_dict()
    assert raw["model_type"] == "mlp_speculator" and raw["architectures"] == ["MLPSpeculatorPreTrainedModel"]
    assert raw["top_k_tokens_per_head"] == [4, 3, 2, 2] and raw["n_candidates"] == 5
    assert MLPSpeculatorConfig.from_dict(raw) == cfg
    with pytest.raises(MLPSpecError, match="unknown speculator config keys: bogus"):
        MLPSpeculatorConfig.from_dict({**raw, "bogus": 1})
    with pytest.raises(MLPSpecError, match="model_type"):
        MLPSpeculatorConfig.from_dict({**raw, "model_type": "medusa"})
    with pytest.raises(MLPSpecError, match="lacks required keys: emb_dim"):
        MLPSpeculatorConfig.from_dict({"vocab_size": 3})


@pytest.mark.parametrize(
    "state, ids, message",
    [
        (torch.randn(2, 3, 12), torch.randint(0, 11, (2, 5)), r"ids must have shape \[b, n \+ h\] = \[2, 6\]"),
        (torch.randn(2, 3, 12), torch.randint(0, 11, (1, 6)), r"\[2, 6\]"),
        (torch.randn(2, 3, 10), torch.randint(0, 11, (2, 6)), r"state must have shape \[b, n, 12\]"),
        (torch.randn(3, 12), torch.randint(0, 11, (2, 6)), "state must have shape"),
        (torch.ones(2, 3, 12, dtype=torch.long), torch.randint(0, 11, (2, 6)), "floating-point"),
        (torch.randn(2, 3, 12, dtype=torch.float64), torch.randint(0, 11, (2, 6)), "dtype torch.float64"),
        (torch.randn(2, 3, 12), torch.rand(2, 6), "int64 or int32"),
    ],
)
def test_forward_bad_inputs(state, ids, message):
    with pytest.raises(MLPSpecError, match=message):
        make()(state, ids)


@pytest.mark.parametrize(
    "args, message",
    [
        (dict(top_k_tokens_per_head=[2, 2, 1, 1]), "has 4 entries but the speculator has 3 heads"),
        (dict(top_k_tokens_per_head=[]), "has 0 entries"),
        (dict(n_candidates=100), r"n_candidates must be an integer in 1..4"),
        (dict(n_candidates=0), "n_candidates"),
        (dict(top_k_tokens_per_head=[20, 1, 1]), r"1..11"),
    ],
)
def test_propose_bad_tree(args, message):
    model = make(top_k_tokens_per_head=[2, 2, 1], n_candidates=2)
    with pytest.raises(MLPSpecError, match=message):
        model.propose(torch.randn(1, 1, 12), torch.tensor([[0]]), **args)


def test_propose_bad_shapes():
    model = make()
    with pytest.raises(MLPSpecError, match=r"state \[b, 1, d\] and last_token \[b, 1\]"):
        model.propose(torch.randn(1, 2, 12), torch.tensor([[0]]))
    with pytest.raises(MLPSpecError, match=r"last_token \[b, 1\]"):
        model.propose(torch.randn(2, 1, 12), torch.tensor([[0]]))


def test_draft_vocabulary_maps_head_indices_to_token_ids():
    torch.manual_seed(0)
    model = MLPSpeculator(MLPSpeculatorConfig(vocab_size=11, emb_dim=12, inner_dim=8, n_predict=2,
                                              draft_vocab_size=4, top_k_tokens_per_head=[2, 2], n_candidates=3))
    model.set_draft_vocab(torch.tensor([1, 4, 7, 9]))
    assert model.head[0].weight.shape == (4, 8)  # a head scores K = 4 tokens, not V = 11
    assert model.to_token_ids(torch.tensor([0, 3, 2])).tolist() == [1, 9, 7]
    assert model.to_head_index(torch.tensor([9, 2, -100, 1])).tolist() == [3, -100, -100, 0]
    candidates, _ = model.propose(torch.randn(3, 1, 12), torch.tensor([[0], [5], [10]]))
    assert set(candidates.flatten().tolist()) <= {1, 4, 7, 9}
    # the same tree as brute force over the draft tokens, in token ids
    state, last = torch.randn(1, 1, 12), torch.tensor([[2]])
    candidates, scores = model.propose(state, last, [4, 4], 16)
    expected = []
    with torch.no_grad():
        s0 = model._stage(0, state, last)
        p0 = torch.log_softmax(model.head[0](s0), -1)[0, 0]
        for a in range(4):
            s1 = model._stage(1, s0, torch.tensor([[model.to_token_ids(torch.tensor(a))]]))
            p1 = torch.log_softmax(model.head[1](s1), -1)[0, 0]
            expected += [((int(model.draft_vocab[a]), int(model.draft_vocab[b])), float(p0[a] + p1[b])) for b in range(4)]
    expected.sort(key=lambda e: -e[1])
    assert [tuple(c) for c in candidates[0].tolist()] == [e[0] for e in expected]
    with pytest.raises(MLPSpecError, match="top_k_tokens_per_head\\[0\\] must be an integer in 1..4"):
        model.propose(state, last, [5, 1], 1)
    for too_many in (12, 11):  # 11 of 11 would leave the base-tied head unattached
        with pytest.raises(MLPSpecError, match="must be below vocab_size 11"):
            MLPSpeculatorConfig(vocab_size=11, emb_dim=12, draft_vocab_size=too_many)


def test_change_draft_vocab_keeps_trained_rows_and_maps_new_ones_from_the_base_head():
    torch.manual_seed(0)
    model = MLPSpeculator(MLPSpeculatorConfig(vocab_size=20, emb_dim=3, inner_dim=5, n_predict=2, tie_weights=True,
                                              draft_vocab_size=8, top_k_tokens_per_head=[2, 2], n_candidates=2))
    base = torch.nn.Linear(3, 20, bias=False)  # the base LM head, rows [V, d]
    old = torch.tensor([0, 2, 4, 6, 8, 10, 12, 14])
    model.set_draft_vocab(old)
    to_trained = torch.randn(3, 5)  # d m: trained rows that are exactly a linear image of the base rows
    with torch.no_grad():
        model.head[0].weight.copy_(base.weight[old] @ to_trained)
    trained = model.head[0].weight.detach().clone()

    class Base:
        def get_output_embeddings(self):
            return base

    new = torch.tensor([19, 0, 2, 4, 6, 8, 10, 17])  # 12 and 14 leave, 17 and 19 come
    assert model.change_draft_vocab(new, Base()) == 2
    assert model.draft_vocab.tolist() == [0, 2, 4, 6, 8, 10, 17, 19]
    assert model.head[1].weight is model.head[0].weight  # still tied
    torch.testing.assert_close(model.head[0].weight[:6], trained[:6], rtol=0, atol=0)  # kept rows, moved where they now sit
    torch.testing.assert_close(model.head[0].weight[6:], base.weight[[17, 19]].detach() @ to_trained)
    for bad in (new[:7], torch.tensor([0, 0, 2, 4, 6, 8, 10, 17]), torch.arange(1, 16, 2)):  # the last: odd ids below 17, none of them kept
        with pytest.raises(MLPSpecError, match="distinct token ids|shares no token"):
            model.change_draft_vocab(bad, Base())


def test_a_shorter_top_k_runs_fewer_stages():
    model = make(vocab_size=7, n_predict=3, seed=2)
    state, last = torch.randn(2, 1, 12), torch.tensor([[1], [3]])
    short, short_scores = model.propose(state, last, [3, 2], 4)
    assert short.shape == (2, 4, 2)
    full, _ = model.propose(state, last, [3, 2, 1], 6)  # every 2-token prefix, extended by its top-1
    assert {tuple(c) for c in short[0].tolist()} <= {tuple(c[:2]) for c in full[0].tolist()}
    expected = as_reference(model)
    expected.h = 2  # the reference enumerates two stages only
    rows = expected.propose(state, last, [3, 2], 4)
    assert short.tolist() == [[p for p, _ in row] for row in rows]


def test_without_token_conditioning_the_tokens_do_not_matter():
    model = make(token_conditioning=False)
    state = torch.randn(2, 4, 12)
    ids = torch.randint(0, 11, (2, 7))
    assert torch.equal(model(state, ids), model(state, (ids + 1) % 11))
    conditioned = make(token_conditioning=True)
    conditioned.load_state_dict(model.state_dict())
    assert not torch.equal(conditioned(state, ids), conditioned(state, (ids + 1) % 11))
    assert model.config.to_dict()["token_conditioning"] is False
    assert "token_conditioning" not in conditioned.config.to_dict()  # the released format stays as it was


def test_feature_layers_start_as_the_final_state_alone_and_then_add_their_own():
    """s_0 = h + sum_l W_l rms(h_l): with W_l at zero (as made) a speculator with feature
    layers proposes what the same weights without them do; with W_l set, by hand."""
    torch.manual_seed(0)
    plain = make(n_predict=3)
    wide = make(n_predict=3, feature_layers=[0, 2])
    wide.load_state_dict(plain.state_dict(), strict=False)
    assert wide.config.input_width == 3 * 12 and len(wide.feature_maps) == 2
    assert all(bool((m.weight == 0).all()) for m in wide.feature_maps)
    h, h0, h2 = torch.randn(3, 2, 4, 12).unbind(0)
    ids = torch.randint(0, 11, (2, 7))
    torch.testing.assert_close(wide(torch.cat([h, h0, h2], -1), ids), plain(h, ids))
    for m in wide.feature_maps:
        torch.nn.init.normal_(m.weight)
    rms = lambda x: x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()  # noqa: E731
    by_hand = h + rms(h0) @ wide.feature_maps[0].weight.T + rms(h2) @ wide.feature_maps[1].weight.T
    torch.testing.assert_close(wide(torch.cat([h, h0, h2], -1), ids), plain(by_hand, ids))
    with pytest.raises(MLPSpecError, match=r"state must have shape \[b, n, 36\] \(emb_dim, and 2 feature layers\)"):
        wide(h, ids)
    raw = wide.config.to_dict()
    assert raw["feature_layers"] == [0, 2] and "feature_layers" not in plain.config.to_dict()
    assert MLPSpeculatorConfig.from_dict(raw) == wide.config
