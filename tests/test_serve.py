"""The server end to end on localhost, driven by the official openai client."""

import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from conftest import tiny_llama, tiny_tokenizer
from mlpspec.decode import speculative_generate
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
        return i, greedy, api.completions.create(**kwargs)

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(24)))
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
    (json.dumps({"model": MODEL_ID, "prompt": "w4", "stop": ["w5"]}).encode(), 400, "'stop' is not supported"),
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
