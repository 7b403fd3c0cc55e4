"""Load check for `mlpspec serve`, on loopback only, bounded in count and time.

    .venv/bin/python scripts/load_check.py [--clients 16] [--requests 48] [--dtype float32] [--lookup 10]

Starts the server in this process twice on the embedded default base model: with the
shipped default speculator (and `--lookup`'s branch), then with speculation off. Each time, `--clients` concurrent
clients send `--requests` mixed requests in all (two in three greedy, the rest sampled,
completions and chat, short and long). Every greedy answer is checked against the same
prompt decoded alone (plain decoding, one request). Prints errors, mismatches, throughput
(completion tokens/s over the whole run) and p50/p95 latency for both servers.
"""

import argparse
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from mlpspec import load_base, load_speculator
from mlpspec.bench import chat_prompts, code_prompts
from mlpspec.generate import speculative_generate
from mlpspec.serve import BackgroundServer, create_app
from mlpspec.text import encode_prompts

parser = argparse.ArgumentParser()
parser.add_argument("--clients", type=int, default=16)
parser.add_argument("--requests", type=int, default=48)
parser.add_argument("--max-tokens", type=int, default=48)
parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
parser.add_argument("--timeout", type=float, default=900, help="seconds allowed per server run")
parser.add_argument("--lookup", type=int, default=0, help="the server's prompt-lookup branch (serve --lookup)")
args = parser.parse_args()

model, tokenizer = load_base(dtype=args.dtype)
speculator = load_speculator(dtype=model.dtype, base=model)
MODEL_ID = "SmolLM2-135M-Instruct"
eos = model.generation_config.eos_token_id

code, chats = code_prompts(12), [p for p in chat_prompts()]
requests = []
for i in range(args.requests):
    greedy = i % 3 != 2
    max_tokens = args.max_tokens if i % 2 == 0 else args.max_tokens // 2
    if i % 4 == 3:
        body = {"messages": chats[i % len(chats)], "max_tokens": max_tokens}
    else:
        body = {"prompt": code[i % len(code)], "max_tokens": max_tokens}
    body |= {"model": MODEL_ID, "temperature": 0 if greedy else 0.8}
    requests.append(body)


def alone(body) -> str:
    ids, mask = encode_prompts(tokenizer, [body.get("messages") or body["prompt"]], chat=False)
    out = speculative_generate(model, None, ids, mask, max_new_tokens=body["max_tokens"], eos_token_id=[eos])
    new = out.sequences[0, ids.size(1):].tolist()[: int(out.stats.emitted[0])]
    return tokenizer.decode([t for t in new if t != eos], skip_special_tokens=True)


references = {i: alone(body) for i, body in enumerate(requests) if body["temperature"] == 0}


def run(speculate: bool) -> dict:
    app = create_app(model, tokenizer, speculator if speculate else None, MODEL_ID, max_batch=args.clients,
                     lookup=args.lookup if speculate else 0)
    server = BackgroundServer(app)
    app.state.engine.ready.wait()  # the policy calibrates at start-up; time the serving only
    url = server.url + "/v1/"

    def send(i):
        body = requests[i]
        path = "chat/completions" if "messages" in body else "completions"
        start = time.perf_counter()
        try:
            response = httpx.post(url + path, json=body, timeout=args.timeout)
        except httpx.HTTPError as e:
            return i, None, time.perf_counter() - start, str(e)
        if response.status_code != 200:
            return i, None, time.perf_counter() - start, response.text
        return i, response.json(), time.perf_counter() - start, None

    start = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as pool:
        results = list(pool.map(send, range(len(requests))))
    wall = time.perf_counter() - start
    server.stop()
    errors = [(i, e) for i, _, _, e in results if e is not None]
    mismatches, tokens, steps = [], 0, []
    for i, reply, _, _ in results:
        if reply is None:
            continue
        choice = reply["choices"][0]
        text = choice["message"]["content"] if "message" in choice else choice["text"]
        tokens += reply["usage"]["completion_tokens"]
        steps.append(reply["usage"]["tokens_per_step"])
        if i in references and text != references[i]:
            mismatches.append(i)
    latencies = sorted(t for _, _, t, _ in results)
    return {
        "speculate": speculate, "requests": len(requests), "clients": args.clients, "errors": len(errors),
        "error_examples": errors[:3], "greedy_checked": len(references), "mismatches": mismatches,
        "completion_tokens": tokens, "wall_s": round(wall, 2), "tokens_per_s": round(tokens / wall, 2),
        "p50_latency_s": round(statistics.median(latencies), 2),
        "p95_latency_s": round(latencies[int(0.95 * (len(latencies) - 1))], 2),
        "mean_tokens_per_step": round(statistics.mean(steps), 3) if steps else None,
        "steps": app.state.engine.steps,
    }


report = [run(True), run(False)]
print(json.dumps(report, indent=2))
on, off = report
print(f"\nspeculation on : {on['tokens_per_s']} tokens/s, p50 {on['p50_latency_s']} s, p95 {on['p95_latency_s']} s, "
      f"{on['errors']} errors, {len(on['mismatches'])} mismatches of {on['greedy_checked']} greedy")
print(f"speculation off: {off['tokens_per_s']} tokens/s, p50 {off['p50_latency_s']} s, p95 {off['p95_latency_s']} s, "
      f"{off['errors']} errors, {len(off['mismatches'])} mismatches of {off['greedy_checked']} greedy")
print(f"throughput ratio on/off: {on['tokens_per_s'] / off['tokens_per_s']:.3f}")
