"""The server end to end on localhost, driven by the official openai client."""

import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from conftest import tiny_llama, tiny_tokenizer
from mlpspec.generate import speculative_generate
from mlpspec.serve import BackgroundServer, create_app
from mlpspec.text import encode_prompt
from test_decode import random_speculator

openai = pytest.importorskip("openai")

MODEL_ID = "tiny"
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}w1"


@pytest.fixture(scope="module")
def server():
    model, tokenizer = tiny_llama(seed=5), tiny_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    speculator = random_speculator(model, seed=5)
    app = create_app(model, tokenizer, speculator, MODEL_ID, max_batch=8, max_tokens_limit=64)
    server = BackgroundServer(app)
    assert app.state.engine.ready.wait(timeout=60)
    yield server.url, model, tokenizer, speculator, app
    server.stop()


def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)


def greedy_alone(model, tokenizer, speculator, prompt_ids, max_tokens):
    """What a request decoded on its own gives: the reference for batched answers."""
    ids = torch.tensor([prompt_ids])
    out = speculative_generate(model, speculator, ids, torch.ones_like(ids), max_new_tokens=max_tokens,
                               eos_token_id=[model.generation_config.eos_token_id])
    new = out.sequences[0, ids.size(1):].tolist()[: int(out.stats.emitted[0])]
    return tokenizer.decode([t for t in new if t != model.generation_config.eos_token_id], skip_special_tokens=True)


def prompt(i):
    return " ".join(f"w{(7 * i + 3 * j) % 50 + 4}" for j in range(3 + i % 5))


def test_completions_chat_and_streaming_through_the_openai_client(server):
    url, model, tokenizer, speculator, _ = server
    api = client(url)
    assert [m.id for m in api.models.list().data] == [MODEL_ID]
    text = prompt(1)
    expected = greedy_alone(model, tokenizer, speculator, tokenizer(text).input_ids, 20)
    done = api.completions.create(model=MODEL_ID, prompt=text, max_tokens=20, temperature=0)
    assert done.choices[0].text == expected
    usage = done.usage.model_dump()
    assert usage["completion_tokens"] >= 1 and usage["tokens_per_step"] >= 1.0 and usage["steps"] >= 1
    streamed = api.completions.create(model=MODEL_ID, prompt=text, max_tokens=20, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == expected

    messages = [{"role": "user", "content": prompt(2)}]
    chat_ids = encode_prompt(tokenizer, messages, chat=True)
    expected = greedy_alone(model, tokenizer, speculator, chat_ids, 12)
    reply = api.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=12, temperature=0)
    assert reply.choices[0].message.content == expected and reply.choices[0].message.role == "assistant"
    chunks = list(api.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=12, temperature=0,
                                              stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_concurrent_mixed_requests_match_single_request_greedy_output(server):
    url, model, tokenizer, speculator, app = server
    api = client(url)

    def one(i):
        greedy = i % 3 != 0
        kwargs = dict(model=MODEL_ID, prompt=prompt(i), max_tokens=6 + i % 9, temperature=0 if greedy else 0.8)
        time.sleep(0.01 * (i % 8))  # staggered arrivals: requests join batches already decoding
        return i, greedy, api.completions.create(**kwargs)

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(32)))
    for i, greedy, response in results:
        assert response.choices[0].finish_reason in ("stop", "length")
        assert response.usage.completion_tokens <= 6 + i % 9
        if greedy:
            assert response.choices[0].text == greedy_alone(model, tokenizer, speculator,
                                                             tokenizer(prompt(i)).input_ids, 6 + i % 9), i
    assert max(response.usage.model_dump()["batch_size"] for _, _, response in results) > 1  # they shared steps


@pytest.mark.parametrize("body, status, message", [
    (b"{not json", 400, "not valid JSON"),
    (json.dumps({"model": "gpt-9", "prompt": "w4"}).encode(), 404, "does not exist"),
    (json.dumps({"model": MODEL_ID, "prompt": "w4", "max_tokens": 10_000}).encode(), 400, "exceeds this server's limit"),
    (json.dumps({"model": MODEL_ID, "prompt": "w4", "temperature": -0.5}).encode(), 400, "temperature must be"),
    (json.dumps({"model": MODEL_ID, "prompt": ""}).encode(), 400, "prompt must be"),
    (json.dumps({"model": MODEL_ID, "prompt": "w4", "stop": 5}).encode(), 400, "stop must be a string or a list"),
    (json.dumps({"model": MODEL_ID, "prompt": "w4", "stop": ["a"] * 5}).encode(), 400, "up to 4 non-empty"),
    (json.dumps({"model": MODEL_ID, "prompt": "w4", "n": 9}).encode(), 400, "n must be an integer from 1 to 8"),
    (json.dumps({"model": MODEL_ID, "prompt": "w4", "seed": 1.5}).encode(), 400, "seed must be an integer"),
    (json.dumps({"model": MODEL_ID, "prompt": "w4", "max_tokens": 0}).encode(), 400, "max_tokens must be an integer >= 1"),
    (json.dumps({"model": MODEL_ID, "prompt": "w4 " * 250, "max_tokens": 10}).encode(), 400, "exceeds this server's"),
    (json.dumps({"model": MODEL_ID, "prompt": "w4", "logprobs": 21}).encode(), 400, "logprobs must be an integer"),
])
def test_bad_requests_are_answered_and_logged(server, caplog, body, status, message):
    url = server[0]
    with caplog.at_level(logging.WARNING, logger="mlpspec.serve"):
        response = httpx.post(url + "/v1/completions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status
    assert message in response.json()["error"]["message"]
    assert any(message in r.getMessage() for r in caplog.records)
    assert httpx.get(url + "/health").json()["status"] == "ok"


def test_a_client_leaving_mid_stream_does_not_hurt_the_server(server, caplog):
    url, model, tokenizer, speculator, _ = server
    body = {"model": MODEL_ID, "prompt": prompt(4), "max_tokens": 60, "temperature": 0, "stream": True}
    with caplog.at_level(logging.INFO, logger="mlpspec.serve"):
        with httpx.stream("POST", url + "/v1/completions", json=body) as response:
            first = next(response.iter_lines())
            assert first.startswith("data: ")
        # the connection is closed after one chunk; the server carries on
        api = client(url)
        done = api.completions.create(model=MODEL_ID, prompt=prompt(5), max_tokens=8, temperature=0)
        assert done.choices[0].text == greedy_alone(model, tokenizer, speculator, tokenizer(prompt(5)).input_ids, 8)
        for _ in range(100):
            if any("went away" in r.getMessage() for r in caplog.records):
                break
            time.sleep(0.05)
    assert any("went away" in r.getMessage() for r in caplog.records)
    assert httpx.get(url + "/health").json()["status"] == "ok"


def test_stop_strings_seed_and_n_through_the_openai_client(server):
    url, model, tokenizer, speculator, _ = server
    api = client(url)
    text = prompt(3)
    full = greedy_alone(model, tokenizer, speculator, tokenizer(text).input_ids, 30)
    words = full.split()
    stop = " ".join(words[4:6])  # two words in the middle of the answer: a stop string across tokens
    expected = full[: full.index(stop)]
    done = api.completions.create(model=MODEL_ID, prompt=text, max_tokens=30, temperature=0, stop=[stop, "zzz"])
    assert done.choices[0].text == expected and done.choices[0].finish_reason == "stop"
    pieces = [c.choices[0].text for c in api.completions.create(model=MODEL_ID, prompt=text, max_tokens=30,
                                                                 temperature=0, stop=stop, stream=True)]
    assert "".join(pieces) == expected  # no piece of the stop string was streamed
    # seed: the same sampled text again, another seed another text; n: one choice per index
    sample = dict(model=MODEL_ID, prompt=text, max_tokens=20, temperature=1.0)
    first = api.completions.create(seed=11, **sample).choices[0].text
    assert api.completions.create(seed=11, **sample).choices[0].text == first
    assert api.completions.create(seed=12, **sample).choices[0].text != first
    both = api.completions.create(seed=11, n=2, **sample)
    assert sorted(c.index for c in both.choices) == [0, 1]
    assert both.choices[0].text == first  # choice i draws with seed + i
    assert both.choices[1].text == api.completions.create(seed=12, **sample).choices[0].text
    chunks = list(api.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": text}],
                                              max_tokens=8, temperature=0, n=2, stream=True,
                                              stream_options={"include_usage": True}))
    assert {c.choices[0].index for c in chunks if c.choices} == {0, 1}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 2


def test_metrics_and_a_client_that_leaves_frees_its_row(server, monkeypatch):
    url, model, tokenizer, speculator, app = server
    engine = app.state.engine.engine
    step = engine.step
    monkeypatch.setattr(engine, "step", lambda: time.sleep(0.05) or step())  # steps slow enough to leave in between
    body = {"model": MODEL_ID, "prompt": prompt(6), "max_tokens": 60, "temperature": 0, "stream": True}
    aborted = metric(url, 'mlpspec_requests_finished_total{reason="abort"}')
    with httpx.stream("POST", url + "/v1/completions", json=body) as response:
        next(response.iter_lines())
        assert running(url) == 1
    for _ in range(200):
        if running(url) == 0:
            break
        time.sleep(0.05)
    assert running(url) == 0  # its row was freed though it had tokens to go
    assert metric(url, 'mlpspec_requests_finished_total{reason="abort"}') == aborted + 1
    text = httpx.get(url + "/metrics").text
    for name in ("mlpspec_generated_tokens_total", "mlpspec_engine_steps_total", "mlpspec_tokens_per_row_step_bucket",
                 "mlpspec_time_to_first_token_seconds_bucket", "mlpspec_inter_token_latency_seconds_bucket",
                 'mlpspec_head_acceptance{head="1"}', "mlpspec_requests_waiting"):
        assert name in text, name


def metric(url, name: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def running(url) -> float:
    return metric(url, "mlpspec_requests_running")


def test_a_full_queue_answers_503_and_the_server_carries_on(monkeypatch):
    model, tokenizer = tiny_llama(seed=7), tiny_tokenizer()
    app = create_app(model, tokenizer, None, MODEL_ID, max_batch=1, max_tokens_limit=64, max_waiting=1)
    server = BackgroundServer(app)
    try:
        assert app.state.engine.ready.wait(timeout=60)
        engine = app.state.engine.engine
        step = engine.step
        monkeypatch.setattr(engine, "step", lambda: time.sleep(0.05) or step())  # slow enough for a queue
        body = {"model": MODEL_ID, "prompt": prompt(1), "max_tokens": 60, "temperature": 0}
        with ThreadPoolExecutor(6) as pool:
            codes = sorted(pool.map(lambda _: httpx.post(server.url + "/v1/completions", json=body,
                                                         timeout=120).status_code, range(6)))
        assert codes[0] == 200 and codes[-1] == 503
        assert httpx.get(server.url + "/health").json()["status"] == "ok"
    finally:
        server.stop()


def test_sigterm_finishes_running_requests_and_exits_0(tiny_llama_folder, tmp_path):
    import os
    import signal
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MLPSPEC_CACHE": str(tmp_path / "cache")}
    server = subprocess.Popen([str(Path(sys.executable).parent / "mlpspec"), "serve", "--base", str(tiny_llama_folder),
                               "--no-speculate", "--dtype", "float32", "--port", str(port), "--model-id", MODEL_ID],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=1).json()["status"] == "ok":
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None, server.stdout.read()
            time.sleep(0.1)
        body = {"model": MODEL_ID, "prompt": prompt(2), "max_tokens": 200, "temperature": 0.7, "seed": 3,
                "stream": True}
        lines = []
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                if not lines:
                    server.send_signal(signal.SIGTERM)  # mid-stream: the request still finishes
                lines.append(line)
        assert [line for line in lines if line][-1] == "data: [DONE]"
        assert server.wait(timeout=60) == 0
    finally:
        if server.poll() is None:
            server.kill()


def test_logprobs_through_the_openai_client(server):
    url, model, tokenizer, speculator, _ = server
    api = client(url)
    text = prompt(4)
    ids = encode_prompt(tokenizer, text, chat=False)
    done = api.completions.create(model=MODEL_ID, prompt=text, max_tokens=10, temperature=0, logprobs=3)
    eos = model.generation_config.eos_token_id
    new = model.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False, pad_token_id=0)[0, len(ids):].tolist()
    new = new[: new.index(eos) + 1] if eos in new else new  # the server's greedy tokens, EOS and all
    got = done.choices[0].logprobs
    with torch.no_grad():
        exact = torch.log_softmax(model(torch.tensor([ids + new])).logits[0].float(), dim=-1)  # n V
    assert len(got.token_logprobs) >= len(new) > 0
    for j, token in enumerate(new):
        assert abs(got.token_logprobs[j] - float(exact[len(ids) - 1 + j, token])) < 1e-4
        assert list(got.top_logprobs[j]) == [tokenizer.decode([t]) for t in exact[len(ids) - 1 + j].topk(3).indices]
    messages = [{"role": "user", "content": text}]
    reply = api.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=6, temperature=0,
                                        logprobs=True, top_logprobs=2)
    content = reply.choices[0].logprobs.content
    assert content and all(len(entry.top_logprobs) == 2 and entry.logprob <= 0 for entry in content)
    assert content[0].top_logprobs[0].logprob >= content[0].logprob - 1e-6  # the likeliest comes first
    with pytest.raises(openai.BadRequestError, match="top_logprobs must be an integer from 0 to 20"):
        api.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=6, logprobs=True, top_logprobs=21)

    # streamed, each chunk carries its tokens' logprobs: together they are the whole reply's
    chunks = list(api.completions.create(model=MODEL_ID, prompt=text, max_tokens=10, temperature=0, logprobs=3,
                                         stream=True))
    scored = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    assert len(scored) > 1 and "".join(c.choices[0].text for c in chunks if c.choices) == done.choices[0].text
    assert sum((s.tokens for s in scored), []) == got.tokens
    assert sum((s.text_offset for s in scored), []) == got.text_offset
    for streamed, whole in zip(sum((s.token_logprobs for s in scored), []), got.token_logprobs):
        assert abs(streamed - whole) < 1e-4
    chat_chunks = list(api.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=6, temperature=0,
                                                   logprobs=True, top_logprobs=2, stream=True))
    streamed = [e for c in chat_chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content]
    assert all(abs(a.logprob - b.logprob) < 1e-4 for a, b in zip(streamed, content))
