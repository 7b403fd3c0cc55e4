import math

import pytest
import torch

from conftest import OracleSpeculator, tiny_llama
from mlpspec import MLPSpecError
from mlpspec.engine import Engine
from mlpspec.scheduler import QueueFull, prefill_groups
from mlpspec.sequence import SamplingParams


def greedy_alone(model, prompt: list[int], n: int, **settings) -> list[int]:
    """transformers' own greedy continuation (float32), up to and with EOS (unless settings
    say eos_token_id=None)."""
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0, **settings)
    return out[0, len(prompt):].tolist()


def prompts(count: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 64, (int(torch.randint(2, 12, (1,), generator=g)),), generator=g).tolist()
            for _ in range(count)]


def oracle_for(model, asks: list[list[int]], n: int, **kwargs) -> OracleSpeculator:
    """An oracle that knows each prompt's greedy continuation (left-padded reference rows)."""
    width = max(len(p) for p in asks)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in asks])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in asks])
    full = model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0,
                          eos_token_id=None)
    return OracleSpeculator(model, full, mask.bool(), n_predict=3, **kwargs)


def run(engine: Engine, arrivals: dict[int, list[tuple[list[int], SamplingParams]]], limit: int = 500):
    """Step the engine, adding requests at the steps `arrivals` names; returns each
    request's tokens (by id), the ids in order of adding, and the step each finished at."""
    tokens, order, finished_at = {}, [], {}
    step = 0
    while step < limit and (engine.has_unfinished() or any(s >= step for s in arrivals)):
        for prompt, params in arrivals.get(step, []):
            order.append(engine.add_request(prompt, params))
        for out in engine.step():
            tokens.setdefault(out.id, []).extend(out.new_ids)
            if out.finished:
                finished_at[out.id] = step
        step += 1
    return tokens, order, finished_at


@pytest.mark.parametrize("adaptive", [False, True])
def test_staggered_greedy_requests_equal_each_decoded_alone(adaptive):
    """Requests joining and leaving at different steps, ragged acceptance (an oracle that
    knows some prompts' continuations, wrong at some positions, and guesses for the
    others), more requests than rows: each answer is transformers'."""
    model = tiny_llama(seed=1)
    asks = prompts(9, seed=1)
    lengths = [5, 17, 30, 9, 24, 3, 12, 28, 20]
    knows = torch.tensor([True, False, True, True, False, True, True, False, True])
    oracle = oracle_for(model, asks, 30, right=knows, wrong=lambda p, j: (p + 2 * j) % 5 == 0)
    engine = Engine(model, oracle, max_batch=4, top_k_tokens_per_head=[2, 2, 1], n_candidates=3, adaptive=adaptive,
                    lookup=4 if adaptive else 0)
    arrivals = {}
    for i, (prompt, n) in enumerate(zip(asks, lengths)):
        arrivals.setdefault((i * 3) % 11, []).append((prompt, SamplingParams(max_tokens=n)))
    tokens, order, _ = run(engine, arrivals)
    by_prompt = {tuple(p): n for p, n in zip(asks, lengths)}
    added = [prompt for step in sorted(arrivals) for prompt, _ in arrivals[step]]
    for request_id, prompt in zip(order, added):
        assert tokens[request_id] == greedy_alone(model, prompt, by_prompt[tuple(prompt)]), prompt
    if adaptive:  # its choices follow timings, so only that it ran: calibrated, a shape every step
        # (at the batch sizes the steps had, which follow those choices: not always down to 1)
        assert engine.policy.calibrated(4)
        assert engine.stats.steps - len(asks) <= sum(engine.stats.shapes.values()) < engine.stats.steps  # prefills
    else:
        accepted = torch.cat(engine.stats.accepted)
        assert int(accepted.max()) == 3 and int(accepted[accepted >= 0].min()) == 0  # ragged
    assert not engine.has_unfinished() and engine.cache.rows == 0


def test_prefill_groups_by_hand():
    # by length 10, 12 | 50, 55 | 200: 12 joins 10 (24 padded tokens <= 1.25 x 22), 50
    # does not (150 > 1.25 x 72), 55 joins 50 (110 <= 1.25 x 105), 200 does not (600 > 381)
    assert prefill_groups([50, 10, 12, 200, 55], max_tokens=2048, max_padding=0.25) == [[1, 2], [0, 4], [3]]
    assert prefill_groups([1000, 1000, 1000], max_tokens=2048, max_padding=0.25) == [[0, 1], [2]]  # the token cap
    assert prefill_groups([], max_tokens=2048, max_padding=0.25) == []


def test_requests_that_join_together_share_a_prefill_pass_and_decode_as_alone():
    model = tiny_llama(seed=2)
    g = torch.Generator().manual_seed(3)
    asks = [torch.randint(4, 64, (n,), generator=g).tolist() for n in (9, 10, 8, 10, 3, 9)]
    engine = Engine(model, oracle_for(model, asks, 12, wrong=lambda p, j: j % 4 == 0), max_batch=8,
                    top_k_tokens_per_head=[2, 1, 1], n_candidates=2)
    tokens, order, _ = run(engine, {0: [(p, SamplingParams(max_tokens=12, ignore_eos=True)) for p in asks]})
    for request_id, prompt in zip(order, asks):
        assert tokens[request_id] == greedy_alone(model, prompt, 12, eos_token_id=None), prompt
    assert engine.stats.steps - sum(engine.stats.shapes.values()) == 2  # lengths 8-10 together, 3 alone


def test_a_short_request_sent_during_a_long_one_finishes_first():
    model = tiny_llama(seed=3)
    engine = Engine(model, None, max_batch=4)
    long_id = engine.add_request([5, 6, 7], SamplingParams(max_tokens=60, ignore_eos=True))
    for _ in range(5):
        engine.step()
    short_id = engine.add_request([9, 10], SamplingParams(max_tokens=4, ignore_eos=True))
    done = []
    while engine.has_unfinished():
        done += [out.id for out in engine.step() if out.finished]
    assert done == [short_id, long_id]


def test_same_seed_same_sampled_output_alone_or_batched():
    model = tiny_llama(seed=4)
    asks = prompts(6, seed=4)
    oracle = oracle_for(model, asks, 20)
    params = SamplingParams(max_tokens=20, temperature=0.9, top_k=20, seed=1234, ignore_eos=True)

    alone = Engine(model, oracle, max_batch=1)
    tokens, order, _ = run(alone, {0: [(asks[0], params)]})
    expected = tokens[order[0]]

    batched = Engine(model, oracle, max_batch=4)
    others = [(p, SamplingParams(max_tokens=15, temperature=t, seed=s, ignore_eos=True))
              for p, t, s in zip(asks[1:], [0.0, 1.0, 0.5, 0.0, 1.3], [None, 7, None, None, 99])]
    tokens, order, _ = run(batched, {0: others[:2], 2: [(asks[0], params)], 3: others[2:]})
    assert tokens[order[2]] == expected
    # and another seed gives another output
    tokens, order, _ = run(Engine(model, oracle, max_batch=1), {0: [(asks[0], SamplingParams(
        max_tokens=20, temperature=0.9, top_k=20, seed=4321, ignore_eos=True))]})
    assert tokens[order[0]] != expected


def test_sampled_row_in_a_mixed_batch_keeps_the_base_models_distribution():
    """3000 sampled requests of 2 tokens through a batch of 8 whose other rows are greedy,
    with a speculator that proposes the greedy continuation: the second token (the first
    that verification decides) is distributed as the base model says, within 1.5 times
    the total variation of 3000 exact draws."""
    model = tiny_llama(seed=5)
    prompt, t, n = [7, 8, 9], 0.8, 3000
    oracle = oracle_for(model, [prompt], 6)
    engine = Engine(model, oracle, max_batch=8, max_waiting=2 * n, generator=torch.Generator().manual_seed(0))
    sampled = set()
    for i in range(n):  # every other request a greedy one, so that the batches mix them
        sampled.add(engine.add_request(prompt, SamplingParams(max_tokens=2, temperature=t, ignore_eos=True)))
        if i % 2:
            engine.add_request(prompt, SamplingParams(max_tokens=6, ignore_eos=True))
    tokens = {}
    while engine.has_unfinished():
        for out in engine.step():
            tokens.setdefault(out.id, []).extend(out.new_ids)
    seconds = torch.tensor([tokens[i][1] for i in sampled])
    with torch.no_grad():
        V = model.config.vocab_size
        p1 = torch.softmax(model(torch.tensor([prompt])).logits[0, -1] / t, -1)  # V
        after = torch.softmax(model(torch.tensor([prompt + [a] for a in range(V)])).logits[:, -1] / t, -1)  # V V
        exact = (p1[:, None] * after).sum(0)  # V
    seen = torch.bincount(seconds, minlength=V) / n
    tv = 0.5 * float((seen - exact).abs().sum())
    noise = 0.5 * float((exact * (1 - exact) / n).sqrt().sum()) * math.sqrt(2 / math.pi)
    assert tv < 1.5 * noise, (tv, noise)
    accepted = torch.cat(engine.stats.accepted)
    assert int((accepted > 0).sum()) > 100  # drafts were accepted, in rows of both kinds


def test_abort_frees_the_row_and_the_queue_is_bounded():
    model = tiny_llama(seed=6)
    engine = Engine(model, None, max_batch=2, max_waiting=2)
    a = engine.add_request([5, 6], SamplingParams(max_tokens=30, ignore_eos=True))
    b = engine.add_request([7, 8], SamplingParams(max_tokens=30, ignore_eos=True))
    engine.step()
    assert engine.running == 2
    c = engine.add_request([9], SamplingParams(max_tokens=3, ignore_eos=True))
    engine.add_request([10], SamplingParams(max_tokens=3, ignore_eos=True))
    with pytest.raises(QueueFull):
        engine.add_request([11], SamplingParams(max_tokens=3))
    engine.abort(a)
    assert engine.running == 1
    outs = engine.step()  # c joins (its prefill, its first token), a step of its own
    assert [out.id for out in outs] == [c] and engine.running == 2
    assert {out.id for out in engine.step()} == {b, c}
    engine.abort("no-such-request")


@pytest.mark.parametrize("params, message", [
    (dict(max_tokens=0), "max_tokens must be an integer >= 1"),
    (dict(temperature=3), r"temperature must be a number in \[0, 2\]"),
    (dict(top_p=0), r"top_p must be in \(0, 1\]"),
    (dict(seed=1.5), "seed must be an integer"),
])
def test_bad_sampling_params(params, message):
    with pytest.raises(MLPSpecError, match=message):
        SamplingParams(**params)


def test_bad_requests():
    engine = Engine(tiny_llama(), None, max_len=32)
    with pytest.raises(MLPSpecError, match="the prompt is empty"):
        engine.add_request([])
    with pytest.raises(MLPSpecError, match="outside the model's vocabulary"):
        engine.add_request([5, 64])
    with pytest.raises(MLPSpecError, match=r"prompt \(10 tokens\) plus max_tokens \(30\) exceeds"):
        engine.add_request(list(range(4, 14)), SamplingParams(max_tokens=30))


def test_logprobs_are_the_base_models_log_softmax_where_each_token_was_chosen():
    model = tiny_llama(seed=8)
    asks = prompts(3, seed=8)
    oracle = oracle_for(model, asks, 12)
    engine = Engine(model, oracle, max_batch=3)
    wanted = engine.add_request(asks[0], SamplingParams(max_tokens=12, ignore_eos=True, logprobs=3))
    sampled = engine.add_request(asks[1], SamplingParams(max_tokens=12, temperature=0.7, seed=1, ignore_eos=True,
                                                         logprobs=0))
    engine.add_request(asks[2], SamplingParams(max_tokens=12, ignore_eos=True))
    tokens, logprobs = {}, {}
    while engine.has_unfinished():
        for out in engine.step():
            tokens.setdefault(out.id, []).extend(out.new_ids)
            logprobs.setdefault(out.id, []).extend(out.logprobs or [])
    for request_id, prompt, top in ((wanted, asks[0], 3), (sampled, asks[1], 0)):
        sequence = prompt + tokens[request_id]
        with torch.no_grad():
            exact = torch.log_softmax(model(torch.tensor([sequence])).logits[0].float(), dim=-1)  # n V
        assert len(logprobs[request_id]) == 12
        for j, (token, entry) in enumerate(zip(tokens[request_id], logprobs[request_id])):
            here = exact[len(prompt) - 1 + j]  # V
            assert abs(entry.logprob - float(here[token])) < 1e-4
            assert [t for t, _ in entry.top] == here.topk(top).indices.tolist()


def test_a_stop_string_ends_the_request_at_the_token_that_completes_it():
    from conftest import tiny_tokenizer

    model, tokenizer = tiny_llama(seed=6), tiny_tokenizer()
    prompt = [5, 9, 14, 3]
    engine = Engine(model, None, max_batch=2, tokenizer=tokenizer)
    full_ids = greedy_alone(model, prompt, 30)
    full = engine.text_of(full_ids)
    stop = " ".join(full.split()[4:6])  # two words: a stop string across tokens
    at = full.index(stop)
    ends = next(k for k in range(len(full_ids) + 1) if stop in engine.text_of(full_ids[:k]))
    engine.add_request(prompt, SamplingParams(max_tokens=30, stop=(stop, "zzz")))
    other = engine.add_request(prompt, SamplingParams(max_tokens=30))
    text, tokens, reasons = {}, {}, {}
    while engine.has_unfinished():
        for out in engine.step():
            text[out.id] = text.get(out.id, "") + out.text
            tokens[out.id] = tokens.get(out.id, []) + out.new_ids
            if out.finished:
                reasons[out.id] = out.finish_reason
    stopped = next(i for i in text if i != other)
    assert text[stopped] == full[:at] and reasons[stopped] == "stop"
    assert tokens[stopped] == full_ids[:ends]  # up to the token that completed the stop string
    assert text[other] == full and tokens[other] == full_ids and reasons[other] == "length"
    with pytest.raises(MLPSpecError, match="stop strings need text"):
        Engine(model, None).add_request(prompt, SamplingParams(stop=("x",)))


def test_warm_up_calibrates_every_batch_bucket_and_leaves_nothing_behind():
    model = tiny_llama(seed=1)
    engine = Engine(model, oracle_for(model, prompts(1), 8), max_batch=8, top_k_tokens_per_head=[2, 2, 1],
                    n_candidates=3, adaptive=True)
    assert not any(engine.policy.calibrated(b) for b in (1, 2, 4, 8))
    engine.warm_up(prompts(1)[0])
    assert all(engine.policy.calibrated(b) for b in (1, 2, 4, 8))
    assert not engine.has_unfinished() and engine.cache.rows == 0 and not engine.requests
    Engine(model, None, max_batch=8).warm_up(prompts(1)[0])  # no policy: nothing to calibrate, no error
