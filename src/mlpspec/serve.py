"""An OpenAI-compatible HTTP server over the batched speculative decoder.

Requests queue up. One worker thread owns the model: each round it takes the waiting
requests that share sampling settings (up to `max_batch`), left-pads them into one batch
and decodes them together, with adaptive speculation whose step costs are calibrated per
batch size, so the live batch size sets how much it speculates. Tokens stream back to each
request as its row emits them; a request that asked for fewer tokens than the longest in
its batch gets exactly its own. Starlette and uvicorn do the HTTP.

Endpoints: POST /v1/completions, POST /v1/chat/completions (both with "stream"),
GET /v1/models, GET /health. Each response's `usage` carries the request's own
`tokens_per_step` and `steps`.
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

import torch

from .adaptive import AdaptivePolicy, shape_menu
from .decode import speculative_generate
from .errors import MLPSpecError
from .text import encode_prompt, is_message_list, left_pad

log = logging.getLogger("mlpspec.serve")


class BadRequest(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


@dataclass
class Job:
    """One request's row in some batch, and the channel its tokens go back through."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float | None
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    tokens: list[int] = field(default_factory=list)
    steps: int = 0  # steps of its batch while this row was still producing
    finished: bool = False
    cancelled: bool = False  # the client went away: stop sending

    @property
    def sampling(self) -> tuple:
        return (self.temperature, self.top_p)

    def send(self, kind: str, payload) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))


class Engine:
    """The worker thread and its queue."""

    def __init__(self, model, tokenizer, speculator, max_batch: int = 16, lookup: int = 0):
        self.model, self.tokenizer, self.speculator = model, tokenizer, speculator
        self.max_batch = max_batch
        speculates = speculator is not None or lookup > 0
        config = speculator.config if speculator is not None else None
        self.policy = AdaptivePolicy(shape_menu(config, lookup=lookup)) if speculates else False
        eos = model.generation_config.eos_token_id
        self.eos = [eos] if isinstance(eos, int) else list(eos or [])
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (self.eos or [0])[0]
        self.waiting: queue.Queue[Job] = queue.Queue()
        self.batches = 0
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, name="mlpspec-engine", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        self.waiting.put(job)

    def _next_batch(self) -> list[Job]:
        first = self.waiting.get()
        batch, others = [first], []
        while len(batch) < self.max_batch:
            try:
                job = self.waiting.get_nowait()
            except queue.Empty:
                break
            (batch if job.sampling == first.sampling else others).append(job)
        for job in others:  # a later round takes them, in their order
            self.waiting.put(job)
        return [job for job in batch if not job.cancelled]

    def _warm_up(self) -> None:
        """Calibrate the adaptive policy at every batch-size bucket up to max_batch before
        the first request, so no request pays for it."""
        sample = self.tokenizer("def add(a, b):\n    return a + b\n\n\ndef mul(a, b):\n").input_ids
        b = 1
        while self.policy and b <= AdaptivePolicy.bucket(self.max_batch):
            ids = torch.tensor([sample] * b)
            speculative_generate(self.model, self.speculator, ids, torch.ones_like(ids), max_new_tokens=4,
                                 eos_token_id=[], adaptive=self.policy)
            b *= 2
        self.ready.set()

    def _run(self) -> None:
        self._warm_up()
        while True:
            batch = self._next_batch()
            if not batch:
                continue
            try:
                self._decode(batch)
            except Exception as e:  # the worker must outlive any one batch; the error goes to its requests
                log.exception("batch of %d failed", len(batch))
                for job in batch:
                    job.send("error", f"generation failed: {e}")

    def _decode(self, batch: list[Job]) -> None:
        ids, mask = left_pad([job.prompt_ids for job in batch], self.pad)

        def on_step(emitted: torch.Tensor) -> None:
            for job, row in zip(batch, emitted.tolist()):
                if job.finished:
                    continue
                new = [t for t in row if t >= 0][: job.max_tokens - len(job.tokens)]
                job.steps += 1
                job.tokens += new
                job.finished = len(job.tokens) >= job.max_tokens or any(t in self.eos for t in new)
                if new and not job.cancelled:
                    job.send("tokens", new)

        temperature, top_p = batch[0].sampling
        speculative_generate(
            self.model, self.speculator, ids, mask, max_new_tokens=max(job.max_tokens for job in batch),
            temperature=temperature, top_p=top_p, eos_token_id=self.eos, on_step=on_step, adaptive=self.policy,
        )
        self.batches += 1
        for job in batch:
            stopped = any(t in self.eos for t in job.tokens)
            job.send("done", {"finish_reason": "stop" if stopped else "length", "steps": job.steps,
                              "batch_size": len(batch)})


def create_app(model, tokenizer, speculator, model_id: str, max_batch: int = 16, max_tokens_limit: int | None = None,
               lookup: int = 0):
    """The Starlette app; the engine starts with it. `lookup` adds a prompt-lookup branch
    (decode.py) to the adaptive policy's shapes."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    engine = Engine(model, tokenizer, speculator, max_batch=max_batch, lookup=lookup)
    context = getattr(model.config.get_text_config(), "max_position_embeddings", None) or 10**9
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
                    return error(BadRequest(500, payload, kind="server_error"))
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
                        yield f"data: {json.dumps({'error': {'message': payload, 'type': 'server_error'}})}\n\n"
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
            return JSONResponse({"status": "engine stopped", "batches": engine.batches}, status_code=503)
        status = "ok" if engine.ready.is_set() else "warming up"
        return JSONResponse({"status": status, "batches": engine.batches})

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
