"""`psannlm serve`: an OpenAI-compatible HTTP API (and a web chat page) over one checkpoint.

FastAPI + uvicorn: the stack the Python serving tools use (vLLM, LitGPT), with asyncio streaming
for server-sent events and request validation through pydantic. Routes: GET /health, GET
/v1/models, POST /v1/completions, POST /v1/chat/completions (the checkpoint's chat template),
`stream: true` as server-sent events ending in `data: [DONE]`, and the chat page at /. Errors are
OpenAI's JSON shape, {"error": {"message", "type", "param", "code"}}, with its status codes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from importlib import resources
from typing import Literal

try:
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field, ValidationError
    from starlette.exceptions import HTTPException
except ImportError as exc:  # an optional extra
    raise ImportError("psannlm serve needs the 'serve' extra: pip install 'psann-lm[serve]'") from exc

from ..errors import PsannError
from ..tokenizers.chat import encode_conversation
from .engine import Engine, Job, QueueFull

log = logging.getLogger("psann.lm")


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.kind, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: dict | None = None
    user: str | None = None  # an end-user id for the operator's logs; it changes nothing
    frequency_penalty: float = Field(0.0, ge=0.0, le=0.0)  # accepted at 0 only: no penalties here
    presence_penalty: float = Field(0.0, ge=0.0, le=0.0)


class CompletionRequest(_Request):
    prompt: str | list[str]
    max_tokens: int | None = 16  # OpenAI's default for completions


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str | list[dict]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        if any(part.get("type") != "text" for part in self.content):
            raise ApiError(400, "only text content parts are supported", param="messages")
        return "".join(str(part.get("text", "")) for part in self.content)


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = None


def _validation_error(exc: ValidationError) -> ApiError:
    first = exc.errors()[0]
    param = ".".join(str(p) for p in first.get("loc", ()))
    if first.get("type") == "extra_forbidden":
        return ApiError(400, f"unsupported parameter '{param}'", param=param, code="unsupported_parameter")
    return ApiError(400, f"{param}: {first.get('msg')}", param=param)


class Server:
    """The routes' state: the loaded model, its engine and the names it answers to."""

    def __init__(self, lm, *, model_name: str, api_key: str | None = None, slots: int = 8, max_queue: int = 64):
        self.lm, self.model_name, self.api_key = lm, model_name, api_key
        self.slots, self.max_queue = slots, max_queue
        self.created = int(time.time())
        self.engine: Engine | None = None

    def check_key(self, request: Request, query: bool = False) -> None:
        """The API key from `Authorization: Bearer KEY`, or (the page: a browser sends no header on
        a link) from `?api_key=KEY` when `query`."""
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if query and not given and "api_key" in request.query_params:
            given = f"Bearer {request.query_params['api_key']}"
        if not secrets.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
            raise ApiError(401, "invalid or missing API key (send Authorization: Bearer KEY)",
                           kind="authentication_error", code="invalid_api_key")

    async def parse(self, request: Request, schema: type[_Request]) -> _Request:
        self.check_key(request)
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        try:
            parsed = schema.model_validate(body)
        except ValidationError as exc:
            raise _validation_error(exc) from None
        if parsed.model != self.model_name:
            raise ApiError(404, f"the model '{parsed.model}' does not exist; this server has '{self.model_name}'",
                           param="model", code="model_not_found")
        return parsed

    # -- requests to jobs ----------------------------------------------------------------------
    def settings(self, req: _Request, max_tokens: int | None, prompt_tokens: int):
        context = self.lm.model_config.max_seq_len
        if prompt_tokens >= context:
            raise ApiError(400, f"the prompt is {prompt_tokens} tokens; this model's context is {context} tokens and "
                           "the prompt must leave room for the completion", param="messages" if isinstance(
                               req, ChatRequest) else "prompt", code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = context - prompt_tokens
        if max_tokens <= 0:
            raise ApiError(400, f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
        if prompt_tokens + max_tokens > context:
            raise ApiError(400, f"this model's context is {context} tokens; you asked for {prompt_tokens + max_tokens} "
                           f"({prompt_tokens} in the prompt, {max_tokens} to generate); lower max_tokens",
                           param="max_tokens", code="context_length_exceeded")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > 4 or any(not s for s in stop):
            raise ApiError(400, "stop takes up to 4 non-empty strings", param="stop")
        options = {"max_new_tokens": max_tokens, "stop": stop}
        options.update({k: v for k, v in (("temperature", req.temperature), ("top_p", req.top_p), ("seed", req.seed))
                        if v is not None})
        try:
            return self.lm.generation_settings(**options)
        except PsannError as exc:
            raise ApiError(400, str(exc)) from None

    def start(self, prompt: list[int], gen, n: int, stop_ids, loop, queue: asyncio.Queue) -> list[Job]:
        """n jobs for one prompt (seeded ones get seed, seed + 1, ...), reporting to `queue`."""
        jobs = []
        for index in range(n):
            def on_text(text, i=index):
                loop.call_soon_threadsafe(queue.put_nowait, (i, "text", text, None, None))

            def on_done(text, reason, tokens, i=index):
                loop.call_soon_threadsafe(queue.put_nowait, (i, "done", text, reason, tokens))

            seeded = gen if gen.seed is None else type(gen)(**{**gen.to_dict(), "seed": gen.seed + index})
            jobs.append(Job(list(prompt), seeded, frozenset(stop_ids), on_text, on_done))
        try:
            for job in jobs:
                self.engine.submit(job)
        except QueueFull as exc:
            for job in jobs:
                job.cancelled.set()
            status = 503 if "shutting down" in str(exc) else 429
            raise ApiError(status, f"the server is busy: {exc}; retry later", kind="rate_limit_error" if status == 429
                           else "server_error", code="queue_full" if status == 429 else "unavailable") from None
        return jobs


def _hold_back(text: str, stops: list[str]) -> int:
    """How much of the end of `text` to keep back from a stream: a partial UTF-8 character, or a
    tail that may grow into a stop string (the final text is cut there)."""
    keep = 1 if text.endswith("\ufffd") else 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:size]):
                keep = max(keep, size)
                break
    return keep


def create_app(lm, *, model_name: str, api_key: str | None = None, slots: int = 8, max_queue: int = 64) -> FastAPI:
    state = Server(lm, model_name=model_name, api_key=api_key, slots=slots, max_queue=max_queue)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        state.engine = Engine(lm.model, lm.tokenizer, lm.model_config, slots=slots, max_queue=max_queue)
        log.info("serve: %s (%s), %s", model_name, lm.model_config.base,
                 f"continuous batching over {slots} slots" if state.engine.batched else "one request at a time")
        yield
        state.engine.close()

    app = FastAPI(title="psann-lm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state

    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        return exc.response()

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        return ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                        kind="invalid_request_error").response()

    @app.get("/health")
    async def health(request: Request):
        state.check_key(request)
        return {"status": "ok", "model": model_name, "requests": state.engine.busy,
                "batching": "continuous" if state.engine.batched else "sequential", "slots": slots}

    @app.get("/v1/models")
    async def models(request: Request):
        state.check_key(request)
        return {"object": "list", "data": [_model_card(state)]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request):
        state.check_key(request)
        if name != model_name:
            raise ApiError(404, f"the model '{name}' does not exist", param="model", code="model_not_found")
        return _model_card(state)

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await state.parse(request, CompletionRequest)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not prompts:
            raise ApiError(400, "prompt is empty", param="prompt")
        tok = lm.tokenizer
        encoded = [tok.encode(p, add_bos=True) for p in prompts]  # as psannLM.generate encodes a prompt
        gens = [state.settings(req, req.max_tokens, len(ids)) for ids in encoded]
        return await _respond(request, state, req, encoded, gens, frozenset(), "text_completion", "cmpl")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = await state.parse(request, ChatRequest)
        tok = lm.tokenizer
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            ids, _ = encode_conversation(tok, messages, add_generation_prompt=True)
        except PsannError as exc:
            raise ApiError(400, str(exc), param="messages") from None
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        gen = state.settings(req, max_tokens, len(ids))
        return await _respond(request, state, req, [ids], [gen], tok.chat_stop_ids, "chat.completion", "chatcmpl")

    @app.get("/", response_class=HTMLResponse)
    async def page(request: Request):
        state.check_key(request, query=True)
        return resources.files(__package__).joinpath("chat.html").read_text(encoding="utf-8")

    return app


def _model_card(state: Server) -> dict:
    return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "psann-lm",
            "max_model_len": state.lm.model_config.max_seq_len}


async def _respond(request: Request, state: Server, req: _Request, encoded: list[list[int]], gens: list, stop_ids,
                   kind: str, prefix: str):
    """Run n jobs per prompt; a JSON response, or a stream of server-sent events."""
    loop, queue = asyncio.get_running_loop(), asyncio.Queue()
    jobs: list[Job] = []
    try:
        for ids, gen in zip(encoded, gens):
            jobs += state.start(ids, gen, req.n, stop_ids, loop, queue)
    except ApiError:
        for job in jobs:
            job.cancelled.set()
        raise
    # choice i runs job i: prompt i // n, sample i % n (OpenAI's order for a list of prompts)
    meta = {"id": f"{prefix}-{secrets.token_hex(12)}", "created": int(time.time()), "model": state.model_name}
    usage = {"prompt_tokens": sum(len(ids) for ids in encoded) * req.n}
    stops = [list(g.stop) for g in gens for _ in range(req.n)]
    chat = kind == "chat.completion"
    if req.stream:
        include_usage = bool((req.stream_options or {}).get("include_usage"))
        return StreamingResponse(_stream(request, jobs, queue, meta, usage, stops, chat, include_usage),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    results = [None] * len(jobs)
    try:
        while any(r is None for r in results):
            try:
                index, event, text, reason, tokens = await asyncio.wait_for(queue.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    raise asyncio.CancelledError from None
                continue
            if event == "done":
                results[index] = (text, reason, tokens)
    finally:
        for job in jobs:
            job.cancelled.set()  # a no-op for finished jobs; frees the slots of a dropped client
    failed = next((r for r in results if r[1].startswith("error")), None)
    if failed:
        raise ApiError(500, f"generation failed ({failed[1][7:]})", kind="server_error")
    choices = []
    for i, (text, reason, _) in enumerate(results):
        body = {"message": {"role": "assistant", "content": text}} if chat else {"text": text, "logprobs": None}
        choices.append({"index": i, **body, "finish_reason": reason})
    completion = sum(r[2] for r in results)
    return {**meta, "object": kind, "choices": choices,
            "usage": {**usage, "completion_tokens": completion, "total_tokens": usage["prompt_tokens"] + completion}}


async def _stream(request, jobs: list[Job], queue: asyncio.Queue, meta: dict, usage: dict, stops: list[list[str]],
                  chat: bool, include_usage: bool):
    kind = "chat.completion.chunk" if chat else "text_completion"
    sent, done, completion = [""] * len(jobs), 0, 0

    def event(choices: list[dict], **extra) -> str:
        return f"data: {json.dumps({**meta, 'object': kind, 'choices': choices, **extra})}\n\n"

    def choice(i: int, text: str, reason: str | None) -> dict:
        if chat:
            return {"index": i, "delta": {"content": text} if text or reason is None else {}, "finish_reason": reason}
        return {"index": i, "text": text, "logprobs": None, "finish_reason": reason}

    try:
        if chat:
            yield event([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                         for i in range(len(jobs))])
        while done < len(jobs):
            index, what, text, reason, tokens = await queue.get()
            if what == "text":
                ready = text[:len(text) - _hold_back(text, stops[index])]
                if len(ready) > len(sent[index]) and ready.startswith(sent[index]):
                    yield event([choice(index, ready[len(sent[index]):], None)])
                    sent[index] = ready
                continue
            done += 1
            completion += tokens
            if reason.startswith("error"):
                yield f"data: {json.dumps({'error': {'message': f'generation failed ({reason[7:]})', 'type': 'server_error', 'param': None, 'code': None}})}\n\n"
                continue
            rest = text[len(sent[index]):] if text.startswith(sent[index]) else ""
            yield event([choice(index, rest, reason)])
        if include_usage:
            yield event([], usage={**usage, "completion_tokens": completion,
                                   "total_tokens": usage["prompt_tokens"] + completion})
        yield "data: [DONE]\n\n"
    finally:  # the client left (the generator is closed) or the stream ended: free the slots
        for job in jobs:
            job.cancelled.set()
