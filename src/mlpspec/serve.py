"""An OpenAI-compatible HTTP server over the engine (engine.py): continuous batching with
speculation at every step.

One worker thread owns the model. Between engine steps it takes new requests in (they join
the live batch at the next step, as rows free up) and aborts those whose client went away;
each step's tokens stream back to their requests at once. The adaptive policy picks every
step's tree for the live batch size, from step costs calibrated at start-up for every
batch-size bucket. Starlette and uvicorn do the HTTP.

Endpoints: POST /v1/completions, POST /v1/chat/completions (both with "stream"),
GET /v1/models, GET /health. Each response's `usage` carries the request's own
`tokens_per_step` and `steps`, and the largest batch it decoded in.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field, replace

from .engine import Engine
from .errors import MLPSpecError
from .scheduler import QueueFull
from .sequence import BadSetting, SamplingParams
from .text import encode_prompt, is_message_list

log = logging.getLogger("mlpspec.serve")


class BadRequest(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


@dataclass
class Job:
    """One choice of one request (a request with n > 1 has n jobs sharing `events`), and
    the channel its tokens go back through: events are (index, kind, payload)."""

    prompt_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    index: int = 0
    tokens: list[int] = field(default_factory=list)
    steps: int = 0  # engine steps that gave this request tokens
    batch_size: int = 0  # the largest batch it decoded in
    finished: bool = False
    cancelled: bool = False  # the client went away: free the row
    submitted: float = field(default_factory=time.perf_counter)
    last_token_at: float | None = None

    def send(self, kind: str, payload) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (self.index, kind, payload))


class Metrics:
    """What GET /metrics shows, in Prometheus' text format (prometheus_client), one
    registry per app."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = registry = CollectorRegistry()
        self.running = Gauge("mlpspec_requests_running", "Requests in the live batch", registry=registry)
        self.waiting = Gauge("mlpspec_requests_waiting", "Requests queued for a row", registry=registry)
        self.finished = Counter("mlpspec_requests_finished", "Requests finished, by reason", ["reason"],
                                registry=registry)
        self.tokens = Counter("mlpspec_generated_tokens", "Tokens generated", registry=registry)
        self.steps = Counter("mlpspec_engine_steps", "Engine steps (one verification pass each)", registry=registry)
        self.per_step = Histogram("mlpspec_tokens_per_row_step", "Tokens a request got from one step",
                                  buckets=[1, 2, 3, 4, 5, 6, 8, 12], registry=registry)
        self.head = Gauge("mlpspec_head_acceptance", "Share of speculative steps whose head i's token was accepted",
                          ["head"], registry=registry)
        self.ttft = Histogram("mlpspec_time_to_first_token_seconds", "From arrival to the first token",
                              buckets=[0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32], registry=registry)
        self.itl = Histogram("mlpspec_inter_token_latency_seconds", "Between tokens of a request",
                             buckets=[0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2], registry=registry)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


WARM_UP_TEXT = "def add(a, b):\n    return a + b\n\n\ndef mul(a, b):\n"  # what the engine warms up on


class Worker:
    """The thread that drives the engine, and the queue requests reach it through."""

    def __init__(self, model, tokenizer, speculator, max_batch: int = 16, lookup: int = 0, max_waiting: int = 256):
        self.tokenizer = tokenizer
        speculates = speculator is not None or lookup > 0
        self.engine = Engine(model, speculator, max_batch=max_batch, max_waiting=max_waiting, lookup=lookup,
                             adaptive=speculates, tokenizer=tokenizer)
        self.metrics = Metrics()
        self.inbox: queue.Queue[Job] = queue.Queue()
        self.jobs: dict[str, Job] = {}
        self.steps = 0
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, name="mlpspec-engine", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        self.inbox.put(job)

    def _warm_up(self) -> None:
        """Every batch-size bucket's timings before the first request (Engine.warm_up)."""
        self.engine.warm_up(self.tokenizer(WARM_UP_TEXT).input_ids)
        self.ready.set()

    def _take(self) -> None:
        """New requests into the engine: wait for one while nothing runs, then take all."""
        try:
            first = self.inbox.get(timeout=0.5) if not self.engine.has_unfinished() else self.inbox.get_nowait()
        except queue.Empty:
            return
        for job in [first, *iter_nowait(self.inbox)]:
            if job.cancelled:
                continue
            try:
                self.jobs[self.engine.add_request(job.prompt_ids, job.params)] = job
            except QueueFull as e:
                job.send("error", (503, str(e)))
            except MLPSpecError as e:
                job.send("error", (400, str(e)))

    def _run(self) -> None:
        self._warm_up()
        while True:
            self._take()
            for request_id, job in list(self.jobs.items()):
                if job.cancelled:  # the client left: its row is free for the next step
                    self.engine.abort(request_id)
                    del self.jobs[request_id]
                    self.metrics.finished.labels("abort").inc()
            if not self.engine.has_unfinished():
                self.metrics.running.set(0)
                self.metrics.waiting.set(self.inbox.qsize())
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # the worker must outlive any one step; the error goes to its requests
                log.exception("a step of %d requests failed", len(self.jobs))
                for request_id, job in self.jobs.items():
                    self.engine.abort(request_id)
                    job.send("error", (500, f"generation failed: {e}"))
                self.jobs.clear()
                continue
            self.steps += 1
            self._gauge()  # before the tokens go out: a client that reads them sees the step in /metrics
            now = time.perf_counter()
            for out in outputs:
                job = self.jobs.get(out.id)
                if job is None:
                    continue
                self._count(job, out.new_ids, now)
                job.tokens += out.new_ids
                job.steps += 1
                job.batch_size = max(job.batch_size, self.engine.running)
                if (out.new_ids or out.text) and not job.cancelled:
                    job.send("tokens", (out.new_ids, out.text, out.logprobs))
                if out.finished:
                    job.finished = True
                    del self.jobs[out.id]
                    self.metrics.finished.labels(out.finish_reason).inc()
                    job.send("done", out.finish_reason)

    def _count(self, job: Job, new: list[int], now: float) -> None:
        m = self.metrics
        if not new:
            return
        m.tokens.inc(len(new))
        m.per_step.observe(len(new))
        if job.last_token_at is None:
            m.ttft.observe(now - job.submitted)
        else:
            for _ in new:  # a step's tokens arrive together: each waited its share
                m.itl.observe((now - job.last_token_at) / len(new))
        job.last_token_at = now

    def _gauge(self) -> None:
        m, engine = self.metrics, self.engine
        m.steps.inc()
        m.running.set(engine.running)
        m.waiting.set(engine.waiting + self.inbox.qsize())
        for i, share in enumerate(engine.head_acceptance()):
            m.head.labels(str(i + 1)).set(share)


def iter_nowait(inbox: queue.Queue):
    while True:
        try:
            yield inbox.get_nowait()
        except queue.Empty:
            return


MAX_CHOICES = 8  # the most choices (n) one request may ask for


@dataclass(frozen=True)
class Asked:
    """A request's decoding fields, checked: its engine settings (choice i is seeded
    seed + i), how many choices, and whether a stream ends with the usage."""

    params: SamplingParams
    n: int
    include_usage: bool


class Choice:
    """One choice as its client sees it: the text so far (the engine's, which never shows a
    piece of a stop string), its tokens and their logprobs when asked, and why it ended."""

    def __init__(self, job: Job):
        self.job, self.text, self.done, self.finish_reason = job, "", False, None
        self.tokens: list[int] = []
        self.logprobs: list = []  # sequence.TokenLogprob per token, when asked

    def take(self, event: str, payload) -> Delta:
        """What a "tokens" event adds; "done" sets the finish reason (and adds nothing)."""
        if event != "tokens":
            self.done, self.finish_reason = True, payload
            return Delta(len(self.tokens), [], "", [])
        ids, text, logprobs = payload
        delta = Delta(len(self.tokens), ids, text, logprobs or [])
        self.text += text
        self.tokens += ids
        self.logprobs += delta.logprobs
        return delta


@dataclass(frozen=True)
class Delta:
    """A choice's new tokens from one step (after `start` earlier ones), their text, which
    may lag them (a stop string's first characters, an unfinished character), and their
    logprobs when asked."""

    start: int
    tokens: list[int]
    text: str
    logprobs: list


def create_app(model, tokenizer, speculator, model_id: str, max_batch: int = 16, max_tokens_limit: int | None = None,
               lookup: int = 0, max_waiting: int = 256):
    """The Starlette app; the engine starts with it. `lookup` adds a prompt-lookup branch
    (decode.py) to the adaptive policy's shapes; past `max_waiting` queued requests, a new
    one is answered 503 with Retry-After."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    engine = Worker(model, tokenizer, speculator, max_batch=max_batch, lookup=lookup, max_waiting=max_waiting)
    context = engine.engine.max_len  # KV slots a request may fill: prompt plus max_tokens
    limit = min(max_tokens_limit or context, context)
    text_of = engine.engine.text_of

    def logprobs_field(choice: Choice, delta: Delta | None, chat: bool) -> dict:
        """Logprobs as OpenAI writes them: a stream chunk's for its delta's tokens, a whole
        response's (delta None) for every token of the choice."""
        tokens, entries, before = ((choice.tokens, choice.logprobs, []) if delta is None else
                                   (delta.tokens, delta.logprobs, choice.tokens[: delta.start]))
        piece = [tokenizer.decode([t]) for t in tokens]
        if chat:
            return {"content": [
                {"token": text, "logprob": e.logprob, "bytes": list(text.encode()),
                 "top_logprobs": [{"token": tokenizer.decode([t]), "logprob": lp,
                                   "bytes": list(tokenizer.decode([t]).encode())} for t, lp in e.top]}
                for text, e in zip(piece, entries)]}
        offsets = [len(text_of(before + tokens[:j])) for j in range(len(tokens))]
        return {"tokens": piece, "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [{tokenizer.decode([t]): lp for t, lp in e.top} for e in entries],
                "text_offset": offsets}

    def error(e: BadRequest) -> JSONResponse:
        log.warning("%d %s", e.status, e.message)
        return JSONResponse({"error": {"message": e.message, "type": e.kind, "param": e.param, "code": None}},
                            status_code=e.status, headers={"Retry-After": "1"} if e.status == 503 else None)

    async def parse(request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadRequest(400, f"the request body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise BadRequest(400, "the request body must be a JSON object")
        if body.get("model") != model_id:
            raise BadRequest(404, f"the model {body.get('model')!r} does not exist; this server serves {model_id!r}",
                             kind="not_found_error", param="model")
        return body

    def logprobs_asked(body: dict, chat: bool) -> int | None:
        """Completions: logprobs = k alternatives; chat: logprobs = true, top_logprobs = k."""
        if chat:
            if body.get("logprobs") not in (None, False, True):
                raise BadRequest(400, f"logprobs must be true or false, got {body.get('logprobs')!r}", param="logprobs")
            top, key = body.get("top_logprobs"), "top_logprobs"
            if top is not None and not body.get("logprobs"):
                raise BadRequest(400, "top_logprobs needs logprobs: true", param="top_logprobs")
            top = (top or 0) if body.get("logprobs") else None
        else:
            top, key = body.get("logprobs"), "logprobs"
        if top is not None and (isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= 20):
            raise BadRequest(400, f"{key} must be an integer from 0 to 20, got {top!r}", param=key)
        return top

    def sampling(body: dict, max_key: str) -> Asked:
        for unsupported in ("tools", "logit_bias", "suffix"):
            if body.get(unsupported) not in (None, False, [], {}, 0):
                raise BadRequest(400, f"{unsupported!r} is not supported by this server", param=unsupported)
        stop = body.get("stop")
        stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
        if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(x, str) and x for x in stops):
            raise BadRequest(400, f"stop must be a string or a list of up to 4 non-empty strings, got {stop!r}",
                             param="stop")
        n = body.get("n", 1)
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_CHOICES:
            raise BadRequest(400, f"n must be an integer from 1 to {MAX_CHOICES}, got {n!r}", param="n")
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise BadRequest(400, "stream_options must be an object", param="stream_options")
        top_p = body.get("top_p")
        try:  # SamplingParams checks each field's type and range
            params = SamplingParams(max_tokens=body.get(max_key, body.get("max_tokens", 16)),
                                    temperature=body.get("temperature", 1.0), top_p=None if top_p == 1 else top_p,
                                    seed=body.get("seed"), stop=tuple(stops),
                                    logprobs=logprobs_asked(body, max_key == "max_completion_tokens"))
        except BadSetting as e:
            raise BadRequest(400, str(e), param=e.field) from None
        if params.max_tokens > limit:
            raise BadRequest(400, f"max_tokens {params.max_tokens} exceeds this server's limit of {limit}",
                             param="max_tokens")
        return Asked(params, n, bool(options.get("include_usage")))

    def tokenize(body: dict, chat: bool) -> list[int]:
        if chat:
            prompt = body.get("messages")
            if not is_message_list(prompt):
                raise BadRequest(400, "messages must be a non-empty list of {role, content} objects", param="messages")
            if getattr(tokenizer, "chat_template", None) is None:
                raise BadRequest(400, f"{model_id} has no chat template; use /v1/completions")
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if not isinstance(prompt, str) or not prompt:
                raise BadRequest(400, "prompt must be a non-empty string", param="prompt")
        ids = encode_prompt(tokenizer, prompt, chat)
        if not ids:
            raise BadRequest(400, "the prompt encodes to no tokens", param="prompt")
        return ids

    async def generate(request: Request, chat: bool):
        try:
            body = await parse(request)
            asked = sampling(body, "max_completion_tokens" if chat else "max_tokens")
            prompt_ids = tokenize(body, chat)
            if len(prompt_ids) + asked.params.max_tokens > context:
                raise BadRequest(400, f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({asked.params.max_tokens}) "
                                      f"exceeds this server's {context} tokens a request", param="max_tokens")
        except BadRequest as e:
            return error(e)
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        params = asked.params
        choices = [Choice(Job(prompt_ids, replace(params, seed=None if params.seed is None else params.seed + i), loop,
                              events, index=i))
                   for i in range(asked.n)]
        for choice in choices:
            engine.submit(choice.job)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"

        def usage() -> dict:
            tokens = sum(len(c.job.tokens) for c in choices)
            steps = max(sum(c.job.steps for c in choices), 1)
            return {"prompt_tokens": len(prompt_ids), "completion_tokens": tokens,
                    "total_tokens": len(prompt_ids) + tokens, "tokens_per_step": round(tokens / steps, 3),
                    "steps": steps, "batch_size": max(c.job.batch_size for c in choices)}

        async def updates():
            """(choice, Delta) as the choices' tokens come, until every one is done;
            an engine error ends it with BadRequest."""
            while not all(c.done for c in choices):
                index, event, payload = await events.get()
                choice = choices[index]
                if choice.done:
                    continue
                if event == "error":
                    raise BadRequest(*payload, kind="server_error" if payload[0] >= 500 else "invalid_request_error")
                yield choice, choice.take(event, payload)

        if not body.get("stream"):
            try:
                async for _ in updates():
                    pass
            except BadRequest as e:
                return error(e)
            listed = []
            for c in choices:
                entry = {"index": c.job.index, "finish_reason": c.finish_reason}
                entry |= ({"message": {"role": "assistant", "content": c.text}} if chat
                          else {"text": c.text, "logprobs": None})
                if params.logprobs is not None:
                    entry["logprobs"] = logprobs_field(c, None, chat)
                listed.append(entry)
            return JSONResponse({"id": rid, "object": kind, "created": created, "model": model_id,
                                 "choices": listed, "usage": usage()})

        def chunk(index: int, text: str | None, finish_reason: str | None = None, role: bool = False,
                  logprobs: dict | None = None) -> str:
            if chat:
                delta = {"role": "assistant"} if role else {} if text is None else {"content": text}
                entry = {"index": index, "delta": delta, "finish_reason": finish_reason}
                if logprobs is not None:
                    entry["logprobs"] = logprobs
            else:
                entry = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}
            payload = {"id": rid, "object": kind + (".chunk" if chat else ""), "created": created, "model": model_id,
                       "choices": [entry]}
            return f"data: {json.dumps(payload)}\n\n"

        async def stream():
            try:
                if chat:
                    for c in choices:
                        yield chunk(c.job.index, None, role=True)
                async for choice, delta in updates():
                    # with logprobs, a step's tokens go out even while their text lags
                    scored = params.logprobs is not None and bool(delta.tokens)
                    if delta.text or scored:
                        yield chunk(choice.job.index, delta.text,
                                    logprobs=logprobs_field(choice, delta, chat) if scored else None)
                    if choice.done:
                        yield chunk(choice.job.index, None, choice.finish_reason)
                if asked.include_usage:
                    yield f"data: {json.dumps({'id': rid, 'object': kind + ('.chunk' if chat else ''), 'created': created, 'model': model_id, 'choices': [], 'usage': usage()})}\n\n"
                yield "data: [DONE]\n\n"
            except BadRequest as e:
                yield f"data: {json.dumps({'error': {'message': e.message, 'type': e.kind}})}\n\n"
            finally:
                for c in choices:
                    if not c.job.finished and not c.job.cancelled:
                        c.job.cancelled = True
                        log.info("client went away mid-stream (%s); its row is dropped", rid)

        return StreamingResponse(stream(), media_type="text/event-stream")

    async def completions(request: Request):
        return await generate(request, chat=False)

    async def chat_completions(request: Request):
        return await generate(request, chat=True)

    async def models(request: Request):
        return JSONResponse({"object": "list", "data": [{"id": model_id, "object": "model", "created": 0,
                                                           "owned_by": "mlpspec"}]})

    async def health(request: Request):
        if not engine.thread.is_alive():
            return JSONResponse({"status": "engine stopped", "steps": engine.steps}, status_code=503)
        status = "ok" if engine.ready.is_set() else "warming up"
        return JSONResponse({"status": status, "steps": engine.steps, "running": engine.engine.running,
                             "waiting": engine.engine.waiting})

    async def metrics(request: Request):
        return Response(engine.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    app = Starlette(routes=[
        Route("/metrics", metrics, methods=["GET"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
    ])
    app.state.engine = engine
    return app


class BackgroundServer:
    """The app served by uvicorn in a daemon thread, on a free loopback port unless told
    otherwise (tests, load checks, notebooks). `url` is ready once the constructor returns."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        import socket

        import uvicorn

        if port == 0:
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        self.url = f"http://{host}:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def serve(model, tokenizer, speculator, model_id: str, host: str = "127.0.0.1", port: int = 8000,
          max_batch: int = 16, lookup: int = 0, max_waiting: int = 256, drain_seconds: float = 30) -> None:
    """Serve until SIGTERM or SIGINT: then no new connection is taken, running requests
    finish (for at most `drain_seconds`), and the process exits with status 0."""
    import uvicorn

    if max_batch < 1:
        raise MLPSpecError(f"--max-batch must be at least 1, got {max_batch}")
    if max_waiting < 0:
        raise MLPSpecError(f"--max-waiting must be at least 0, got {max_waiting}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    app = create_app(model, tokenizer, speculator, model_id, max_batch=max_batch, lookup=lookup,
                     max_waiting=max_waiting)
    # uvicorn drains on SIGTERM, then raises the signal again to the handler it found: make
    # that one a no-op, so that a drained server exits with status 0
    previous = signal.signal(signal.SIGTERM, lambda *_: log.info("drained after SIGTERM; exiting"))
    try:
        uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=drain_seconds)
    finally:
        signal.signal(signal.SIGTERM, previous)
