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
import threading
import time
import uuid
from dataclasses import dataclass, field

from .engine import Engine
from .errors import MLPSpecError
from .scheduler import QueueFull
from .sequence import SamplingParams
from .text import encode_prompt, is_message_list

log = logging.getLogger("mlpspec.serve")


class BadRequest(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


@dataclass
class Job:
    """One request, and the channel its tokens go back through."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float | None
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    tokens: list[int] = field(default_factory=list)
    steps: int = 0  # engine steps that gave this request tokens
    batch_size: int = 0  # the largest batch it decoded in
    finished: bool = False
    cancelled: bool = False  # the client went away: stop sending, free the row

    def send(self, kind: str, payload) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))


class Worker:
    """The thread that drives the engine, and the queue requests reach it through."""

    def __init__(self, model, tokenizer, speculator, max_batch: int = 16, lookup: int = 0, max_waiting: int = 256):
        self.tokenizer = tokenizer
        speculates = speculator is not None or lookup > 0
        self.engine = Engine(model, speculator, max_batch=max_batch, max_waiting=max_waiting, lookup=lookup,
                             adaptive=speculates)
        self.eos = list(self.engine.eos)
        self.inbox: queue.Queue[Job] = queue.Queue()
        self.jobs: dict[str, Job] = {}
        self.steps = 0
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, name="mlpspec-engine", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        self.inbox.put(job)

    def _warm_up(self) -> None:
        """Run batches of every batch-size bucket up to max_batch before the first request,
        so that the adaptive policy's timings (taken when a bucket is first seen) cost no
        request anything."""
        engine, sample = self.engine, self.tokenizer("def add(a, b):\n    return a + b\n\n\ndef mul(a, b):\n").input_ids
        b = 1
        while engine.policy is not None and b <= engine.scheduler.max_batch:
            for _ in range(b):
                engine.add_request(sample, SamplingParams(max_tokens=4, ignore_eos=True))
            while engine.has_unfinished():
                engine.step()
            b *= 2
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
            params = SamplingParams(max_tokens=job.max_tokens, temperature=job.temperature, top_p=job.top_p)
            try:
                self.jobs[self.engine.add_request(job.prompt_ids, params)] = job
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
            if not self.engine.has_unfinished():
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
            for out in outputs:
                job = self.jobs.get(out.id)
                if job is None:
                    continue
                job.tokens += out.new_ids
                job.steps += 1
                job.batch_size = max(job.batch_size, self.engine.running)
                if out.new_ids and not job.cancelled:
                    job.send("tokens", out.new_ids)
                if out.finished:
                    job.finished = True
                    del self.jobs[out.id]
                    job.send("done", {"finish_reason": out.finish_reason, "steps": job.steps,
                                      "batch_size": job.batch_size})


def iter_nowait(inbox: queue.Queue):
    while True:
        try:
            yield inbox.get_nowait()
        except queue.Empty:
            return


def create_app(model, tokenizer, speculator, model_id: str, max_batch: int = 16, max_tokens_limit: int | None = None,
               lookup: int = 0):
    """The Starlette app; the engine starts with it. `lookup` adds a prompt-lookup branch
    (decode.py) to the adaptive policy's shapes."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    engine = Worker(model, tokenizer, speculator, max_batch=max_batch, lookup=lookup)
    context = engine.engine.max_len  # KV slots a request may fill: prompt plus max_tokens
    limit = min(max_tokens_limit or context, context)
    eos = set(engine.eos)

    def error(e: BadRequest) -> JSONResponse:
        log.warning("%d %s", e.status, e.message)
        return JSONResponse({"error": {"message": e.message, "type": e.kind, "param": e.param, "code": None}},
                            status_code=e.status)

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

    def sampling(body: dict, max_key: str) -> tuple[int, float, float | None]:
        max_tokens = body.get(max_key, body.get("max_tokens", 16))
        temperature = body.get("temperature", 1.0)
        top_p = body.get("top_p", 1.0)
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise BadRequest(400, f"max_tokens must be a positive integer, got {max_tokens!r}", param="max_tokens")
        if max_tokens > limit:
            raise BadRequest(400, f"max_tokens {max_tokens} exceeds this server's limit of {limit}", param="max_tokens")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2:
            raise BadRequest(400, f"temperature must be between 0 and 2, got {temperature!r}", param="temperature")
        if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
            raise BadRequest(400, f"top_p must be in (0, 1], got {top_p!r}", param="top_p")
        for unsupported in ("stop", "logprobs", "tools", "logit_bias", "suffix"):
            if body.get(unsupported) not in (None, False, [], {}):
                raise BadRequest(400, f"{unsupported!r} is not supported by this server", param=unsupported)
        if body.get("n", 1) != 1:
            raise BadRequest(400, "only n = 1 is supported", param="n")
        return max_tokens, float(temperature), None if top_p == 1 else float(top_p)

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
            max_tokens, temperature, top_p = sampling(body, "max_completion_tokens" if chat else "max_tokens")
            prompt_ids = tokenize(body, chat)
            if len(prompt_ids) + max_tokens > context:
                raise BadRequest(400, f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({max_tokens}) exceeds "
                                      f"the model's context of {context}", param="max_tokens")
        except BadRequest as e:
            return error(e)
        job = Job(prompt_ids, max_tokens, temperature, top_p, asyncio.get_running_loop(), asyncio.Queue())
        engine.submit(job)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"

        def usage(info: dict) -> dict:
            steps = max(info["steps"], 1)
            return {"prompt_tokens": len(prompt_ids), "completion_tokens": len(job.tokens),
                    "total_tokens": len(prompt_ids) + len(job.tokens),
                    "tokens_per_step": round(len(job.tokens) / steps, 3), "steps": steps,
                    "batch_size": info["batch_size"]}

        def text_of(tokens: list[int]) -> str:
            return tokenizer.decode([t for t in tokens if t not in eos], skip_special_tokens=True)

        if not body.get("stream"):
            while True:
                event, payload = await job.events.get()
                if event == "error":
                    status, message = payload
                    return error(BadRequest(status, message, kind="server_error" if status >= 500 else
                                            "invalid_request_error"))
                if event == "done":
                    break
            text = text_of(job.tokens)
            choice = {"index": 0, "finish_reason": payload["finish_reason"]}
            choice |= {"message": {"role": "assistant", "content": text}} if chat else {"text": text, "logprobs": None}
            return JSONResponse({"id": rid, "object": kind, "created": created, "model": model_id,
                                 "choices": [choice], "usage": usage(payload)})

        def chunk(text: str | None, finish_reason: str | None = None, extra: dict | None = None, role: bool = False) -> str:
            if chat:
                delta = {"role": "assistant"} if role else {} if text is None else {"content": text}
                choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
            body = {"id": rid, "object": kind + (".chunk" if chat else ""), "created": created, "model": model_id,
                    "choices": [choice], **(extra or {})}
            return f"data: {json.dumps(body)}\n\n"

        async def stream():
            sent = ""
            try:
                if chat:
                    yield chunk(None, role=True)
                while True:
                    event, payload = await job.events.get()
                    if event == "error":
                        yield f"data: {json.dumps({'error': {'message': payload[1], 'type': 'server_error'}})}\n\n"
                        return
                    if event == "tokens":
                        text = text_of(job.tokens)
                        if not text.endswith("\ufffd"):  # hold back half a UTF-8 character
                            yield chunk(text[len(sent):])
                            sent = text
                        continue
                    text = text_of(job.tokens)
                    if text[len(sent):]:
                        yield chunk(text[len(sent):])
                    yield chunk(None, payload["finish_reason"], {"usage": usage(payload)})
                    yield "data: [DONE]\n\n"
                    return
            finally:
                if not job.finished:
                    job.cancelled = True
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

    app = Starlette(routes=[
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
          max_batch: int = 16, lookup: int = 0) -> None:
    import uvicorn

    if max_batch < 1:
        raise MLPSpecError(f"--max-batch must be at least 1, got {max_batch}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    app = create_app(model, tokenizer, speculator, model_id, max_batch=max_batch, lookup=lookup)
    uvicorn.run(app, host=host, port=port, log_level="info")
