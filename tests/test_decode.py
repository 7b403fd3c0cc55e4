import math

import pytest
import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

import mlpspec.base as base
import mlpspec.decode as decode
from conftest import TINY_VOCAB, OracleSpeculator, prefill_passes, tiny_gpt2, tiny_llama, tiny_qwen2

ARCHITECTURES = pytest.mark.parametrize("build", [tiny_llama, tiny_qwen2, tiny_gpt2], ids=["llama", "qwen2", "gpt2"])
from mlpspec import MLPSpecError, MLPSpeculator, run_base, speculator_config_for
from mlpspec.decode import target_probs
from mlpspec.generate import speculative_generate


def random_speculator(model, seed=0, **kw):
    torch.manual_seed(seed)
    kw = {"n_predict": 3, "inner_dim": 16, **kw}
    return MLPSpeculator(speculator_config_for(model, **kw)).eval()


def hf_greedy(model, ids, mask, max_new, eos):
    return model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
        eos_token_id=eos, pad_token_id=0,
    )


def left_padded(lengths, seed=0):
    torch.manual_seed(seed)
    P = max(lengths)
    ids = torch.zeros(len(lengths), P, dtype=torch.long)
    mask = torch.zeros(len(lengths), P, dtype=torch.long)
    for r, n in enumerate(lengths):
        ids[r, P - n :] = torch.randint(3, TINY_VOCAB, (n,))
        mask[r, P - n :] = 1
    return ids, mask


@ARCHITECTURES
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("max_new", [1, 2, 4, 5, 23])
def test_greedy_equals_transformers_batch_1(build, seed, max_new):
    model = build(seed=seed)
    ids, mask = left_padded([3 + 5 * seed], seed)
    expected = hf_greedy(model, ids, mask, max_new, eos=None)
    for speculator in (None, random_speculator(model, seed)):
        out = speculative_generate(model, speculator, ids, mask, max_new_tokens=max_new, eos_token_id=[])
        assert out.sequences.tolist() == expected.tolist()
        assert int(out.stats.emitted.sum()) == max_new


@ARCHITECTURES
@pytest.mark.parametrize("seed", range(3))
def test_greedy_equals_transformers_batch_4_mixed_lengths(build, seed):
    model = build(seed=seed)
    ids, mask = left_padded([2, 9, 5, 13], seed)
    expected = hf_greedy(model, ids, mask, 30, eos=None)
    for top_k, n in [([4, 3, 2], 5), ([2, 2, 2], 8), ([1, 1, 1], 1)]:
        speculator = random_speculator(model, seed, top_k_tokens_per_head=top_k, n_candidates=n)
        out = speculative_generate(model, speculator, ids, mask, max_new_tokens=30, eos_token_id=[])
        assert out.sequences.tolist() == expected.tolist()


@ARCHITECTURES
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_the_walk_reads_the_lm_head_only_at_the_nodes_it_visits(build, temperature, monkeypatch):
    """The verify pass skips the LM head (base.lazy_head holds for all three): the walk
    computes it for the root and the likeliest path up front, and for any other node it
    reaches, here a runner-up that carries the truth where the oracle's first child is
    wrong. Greedy output stays transformers' own; sampled output the same draws as a
    pass that computed every node's logits."""

    model = build(seed=2)
    assert base.lazy_head(model)
    ids, mask = left_padded([6, 11], seed=2)
    expected = hf_greedy(model, ids, mask, 24, eos=None)
    rows = []
    head = base.head_logits  # the transformers runner's NodeLogits reads the head through it
    monkeypatch.setattr(base, "head_logits", lambda m, hidden: rows.append(hidden.size(0)) or head(m, hidden))
    nodes = []
    verify = decode.verify
    monkeypatch.setattr(decode, "verify", lambda m, state, tree: nodes.append(tree.tokens.numel()) or verify(m, state, tree))

    def run(lazy: bool):
        monkeypatch.setattr(base, "lazy_head", lambda m: lazy)
        oracle = OracleSpeculator(model, expected, mask.bool(), n_predict=3, wrong=lambda p, j: (p + j) % 3 == 0)
        rows.clear(), nodes.clear()
        return speculative_generate(model, oracle, ids, mask, max_new_tokens=24, eos_token_id=[],
                                    top_k_tokens_per_head=[2, 2, 2], n_candidates=4, temperature=temperature,
                                    generator=torch.Generator().manual_seed(0))

    lazy = run(True)
    computed, scored, up_front = sum(rows), sum(nodes), len(nodes)
    assert computed < 0.7 * scored  # every node: scored
    if temperature == 0:  # (sampled walks seldom get past the root with a greedy oracle)
        assert lazy.sequences.tolist() == expected.tolist()
        assert len(rows) > up_front  # some nodes off the likeliest path were read later
    assert lazy.sequences.tolist() == run(False).sequences.tolist() and not rows


def test_the_speculator_reads_the_feature_layers_of_the_state_that_made_the_pending_token():
    """With feature_layers the decoder carries the states after those layers beside the
    final one, taken from each tree's accepted path: every proposal reads exactly the
    states a full forward pass gives at the token before the pending one, whether a step
    accepted none, some or all of its candidates."""
    model = tiny_llama(seed=3)
    ids, mask = left_padded([4, 9, 6], seed=3)
    expected = hf_greedy(model, ids, mask, 30, eos=None)
    oracle = OracleSpeculator(model, expected, mask.bool(), n_predict=3, feature_layers=[0, 1],
                              wrong=lambda p, j: (p + j) % 5 == 0)  # stops some chains part way
    out = speculative_generate(model, oracle, ids, mask, max_new_tokens=30, eos_token_id=[],
                               top_k_tokens_per_head=[1, 1, 1], n_candidates=1)
    assert out.sequences.tolist() == expected.tolist()
    assert {0, 1, 2, 3} <= set(out.stats.accepted_lengths)
    decoding = out.stats.steps - prefill_passes([4, 9, 6])
    assert len(oracle.distances) >= 3 * (decoding - 1) and max(oracle.distances) < 1e-4


def test_max_new_tokens_zero_returns_the_prompt():
    model = tiny_llama()
    ids, mask = left_padded([4, 6])
    out = speculative_generate(model, random_speculator(model), ids, mask, max_new_tokens=0)
    assert torch.equal(out.sequences, ids) and out.stats.steps == 0


@pytest.mark.parametrize("n_predict", [1, 3, 5])
def test_oracle_reaches_n_predict_plus_one_tokens_per_step(n_predict):
    model = tiny_llama(seed=1)
    ids, mask = left_padded([5, 11, 8], seed=1)
    max_new = 1 + 6 * (n_predict + 1)  # the prefill's token, then six full steps
    expected = hf_greedy(model, ids, mask, max_new, eos=None)
    oracle = OracleSpeculator(model, expected, mask.bool(), n_predict=n_predict)
    out = speculative_generate(model, oracle, ids, mask, max_new_tokens=max_new, eos_token_id=[])
    assert out.sequences.tolist() == expected.tolist()
    assert out.stats.steps == prefill_passes([5, 11, 8]) + 6  # the rows' prefills, then six steps of the batch
    assert out.stats.accepted_lengths == [n_predict] * 18  # every row accepts every head, every step
    assert out.stats.per_head_acceptance == [1.0] * n_predict
    # each speculative step emits n_predict + 1 tokens per row (the prefill step emits 1)
    assert out.stats.tokens_per_step == pytest.approx(max_new / 7)


def test_a_shorter_top_k_runs_fewer_stages_and_stays_lossless():
    model = tiny_llama(seed=1)
    ids, mask = left_padded([5, 11, 8], seed=1)
    max_new = 1 + 6 * 3  # the prefill's token, then six steps of 2 candidate tokens + 1
    expected = hf_greedy(model, ids, mask, max_new, eos=None)
    oracle = OracleSpeculator(model, expected, mask.bool(), n_predict=4)
    out = speculative_generate(model, oracle, ids, mask, max_new_tokens=max_new, eos_token_id=[],
                               top_k_tokens_per_head=[1, 1], n_candidates=1)
    assert out.sequences.tolist() == expected.tolist()
    assert out.stats.steps == prefill_passes([5, 11, 8]) + 6 and out.stats.accepted_lengths == [2] * 18
    assert out.stats.per_head_acceptance == [1.0, 1.0]  # the two stages run, not the speculator's four


def test_ragged_acceptance_with_eos_mid_step_and_compaction(monkeypatch):
    model = tiny_llama(seed=2)
    ids, mask = left_padded([3, 10, 6, 7], seed=2)
    free_run = hf_greedy(model, ids, mask, 40, eos=None)
    new = free_run[:, ids.size(1):].tolist()
    # an EOS that stops row 1 mid-stream and no other row: a token new to row 1 at some
    # point after its 4th token, and absent from the other rows' continuations
    eos = next(t for i, t in enumerate(new[1]) if i >= 4 and t not in new[1][:i]
               and all(t not in row for r, row in enumerate(new) if r != 1))
    expected = hf_greedy(model, ids, mask, 40, eos=eos)
    assert expected.shape[1] == ids.size(1) + 40 and eos in expected[1, ids.size(1):-1]
    # row 0 and 2 get the right continuation, rows 1 and 3 random guesses: ragged acceptance
    oracle = OracleSpeculator(model, free_run, mask.bool(), right=torch.tensor([True, False, True, False]))
    compactions = []
    original = decode.compact
    monkeypatch.setattr(decode, "compact", lambda state: (compactions.append(state.cache.length), original(state)))
    out = speculative_generate(model, oracle, ids, mask, max_new_tokens=40, eos_token_id=eos)
    assert out.sequences.tolist() == expected.tolist()
    lengths = torch.tensor(out.stats.accepted_lengths)
    assert lengths.max() == 3 and lengths.min() == 0
    assert compactions, "ragged acceptance should have filled the cache with holes"


def test_eos_inside_an_accepted_run_stops_there():
    model = tiny_llama(seed=3)
    ids, mask = left_padded([6], seed=3)
    free_run = hf_greedy(model, ids, mask, 20, eos=None)
    new = free_run[0, ids.size(1):].tolist()
    eos = next(t for i, t in enumerate(new) if i >= 2 and t not in new[:i])  # first seen mid-stream
    expected = hf_greedy(model, ids, mask, 20, eos=eos)
    oracle = OracleSpeculator(model, free_run, mask.bool())
    out = speculative_generate(model, oracle, ids, mask, max_new_tokens=20, eos_token_id=eos)
    assert out.sequences.tolist() == expected.tolist()
    assert out.sequences[0, -1] == eos


def test_streamer_sees_every_new_token_once():
    model = tiny_llama()
    ids, _ = left_padded([5])

    class Recorder:
        def __init__(self):
            self.chunks = []
            self.ended = False

        def put(self, value):
            self.chunks.append(value.tolist())

        def end(self):
            self.ended = True

    streamer = Recorder()
    out = speculative_generate(model, random_speculator(model), ids, max_new_tokens=12, eos_token_id=[],
                               streamer=streamer)
    assert streamer.chunks[0] == ids[0].tolist() and streamer.ended
    assert sum(streamer.chunks[1:], []) == out.sequences[0, 5:].tolist()


def test_target_probs_match_transformers_warpers():
    torch.manual_seed(0)
    logits = torch.randn(6, 50) * 3
    for temperature, top_k, top_p in [(0.7, None, None), (1.0, 5, None), (1.3, None, 0.8), (0.9, 10, 0.6)]:
        warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
        if top_k:
            warpers.append(TopKLogitsWarper(top_k))
        if top_p:
            warpers.append(TopPLogitsWarper(top_p))
        expected = warpers(None, logits.clone()).softmax(-1)
        torch.testing.assert_close(target_probs(logits, temperature, top_k, top_p), expected)


def exact_distribution(model, prompt, n_tokens, temperature, top_k, top_p):
    """P(first n_tokens sampled tokens = seq) for every seq, by enumeration."""
    V = model.config.vocab_size
    probs = {(): 1.0}
    for _ in range(n_tokens):
        prefixes = list(probs)
        batch = torch.tensor([prompt + list(p) for p in prefixes])
        with torch.no_grad():
            p_target = target_probs(model(batch).logits[:, -1], temperature, top_k, top_p)
        probs = {p + (t,): probs[p] * float(p_target[i, t]) for i, p in enumerate(prefixes) for t in range(V)}
    return probs


def chi_square_threshold(df, z=3.719):  # z: upper 1e-4 normal quantile; Wilson-Hilferty
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi_square(counts, exact, n):
    """Pearson's statistic over cells with expected count >= 5, the rest pooled."""
    stat, pooled_obs, pooled_exp, df = 0.0, 0, 0.0, -1
    for seq, p in exact.items():
        expected = p * n
        if expected >= 5:
            stat += (counts.get(seq, 0) - expected) ** 2 / expected
            df += 1
        else:
            pooled_obs += counts.get(seq, 0)
            pooled_exp += expected
    if pooled_exp > 0:
        stat += (pooled_obs - pooled_exp) ** 2 / pooled_exp
        df += 1
    return stat, df


@pytest.mark.parametrize("temperature,top_k,top_p,lookup", [(1.0, None, None, 0), (0.8, 4, 0.9, 0), (1.0, None, None, 3)])
def test_sampling_matches_the_target_distribution(temperature, top_k, top_p, lookup):
    model = tiny_llama(seed=4, vocab=6)
    with torch.no_grad():  # a freshly initialised model is near uniform; make it opinionated
        model.lm_head.weight.mul_(40)
    speculator = random_speculator(model, seed=4, top_k_tokens_per_head=[3, 2, 2], n_candidates=5)
    prompt = [3, 1, 4, 1]
    exact = exact_distribution(model, prompt, 3, temperature, top_k, top_p)
    generator = torch.Generator().manual_seed(1234)
    counts, n, accepted = {}, 0, []
    for _ in range(8):
        ids = torch.tensor([prompt] * 2500)
        out = speculative_generate(model, speculator, ids, max_new_tokens=3, temperature=temperature,
                                   top_k=top_k, top_p=top_p, eos_token_id=[], generator=generator, lookup=lookup)
        for row in out.sequences[:, 4:].tolist():
            counts[tuple(row)] = counts.get(tuple(row), 0) + 1
        n += len(ids)
        accepted += out.stats.accepted_lengths
    assert sum(a > 0 for a in accepted) > 0.1 * len(accepted)  # the tree path really was exercised
    stat, df = chi_square(counts, exact, n)
    assert stat < chi_square_threshold(df), (stat, df)
    # the same test rejects a slightly wrong distribution (temperature off by 10%, a total
    # variation distance of about 0.04-0.05 here): it has the power to catch a real bias
    wrong = exact_distribution(model, prompt, 3, temperature * 1.1, top_k, top_p)
    stat, df = chi_square(counts, wrong, n)
    assert stat > chi_square_threshold(df), (stat, df)


def test_sampling_is_reproducible_with_a_generator():
    model = tiny_llama()
    ids, _ = left_padded([5])
    spec = random_speculator(model)
    runs = [
        speculative_generate(model, spec, ids, max_new_tokens=15, temperature=1.0, eos_token_id=[],
                             generator=torch.Generator().manual_seed(7)).sequences
        for _ in range(2)
    ]
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(input_ids=torch.zeros(1, 0, dtype=torch.long)), "the prompt is empty"),
        (dict(attention_mask=torch.tensor([[1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])), "row 1 is empty"),
        (dict(attention_mask=torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])), "left-padded"),
        (dict(input_ids=torch.ones(2, 300, dtype=torch.long), attention_mask=None), "more than the model's context of 256"),
        (dict(max_new_tokens=300), r"plus max_new_tokens \(300\) exceeds the model's context of 256"),
        (dict(max_new_tokens=-1), "max_new_tokens must be an integer >= 0"),
        (dict(input_ids=torch.full((2, 5), 99)), "outside the model's vocabulary"),
        (dict(temperature=-0.5), "temperature must be >= 0"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(top_k=0), "top_k must be an integer >= 1"),
        (dict(top_k_tokens_per_head=[2, 2, 2, 2]), "has 4 entries but the speculator has 3 heads"),
        (dict(top_k_tokens_per_head=[]), "has 0 entries but the speculator has 3 heads"),
        (dict(n_candidates=50), r"n_candidates must be an integer in 1..24"),
        (dict(streamer=object()), "single prompt"),
        (dict(lookup=-1), "lookup must be an integer >= 0"),
    ],
)
def test_bad_inputs(kwargs, message):
    model = tiny_llama()
    args = dict(input_ids=torch.randint(3, 60, (2, 5)), attention_mask=torch.ones(2, 5, dtype=torch.long),
                max_new_tokens=4)
    args.update(kwargs)
    with pytest.raises(MLPSpecError, match=message):
        speculative_generate(model, random_speculator(model), **args)


def test_the_prompt_moves_to_the_model_and_the_generator_must_be_there():
    model = tiny_llama().to("meta")  # stands in for a GPU: the checks come before any arithmetic
    with pytest.raises(MLPSpecError, match=r"the generator is on cpu and the model on meta: .* torch.Generator\('meta'\)"):
        speculative_generate(model, None, torch.randint(3, 60, (1, 5)), max_new_tokens=4, temperature=1.0,
                             generator=torch.Generator())


def test_mismatched_speculator_is_refused():
    model = tiny_llama()
    other = random_speculator(tiny_llama(hidden=48))
    with pytest.raises(MLPSpecError, match="emb_dim 48 does not match"):
        speculative_generate(model, other, torch.tensor([[5, 6]]), max_new_tokens=3)


DEFAULT_PROMPTS = [
    "def quicksort(items):\n    ",
    "The three laws of thermodynamics are",
    "import json\n\nwith open('config.json') as f:\n",
    "Q: What is the capital of France?\nA:",
]


@pytest.fixture(scope="module")
def default_base():
    from mlpspec import load_base

    return load_base()


@pytest.mark.slow
def test_greedy_equals_transformers_on_the_default_float32(default_base):
    """SmolLM2-135M-Instruct in float32, batch 1 and 4, with an untrained speculator and
    with an oracle that makes every step accept a long path."""
    from mlpspec.text import encode_prompts

    model, tokenizer = default_base
    ids, mask = encode_prompts(tokenizer, DEFAULT_PROMPTS, chat=False)
    eos = tokenizer.eos_token_id
    expected = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=40, do_sample=False,
                              eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
    untrained = random_speculator(model, n_predict=3, inner_dim=64)
    oracle = OracleSpeculator(model, expected, mask.bool(), n_predict=4)
    for speculator in (untrained, oracle):
        out = speculative_generate(model, speculator, ids, mask, max_new_tokens=40, eos_token_id=eos)
        assert out.sequences.tolist() == expected.tolist()
    assert max(out.stats.accepted_lengths) == 4
    for r in range(len(DEFAULT_PROMPTS)):  # batch 1, each prompt alone
        row_ids = ids[r : r + 1, mask[r].bool()]
        alone = model.generate(input_ids=row_ids, max_new_tokens=40, do_sample=False, eos_token_id=eos,
                               pad_token_id=tokenizer.pad_token_id)
        oracle = OracleSpeculator(model, alone, torch.ones_like(row_ids, dtype=torch.bool), n_predict=4)
        out = speculative_generate(model, oracle, row_ids, max_new_tokens=40, eos_token_id=eos)
        assert out.sequences.tolist() == alone.tolist()
        assert out.stats.tokens_per_step > 3


@pytest.mark.slow
def test_bfloat16_divergences_on_the_default_are_near_ties():
    """In bfloat16 a tree pass may round differently from a one-token step; every
    divergence from transformers' greedy output must be a near tie (see equality.py)."""
    from mlpspec import load_base
    from mlpspec.equality import find_divergences
    from mlpspec.text import encode_prompts

    model, tokenizer = load_base(dtype="bfloat16")
    eos = tokenizer.eos_token_id
    runs, divergences = 0, []
    for prompt in DEFAULT_PROMPTS:
        ids, mask = encode_prompts(tokenizer, [prompt], chat=False)
        expected = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=48, do_sample=False,
                                  eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
        for speculator in (None, OracleSpeculator(model, expected, mask.bool(), n_predict=4)):
            out = speculative_generate(model, speculator, ids, mask, max_new_tokens=48, eos_token_id=eos)
            divergences += find_divergences(model, ids, mask, out.sequences, expected, eos)
            runs += 1
    print(f"bf16: {len(divergences)} of {runs} runs diverged; gaps in ulps: {[round(d.ulps, 1) for d in divergences]}")
    assert all(d.near_tie for d in divergences), divergences


def test_on_step_streams_every_row_and_steps_are_counted_per_row():
    model = tiny_llama(seed=4)
    ids, mask = left_padded([3, 8, 5], seed=4)
    streamed = [[] for _ in range(3)]

    def on_step(emitted):
        for row, tokens in enumerate(emitted.tolist()):
            streamed[row] += [t for t in tokens if t >= 0]

    out = speculative_generate(model, random_speculator(model, 3), ids, mask, max_new_tokens=12,
                               eos_token_id=[2], on_step=on_step)
    for row in range(3):
        new = out.sequences[row, ids.size(1):].tolist()[: int(out.stats.emitted[row])]
        assert streamed[row] == new
    assert int(out.stats.steps_per_row.sum()) == out.stats.row_steps
    assert all(1 <= int(s) <= out.stats.steps for s in out.stats.steps_per_row)


@pytest.mark.parametrize("max_new", range(6, 30, 3))
def test_rows_that_overshoot_max_new_tokens_never_overflow_the_cache(max_new):
    """One row accepts whole chains while the other accepts nothing: the first reaches
    max_new_tokens mid-chain, and what it accepted past that must not take cache room that
    compaction then cannot find."""
    model = tiny_llama(seed=6)
    ids, mask = left_padded([4, 9], seed=6)
    longer = hf_greedy(model, ids, mask, max_new + 8, eos=None)  # so the oracle can guess past the end
    oracle = OracleSpeculator(model, longer, mask.bool(), n_predict=4, right=torch.tensor([False, True]))
    out = speculative_generate(model, oracle, ids, mask, max_new_tokens=max_new, eos_token_id=[],
                               top_k_tokens_per_head=[1, 1, 1, 1], n_candidates=1)
    assert out.sequences.tolist() == longer[:, : ids.size(1) + max_new].tolist()


def repetitive(lengths, seed=0):
    """Left-padded prompts that repeat a short phrase, so prompt lookup finds matches."""
    g = torch.Generator().manual_seed(seed)
    P = max(lengths)
    ids = torch.zeros(len(lengths), P, dtype=torch.long)
    mask = torch.zeros(len(lengths), P, dtype=torch.long)
    for r, n in enumerate(lengths):
        phrase = torch.randint(3, TINY_VOCAB, (4,), generator=g)
        ids[r, P - n :] = phrase.repeat(n // 4 + 1)[:n]
        mask[r, P - n :] = 1
    return ids, mask


@ARCHITECTURES
def test_greedy_with_a_lookup_branch_equals_transformers(build):
    """Repetitive prompts, batch 4 with mixed lengths, the lookup branch alone and beside a
    speculator's tree, over three seeds."""
    for seed in range(3):
        model = build(seed=seed)
        ids, mask = repetitive([6, 17, 9, 13], seed)
        expected = hf_greedy(model, ids, mask, 30, eos=None)
        for speculator in (None, random_speculator(model, seed)):
            for lookup in (1, 4, 10):
                out = speculative_generate(model, speculator, ids, mask, max_new_tokens=30, eos_token_id=[],
                                           lookup=lookup)
                assert out.sequences.tolist() == expected.tolist()
                assert max(out.stats.accepted_lengths) >= min(lookup, 2)  # copies were accepted, not just proposed


@pytest.mark.parametrize("max_new", [1, 2, 5, 9, 14])
def test_lookup_branch_longer_than_what_is_left(max_new):
    """A lookup branch of 12 against a few tokens left, with rows ending at EOS mid-copy."""
    model = tiny_llama(seed=2)
    ids, mask = repetitive([8, 12, 5], seed=2)
    eos = int(ids[1, -2])  # a token the copies will carry
    expected = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                              eos_token_id=eos, pad_token_id=eos)
    out = speculative_generate(model, random_speculator(model, 2), ids, mask, max_new_tokens=max_new,
                               eos_token_id=eos, lookup=12)
    assert out.sequences.tolist() == expected.tolist()


def test_adaptive_lookup_without_a_speculator():
    model = tiny_llama(seed=1)
    ids, mask = repetitive([12, 7], seed=1)
    expected = hf_greedy(model, ids, mask, 20, eos=None)
    out = speculative_generate(model, None, ids, mask, max_new_tokens=20, eos_token_id=[], lookup=6, adaptive=True)
    assert out.sequences.tolist() == expected.tolist()
    assert set(out.stats.shapes) <= {"plain", "lookup6"}
    from mlpspec.adaptive import AdaptivePolicy, shape_menu

    policy = AdaptivePolicy(shape_menu(random_speculator(model).config))
    with pytest.raises(MLPSpecError, match="need a speculator"):
        speculative_generate(model, None, ids, mask, max_new_tokens=4, adaptive=policy)


def tiny_gemma3(window: int = 16, seed: int = 0):
    """Gemma-3-type: three sliding-window layers of `window` tokens, then a global one."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=256, sliding_window=window, bos_token_id=1,
        eos_token_id=2, pad_token_id=0, layer_types=["sliding_attention"] * 3 + ["full_attention"],
    )
    return Gemma3ForCausalLM(config).eval()


def test_a_sliding_window_model_generates_past_its_window(monkeypatch):
    """Gemma 3 with a window of 16: 64 tokens past a 48-token prompt equal model.generate
    in float32, alone and as two rows of a batch, with trees and a lookup branch (each tree
    pass masks the old keys from its sliding-window layers: base.layer_masks)."""
    model = tiny_gemma3()
    ids, mask = left_padded([48, 41], seed=5)
    alone = [hf_greedy(model, ids[r : r + 1, mask[r].bool()], None, 64, eos=None) for r in range(2)]
    speculator = random_speculator(model, 3)
    out = speculative_generate(model, speculator, ids[:1], max_new_tokens=64, eos_token_id=[], lookup=4)
    assert out.sequences.tolist() == alone[0].tolist()
    assert out.stats.tokens_per_step > 1.3  # trees were accepted, not only bonus tokens
    both = speculative_generate(model, speculator, ids, mask, max_new_tokens=64, eos_token_id=[], lookup=4)
    for r in range(2):
        assert both.sequences[r, 48:].tolist() == alone[r][0, -64:].tolist()  # each row's 64 new tokens
    # the window matters here: without it the tree passes see keys the model would not
    monkeypatch.setattr(base, "sliding_window", lambda model: None)  # the transformers runner reads it there
    blind = speculative_generate(model, speculator, ids[:1], max_new_tokens=64, eos_token_id=[], lookup=4)
    assert blind.sequences.tolist() != alone[0].tolist()
