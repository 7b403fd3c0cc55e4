"""The serving benchmark (`mlpspec bench --serving`): requests arrive as a Poisson process
at several rates, over loopback, to `mlpspec serve` with speculation on and off, and, as
the anchor, to transformers' own continuous batching (ContinuousBatchingManager, driven in
this process). Reports throughput, time to first token and inter-token latency (p50 and
p95), tokens per step and errors, as JSON, markdown and plots.

Every target gets the same requests at the same arrival times (one seeded schedule per
rate): mixed code and chat prompts, greedy, and mixed lengths: each request its own
`max_tokens`, uniform in [max_tokens / 3, 5 max_tokens / 3] (mean max_tokens), or with
lengths="fixed" every one `max_tokens`. Fixed lengths are a case real traffic never makes:
plain decoding then keeps rows that joined together in step until they all finish, so
their successors share one prefill pass, where speculation's rows finish one at a time
(docs/experiments/serving-engine.md). On a shared machine a slow
spell can move one run's throughput by a quarter, so with `repeats` the targets take turns
(in reversed order every other round, each started afresh), each (target, rate) reports
its median run, and speculation on against off is the median of the rounds' paired ratios.
"""

from __future__ import annotations

import contextlib
import json
import random
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from .errors import MLPSpecError
from .hardware import describe_machine, hardware_line

TARGETS = ("mlpspec", "mlpspec_plain", "transformers_cb")
LENGTHS = ("mixed", "fixed")


@dataclass
class ServingSettings:
    rates: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])  # requests per second
    requests: int = 24  # per rate and target
    max_tokens: int = 48
    max_batch: int = 16
    lookup: int = 0  # the speculating server's prompt-lookup branch (serve --lookup)
    seed: int = 0
    repeats: int = 1  # rounds over all targets, taking turns
    targets: tuple[str, ...] = TARGETS
    lengths: str = "mixed"  # each request's max_tokens: "mixed" (seeded, mean max_tokens) or "fixed"

    def budgets(self) -> list[int]:
        """Each request's max_tokens, the same for every target and rate (budgets())."""
        return budgets(self.max_tokens, self.requests, self.lengths, self.seed)

    def __post_init__(self):
        if not self.rates or any(r <= 0 for r in self.rates):
            raise MLPSpecError(f"rates must be positive requests per second, got {self.rates}")
        if self.requests < 1 or self.max_tokens < 1 or self.repeats < 1:
            raise MLPSpecError("requests, max_tokens and repeats must be at least 1")
        if self.lengths not in LENGTHS:
            raise MLPSpecError(f"lengths must be one of {', '.join(LENGTHS)}, got {self.lengths!r}")
        unknown = set(self.targets) - set(TARGETS)
        if unknown:
            raise MLPSpecError(f"unknown targets {sorted(unknown)}; choose from {', '.join(TARGETS)}")


@dataclass
class Timing:
    """One request as its client saw it."""

    sent: float
    first: float | None = None  # first token
    done: float | None = None
    tokens: int = 0
    tokens_per_step: float | None = None
    error: str | None = None

    @property
    def inter_token(self) -> float | None:
        """Mean seconds between its tokens after the first (a step's tokens arrive together)."""
        if self.first is None or self.done is None or self.tokens < 2:
            return None
        return (self.done - self.first) / (self.tokens - 1)


def arrivals(rate: float, n: int, seed: int) -> list[float]:
    """Seconds from the start at which each of n requests arrives: exponential gaps of mean 1/rate."""
    rng = random.Random(seed)
    at, times = 0.0, []
    for _ in range(n):
        times.append(at)
        at += rng.expovariate(rate)
    return times


def serving_prompts(tokenizer) -> list[list[int]]:
    """The bench's prompts as token ids: six unseen code prompts and six chat prompts (in
    the chat template), taking turns."""
    from .bench import chat_prompts, code_prompts
    from .text import encode_prompt

    code = [encode_prompt(tokenizer, p, chat=False) for p in code_prompts(6)]
    chat = [encode_prompt(tokenizer, m, chat=True) for m in chat_prompts()[:6]]
    return [ask for pair in zip(code, chat) for ask in pair]


def budgets(max_tokens: int, n: int, lengths: str, seed: int) -> list[int]:
    """Each of n requests' max_tokens: all max_tokens ("fixed"), or seeded draws uniform in
    [max_tokens // 3, 5 max_tokens // 3], at least 1 ("mixed")."""
    if lengths == "fixed":
        return [max_tokens] * n
    rng = random.Random(seed)
    return [max(1, rng.randint(max_tokens // 3, max_tokens * 5 // 3)) for _ in range(n)]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]


def summarize(timings: list[Timing], wall: float) -> dict:
    ok = [t for t in timings if t.error is None and t.done is not None]
    ttft = [t.first - t.sent for t in ok if t.first is not None]
    gaps = [t.inter_token for t in ok if t.inter_token is not None]
    per_step = [t.tokens_per_step for t in ok if t.tokens_per_step]
    tokens = sum(t.tokens for t in ok)
    return {
        "requests": len(timings), "errors": len(timings) - len(ok), "completion_tokens": tokens,
        "wall_s": round(wall, 2), "tokens_per_s": round(tokens / wall, 2) if wall else None,
        "ttft_p50_s": _round(percentile(ttft, 0.5)), "ttft_p95_s": _round(percentile(ttft, 0.95)),
        "itl_p50_s": _round(percentile(gaps, 0.5)), "itl_p95_s": _round(percentile(gaps, 0.95)),
        "tokens_per_step": round(statistics.mean(per_step), 3) if per_step else None,
    }


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def drive_http(url: str, model_id: str, tokenizer):
    """send(timing, prompt, max_tokens): one streaming completion (the prompt's token ids as text)."""

    def send(timing: Timing, prompt: list[int], max_tokens: int) -> None:
        body = {"model": model_id, "prompt": tokenizer.decode(prompt), "max_tokens": max_tokens,
                "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
        try:
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as response:
                if response.status_code != 200:
                    timing.error = f"HTTP {response.status_code}"
                    return
                for line in response.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        timing.error = chunk["error"]["message"]
                        return
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                        timing.tokens_per_step = usage.get("tokens_per_step")
                        timing.tokens = usage["completion_tokens"]
                    elif chunk["choices"] and chunk["choices"][0].get("text") and timing.first is None:
                        timing.first = time.perf_counter()
            timing.done = time.perf_counter()
        except httpx.HTTPError as e:
            timing.error = str(e)

    return send


def drive_transformers(manager):
    """send(timing, prompt, max_tokens) through transformers' ContinuousBatchingManager (streaming)."""

    def send(timing: Timing, prompt: list[int], max_tokens: int) -> None:
        try:
            rid = manager.add_request(prompt, max_new_tokens=max_tokens, streaming=True)
            for output in manager.request_id_iter(rid):
                timing.tokens = len(output.generated_tokens)
                if timing.tokens and timing.first is None:
                    timing.first = time.perf_counter()
                if output.is_finished():
                    break
            timing.done = time.perf_counter()
        except Exception as e:  # the anchor's failure is reported, not fatal to the benchmark
            timing.error = f"{type(e).__name__}: {e}"

    return send


def replay(send, prompts: list[list[int]], times: list[float], max_tokens: list[int]) -> tuple[float, list[Timing]]:
    """Send each prompt at its arrival time with its max_tokens, one thread per request.
    Returns the wall time from the first arrival to the last request's end, and each
    request's timing."""
    timings = [Timing(sent=0.0) for _ in prompts]
    start = time.perf_counter()

    def one(i: int) -> None:
        time.sleep(max(0.0, start + times[i] - time.perf_counter()))
        timings[i].sent = time.perf_counter()
        send(timings[i], prompts[i], max_tokens[i])

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - start, timings


@contextlib.contextmanager
def target_sender(target: str, model, tokenizer, speculator, settings: ServingSettings):
    """A running target (a server, or transformers' manager) and its send function."""
    if target == "transformers_cb":
        from transformers import GenerationConfig

        config = GenerationConfig(max_new_tokens=max(settings.budgets()), do_sample=False,
                                  eos_token_id=model.generation_config.eos_token_id,
                                  pad_token_id=model.generation_config.pad_token_id or 0)
        # transformers' continuous batching takes only its own attention kernels: sdpa for
        # the run (load_base gave the model mlpspec's tree attention), then back
        ours = model.config._attn_implementation
        model.set_attn_implementation("sdpa")
        manager = model.init_continuous_batching(generation_config=config)
        manager.start()
        try:
            yield drive_transformers(manager)
        finally:
            manager.stop(block=True)
            model.set_attn_implementation(ours)
        return
    from .serve import BackgroundServer, create_app

    speculates = target == "mlpspec"
    app = create_app(model, tokenizer, speculator if speculates else None, "bench", max_batch=settings.max_batch,
                     lookup=settings.lookup if speculates else 0)
    server = BackgroundServer(app)
    try:
        app.state.engine.ready.wait()
        yield drive_http(server.url, "bench", tokenizer)
    finally:
        server.stop()


def run_serving_bench(model, tokenizer, speculator, prompts: list[list[int]], settings: ServingSettings,
                      progress=None) -> dict:
    """Every target at every rate, `repeats` rounds; the same requests and arrival times
    for each. Each target first answers one request untimed: transformers' manager pays for
    its start-up there, as mlpspec's server does before it says it is ready."""
    asks = [prompts[i % len(prompts)] for i in range(settings.requests)]
    lengths = settings.budgets()
    runs: dict[str, dict[str, list[dict]]] = {t: {str(rate): [] for rate in settings.rates} for t in settings.targets}
    for round_ in range(settings.repeats):
        for target in settings.targets[:: 1 if round_ % 2 == 0 else -1]:
            with target_sender(target, model, tokenizer, speculator, settings) as send:
                send(Timing(sent=0.0), asks[0], settings.max_tokens)
                for rate in settings.rates:
                    wall, timings = replay(send, asks, arrivals(rate, len(asks), settings.seed), lengths)
                    runs[target][str(rate)].append(summarize(timings, wall))
                    if progress:
                        progress(target, rate)
    report = {"date": time.strftime("%Y-%m-%d"), "machine": describe_machine(model.device),
              "dtype": str(model.dtype).removeprefix("torch."), "settings": asdict(settings),
              "results": {t: {rate: median_run(rs) for rate, rs in by_rate.items()} for t, by_rate in runs.items()}}
    if {"mlpspec", "mlpspec_plain"} <= set(settings.targets):
        report["speculation_on_off"] = {rate: paired_ratios(runs["mlpspec"][rate], runs["mlpspec_plain"][rate])
                                        for rate in runs["mlpspec"]}
    return report


def median_run(runs: list[dict]) -> dict:
    """The run of median throughput (the lower middle one of an even count), with every
    run's throughput beside it and the errors of all runs."""
    ordered = sorted(runs, key=lambda r: r["tokens_per_s"] or 0.0)
    return ordered[(len(ordered) - 1) // 2] | {"tokens_per_s_runs": [r["tokens_per_s"] for r in runs],
                                                "errors": sum(r["errors"] for r in runs)}


def paired_ratios(on: list[dict], off: list[dict]) -> dict:
    """Round by round, speculation on's throughput over off's, and their median."""
    ratios = [round(a["tokens_per_s"] / b["tokens_per_s"], 3) for a, b in zip(on, off)
              if a["tokens_per_s"] and b["tokens_per_s"]]
    return {"rounds": ratios, "median": round(statistics.median(ratios), 3) if ratios else None}


def write_serving_report(report: dict, out: Path) -> None:
    """serving.json, serving.md (its first line the date, the hardware, the dtype and, where
    the report has one, the command) and serving.png (throughput and p95 time to first
    token by rate)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "serving.json").write_text(json.dumps(report, indent=2) + "\n")
    settings = report["settings"]
    rows = [f"{report['date']}, {hardware_line(report['machine'], report['dtype'])}"
            + (f"; `{report['command']}`" if report.get("command") else ""), "",
            f"{settings['requests']} requests a rate, max_tokens {settings['max_tokens']} ({settings['lengths']} lengths), "
            f"max batch {settings['max_batch']}, {settings['repeats']} round(s)", "",
            "| target | rate (req/s) | tokens/s (median run; every run) | TTFT p50 / p95 (s) | ITL p50 / p95 (s) | tokens/step | errors |",
            "|---|---|---|---|---|---|---|"]
    for target, by_rate in report["results"].items():
        for rate, r in by_rate.items():
            runs = r.get("tokens_per_s_runs", [])
            speed = f"{r['tokens_per_s']}" + (f" ({', '.join(map(str, runs))})" if len(runs) > 1 else "")
            rows.append(f"| {target} | {rate} | {speed} | {r['ttft_p50_s']} / {r['ttft_p95_s']} | "
                        f"{r['itl_p50_s']} / {r['itl_p95_s']} | {r['tokens_per_step']} | {r['errors']} |")
    ratios = report.get("speculation_on_off")
    if ratios:
        rows += ["", "| rate (req/s) | speculation on / off, per round | median |", "|---|---|---|"]
        rows += [f"| {rate} | {', '.join(map(str, r['rounds']))} | {r['median']} |" for rate, r in ratios.items()]
    (out / "serving.md").write_text("\n".join(rows) + "\n")
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for target, by_rate in report["results"].items():
        rates = [float(r) for r in by_rate]
        left.plot(rates, [r["tokens_per_s"] for r in by_rate.values()], marker="o", label=target)
        right.plot(rates, [r["ttft_p95_s"] for r in by_rate.values()], marker="o", label=target)
    left.set(xlabel="requests per second", ylabel="completion tokens per second", title="throughput")
    right.set(xlabel="requests per second", ylabel="seconds", title="time to first token, p95")
    left.legend()
    fig.tight_layout()
    fig.savefig(out / "serving.png", dpi=120)
    plt.close(fig)
