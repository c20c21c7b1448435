"""The OpenAI-compatible HTTP API (FastAPI + sse-starlette) in front of an :class:`Engine`.

The engine runs in its own thread; each HTTP request submits to it and receives its events on an
asyncio queue (``call_soon_threadsafe``). A client that disconnects (stream closed, or a
non-streaming caller gone) cancels its request, which frees the cache slot at the next iteration.
Errors are OpenAI error bodies: 400 bad request, 401 missing/wrong bearer token, 413 body too
large, 429 queue full (with Retry-After). The model is the one the server was started with; a
request's ``model`` is only compared against its name, never loaded.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from sse_starlette.sse import EventSourceResponse

from aqlmkit.errors import AqlmkitError
from aqlmkit.runtime.chat_template import encode_chat
from aqlmkit.runtime.engine import Engine, Event, QueueFull
from aqlmkit.runtime.metrics import Metrics
from aqlmkit.runtime.protocol import ChatRequest, CompletionRequest, error_body


@dataclass
class ServerConfig:
    """Limits and identity of one server."""

    model_name: str
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    max_tokens_limit: int = 4096


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None,
                 kind: str = "invalid_request_error", param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.headers, self.kind = status, message, code, headers, kind
        self.param = param


class _Stream:
    """One submitted request, its events as they arrive, and the latency metrics they imply."""

    def __init__(self, engine: Engine, prompt: list[int], params, metrics: Metrics) -> None:
        self.engine, self.metrics = engine, metrics
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.t0, self.last = time.perf_counter(), None
        try:
            self.req = engine.submit(prompt, params, self._sink)
        except QueueFull as e:
            raise ApiError(429, str(e), "queue_full", {"Retry-After": "1"}, "rate_limit_error") from e  # ~a few steps
        except AqlmkitError as e:
            raise ApiError(400, str(e)) from e
        metrics.prompt_tokens.inc(len(self.req.prompt))

    def _sink(self, ev: Event) -> None:  # engine thread
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, ev)
        except RuntimeError:  # the event loop is gone (server shutting down)
            pass

    async def next(self, timeout: float | None = None) -> Event | None:
        try:
            ev = await asyncio.wait_for(self.queue.get(), timeout)
        except asyncio.TimeoutError:
            return None
        if ev.token_id >= 0:
            now = time.perf_counter()
            (self.metrics.ttft if self.last is None else self.metrics.tpot).observe(now - (self.last or self.t0))
            self.last = now
            self.metrics.generation_tokens.inc()
        return ev

    def cancel(self) -> None:
        if self.req.finish_reason is None:
            self.engine.cancel(self.req)


def _usage(ev: Event) -> dict:
    return {"prompt_tokens": ev.prompt_tokens, "completion_tokens": ev.completion_tokens,
            "total_tokens": ev.prompt_tokens + ev.completion_tokens}


class _Shape:
    """Reply objects of one endpoint: text completions or chat completions."""

    def __init__(self, chat: bool, model: str, token_ids: bool) -> None:
        self.chat, self.model, self.token_ids = chat, model, token_ids
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _head(self, stream: bool) -> dict:
        obj = ("chat.completion" if self.chat else "text_completion") + (".chunk" if stream and self.chat else "")
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def chunk(self, text: str, finish: str | None, ids: list[int], first: bool = False) -> dict:
        choice: dict = {"index": 0, "finish_reason": finish}
        if self.chat:
            choice["delta"] = ({"role": "assistant", "content": text} if first else {"content": text})
        else:
            choice.update(text=text, logprobs=None)
        if self.token_ids:
            choice["token_ids"] = ids
        return {**self._head(True), "choices": [choice]}

    def usage_chunk(self, ev: Event) -> dict:
        return {**self._head(True), "choices": [], "usage": _usage(ev)}

    def full(self, text: str, finish: str, ids: list[int], ev: Event) -> dict:
        choice: dict = {"index": 0, "finish_reason": finish}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice.update(text=text, logprobs=None)
        if self.token_ids:
            choice["token_ids"] = ids
        return {**self._head(False), "choices": [choice], "usage": _usage(ev)}


def build_app(engine: Engine, tokenizer, cfg: ServerConfig) -> FastAPI:
    """The FastAPI app; the caller starts/stops ``engine`` (see :func:`aqlmkit.runtime.serve`)."""
    if tokenizer is None:
        raise AqlmkitError("this model has no tokenizer, so it cannot be served; save one into the "
                           "checkpoint folder (tokenizer.save_pretrained(folder))")
    app = FastAPI(title="aqlmkit", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = app.state.metrics = Metrics(engine)
    app.state.engine = engine

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return JSONResponse(error_body(e.message, e.kind, e.code, e.param), status_code=e.status,
                            headers=e.headers)

    @app.middleware("http")
    async def _count(request: Request, call_next):
        response = await call_next(request)
        metrics.requests.labels(request.url.path, str(response.status_code)).inc()
        return response

    @app.get("/health")
    async def health():
        return {"status": "ok", "running": engine.running, "waiting": engine.queue_depth}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request):
        _auth(request, cfg)
        return {"object": "list", "data": [{"id": cfg.model_name, "object": "model", "created": 0,
                                            "owned_by": "aqlmkit", "max_model_len": engine.context}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _parse(request, cfg, CompletionRequest)
        prompt = body.prompt if isinstance(body.prompt, list) else _tokenize(tokenizer, body.prompt)
        return await _generate(request, engine, metrics, cfg, body, prompt, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await _parse(request, cfg, ChatRequest)
        messages = [{"role": m.role, "content": m.text()} for m in _checked(body).messages]
        try:
            prompt = encode_chat(tokenizer, messages)
        except AqlmkitError as e:
            raise ApiError(400, str(e)) from e
        return await _generate(request, engine, metrics, cfg, body, prompt, chat=True)

    return app


def _checked(body):
    try:
        body.check_unsupported()
    except AqlmkitError as e:
        raise ApiError(400, str(e)) from e
    return body


def _tokenize(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text)["input_ids"])


def _auth(request: Request, cfg: ServerConfig) -> None:
    if cfg.api_key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), cfg.api_key.encode()):
        raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                       "invalid_api_key", {"WWW-Authenticate": "Bearer"})


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) past ``limit`` bytes without reading more than that."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body over {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body over {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _parse(request: Request, cfg: ServerConfig, model: type[BaseModel]):
    _auth(request, cfg)
    raw = await _read_body(request, cfg.max_body_bytes)
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        body = model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise ApiError(400, f"{where}: {err['msg']}", param=where) from e
    if body.model != cfg.model_name:
        raise ApiError(400, f"model {body.model!r} is not served here; this server serves "
                            f"{cfg.model_name!r}", "model_not_found")
    return _checked(body)


def _max_tokens(body, prompt_len: int, engine: Engine, cfg: ServerConfig, chat: bool) -> int:
    asked = getattr(body, "max_completion_tokens", None)
    asked = body.max_tokens if asked is None else asked
    if asked is None:  # OpenAI's defaults: 16 for completions, the rest of the context for chat
        room = engine.context - prompt_len
        return max(1, min(16 if not chat else room, room, cfg.max_tokens_limit))
    if asked < 1:
        raise ApiError(400, f"max_tokens must be at least 1 (got {asked})", param="max_tokens")
    if asked > cfg.max_tokens_limit:
        raise ApiError(400, f"max_tokens {asked} is over this server's limit of {cfg.max_tokens_limit}",
                       param="max_tokens")
    return asked


async def _generate(request: Request, engine: Engine, metrics: Metrics, cfg: ServerConfig, body, prompt,
                    chat: bool):
    try:
        params = body.sampling(_max_tokens(body, len(prompt), engine, cfg, chat))
    except AqlmkitError as e:
        raise ApiError(400, str(e)) from e
    stream = _Stream(engine, prompt, params, metrics)
    shape = _Shape(chat, cfg.model_name, body.return_token_ids)
    if body.stream:
        return EventSourceResponse(_sse(stream, shape, body.include_usage), ping=15)
    return await _collect(request, stream, shape)


async def _sse(stream: _Stream, shape: _Shape, include_usage: bool):
    """SSE data events: one chunk per token that releases text (and the last), then [DONE]."""
    first = True
    try:
        while True:
            ev = await stream.next()
            if ev.text or ev.finish_reason or shape.token_ids or first:
                ids = [ev.token_id] if ev.token_id >= 0 else []
                yield json.dumps(shape.chunk(ev.text, ev.finish_reason, ids, first))
                first = False
            if ev.finish_reason == "error":
                yield json.dumps(error_body("generation failed on the server", "server_error"))
                break
            if ev.finish_reason:
                break
        if include_usage:
            yield json.dumps(shape.usage_chunk(ev))
        yield "[DONE]"
    finally:
        stream.cancel()  # client gone before the end: free the slot


async def _collect(request: Request, stream: _Stream, shape: _Shape):
    """A non-streaming reply; the request is cancelled if the client disconnects while waiting."""
    text, ids = [], []
    try:
        while True:
            ev = await stream.next(timeout=0.5)
            if ev is None:
                if await request.is_disconnected():
                    return Response(status_code=499)
                continue
            if ev.finish_reason == "error":
                raise ApiError(500, "generation failed on the server", kind="server_error")
            text.append(ev.text)
            if ev.token_id >= 0:
                ids.append(ev.token_id)
            if ev.finish_reason:
                return shape.full("".join(text), ev.finish_reason, ids, ev)
    finally:
        stream.cancel()
